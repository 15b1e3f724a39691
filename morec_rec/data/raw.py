"""What every source reader returns: raw interactions and a raw item catalogue.

Readers only parse and normalise types; every filter and derived column belongs to
:mod:`morec_rec.data.prepare`, so that all sources go through one mechanism.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa

#: Interactions: one row per event. ``rating`` may be entirely null (implicit feedback).
INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user", pa.string(), nullable=False),
        pa.field("item", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # seconds since the epoch
        pa.field("rating", pa.float64()),
    ]
)

#: Item catalogue: one row per item. A null price or category is "missing", handled by
#: the preparation's missing-value policy; a price of zero is a valid (free) item.
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item", pa.string(), nullable=False),
        pa.field("price", pa.float64()),
        pa.field("category", pa.string()),
    ]
)


@dataclasses.dataclass
class RawData:
    """A source's output.

    Attributes:
        interactions: table with :data:`INTERACTIONS_SCHEMA`.
        items: table with :data:`ITEMS_SCHEMA`, at most one row per item. Items of
            ``interactions`` absent from it count as having no price and no category.
        source: JSON-serialisable description of what was read (reader name, files with
            size and sha256, reader parameters, rows the reader dropped and why).
    """

    interactions: pa.Table
    items: pa.Table
    source: dict[str, Any]

    def __post_init__(self) -> None:
        self.interactions = self.interactions.select(INTERACTIONS_SCHEMA.names).cast(
            INTERACTIONS_SCHEMA
        )
        self.items = self.items.select(ITEMS_SCHEMA.names).cast(ITEMS_SCHEMA)
