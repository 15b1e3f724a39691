"""Reading tabular source files with errors that name the file, the column and the value.

Shared by every reader: CSV (optionally compressed, e.g. ``.csv.gz``) and Parquet input,
column presence and type checks, and fingerprints of the files that were read.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from morec_rec.errors import MorecError

_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"

#: The compressions that a CSV file's suffix selects (see :func:`_open_text`).
_COMPRESSIONS = ".gz, .bz2, .zst or .zip"


def require_file(path: Path) -> Path:
    """Returns ``path`` if it names a readable file; raises :class:`MorecError` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise MorecError(f"{path}: is a directory, expected a file")
    if not path.exists():
        raise MorecError(f"{path}: no such file")
    if not path.is_file():  # a pipe or device: read more than once, it would not hold
        raise MorecError(f"{path}: not a regular file (a pipe or a device); give a file")
    return path


def fingerprint(path: Path) -> dict[str, Any]:
    """Name, size in bytes and sha256 of a file, for the manifest's record of its source."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def read_table(path: Path, columns: Iterable[str], delimiter: str = ",") -> pa.Table:
    """Reads ``columns`` of a CSV or Parquet file, every CSV column as a string.

    Strings keep identifiers intact (leading zeros); numbers are converted afterwards by
    :func:`to_float` / :func:`to_seconds`, which report the first value that does not parse.
    A ``.parquet`` / ``.pq`` suffix selects Parquet; anything else is read as CSV, plain,
    compressed (``.gz``, ``.bz2``, ``.zst``) or as the only file of a ``.zip``. A file
    without rows is an error.
    """
    table = _read_table(require_file(path), list(columns), delimiter)
    if table.num_rows == 0:
        raise MorecError(f"{path}: no rows")
    return table


def _read_table(path: Path, columns: list[str], delimiter: str) -> pa.Table:
    """:func:`read_table`'s reading, empty or not; every string column is valid UTF-8."""
    if path.suffix in (".parquet", ".pq"):
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise MorecError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
        _require_columns(path, columns, schema.names)
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise MorecError(f"{path}: corrupt Parquet data ({first_line(e)})") from None
        _require_utf8(table, path)
        return table
    try:
        _require_utf8_header(path)
        with _open_text(path) as stream:
            header = pa_csv.open_csv(
                stream, parse_options=pa_csv.ParseOptions(delimiter=delimiter)
            ).schema.names
    except (pa.ArrowInvalid, OSError, zipfile.BadZipFile) as e:
        raise MorecError(f"{path}: not a readable CSV file ({first_line(e)})") from None
    _require_columns(path, columns, header)
    try:
        with _open_text(path) as stream:
            table = pa_csv.read_csv(
                stream,
                parse_options=pa_csv.ParseOptions(delimiter=delimiter),
                convert_options=pa_csv.ConvertOptions(
                    include_columns=columns,
                    column_types={c: pa.string() for c in columns},
                    # Only an empty cell, quoted or not, is missing (not "NA", "null"...).
                    null_values=[""],
                    strings_can_be_null=True,
                    check_utf8=False,  # checked below, to name the column and the row
                ),
            )
    except (pa.ArrowInvalid, OSError) as e:
        raise MorecError(f"{path}: malformed CSV ({first_line(e)})") from None
    _require_utf8(table, path)
    return table


def _require_utf8_header(path: Path) -> None:
    """Raises :class:`MorecError` unless the first line of a CSV file is UTF-8 text.

    Catches what would otherwise fail obscurely: another encoding (Latin-1; UTF-16, whose
    NUL bytes are valid UTF-8), or compressed data without its suffix.
    """
    with _open_text(path) as stream:
        line = stream.read(1 << 16).split(b"\n", 1)[0]
    try:
        codecs.getincrementaldecoder("utf-8")().decode(line)  # a cut last character is fine
        text = b"\0" not in line
    except UnicodeDecodeError:
        text = False
    if not text:
        raise MorecError(
            f"{path}: not UTF-8 text (convert it to UTF-8; a compressed file must be named "
            f"{_COMPRESSIONS})"
        )


def _require_utf8(table: pa.Table, path: Path) -> None:
    """Raises :class:`MorecError` naming the first column and row that is not UTF-8 text."""
    for column in table.column_names:
        row = first_invalid_utf8(table[column])
        if row is not None:
            raise MorecError(f"{path}: column '{column}' is not UTF-8 text in row {row}")


def first_invalid_utf8(values: pa.ChunkedArray) -> int | None:
    """The index of the first value holding a string that is not valid UTF-8, or None.

    For readers that do not check it (``pyarrow.json``, Parquet, CSV with ``check_utf8``
    off): a full validation, then a bisection (about twice the column's work) to the row.
    A list's row is that of its first bad element, a dictionary's that of its first bad
    value (validating a slice of either validates all its elements or dictionary).
    """
    if _is_valid(values):
        return None
    if pa.types.is_dictionary(values.type):
        return first_invalid_utf8(pc.cast(values, values.type.value_type))
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        element = first_invalid_utf8(pc.list_flatten(values))
        return None if element is None else pc.list_parent_indices(values)[element].as_py()
    low, high = 0, len(values)  # the first bad row lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if _is_valid(values.slice(low, middle - low)):
            low = middle
        else:
            high = middle
    return low


