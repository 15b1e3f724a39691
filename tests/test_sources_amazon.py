"""The Amazon reader on small hand-written 2014 and 2018 files, plain and gzipped."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

from morec_rec.config import SourceConfig
from morec_rec.data.sources import amazon
from morec_rec.errors import MorecError

SUFFIXES = [".json", ".json.gz"]

REVIEWS = [  # the 2014 and 2018 releases share these keys; 2018 adds others (ignored)
    {"reviewerID": "U1", "asin": "0001", "overall": 5.0, "unixReviewTime": 1400000000,
     "reviewText": "good", "helpful": [0, 0]},
    {"reviewerID": "U2", "asin": "0002", "overall": 2, "unixReviewTime": 1400000100,
     "vote": "3", "style": {"Format:": " Hardcover"}},
    {"reviewerID": "U1", "asin": "0003", "overall": 4.0, "unixReviewTime": 0},
]

# 2014: Python literals, one of them also valid JSON; categories[0][1] is the category.
META_2014 = [
    "{'asin': '0001', 'price': 12.5, 'categories': [['Books', 'Fiction', 'Crime'], ['Kindle']],"
    " 'title': \"Hitchhiker's Guide\", 'salesRank': {'Books': 3}}",
    "{'asin': '0002', 'categories': [['Books']]}",  # no price; no level below the root
    '{"asin": "0003", "price": 0.0, "categories": [["Music", "Jazz"]]}',
    "{'asin': '0001', 'price': 99.0, 'categories': [['Toys', 'Games']]}",  # duplicate
    "{'asin': '0004', 'price': 3, 'categories': []}",
]

META_2018 = [
    {"asin": "0001", "price": "$12.99", "category": ["Books", "Fiction", "Crime"],
     "title": "t", "main_cat": "Books"},
    {"asin": "0002", "price": "$1.00 - $5.00", "category": ["Books", "Poetry"]},
    {"asin": "0003", "price": "", "category": ["Books"]},
    {"asin": "0004", "price": '.a-box-inner{background-color:#fff;}', "category": []},
    {"asin": "0005", "price": "$1,234.50", "category": ["Music", "Jazz"]},
    {"asin": "0001", "price": "$7.00", "category": ["Toys", "Games"]},  # duplicate
    {"asin": "0006", "price": "$0.00", "category": ["Music", "Rock"]},
]


def _write(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _json_lines(records: list[dict]) -> list[str]:
    return [json.dumps(r) for r in records]


def _read(reviews: Path, meta: Path | None):
    return amazon.read(reviews, meta, SourceConfig())


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    return _write(tmp_path / "reviews.json.gz", _json_lines(REVIEWS))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_reviews(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"reviews{suffix}", _json_lines(REVIEWS))
    meta = _write(tmp_path / "meta.json", _json_lines(META_2018))
    interactions = _read(path, meta).interactions.to_pydict()
    assert interactions == {
        "user": ["U1", "U2", "U1"],
        "item": ["0001", "0002", "0003"],
        "timestamp": [1400000000, 1400000100, 0],
        "rating": [5.0, 2.0, 4.0],
    }


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_meta_2014(tmp_path: Path, reviews: Path, suffix: str) -> None:
    raw = _read(reviews, _write(tmp_path / f"meta{suffix}", META_2014))
    assert raw.items.to_pydict() == {
        "item": ["0001", "0002", "0003", "0004"],
        "price": [12.5, None, 0.0, 3.0],
        "category": ["Fiction", None, "Jazz", None],
    }
    assert raw.source["meta_release"] == "2014"
    assert raw.source["catalogue_duplicates_dropped"] == 1
    assert raw.source["price_unparsed"] == 0


def test_meta_2014_as_strict_json(tmp_path: Path, reviews: Path) -> None:
    """The release is told by the records, not by whether the lines are JSON."""
    literal = _read(reviews, _write(tmp_path / "literal.json", META_2014)).items
    records = [json.dumps(ast.literal_eval(line)) for line in META_2014]
    strict = _read(reviews, _write(tmp_path / "strict.json", records)).items
    assert strict.equals(literal)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_meta_2018(tmp_path: Path, reviews: Path, suffix: str) -> None:
    raw = _read(reviews, _write(tmp_path / f"meta{suffix}", _json_lines(META_2018)))
    assert raw.items.to_pydict() == {
        "item": ["0001", "0002", "0003", "0004", "0005", "0006"],
        "price": [12.99, 1.0, None, None, 1234.5, 0.0],
        "category": ["Fiction", "Poetry", None, None, "Jazz", "Rock"],
    }
    assert raw.source["meta_release"] == "2018"
    assert raw.source["catalogue_duplicates_dropped"] == 1
    assert raw.source["price_unparsed"] == 1  # the HTML; "" is missing, not unparsed


def test_source(tmp_path: Path, reviews: Path) -> None:
    meta = _write(tmp_path / "meta.json.gz", META_2014)
    source = _read(reviews, meta).source
    assert source["name"] == "amazon"
    assert [f["path"] for f in source["files"]] == [str(reviews), str(meta)]
    assert source["files"][1]["sha256"] == hashlib.sha256(meta.read_bytes()).hexdigest()
    assert source["reviews_read"] == 3
    assert source["meta_records_read"] == 5


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path / "reviews.json", ["", *_json_lines(REVIEWS[:1]), "  ", ""])
    meta = _write(tmp_path / "meta.json", ["", *META_2014])
    raw = _read(path, meta)
    assert raw.interactions.num_rows == 1
    assert raw.items.num_rows == 4


def test_missing_files(tmp_path: Path, reviews: Path) -> None:
    with pytest.raises(MorecError, match="nothere.json.gz: no such file"):
        _read(tmp_path / "nothere.json.gz", _write(tmp_path / "meta.json", META_2014))
    with pytest.raises(MorecError, match="meta.json.gz: no such file"):
        _read(reviews, tmp_path / "meta.json.gz")
    with pytest.raises(MorecError, match="--meta"):
        _read(reviews, None)


@pytest.mark.parametrize("key", ["reviewerID", "asin", "overall", "unixReviewTime"])
def test_review_without_key(tmp_path: Path, key: str) -> None:
    records = [dict(r) for r in REVIEWS]
    del records[1][key]
    path = _write(tmp_path / "reviews.json.gz", _json_lines(records))
    meta = _write(tmp_path / "meta.json", META_2014)
    with pytest.raises(MorecError, match=rf"reviews\.json\.gz: record 2 has no '{key}'"):
        _read(path, meta)


def test_meta_without_asin(tmp_path: Path, reviews: Path) -> None:
    meta = _write(tmp_path / "meta.json", [*META_2014, "{'price': 1.0}"])
    with pytest.raises(MorecError, match="meta.json: record 6 has no 'asin'"):
        _read(reviews, meta)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_malformed_json(tmp_path: Path, suffix: str) -> None:
    lines = _json_lines(REVIEWS)
    lines[1] = lines[1][:-1]  # no closing brace
    path = _write(tmp_path / f"reviews{suffix}", lines)
    with pytest.raises(MorecError, match=rf"reviews{suffix}: malformed JSON"):
        _read(path, _write(tmp_path / "meta.json", META_2014))


def test_wrongly_typed_json(tmp_path: Path) -> None:
    records = [dict(r) for r in REVIEWS]
    records[2]["overall"] = "five"
    path = _write(tmp_path / "reviews.json", _json_lines(records))
    with pytest.raises(MorecError, match=r"reviews\.json: malformed JSON.*overall") as raised:
        _read(path, _write(tmp_path / "meta.json", META_2014))
    assert " row " not in str(raised.value)  # pyarrow's count within a block misleads


def test_a_record_longer_than_pyarrows_default_block_is_read(tmp_path: Path) -> None:
    records = [dict(r) for r in REVIEWS]
    records[1]["reviewText"] = "long " * 600_000  # 3 MB; pyarrow.json's blocks are 1 MiB
    path = _write(tmp_path / "reviews.json", _json_lines(records))
    assert _read(path, _write(tmp_path / "meta.json", META_2014)).interactions.num_rows > 0


def test_malformed_literal_names_line(tmp_path: Path, reviews: Path) -> None:
    lines = [*META_2014[:2], "{'asin': '0009', 'price': }", *META_2014[2:]]
    meta = _write(tmp_path / "meta.json.gz", lines)
    with pytest.raises(MorecError, match=r"meta\.json\.gz: line 3 is neither JSON nor"):
        _read(reviews, meta)


def test_record_that_is_not_an_object(tmp_path: Path, reviews: Path) -> None:
    meta = _write(tmp_path / "meta.json", ["['0001', 1.0]"])
    with pytest.raises(MorecError, match=r"meta\.json: line 1 is not a record"):
        _read(reviews, meta)


def test_empty_file(tmp_path: Path, reviews: Path) -> None:
    with pytest.raises(MorecError, match=r"meta\.json\.gz: no records"):
        _read(reviews, _write(tmp_path / "meta.json.gz", []))


def test_truncated_gzip(tmp_path: Path, reviews: Path) -> None:
    meta = tmp_path / "meta.json.gz"
    meta.write_bytes(gzip.compress("\n".join(META_2014).encode())[:-8])
    with pytest.raises(MorecError, match=r"meta\.json\.gz"):
        _read(reviews, meta)


@pytest.mark.parametrize(("record", "shown"), [
    ("{'asin': '0002', 'price': -2.0}", "-2.0"),  # 2014
    ('{"asin": "0002", "price": "-$5.00", "category": []}', "'-$5.00'"),  # 2018: not unparsed
    ('{"asin": "0002", "price": "$-5.00", "category": []}', "'$-5.00'"),
])
def test_negative_price(tmp_path: Path, reviews: Path, record: str, shown: str) -> None:
    first = ("{'asin': '0001', 'price': 2.0}" if record.startswith("{'")
             else '{"asin": "0001", "price": "$2.00", "category": []}')
    meta = _write(tmp_path / "meta.json", [first, record])
    with pytest.raises(MorecError, match=rf"meta\.json: record 2 \(asin '0002'\) has a "
                                         rf"negative price {re.escape(shown)}$"):
        _read(reviews, meta)


def test_infinite_price(tmp_path: Path, reviews: Path) -> None:
    meta = _write(tmp_path / "meta.json",
                  [json.dumps({"asin": "0001", "price": "$" + "9" * 400, "category": []})])
    with pytest.raises(MorecError, match=r"meta\.json: record 1 \(asin '0001'\) has a "
                                         r"non-finite price '\$999"):
        _read(reviews, meta)


def test_nan_rating(tmp_path: Path) -> None:
    lines = _json_lines(REVIEWS)
    lines[1] = lines[1].replace('"overall": 2', '"overall": NaN')
    path = _write(tmp_path / "reviews.json", lines)
    with pytest.raises(MorecError, match=r"reviews\.json: column 'overall' has a non-finite "
                                         r"value nan in row 1$"):
        _read(path, _write(tmp_path / "meta.json", META_2014))


@pytest.mark.parametrize("key", ["reviewerID", "asin"])
@pytest.mark.parametrize("value", ["", "  "])
def test_empty_review_ids(tmp_path: Path, key: str, value: str) -> None:
    records = [dict(r) for r in REVIEWS]
    records[2][key] = value
    path = _write(tmp_path / "reviews.json", _json_lines(records))
    with pytest.raises(MorecError, match=rf"reviews\.json: record 3 has an empty '{key}'$"):
        _read(path, _write(tmp_path / "meta.json", META_2014))


def test_empty_meta_asin(tmp_path: Path, reviews: Path) -> None:
    meta = _write(tmp_path / "meta.json", [*_json_lines(META_2018[:2]), '{"asin": ""}'])
    with pytest.raises(MorecError, match=r"meta\.json: record 3 has an empty 'asin'$"):
        _read(reviews, meta)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_json_that_is_not_utf8(tmp_path: Path, suffix: str) -> None:
    """pyarrow.json does not check UTF-8: the reader does, naming the record."""
    lines = [line.encode() for line in _json_lines(REVIEWS)]
    lines[1] = lines[1].replace(b'"0002"', b'"0\xe9"')
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / f"reviews{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(MorecError,
                       match=rf"reviews{re.escape(suffix)}: record 2: 'asin' is not UTF-8 text$"):
        _read(path, _write(tmp_path / "meta.json", META_2014))
    meta = tmp_path / "meta.json"
    meta.write_bytes(json.dumps(META_2018[0]).encode() + b"\n"
                     + b'{"asin": "0002", "price": "", "category": ["B\xe9", "x"]}\n')
    with pytest.raises(MorecError, match=r"meta\.json: record 2: 'category' is not UTF-8 text$"):
        _read(_write(tmp_path / "ok.json", _json_lines(REVIEWS)), meta)


def test_literal_that_is_not_utf8(tmp_path: Path, reviews: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_bytes(META_2014[0].encode() + b"\n{'asin': '0\xe9', 'price': 1.0}\n")
    with pytest.raises(MorecError, match=r"meta\.json: line 2 is not UTF-8 text \(a compressed "
                                         r"file must be named \.gz\)$"):
        _read(reviews, meta)
