"""The MoRec authors' item metadata (``item_meta_morec.csv``) with a generic interaction file.

The metadata is the file that the authors' UniRec preprocessing writes, always
comma-separated (or Parquet), one row per item::

    item_id, weight, fair_group, align_group

``weight`` is the item's revenue weight, i.e. its price; ``fair_group`` its fairness group
id, which becomes the category; ``align_group`` its popularity group, which is validated
but not used (the reason is recorded in the source description). The interactions are
read as by the ``generic`` source.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from morec_rec.config import SourceConfig
from morec_rec.data.raw import RawData
from morec_rec.data.sources import generic, tables
from morec_rec.errors import MorecError

_META_COLUMNS = ("item_id", "weight", "fair_group", "align_group")

#: Metadata columns that are read and validated but not used, and why.
_IGNORED = {
    "align_group": "popularity groups are recomputed from the prepared training split, so "
    "that the groups and the target distribution Q come from the same counts",
}


def read(input: Path, meta: Path | None, config: SourceConfig) -> RawData:
    """Reads the interactions (``input``) and the authors' item metadata (``meta``, required).

    Interactions use ``config``'s user, item, time and (optional) rating columns and its
    delimiter; without a rating column every rating is null. In the metadata an empty
    weight or fair_group is a missing price or category, and a repeated item_id keeps its
    first row; a negative weight or a fractional group id is an error.
    """
    if meta is None:
        raise MorecError("source 'morec' needs --meta: the authors' item_meta_morec.csv")
    input, meta = tables.require_file(input), tables.require_file(meta)
    interactions = generic.read_interactions(input, config)
    items, duplicates = tables.first_per_key(_read_items(meta), "item")
    source = {
        "name": "morec",
        "files": [tables.fingerprint(input), tables.fingerprint(meta)],
        "interactions_read": interactions.num_rows,
        "catalogue_duplicates_dropped": duplicates,
        "ignored_columns": _IGNORED,
    }
    return RawData(interactions, items, source)


def _read_items(path: Path) -> pa.Table:
    table = tables.read_table(path, _META_COLUMNS)  # the authors write it comma-separated
    weight = tables.to_float(table, "weight", path)
    tables.require_non_negative(weight, "weight", path)
    fair_group = _to_integers(table, "fair_group", path)
    _to_integers(table, "align_group", path)  # validated only: see _IGNORED
    return pa.table(
        {
            "item": tables.to_string_ids(table, "item_id", path),
            "price": weight,
            "category": pc.cast(fair_group, pa.string()),
        }
    )


def _to_integers(table: pa.Table, column: str, path: Path) -> pa.ChunkedArray:
    """A column of whole numbers as int64, nulls kept; a fractional value, or one outside
    the int64 range, is an error."""
    values = tables.to_float(table, column, path)
    outside = pc.or_(pc.less(values, -(2.0**63)), pc.greater_equal(values, 2.0**63))
    if pc.any(outside).as_py():
        row = pc.index(outside, True).as_py()
        raise MorecError(
            f"{path}: column '{column}' has a value {table[column][row].as_py()} in row {row} "
            "outside the 64-bit integer range"
        )
    fractional = pc.not_equal(pc.floor(values), values)
    if pc.any(fractional).as_py():
        row = pc.index(fractional, True).as_py()
        raise MorecError(
            f"{path}: column '{column}' has a non-integer value {values[row].as_py()} "
            f"in row {row}"
        )
    return pc.cast(values, pa.int64())
