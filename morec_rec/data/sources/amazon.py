"""Amazon review data: the 2014 (McAuley et al., SNAP) and 2018 (Ni et al.) releases.

Both releases are JSON-lines files, plain or gzip-compressed (``.json`` / ``.json.gz``):

* reviews (both years): ``reviewerID``, ``asin``, ``overall`` (the rating) and
  ``unixReviewTime`` (seconds); every record must have all four.
* metadata 2014: ``asin``, ``price`` (a number, often absent) and ``categories`` (a list
  of category paths); the category is ``categories[0][1]``, the first level below the root.
  Lines are Python literals (single quotes), not JSON.
* metadata 2018: strict JSON with ``asin``, ``price`` (a string such as ``"$12.99"``) and
  ``category`` (one path); the category is ``category[1]``, the first level below the root.

Strict-JSON files are parsed by ``pyarrow.json``, vectorised; a file whose first line is
not JSON is parsed line by line (see :func:`_read_records`). The release of a metadata file
is told by its first record (2018 records always carry ``category``, 2014 records never
do), not by the file name; compression is told by the suffix (``.gz``).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from morec_rec.config import SourceConfig
from morec_rec.data.raw import RawData
from morec_rec.data.sources import tables
from morec_rec.errors import MorecError

_REVIEWS_SCHEMA = pa.schema(
    [
        ("reviewerID", pa.string()),
        ("asin", pa.string()),
        ("overall", pa.float64()),
        ("unixReviewTime", pa.int64()),
    ]
)

#: A price such as "12.99", "$1,234.50" or the range "$1.00 - $5.00"; ``low`` is the
#: (lower) amount, commas included.
_PRICE = (
    r"^\s*\$?\s*(?P<low>\d[\d,]*(?:\.\d*)?|\.\d+)"
    r"(?:\s*-\s*\$?\s*(?:\d[\d,]*(?:\.\d*)?|\.\d+))?\s*$"
)

#: A negative amount such as "-$5.00", "$-5.00" or "-5".
_NEGATIVE_PRICE = r"^\s*(?:-\s*\$?|\$\s*-)\s*(?:\d|\.\d)"

#: Lines converted per ``pyarrow.json`` call when a file is not strict JSON.
_LINES_PER_BATCH = 100_000
#: The bytes ``pyarrow.json`` parses as one block: the longest record it can read (its
#: default, 1 MiB, refuses the longer product descriptions and review texts).
_BLOCK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class _MetaLayout:
    """The keys of one release's metadata and where its category sits."""

    release: str
    schema: pa.Schema
    category: Callable[[pa.Table], pa.ChunkedArray]


_META_2014 = _MetaLayout(
    release="2014",
    schema=pa.schema(
        [
            ("asin", pa.string()),
            ("price", pa.float64()),
            ("categories", pa.list_(pa.list_(pa.string()))),
        ]
    ),
    category=lambda table: _element(_element(table["categories"], 0), 1),
)

_META_2018 = _MetaLayout(
    release="2018",
    schema=pa.schema(
        [("asin", pa.string()), ("price", pa.string()), ("category", pa.list_(pa.string()))]
    ),
    category=lambda table: _element(table["category"], 1),
)


def read(input: Path, meta: Path | None, config: SourceConfig) -> RawData:
    """Reads Amazon reviews (``input``) and their item metadata (``meta``, required).

    ``config`` is unused: the keys of both releases are fixed. Ratings are kept as given
    (the rating filter belongs to the preparation). A 2018 price range such as
    ``"$1.00 - $5.00"`` becomes its lower bound; a 2018 price that is not an amount (e.g.
    leftover HTML) becomes null and is counted in ``source["price_unparsed"]``.
    """
    if meta is None:
        raise MorecError("source 'amazon' needs --meta: the item metadata (meta_*.json.gz)")
    input, meta = tables.require_file(input), tables.require_file(meta)
    interactions = _read_reviews(input)
    items, meta_facts = _read_meta(meta)
    source = {
        "name": "amazon",
        "files": [tables.fingerprint(input), tables.fingerprint(meta)],
        "reviews_read": interactions.num_rows,
        **meta_facts,
    }
    return RawData(interactions, items, source)


