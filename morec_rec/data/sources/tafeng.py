"""Ta-Feng grocery transactions (``ta_feng_all_months_merged.csv``, plain or zipped).

One interaction per distinct (customer, product) pair, at its first purchase (day
resolution: TRANSACTION_DT is m/d/yyyy, read as midnight UTC). A product's price is the
median of SALES_PRICE / AMOUNT over all its rows; its category is its most frequent
PRODUCT_SUBCLASS (the smallest code among equally frequent ones) cut to
``SourceConfig.category_prefix`` digits.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from morec_rec.config import SourceConfig
from morec_rec.data import arrays
from morec_rec.data.raw import RawData
from morec_rec.data.sources import tables
from morec_rec.errors import MorecError

DATE, CUSTOMER = "TRANSACTION_DT", "CUSTOMER_ID"
SUBCLASS, PRODUCT = "PRODUCT_SUBCLASS", "PRODUCT_ID"
AMOUNT, SALES = "AMOUNT", "SALES_PRICE"


def read(input: Path, meta: Path | None, config: SourceConfig) -> RawData:
    if meta is not None:
        raise MorecError("source 'tafeng' takes no --meta: prices and categories are in --input")
    table = tables.read_table(input, [DATE, CUSTOMER, SUBCLASS, PRODUCT, AMOUNT, SALES])
    day = _days(table, input)
    amount = tables.to_float(table, AMOUNT, input)
    sales = tables.to_float(table, SALES, input)
    tables.require_values(amount, AMOUNT, input)  # a unit price needs both
    tables.require_values(sales, SALES, input)
    tables.require_non_negative(sales, SALES, input)
    if not pc.all(pc.greater(amount, 0)).as_py():
        row = pc.index(pc.less_equal(amount, 0), True).as_py()
        raise MorecError(f"{input}: column '{AMOUNT}' is {amount[row].as_py()} in row {row}, "
                         "expected a positive quantity")
    product, products = arrays.encode_sorted(tables.to_string_ids(table, PRODUCT, input))
    subclass, subclasses = arrays.encode_sorted(tables.to_string_ids(table, SUBCLASS, input))
    first = (
        pa.table({"user": tables.to_string_ids(table, CUSTOMER, input), "item": product, "t": day})
        .group_by(["user", "item"], use_threads=False)
        .aggregate([("t", "min")])
    )
    interactions = pa.table({
        "user": first["user"],
        "item": products.take(first["item"]),
        "timestamp": first["t_min"],
        "rating": pa.nulls(first.num_rows, pa.float64()),
    })
    unit_price = sales.to_numpy() / amount.to_numpy()
    items = pa.table({
        "item": products,
        "price": arrays.median(product, unit_price, len(products)),
        "category": pc.utf8_slice_codeunits(
            subclasses.take(arrays.mode(product, subclass, len(products))),
            0, config.category_prefix,
        ),
    })
    return RawData(
        interactions,
        items,
        {
            "name": "tafeng",
            "files": [tables.fingerprint(Path(input))],
            "rows_read": table.num_rows,
            "distinct_pairs": interactions.num_rows,
            "category_prefix": config.category_prefix,
        },
    )


def _days(table: pa.Table, path: Path) -> pa.ChunkedArray:
    """TRANSACTION_DT (m/d/yyyy) as int64 seconds since the epoch."""
    try:
        parsed = pc.strptime(table[DATE], format="%m/%d/%Y", unit="s")
    except pa.ArrowInvalid as e:
        raise MorecError(
            f"{path}: column '{DATE}' has a value that is not m/d/yyyy ({e})") from None
    return tables.to_seconds(pa.table({DATE: parsed}), DATE, path)
