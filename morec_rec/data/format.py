"""The prepared-dataset format: file layout, Arrow schemas, and opening a dataset.

A prepared dataset is a directory::

    manifest.json        counts, groups, Q, price statistics, shards, parameters, source
    items.parquet        one row per item id 0..num_items-1, in id order
    users.parquet        one row per user id 0..num_users-1: the original id
    train/part-NNNNN.parquet   training rows in a seeded random order
    valid.parquet        one row per user (second-last interaction), in user order
    test.parquet         one row per user (last interaction), in user order

``manifest.json`` is written last: a directory without it is not a dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from morec_rec.errors import MorecError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS = "items.parquet"
USERS = "users.parquet"
TRAIN_DIR = "train"
SPLITS = ("train", "valid", "test")

#: One interaction. ``history`` holds the user's earlier items (earlier in the split order:
#: train rows see earlier train rows, valid sees all train rows, test sees train and valid),
#: most recent last, at most ``history_length`` of them.
ROW_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int32(), nullable=False),
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # seconds since the epoch
        pa.field("price", pa.float64(), nullable=False),  # the item's price, >= 0
        pa.field("fairness_group", pa.int16(), nullable=False),
        pa.field("popularity_group", pa.int16(), nullable=False),
        pa.field("history", pa.list_(pa.field("item", pa.int32(), nullable=False)), nullable=False),
    ]
)

#: Row columns that hold the row's item's value of the same column of ``items.parquet``:
#: a reader may look them up by ``item_id`` there instead of decoding them row by row.
ITEM_ATTRIBUTES = ("price", "fairness_group", "popularity_group")

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("original_id", pa.string(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("category", pa.string(), nullable=False),  # before folding into groups
        pa.field("fairness_group", pa.int16(), nullable=False),
        pa.field("popularity_group", pa.int16(), nullable=False),
        pa.field("train_count", pa.int64(), nullable=False),
    ]
)

USER_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int32(), nullable=False),
        pa.field("original_id", pa.string(), nullable=False),
    ]
)


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """An opened prepared dataset: its directory and parsed manifest."""

    root: Path
    manifest: dict[str, Any]

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the manifest (canonical JSON) but for the versions that wrote it: it
        holds the source files' sha256, the preparation's settings and every count, so
        data prepared again from other input or with other settings has another."""
        content = {key: value for key, value in self.manifest.items() if key != "created_by"}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @classmethod
    def open(cls, root: Path | str) -> "PreparedDataset":
        """Opens ``root``; raises :class:`MorecError` unless it is a complete dataset whose
        manifest's counts match its files' and whose rows' ids are ids of its users and
        items (both read from the Parquet footers where they hold statistics)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise MorecError(f"{root}: not a prepared dataset (no {MANIFEST})")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MorecError(f"{path}: not valid JSON ({e})") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise MorecError(
                f"{path}: format_version {version!r}, this package reads {FORMAT_VERSION}"
            )
        for key in ("num_users", "num_items", "history_length"):
            _require_count(manifest, key, path)
        shards = manifest.get("shards")
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("path"), str) for s in shards
        ):
            raise MorecError(f"{path}: field 'shards' is not a list of {{path, rows}}")
        dataset = cls(root, manifest)
        for file in dataset.files():
            if not file.is_file():
                raise MorecError(f"{root}: not a prepared dataset ({file.name} is missing)")
        dataset._check_files()
        return dataset

    def _check_files(self) -> None:
        """Checks the manifest's counts against the Parquet footers (a truncated file has
        none): the items, the users, a valid and a test row per user, each shard's rows;
        then the ids of the rows' ``user_id``, ``item_id`` and ``history`` against the
        manifest's ``num_users`` and ``num_items``."""
        path = self.root / MANIFEST
        users, items = self.manifest["num_users"], self.manifest["num_items"]
        expected = [(self.root / ITEMS, "num_items", items),
                    (self.root / USERS, "num_users", users),
                    (self.root / "valid.parquet", "num_users", users),
                    (self.root / "test.parquet", "num_users", users)]
        for index, shard in enumerate(self.manifest["shards"]):
            field = f"shards[{index}].rows"
            expected.append((self.root / shard["path"], field,
                             _require_count(shard, "rows", path, field)))
        for file, field, count in expected:
            metadata = parquet_metadata(file)
            if metadata.num_rows != count:
                raise MorecError(f"{path}: {field} = {count} does not match {file} "
                                 f"({metadata.num_rows} rows)")
            if file.name not in (ITEMS, USERS):
                self._check_ids(file, metadata)

    def _check_ids(self, file: Path, metadata: pq.FileMetaData) -> None:
        """Raises :class:`MorecError` naming ``file`` and the column unless the ids of its
        rows are ids of the manifest's users and items: from the row groups' statistics,
        or from the column's values where a writer kept none."""
        limits = {"user_id": "num_users", "item_id": "num_items", "history": "num_items"}
        for index in range(metadata.num_columns):
            column = metadata.schema.column(index).path.split(".")[0]
            if column not in limits:
                continue
            chunks = [metadata.row_group(group).column(index).statistics
                      for group in range(metadata.num_row_groups)]
            if all(s is not None and (s.has_min_max or not s.num_values) for s in chunks):
                values = [v for s in chunks if s.has_min_max for v in (s.min, s.max)]
            else:
                data = read_parquet(file, [column])[column]
                extremes = pc.min_max(pc.list_flatten(data) if column == "history" else data)
                values = [v.as_py() for v in extremes.values() if v.is_valid]
            count = limits[column]
            bad = [v for v in values if not 0 <= v < self.manifest[count]]
            if bad:
                raise MorecError(f"{file}: {column} holds {bad[0]}, not an id of {count} = "
                                 f"{self.manifest[count]} in {self.root / MANIFEST}")

    def check_batch(self, batch_size: int, num_streams: int, setting: str) -> None:
        """Raises :class:`MorecError` naming ``setting`` (e.g. ``batch_size = 4096``)
        unless each of ``num_streams`` streams of the training rows (ranks × loader
        workers: see :mod:`morec_rec.plugin.sampling.partition`) holds a batch of ``batch_size``
        rows: with fewer, an epoch would run no step."""
        rows = sum(shard["rows"] for shard in self.manifest["shards"]) // num_streams
        if batch_size > rows:
            raise MorecError(
                f"config: {setting}: {batch_size:,} rows a batch exceed the {rows:,} training "
                f"rows of each of {num_streams} stream(s) (ranks × loader workers) of "
                f"{self.root}: no step would run"
            )

    @property
    def train_files(self) -> list[Path]:
        return [self.root / shard["path"] for shard in self.manifest["shards"]]

    def files(self) -> list[Path]:
        return [self.root / ITEMS, self.root / USERS, self.root / "valid.parquet",
                self.root / "test.parquet", *self.train_files]

    def split(self, name: str) -> pa.Table:
        """All rows of one split (``valid``/``test``; ``train`` reads every shard)."""
        if name not in SPLITS:
            raise MorecError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        paths = self.train_files if name == "train" else [self.root / f"{name}.parquet"]
        return pa.concat_tables(read_parquet(p) for p in paths)

    def items(self) -> pa.Table:
        return read_parquet(self.root / ITEMS)

    def item_columns(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """``items.parquet``'s columns ``names`` as numpy arrays of shape (num_items,),
        indexed by item id."""
        path = self.root / ITEMS
        missing = sorted(set(names) - set(ITEM_SCHEMA.names))
        if missing:
            raise MorecError(f"{path}: no column(s) {', '.join(missing)}")
        table = read_parquet(path, ["item_id", *names])
        if not np.array_equal(table["item_id"].to_numpy(), np.arange(table.num_rows)):
            raise MorecError(f"{path}: item_id must run 0..{table.num_rows - 1} in order")
        return {name: table[name].to_numpy() for name in names}


def parquet_metadata(path: Path) -> pq.FileMetaData:
    """A dataset's Parquet file's footer; an unreadable one (as in a truncated file) is a
    :class:`MorecError`."""
    try:
        return pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise MorecError(f"{path}: corrupt Parquet file ({str(e).splitlines()[0]})") from None


def _require_count(record: dict[str, Any], key: str, path: Path, field: str = "") -> int:
    """``record[key]``, which must be an integer >= 0; the error names ``path`` and the
    field (``field``, else ``key``)."""
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MorecError(f"{path}: field '{field or key}' = {value!r} is not a count")
    return value


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Reads a Parquet file of a dataset; a corrupt file is a :class:`MorecError`."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise MorecError(f"{path}: corrupt Parquet file ({str(e).splitlines()[0]})") from None