def _is_valid(values: pa.ChunkedArray) -> bool:
    try:
        values.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[Any]:
    """Opens a text file, decompressing ``.gz``/``.bz2``/``.zst`` or a one-file ``.zip``."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            if len(members) != 1:
                raise MorecError(f"{path}: expected one file in the archive, found {len(members)}")
            with archive.open(members[0]) as stream:
                yield stream
    else:
        with pa.input_stream(str(path), compression="detect") as stream:
            yield stream


def to_strings(table: pa.Table, column: str, path: Path) -> pa.ChunkedArray:
    """A column of text or numbers as strings, nulls kept.

    Accepts strings, integers, floats (NaN is an error), UTF-8 binary and dictionaries of
    these; any other type (e.g. a list) is an error naming the column.
    """
    values = _decoded(table[column])
    kind = values.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        values = pc.cast(values, pa.string(), safe=False)  # not checked by the cast...
        row = first_invalid_utf8(values)  # ...but here, to name the row
        if row is not None:
            raise MorecError(f"{path}: column '{column}' is not UTF-8 text in row {row}")
    elif pa.types.is_floating(kind):
        nan = pc.is_nan(values)
        if pc.any(nan).as_py():
            raise MorecError(f"{path}: column '{column}' is NaN in row {_first_index(nan)}")
    elif not (pa.types.is_string(kind) or pa.types.is_integer(kind)):
        raise MorecError(f"{path}: column '{column}' has type {kind}, expected text or integers")
    return values if values.type == pa.string() else pc.cast(values, pa.string())


def to_string_ids(table: pa.Table, column: str, path: Path) -> pa.ChunkedArray:
    """The identifier column as strings (see :func:`to_strings`); a null, empty or blank
    identifier is an error."""
    values = to_strings(table, column, path)
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
    if pc.any(blank).as_py():
        raise MorecError(f"{path}: column '{column}' is empty in row {_first_index(blank)}")
    return values


def to_float(table: pa.Table, column: str, path: Path) -> pa.ChunkedArray:
    """A numeric column as float64, nulls kept (an empty or blank string is null).

    Accepts numbers (decimals too), strings of numbers and dictionaries of these. A
    non-numeric value, NaN or an infinity (also one that overflows, such as "1e400") is an
    error naming the column, the row and the value.
    """
    return _floats(_decoded(table[column]), column, path)


def _floats(values: pa.ChunkedArray, column: str, path: Path) -> pa.ChunkedArray:
    """:func:`to_float` of a column that is not a dictionary."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = pc.if_else(pc.equal(pc.utf8_trim_whitespace(values), ""), None, values)
        bad = pc.invert(pc.match_substring_regex(values, _NUMBER))
        if pc.any(bad).as_py():
            row = _first_index(bad)
            raise MorecError(
                f"{path}: column '{column}' has a non-numeric value {values[row].as_py()!r} "
                f"in row {row}"
            )
        number = pc.cast(pc.utf8_trim_whitespace(values), pa.float64())
    elif (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
          or pa.types.is_decimal(values.type)):
        number = pc.cast(values, pa.float64())
    else:
        raise MorecError(f"{path}: column '{column}' has type {values.type}, expected numbers")
    non_finite = pc.invert(pc.is_finite(number))  # NaN too; null stays null
    if pc.any(non_finite).as_py():
        row = _first_index(non_finite)
        raise MorecError(
            f"{path}: column '{column}' has a non-finite value {values[row].as_py()!r} "
            f"in row {row}"
        )
    return number


def _decoded(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """A dictionary column as its values; a large string column as strings; others as is."""
    if pa.types.is_dictionary(values.type):
        values = pc.cast(values, values.type.value_type)
    if pa.types.is_large_string(values.type):
        values = pc.cast(values, pa.string())
    return values


def require_values(values: pa.ChunkedArray, column: str, path: Path) -> None:
    """Raises :class:`MorecError` naming the first null (empty) value of ``column``."""
    if values.null_count:
        row = _first_index(pc.is_null(values))
        raise MorecError(f"{path}: column '{column}' is empty in row {row}")


def to_seconds(table: pa.Table, column: str, path: Path) -> pa.ChunkedArray:
    """A time column as int64 seconds since the epoch.

    Accepts numbers (already seconds), Arrow timestamps or dates, and ISO-8601 strings
    (without a zone: UTC; with one, or ``Z``; fractions of a second are dropped; also large
    or dictionary-encoded), not a mixture of numbers and strings, nor of times with and
    without a zone. A missing or negative time, or one after :data:`MAX_SECONDS`
    (9999-12-31), is an error naming the value.
    """
    values = _decoded(table[column])
    require_values(values, column, path)
    kind = values.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):  # fractions of a second go
        seconds = pc.cast(pc.cast(values, pa.timestamp("s"), safe=False), pa.int64())
    elif pa.types.is_string(kind) and not pc.all(
        pc.match_substring_regex(values, _NUMBER)
    ).as_py():
        seconds = _parse_times(values, column, path)
    else:
        number = _floats(values, column, path)
        _require_time_range(number, values, column, path)  # before int64 could overflow
        seconds = pc.cast(pc.floor(number), pa.int64())
    _require_time_range(seconds, values, column, path)
    return seconds


