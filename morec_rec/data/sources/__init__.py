"""Source readers: each turns raw files into :class:`~morec_rec.data.raw.RawData`.

A reader is ``read(input, meta, config) -> RawData``; ``SOURCES`` maps the names accepted
by ``morec-rec prepare --source`` to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from morec_rec.config import SourceConfig
from morec_rec.data.raw import RawData
from morec_rec.data.sources import amazon, generic, morec_meta, tafeng
from morec_rec.errors import MorecError

Reader = Callable[[Path, "Path | None", SourceConfig], RawData]

SOURCES: dict[str, Reader] = {
    "generic": generic.read,
    "amazon": amazon.read,
    "tafeng": tafeng.read,
    "morec": morec_meta.read,
}


def read_source(name: str, input: Path, meta: Path | None, config: SourceConfig) -> RawData:
    """Reads ``input`` (and ``meta``) with the reader called ``name``."""
    if name not in SOURCES:
        raise MorecError(f"unknown source {name!r} (expected one of {', '.join(SOURCES)})")
    return SOURCES[name](Path(input), None if meta is None else Path(meta), config)
