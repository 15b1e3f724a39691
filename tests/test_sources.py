"""The generic and Ta-Feng readers on small hand-written files."""

from __future__ import annotations

import datetime
import decimal
import gzip
import lzma
import re
import zipfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from morec_rec.config import SourceConfig
from morec_rec.data.raw import RawData
from morec_rec.data.sources import generic, read_source, tafeng
from morec_rec.errors import MorecError

TAFENG_HEADER = ("TRANSACTION_DT,CUSTOMER_ID,AGE_GROUP,PIN_CODE,PRODUCT_SUBCLASS,PRODUCT_ID,"
                 "AMOUNT,ASSET,SALES_PRICE")


def _seconds(year: int, month: int, day: int) -> int:
    return int(datetime.datetime(year, month, day, tzinfo=datetime.timezone.utc).timestamp())


def _tafeng_zip(path: Path, lines: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ta_feng_all_months_merged.csv",
                         "\ufeff" + "\n".join([TAFENG_HEADER, *lines]) + "\n")
    return path


def test_tafeng_pairs_prices_and_categories(tmp_path: Path) -> None:
    path = _tafeng_zip(tmp_path / "t.zip", [
        "11/2/2000,007,30-34,115,110411,0471,2,20,30",   # 007 buys 0471 twice: first on 11/1
        "11/1/2000,007,30-34,115,110411,0471,1,8,10",
        "12/1/2000,009,,115,120107,0471,2,30,40",        # unit prices of 0471: 15, 10, 20
        "1/15/2001,009,,115,560101,0900,3,0,0",          # a free item
        "1/15/2001,009,,115,550101,0900,1,0,0",          # subclass tie: smallest code wins
    ])
    raw = tafeng.read(path, None, SourceConfig(category_prefix=2))
    pairs = raw.interactions.sort_by([("user", "ascending"), ("item", "ascending")]).to_pylist()
    assert [(p["user"], p["item"], p["timestamp"]) for p in pairs] == [
        ("007", "0471", _seconds(2000, 11, 1)),
        ("009", "0471", _seconds(2000, 12, 1)),
        ("009", "0900", _seconds(2001, 1, 15)),
    ]
    assert all(p["rating"] is None for p in pairs)
    assert raw.items.sort_by("item").to_pylist() == [
        {"item": "0471", "price": 15.0, "category": "11"},  # 110411 twice, 120107 once
        {"item": "0900", "price": 0.0, "category": "55"},
    ]
    assert raw.source["rows_read"] == 5 and raw.source["distinct_pairs"] == 3
    assert raw.source["files"][0]["bytes"] == path.stat().st_size


def test_tafeng_bad_values(tmp_path: Path) -> None:
    bad_date = _tafeng_zip(tmp_path / "a.zip", ["2000-11-01,007,,1,110411,0471,1,1,1"])
    with pytest.raises(MorecError, match="a.zip: column 'TRANSACTION_DT'"):
        tafeng.read(bad_date, None, SourceConfig())
    negative = _tafeng_zip(tmp_path / "b.zip", ["11/1/2000,007,,1,110411,0471,1,1,-5"])
    with pytest.raises(MorecError, match="b.zip: column 'SALES_PRICE' has a negative value -5"):
        tafeng.read(negative, None, SourceConfig())
    text = _tafeng_zip(tmp_path / "c.zip", ["11/1/2000,007,,1,110411,0471,two,1,5"])
    with pytest.raises(MorecError, match="c.zip: column 'AMOUNT' has a non-numeric value 'two'"):
        tafeng.read(text, None, SourceConfig())


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_generic_reads_named_columns(tmp_path: Path, suffix: str) -> None:
    interactions = pa.table({
        "uid": ["u1", "u2", "u1"],
        "iid": ["007", "9", "9"],
        "when": ["2001-01-02", "2001-01-03T00:00:10", "1970-01-01"],
        "stars": ["4", "2.5", ""],
    })
    items = pa.table({"iid": ["007", "9", "007"], "cost": ["1.5", "", "9"],
                      "kind": ["x", "", "y"]})
    paths = []
    for name, table in (("inter", interactions), ("items", items)):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".parquet":
            pq.write_table(table, path)
        else:
            pa.csv.write_csv(table, pa.output_stream(str(path), compression="detect"))
        paths.append(path)
    config = SourceConfig(user_column="uid", item_column="iid", time_column="when",
                          rating_column="stars", price_column="cost", category_column="kind")
    raw = read_source("generic", paths[0], paths[1], config)
    assert raw.interactions.to_pylist() == [
        {"user": "u1", "item": "007", "timestamp": _seconds(2001, 1, 2), "rating": 4.0},
        {"user": "u2", "item": "9", "timestamp": _seconds(2001, 1, 3) + 10, "rating": 2.5},
        {"user": "u1", "item": "9", "timestamp": 0, "rating": None},
    ]
    # The first row of a repeated item wins; a blank category is missing (preparation
    # treats "" and null alike).
    assert [(r["item"], r["price"], r["category"] or None) for r in raw.items.to_pylist()] == [
        ("007", 1.5, "x"), ("9", None, None)
    ]
    assert raw.source["catalogue_duplicates_dropped"] == 1