#: The last second of 9999-12-31 UTC: a later time is taken for a mistake (e.g. a time in
#: nanoseconds), not for seconds since the epoch.
MAX_SECONDS = 253_402_300_799


def _require_time_range(seconds: pa.ChunkedArray, original: pa.ChunkedArray, column: str,
                        path: Path) -> None:
    """Raises :class:`MorecError` quoting the first value of ``original`` whose time in
    ``seconds`` is negative or after :data:`MAX_SECONDS`."""
    for bad, what, where in ((pc.less(seconds, 0), "a negative value", ""),
                             (pc.greater(seconds, MAX_SECONDS), "a value", " after 9999-12-31")):
        if pc.any(bad).as_py():
            row = _first_index(bad)
            raise MorecError(
                f"{path}: column '{column}' has {what} {original[row].as_py()} in row {row}"
                f"{where} (expected seconds since the epoch, 0 to {MAX_SECONDS})"
            )


def _parse_times(values: pa.ChunkedArray, column: str, path: Path) -> pa.ChunkedArray:
    """ISO-8601 strings as int64 seconds, for a column of strings not all numbers.

    Its first value says what the column holds: a number (then the first value that is
    not one is at fault) or a time (then the first value that does not parse is).
    """
    numeric = pc.match_substring_regex(values, _NUMBER)
    if pc.drop_null(numeric)[0].as_py():
        _not_a_time(values, _first_index(pc.invert(numeric)), column, path)
    # The first time says which kind the column holds: Arrow parses a time with a zone
    # only as a zoned timestamp, one without only as a naive one.
    kind = next((kind for kind in _TIME_KINDS if _parses(values.slice(0, 1), kind)), None)
    if kind is None:
        _not_a_time(values, 0, column, path)
    try:
        times = pc.cast(values, kind)
    except pa.ArrowInvalid:
        # Bisect to the first value that does not parse (pyarrow's message may quote
        # another).
        low, high = 0, len(values)  # the first bad row lies in [low, high)
        while high - low > 1:
            middle = (low + high) // 2
            if _parses(values.slice(low, middle - low), kind):
                low = middle
            else:
                high = middle
        _not_a_time(values, low, column, path)
    # Fractions of a second go.
    return pc.cast(pc.cast(times, pa.timestamp("s", kind.tz), safe=False), pa.int64())


#: What ISO-8601 strings are parsed as: without a zone (taken as UTC), or with one. In
#: microseconds, which hold fractions of a second and the years up to 9999.
_TIME_KINDS = (pa.timestamp("us"), pa.timestamp("us", "UTC"))


def _parses(values: pa.ChunkedArray, kind: pa.DataType) -> bool:
    try:
        pc.cast(values, kind)
    except pa.ArrowInvalid:
        return False
    return True


def _not_a_time(values: pa.ChunkedArray, row: int, column: str, path: Path) -> NoReturn:
    raise MorecError(
        f"{path}: column '{column}' is not a time in row {row}: {values[row].as_py()!r} "
        "(expected seconds since the epoch, or ISO-8601 such as 2015-01-31T12:00:00 (UTC) "
        "or 2015-01-31T12:00:00.5+02:00, one kind in the whole column)"
    )


def require_non_negative(values: pa.ChunkedArray, column: str, path: Path) -> None:
    """Raises :class:`MorecError` naming the first negative value of ``column``."""
    negative = pc.less(values, 0)
    if pc.any(negative).as_py():
        row = _first_index(negative)
        raise MorecError(
            f"{path}: column '{column}' has a negative value {values[row].as_py()} in row {row}"
        )


def first_per_key(table: pa.Table, column: str) -> tuple[pa.Table, int]:
    """Keeps the first row of each distinct value of ``column``; returns (table, rows dropped)."""
    codes = pc.dictionary_encode(table[column].combine_chunks()).indices.to_numpy()
    _, first = np.unique(codes, return_index=True)
    return table.take(np.sort(first)), table.num_rows - len(first)


def _require_columns(path: Path, wanted: list[str], present: list[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise MorecError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} "
            f"(found {', '.join(map(repr, present))})"
        )


def _first_index(mask: pa.ChunkedArray | pa.Array) -> int:
    return pc.index(mask, True).as_py()


def first_line(error: Exception) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
