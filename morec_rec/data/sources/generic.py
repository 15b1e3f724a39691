"""Generic source: an interactions file and an item table, CSV or Parquet.

Column names come from :class:`~morec_rec.config.SourceConfig`. Interactions: user, item,
time (seconds, an ISO-8601 string, or a Parquet timestamp/date), optional rating. Item
table: item, price (>= 0; empty = missing), category (empty = missing).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from morec_rec.config import SourceConfig
from morec_rec.data.raw import RawData
from morec_rec.data.sources import tables
from morec_rec.errors import MorecError


def read(input: Path, meta: Path | None, config: SourceConfig) -> RawData:
    if meta is None:
        raise MorecError("source 'generic' needs --meta: the item table with price and category")
    interactions = read_interactions(input, config)
    table = tables.read_table(
        meta, [config.item_column, config.price_column, config.category_column], config.delimiter
    )
    price = tables.to_float(table, config.price_column, meta)
    tables.require_non_negative(price, config.price_column, meta)
    category = tables.to_strings(table, config.category_column, meta)
    items, duplicates = tables.first_per_key(
        pa.table({
            "item": tables.to_string_ids(table, config.item_column, meta),
            "price": price,
            "category": category,
        }),
        "item",
    )
    return RawData(
        interactions,
        items,
        {
            "name": "generic",
            "files": [tables.fingerprint(Path(input)), tables.fingerprint(Path(meta))],
            "columns": {
                "user": config.user_column, "item": config.item_column,
                "time": config.time_column, "rating": config.rating_column or None,
                "price": config.price_column, "category": config.category_column,
            },
            "catalogue_duplicates_dropped": duplicates,
        },
    )


def read_interactions(path: Path, config: SourceConfig) -> pa.Table:
    """The interactions of a CSV or Parquet file as a table of the raw schema."""
    columns = [config.user_column, config.item_column, config.time_column]
    if config.rating_column:
        columns.append(config.rating_column)
    table = tables.read_table(path, columns, config.delimiter)
    rating = (
        tables.to_float(table, config.rating_column, path)
        if config.rating_column
        else pa.nulls(table.num_rows, pa.float64())
    )
    return pa.table({
        "user": tables.to_string_ids(table, config.user_column, path),
        "item": tables.to_string_ids(table, config.item_column, path),
        "timestamp": tables.to_seconds(table, config.time_column, path),
        "rating": rating,
    })
