"""A run directory: its record (config, data, versions), its log, and its checkpoints.

    RUN/run.json            what was run: config, dataset (path and fingerprint),
                            versions, world size
    RUN/log.jsonl           one JSON object per line: "step" and "eval" records (an
                            eval's "seconds": its pass's wall time, "users": the
                            validation users it measured), and "epoch"
                            (pretraining) or "update" and "targets" (continued)
    RUN/checkpoints/last    the latest checkpoint, every ``checkpoint_every`` steps and at
                            each epoch's end (resume continues from it)
    RUN/checkpoints/best    the selected validation pass: the best Hit@10 of a
                            pretraining, the valid pass of highest Imp of continued training
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.version import __version__

RECORD = "run.json"
#: The keys every run's record holds (a continued run's holds more).
RECORD_KEYS = ("config", "data")


@dataclasses.dataclass(frozen=True)
class Run:
    root: Path

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best"

    @property
    def record(self) -> dict[str, Any]:
        """What was run (``run.json``): a JSON object holding :data:`RECORD_KEYS`, its
        ``config`` an object; else MorecError naming the file."""
        record = read_record(self.root / RECORD, RECORD_KEYS)
        if not isinstance(record["config"], dict):
            raise MorecError(f"{self.root / RECORD}: config = {record['config']!r} is not a "
                             "JSON object")
        return record

    @classmethod
    def create(cls, root: Path, record: Mapping[str, Any]) -> "Run":
        """A new run at ``root`` (absent, empty, or holding only what a kill in an earlier
        ``create`` left: see :func:`leftover`); rank 0 writes its record."""
        root = Path(root)
        if (root / RECORD).exists():
            raise MorecError(f"{root}: a run exists here; pass --resume to continue it")
        if root.exists() and not all(leftover(path) for path in root.iterdir()):
            raise MorecError(f"{root}: output exists and is not an empty directory")
        dist.barrier()  # every rank has checked before rank 0 writes
        if dist.get_rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            for path in root.glob("*.partial"):
                path.unlink()  # leftovers (checked above)
            partial = root / (RECORD + ".partial")
            partial.write_text(json.dumps({**record, "versions": versions()}, indent=2) + "\n")
            partial.rename(root / RECORD)  # first: a run.json makes the directory a run
            (root / "checkpoints").mkdir(exist_ok=True)
        dist.barrier()
        return cls(root)

    def resume(self, world_size: int, fields: Mapping[str, Any]) -> None:
        """Continues this run on ``world_size`` ranks: completes the checkpoint saves that
        a kill interrupted, and rewrites ``fields`` of its record (a resume's longer
        training). Rank 0 writes, atomically; every rank waits.

        Raises MorecError if the run started on another world size: its batches, and the
        steps at which its epochs start, depend on it.
        """
        from morec_rec.jobs import checkpoint

        record = self.record
        if record.get("world_size") != world_size:
            raise MorecError(f"{self.root}: started on {record.get('world_size')} rank(s), not "
                             f"{world_size}: a resume needs the world size the run started with")
        if dist.get_rank() == 0:
            checkpoint.recover(self.last)
            checkpoint.recover(self.best)
            partial = self.root / (RECORD + ".partial")
            partial.write_text(json.dumps({**record, **fields}, indent=2) + "\n")
            partial.rename(self.root / RECORD)
        dist.barrier()

    @classmethod
    def open(cls, root: Path) -> "Run":
        root = Path(root)
        if not (root / RECORD).is_file():
            raise MorecError(f"{root}: not a run directory (no {RECORD})")
        return cls(root)

    def truncate_log(self, step: int | None) -> None:
        """Drops the log's records of steps after ``step`` (all of them for None), so that
        a resumed run logs those steps once (rank 0 rewrites the log; others wait). A last
        line cut short by a kill goes too; another line that is no JSON object is a
        MorecError naming file and line (on every rank)."""
        path = self.root / "log.jsonl"
        kept = None if not path.exists() else [] if step is None else [
            line for line, record in _log_lines(path, torn=True)
            if record.get("step", 0) <= step]
        dist.barrier()  # every rank has read the log before rank 0 rewrites it
        if dist.get_rank() == 0 and kept is not None:
            partial = self.root / "log.jsonl.partial"
            partial.write_text("".join(kept))
            partial.rename(path)
        dist.barrier()

    def log(self, record: Mapping[str, Any]) -> None:
        """Appends one record to ``log.jsonl`` (rank 0 only; other ranks do nothing)."""
        if dist.get_rank() == 0:
            with open(self.root / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def data_fields(dataset: PreparedDataset) -> dict[str, str]:
    """What a record says of the data it trained on: its directory and its fingerprint."""
    return {"data": str(dataset.root.resolve()), "data_fingerprint": dataset.fingerprint}


def recorded_data(record: Mapping[str, Any], where: Path) -> PreparedDataset:
    """The dataset that the record ``where`` (``record``, read) names, checked by
    :func:`check_same_data`."""
    dataset = PreparedDataset.open(record["data"])
    check_same_data(record, dataset, where)
    return dataset


def check_same_data(record: Mapping[str, Any], dataset: PreparedDataset, where: Path) -> None:
    """MorecError if ``dataset`` is not the data that the record ``where`` was made on,
    by the fingerprint it holds (records written before fingerprints hold none)."""
    recorded = record.get("data_fingerprint")
    if recorded is not None and recorded != dataset.fingerprint:
        raise MorecError(f"{dataset.root}: prepared again since {where} was written (its "
                         "manifest differs from the one recorded there): resume or evaluate "
                         "on the data it was made with, or start anew")


@contextlib.contextmanager
def hold(root: Path) -> Iterator[None]:
    """Keeps other morec-rec processes from writing to the directory ``root`` while the
    body runs: rank 0 holds an exclusive ``flock`` on it, which the kernel drops when the
    process ends, however it ends (other ranks take nothing).

    Raises:
        MorecError: another process holds it (a run still going, or the ranks of a
            killed ``torchrun`` that have not ended yet).
    """
    if dist.is_initialized() and dist.get_rank() != 0:
        yield
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MorecError(f"{root}: another morec-rec process is writing here (a run "
                             "still going, or the ranks of a killed torchrun not ended yet); "
                             "wait for it to end") from None
        except OSError as error:  # a file system without locks: nothing to hold
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        yield
    finally:
        os.close(fd)


def versions() -> dict[str, str]:
    import torchrec

    return {
        "morec_rec": __version__, "python": platform.python_version(),
        "torch": torch.__version__, "torchrec": torchrec.__version__,
        "numpy": np.__version__, "pyarrow": pa.__version__,
    }


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``, in file order; blank lines are skipped.

    Raises:
        MorecError: the file is missing, or a line is not a JSON object (names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise MorecError(f"{path}: no such log file")
    return [record for _, record in _log_lines(path)]


def _log_lines(path: Path, torn: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each non-blank line of the log ``path`` (ending in a newline) with its record;
    MorecError naming file and line for one that is not a JSON object. With ``torn``, a
    last line without its newline that is not JSON (a write cut short) is skipped."""
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if torn and not line.endswith("\n"):
                    return
                raise MorecError(f"{path}, line {number}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise MorecError(f"{path}, line {number}: not a JSON object")
            yield line if line.endswith("\n") else line + "\n", record


def read_record(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    """The JSON object in the record ``path`` (``run.json``, ``job.json``); MorecError
    naming the file unless it is one holding ``keys``."""
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise MorecError(f"{path}: not JSON ({error.msg}; damaged or cut short?)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MorecError(f"{path}: cannot be read ({error})") from None
    if not isinstance(record, dict):
        raise MorecError(f"{path}: not a JSON object")
    missing = [key for key in keys if key not in record]
    if missing:
        raise MorecError(f"{path}: no {', '.join(repr(key) for key in missing)} (damaged or "
                         "edited?)")
    return record


def leftover(path: Path) -> bool:
    """Whether ``path``, in a run's or a job's directory, is all that a kill while it was
    being created can have left: an empty ``checkpoints/`` or a ``*.partial`` file."""
    if path.name == "checkpoints" and path.is_dir() and not path.is_symlink():
        return not any(path.iterdir())
    return path.name.endswith(".partial") and path.is_file() and not path.is_symlink()
