"""The generic and Ta-Feng readers on small hand-written files."""

from __future__ import annotations

import datetime
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from morec_rec.config import SourceConfig
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