def _read_reviews(path: Path) -> pa.Table:
    _, strict = _first_record(path)
    table = _read_records(path, _REVIEWS_SCHEMA, strict)
    _require_keys(table, path)
    return pa.table(
        {
            "user": table["reviewerID"],
            "item": table["asin"],
            "timestamp": tables.to_seconds(table, "unixReviewTime", path),
            "rating": tables.to_float(table, "overall", path),  # NaN is an error
        }
    )


def _read_meta(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """The item table, first record per asin, and the facts for ``source``."""
    first, strict = _first_record(path)
    layout = _META_2018 if "category" in first else _META_2014
    records = _read_records(path, layout.schema, strict)
    _require_keys(records.select(["asin"]), path)
    price, unparsed = _parse_prices(records["price"])
    _require_prices(records, price, path)
    table, duplicates = tables.first_per_key(
        records.append_column("amount", price).append_column("unparsed", unparsed), "asin"
    )
    items = pa.table(
        {"item": table["asin"], "price": table["amount"], "category": layout.category(table)}
    )
    facts = {
        "meta_release": layout.release,
        "meta_records_read": records.num_rows,
        "catalogue_duplicates_dropped": duplicates,
        "price_unparsed": pc.sum(table["unparsed"]).as_py() or 0,
    }
    return items, facts


def _read_records(path: Path, schema: pa.Schema, strict: bool) -> pa.Table:
    """The keys of ``schema`` from every record of a JSON-lines file; absent keys are null.

    A strict-JSON file is read by ``pyarrow.json`` in one call. Otherwise (2014 metadata)
    each line is parsed in Python, re-encoded as JSON and read in batches by the same
    ``pyarrow.json`` call, so that both paths share one typed conversion: this is the only
    per-line loop of the reader, and it is needed because ``pyarrow.json`` cannot parse
    Python literals. (``pa.Table.from_pylist`` would not do: it silently splits a string
    where a list is expected into characters.)
    """
    if strict:
        with pa.input_stream(str(path), compression="detect") as stream:
            return _parse_json(stream, path, schema)
    batches = (_parse_json(io.BytesIO(batch), path, schema) for batch in _as_json(path, schema))
    return pa.concat_tables(batches)


def _parse_json(source: pa.NativeFile | io.BytesIO, path: Path, schema: pa.Schema) -> pa.Table:
    """Reads JSON lines with ``schema``; a string that is not UTF-8 is an error.

    Records are numbered from 1 within ``source``: the whole file where it is strict JSON
    (the re-encoded batches of :func:`_as_json` are valid UTF-8 by construction).
    """
    options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        table = pa_json.read_json(source, read_options=pa_json.ReadOptions(
            block_size=_BLOCK_BYTES), parse_options=options)
    except (pa.ArrowInvalid, OSError) as e:
        message = tables.first_line(e)
        if "straddles two block boundaries" in message:
            raise MorecError(f"{path}: a record is longer than {_BLOCK_BYTES >> 20} MiB, the "
                             "longest this reader takes") from None
        # pyarrow's row numbers count within a block: no line number can be given.
        message = re.sub(r" in row \d+", "", message)
        raise MorecError(f"{path}: malformed JSON lines ({message})") from None
    for key in table.column_names:  # pyarrow.json does not check UTF-8
        row = tables.first_invalid_utf8(table[key])
        if row is not None:
            raise MorecError(f"{path}: record {row + 1}: '{key}' is not UTF-8 text")
    return table


def _as_json(path: Path, schema: pa.Schema) -> Iterator[bytes]:
    """Batches of the file's records as strict JSON lines, only the keys of ``schema``."""
    batch: list[str] = []
    for number, line in _lines(path):
        record, _ = _parse_line(line, path, number)
        try:
            batch.append(json.dumps({k: record[k] for k in schema.names if k in record}))
        except (TypeError, ValueError):
            raise MorecError(f"{path}: line {number} holds a value that JSON cannot hold") from None
        if len(batch) == _LINES_PER_BATCH:
            yield "\n".join(batch).encode()
            batch = []
    if batch:
        yield "\n".join(batch).encode()


def _first_record(path: Path) -> tuple[dict[str, Any], bool]:
    """The first record of ``path`` and whether its line is strict JSON."""
    for number, line in _lines(path):
        return _parse_line(line, path, number)
    raise MorecError(f"{path}: no records")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a plain or gzip-compressed file, with their 1-based numbers."""
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            for number, line in enumerate(io.BufferedReader(stream), start=1):
                if line.strip():
                    yield number, line
    except OSError as e:  # e.g. a truncated gzip stream
        raise MorecError(f"{path}: unreadable ({e})") from None


def _parse_line(line: bytes, path: Path, number: int) -> tuple[dict[str, Any], bool]:
    """One record and whether its line is strict JSON; other lines must be Python literals."""
    try:
        record, strict = json.loads(line), True
    except ValueError:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise MorecError(
                f"{path}: line {number} is not UTF-8 text (a compressed file must be named .gz)"
            ) from None
        try:
            record, strict = ast.literal_eval(text), False
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise MorecError(
                f"{path}: line {number} is neither JSON nor a Python literal"
            ) from None
    if not isinstance(record, dict):
        raise MorecError(f"{path}: line {number} is not a record ({{...}})")
    return record, strict


def _require_keys(table: pa.Table, path: Path) -> None:
    """Every record must have every key of ``table`` (an absent key reads as null), and no
    empty or blank string there.

    Records are numbered from 1, blank lines not counted.
    """
    for key in table.column_names:
        values = table[key]
        missing = pc.is_null(values)
        if pa.types.is_string(values.type):
            missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
        if pc.any(missing).as_py():
            row = pc.index(missing, True).as_py()
            what = "no" if values[row].as_py() is None else "an empty"
            raise MorecError(f"{path}: record {row + 1} has {what} '{key}'")


def _parse_prices(prices: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """Prices as float64, and whether each is a non-empty value that is not an amount.

    Numbers (2014) are kept. Strings (2018) must match :data:`_PRICE`; a range becomes its
    lower bound; an empty string is a missing price, anything else unparsed.
    """
    if not pa.types.is_string(prices.type):
        return pc.cast(prices, pa.float64()), pa.chunked_array([pa.repeat(False, len(prices))])
    low = pc.struct_field(pc.extract_regex(prices, _PRICE), "low")  # null: no match
    parsed = pc.cast(pc.replace_substring(low, ",", ""), pa.float64())
    given = pc.not_equal(pc.utf8_trim_whitespace(prices), "")
    return parsed, pc.fill_null(pc.and_(given, pc.is_null(parsed)), False)


def _require_prices(records: pa.Table, price: pa.ChunkedArray, path: Path) -> None:
    """Raises :class:`MorecError` naming the first record whose price is negative (e.g. a
    2018 "-$5.00", which :data:`_PRICE` would leave unparsed) or not finite."""
    given = records["price"]
    negative = (pc.match_substring_regex(given, _NEGATIVE_PRICE)
                if pa.types.is_string(given.type) else pc.less(price, 0))
    for bad, what in ((negative, "negative"), (pc.invert(pc.is_finite(price)), "non-finite")):
        if pc.any(bad).as_py():
            row = pc.index(bad, True).as_py()
            raise MorecError(
                f"{path}: record {row + 1} (asin {records['asin'][row].as_py()!r}) has a "
                f"{what} price {given[row].as_py()!r}"
            )


def _element(lists: pa.ChunkedArray, index: int) -> pa.ChunkedArray:
    """Element ``index`` of each list; null where the list is null or too short."""
    padded = pc.list_slice(lists, index, index + 1, return_fixed_size_list=True)
    return pc.list_element(padded, 0)