def test_generic_numeric_seconds_and_no_rating(tmp_path: Path) -> None:
    (tmp_path / "i.csv").write_text("user;item;timestamp\na;x;100\nb;x;200.7\n")
    (tmp_path / "m.csv").write_text("item;price;category\nx;3;c\n")
    raw = generic.read(tmp_path / "i.csv", tmp_path / "m.csv", SourceConfig(delimiter=";"))
    assert raw.interactions["timestamp"].to_pylist() == [100, 200]
    assert raw.interactions["rating"].null_count == 2


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("empty", ["inter", "items"])
def test_generic_file_without_rows(tmp_path: Path, suffix: str, empty: str) -> None:
    tables = {"inter": pa.table({"user": ["a"], "item": ["x"], "timestamp": ["100"]}),
              "items": pa.table({"item": ["x"], "price": ["3"], "category": ["c"]})}
    tables[empty] = tables[empty].slice(0, 0)
    for name, table in tables.items():
        if suffix == ".parquet":
            pq.write_table(table, tmp_path / f"{name}{suffix}")
        else:
            pa.csv.write_csv(table, tmp_path / f"{name}{suffix}")
    with pytest.raises(MorecError, match=rf"{empty}{suffix}: no rows$"):
        generic.read(tmp_path / f"inter{suffix}", tmp_path / f"items{suffix}", SourceConfig())


def test_generic_needs_meta(tmp_path: Path) -> None:
    with pytest.raises(MorecError, match="needs --meta"):
        generic.read(tmp_path / "i.csv", None, SourceConfig())


def test_unknown_source() -> None:
    with pytest.raises(MorecError, match="unknown source 'nope'"):
        read_source("nope", Path("x"), None, SourceConfig())


def test_tafeng_empty_quantity_or_price(tmp_path: Path) -> None:
    """An empty AMOUNT or SALES_PRICE would become a NaN unit price, silently imputed."""
    for name, row, column in (("a.zip", "11/1/2000,007,,1,110411,0471,,1,5", "AMOUNT"),
                              ("b.zip", '11/1/2000,007,,1,110411,0471,1,1,""', "SALES_PRICE")):
        path = _tafeng_zip(tmp_path / name, ["11/1/2000,007,,1,110411,0471,1,1,5", row])
        with pytest.raises(MorecError, match=rf"{name}: column '{column}' is empty in row 1$"):
            tafeng.read(path, None, SourceConfig())


def test_tafeng_infinite_price(tmp_path: Path) -> None:
    path = _tafeng_zip(tmp_path / "t.zip", ["11/1/2000,007,,1,110411,0471,1,1,1e400"])
    with pytest.raises(MorecError, match=r"t\.zip: column 'SALES_PRICE' has a non-finite "
                                         r"value '1e400' in row 0$"):
        tafeng.read(path, None, SourceConfig())


def _generic(tmp_path: Path, inter: pa.Table | str, items: pa.Table | str,
             suffix: str = ".csv") -> RawData:
    """``generic.read`` of the two tables (CSV text, or Parquet where given a table)."""
    paths = []
    for name, content in (("inter", inter), ("items", items)):
        if isinstance(content, str):
            path = tmp_path / f"{name}{suffix}"
            path.write_text(content)
        else:
            path = tmp_path / f"{name}.parquet"
            pq.write_table(content, path)
        paths.append(path)
    return generic.read(*paths, SourceConfig())


INTER_CSV = "user,item,timestamp\nu1,i1,100\nu2,i1,200\n"
ITEMS_CSV = "item,price,category\ni1,3,c\n"


@pytest.mark.parametrize(("items", "message"), [
    ("item,price,category\ni1,1e400,c\n", "has a non-finite value '1e400' in row 0"),
    ("item,price,category\ni1,3,c\ni2,NaN,c\n", "has a non-numeric value 'NaN' in row 1"),
    (pa.table({"item": ["i1", "i2"], "price": [1.0, float("inf")], "category": ["c", "c"]}),
     "has a non-finite value inf in row 1"),
    (pa.table({"item": ["i1"], "price": [float("nan")], "category": ["c"]}),
     "has a non-finite value nan in row 0"),
], ids=["csv 1e400", "csv NaN", "parquet inf", "parquet nan"])
def test_generic_non_finite_price(tmp_path: Path, items: pa.Table | str, message: str) -> None:
    suffix = ".csv" if isinstance(items, str) else ".parquet"
    with pytest.raises(MorecError, match=rf"items{suffix}: column 'price' {message}$"):
        _generic(tmp_path, INTER_CSV, items)


def test_generic_decimal_prices(tmp_path: Path) -> None:
    items = pa.table({"item": ["i1"], "price": pa.array([decimal.Decimal("2.50")],
                                                        pa.decimal128(5, 2)),
                      "category": ["c"]})
    assert _generic(tmp_path, INTER_CSV, items).items["price"].to_pylist() == [2.5]


def test_generic_only_empty_cells_are_missing(tmp_path: Path) -> None:
    """pyarrow's null markers ("NA", "null", "#N/A"...) are values; only empty cells are
    missing, quoted or not."""
    inter = 'user,item,timestamp\nNA,null,100\n"",i1,200\n'
    with pytest.raises(MorecError, match=r"inter\.csv: column 'user' is empty in row 1$"):
        _generic(tmp_path, inter, ITEMS_CSV)
    raw = _generic(tmp_path, "user,item,timestamp\nNA,null,100\n",
                   'item,price,category\nnull,"",NA\ni2,,#N/A\n')
    assert raw.interactions.select(["user", "item"]).to_pylist() == [{"user": "NA", "item": "null"}]
    assert raw.items.to_pylist() == [{"item": "null", "price": None, "category": "NA"},
                                     {"item": "i2", "price": None, "category": "#N/A"}]


@pytest.mark.parametrize(("column", "values", "message"), [
    ("user", [1.0, float("nan")], "column 'user' is NaN in row 1"),
    ("user", pa.array([None, "u"], pa.string()), "column 'user' is empty in row 0"),
    ("item", [" ", "i1"], "column 'item' is empty in row 0"),
    ("user", [[1], [2]], "column 'user' has type list<element: int64>, expected text or "
                         "integers"),
    ("user", pa.array([b"u", b"\xff"]), "column 'user' is not UTF-8 text in row 1"),
])
def test_generic_bad_parquet_ids(tmp_path: Path, column: str, values: Any, message: str) -> None:
    inter = {"user": ["u1", "u2"], "item": ["i1", "i1"], "timestamp": [100, 200]}
    inter[column] = values
    with pytest.raises(MorecError, match=rf"inter\.parquet: {re.escape(message)}$"):
        _generic(tmp_path, pa.table(inter), ITEMS_CSV)


def test_generic_ids_of_other_types(tmp_path: Path) -> None:
    inter = pa.table({"user": pa.array([b"u1", b"u2"]),
                      "item": pa.array(["i1", "i1"]).dictionary_encode(),
                      "timestamp": [100, 200]})
    items = pa.table({"item": pa.array(["i1"], pa.large_string()), "price": [1.0],
                      "category": pa.array([7]).dictionary_encode()})
    raw = _generic(tmp_path, inter, items)
    assert raw.interactions["user"].to_pylist() == ["u1", "u2"]
    assert raw.items.to_pylist() == [{"item": "i1", "price": 1.0, "category": "7"}]


def test_generic_category_of_an_unsupported_type(tmp_path: Path) -> None:
    items = pa.table({"item": ["i1"], "price": [1.0], "category": [["a", "b"]]})
    with pytest.raises(MorecError, match=r"items\.parquet: column 'category' has type "
                                         r"list<element: string>, expected text or integers$"):
        _generic(tmp_path, INTER_CSV, items)


@pytest.mark.parametrize("kind", ["large_string", "dictionary"])
def test_generic_iso_times_of_other_string_types(tmp_path: Path, kind: str) -> None:
    times = pa.array(["1970-01-01T00:01:40", "1970-01-01T00:03:20"], pa.large_string())
    if kind == "dictionary":
        times = pa.array(times.to_pylist()).dictionary_encode()
    inter = pa.table({"user": ["u1", "u2"], "item": ["i1", "i1"], "timestamp": times})
    assert _generic(tmp_path, inter, ITEMS_CSV).interactions["timestamp"].to_pylist() \
        == [100, 200]


@pytest.mark.parametrize(("data", "suffix"), [
    ("user,item,timestamp\n".encode("latin-1") + "\xe9,i1,100\n".encode("latin-1"), ".csv"),
    ("us\xe9r,item,timestamp\nu1,i1,100\n".encode("latin-1"), ".csv"),
    (INTER_CSV.encode("utf-16"), ".csv"),  # its NUL bytes are valid UTF-8
    (INTER_CSV.encode("utf-16-le"), ".csv"),  # without a byte-order mark
    (gzip.compress(INTER_CSV.encode()), ".csv"),  # compressed, without its suffix
    (lzma.compress(INTER_CSV.encode()), ".csv.xz"),  # a compression not supported
], ids=["latin-1 cell", "latin-1 header", "utf-16", "utf-16-le", "gzip as .csv", "xz"])
def test_generic_not_utf8(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"inter{suffix}"
    path.write_bytes(data)
    (tmp_path / "items.csv").write_text(ITEMS_CSV)
    message = (r"not UTF-8 text \(convert it to UTF-8; a compressed file must be named "
               r"\.gz, \.bz2, \.zst or \.zip\)")
    if data.startswith(b"user,"):  # the header is fine: the cell is named
        message = "column 'user' is not UTF-8 text in row 0"
    with pytest.raises(MorecError, match=rf"inter{re.escape(suffix)}: {message}$"):
        generic.read(path, tmp_path / "items.csv", SourceConfig())


def test_generic_dictionary_that_is_not_utf8(tmp_path: Path) -> None:
    """The row is that of the first bad value (a dictionary validates as a whole)."""
    text = pc.cast(pa.array([b"u1", b"\xff"]), pa.string(), safe=False)
    users = pa.DictionaryArray.from_arrays(pa.array([0, 0, 1], pa.int32()), text)
    inter = pa.table({"user": users, "item": ["i1"] * 3, "timestamp": [1, 2, 3]})
    with pytest.raises(MorecError, match=r"inter\.parquet: column 'user' is not UTF-8 text "
                                         r"in row 2$"):
        _generic(tmp_path, inter, ITEMS_CSV)
