"""The MoRec-metadata reader: the authors' item_meta_morec.csv and a generic interaction file."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from morec_rec.config import SourceConfig
from morec_rec.data.sources import morec_meta
from morec_rec.errors import MorecError

CONFIG = SourceConfig(
    user_column="user_id", item_column="item_id", time_column="ts", rating_column="stars"
)

INTERACTIONS = "user_id,item_id,ts,stars\n007,1,100,5\n8,2,1609459200.0,\n"

META = (
    "item_id,weight,fair_group,align_group\n"
    "1,12.5,3,1\n"
    "2,0,1,10\n"  # weight 0: a free item
    "3,,,2\n"  # empty weight and fair_group: missing
    "1,99,9,1\n"  # a repeated item_id keeps its first row
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def interactions(tmp_path: Path) -> Path:
    return _write(tmp_path / "interactions.csv", INTERACTIONS)


def test_values(tmp_path: Path, interactions: Path) -> None:
    raw = morec_meta.read(interactions, _write(tmp_path / "item_meta_morec.csv", META), CONFIG)
    assert raw.interactions.to_pydict() == {
        "user": ["007", "8"],
        "item": ["1", "2"],
        "timestamp": [100, 1609459200],
        "rating": [5.0, None],
    }
    assert raw.items.to_pydict() == {
        "item": ["1", "2", "3"],
        "price": [12.5, 0.0, None],
        "category": ["3", "1", None],
    }
    assert raw.source["name"] == "morec"
    assert [f["path"] for f in raw.source["files"]] == [
        str(interactions), str(tmp_path / "item_meta_morec.csv")
    ]
    assert raw.source["interactions_read"] == 2
    assert raw.source["catalogue_duplicates_dropped"] == 1


def test_align_group_is_ignored_and_recorded(tmp_path: Path, interactions: Path) -> None:
    raw = morec_meta.read(interactions, _write(tmp_path / "meta.csv", META), CONFIG)
    assert "align_group" not in raw.items.column_names
    assert "training split" in raw.source["ignored_columns"]["align_group"]


def test_parquet_interactions_without_rating(tmp_path: Path) -> None:
    path = tmp_path / "interactions.parquet"
    pq.write_table(pa.table({"u": [1, 2], "i": [3, 1], "t": [10, 20], "extra": [0, 0]}), path)
    config = SourceConfig(user_column="u", item_column="i", time_column="t")
    raw = morec_meta.read(path, _write(tmp_path / "meta.csv", META), config)
    assert raw.interactions.to_pydict() == {
        "user": ["1", "2"], "item": ["3", "1"], "timestamp": [10, 20], "rating": [None, None]
    }


def test_interaction_delimiter(tmp_path: Path) -> None:
    path = _write(tmp_path / "interactions.tsv", INTERACTIONS.replace(",", "\t"))
    config = SourceConfig(**{**vars(CONFIG), "delimiter": "\t"})
    raw = morec_meta.read(path, _write(tmp_path / "meta.csv", META), config)
    assert raw.interactions["user"].to_pylist() == ["007", "8"]


def test_negative_weight(tmp_path: Path, interactions: Path) -> None:
    meta = _write(tmp_path / "meta.csv", META + "4,-1.5,2,3\n")
    with pytest.raises(MorecError, match=r"meta\.csv: column 'weight' has a negative value -1\.5"):
        morec_meta.read(interactions, meta, CONFIG)


@pytest.mark.parametrize("column", ["fair_group", "align_group"])
def test_fractional_group(tmp_path: Path, interactions: Path, column: str) -> None:
    row = {"item_id": "4", "weight": "1", "fair_group": "2", "align_group": "3", column: "2.5"}
    meta = _write(tmp_path / "meta.csv", META + ",".join(row.values()) + "\n")
    with pytest.raises(MorecError, match=rf"meta\.csv: column '{column}' has a non-integer"):
        morec_meta.read(interactions, meta, CONFIG)


@pytest.mark.parametrize("column", ["item_id", "weight", "fair_group", "align_group"])
def test_missing_meta_column(tmp_path: Path, interactions: Path, column: str) -> None:
    header, *rows = META.splitlines()
    keep = [i for i, name in enumerate(header.split(",")) if name != column]
    text = "\n".join(",".join(line.split(",")[i] for i in keep) for line in [header, *rows])
    meta = _write(tmp_path / "meta.csv", text + "\n")
    with pytest.raises(MorecError, match=rf"meta\.csv: missing column\(s\) '{column}'"):
        morec_meta.read(interactions, meta, CONFIG)


def test_missing_interaction_column(tmp_path: Path, interactions: Path) -> None:
    config = SourceConfig(**{**vars(CONFIG), "time_column": "when"})
    with pytest.raises(MorecError, match=r"interactions\.csv: missing column\(s\) 'when'"):
        morec_meta.read(interactions, _write(tmp_path / "meta.csv", META), config)


def test_meta_is_required(interactions: Path) -> None:
    with pytest.raises(MorecError, match="--meta"):
        morec_meta.read(interactions, None, CONFIG)


def test_missing_files(tmp_path: Path, interactions: Path) -> None:
    with pytest.raises(MorecError, match=r"item_meta_morec\.csv: no such file"):
        morec_meta.read(interactions, tmp_path / "item_meta_morec.csv", CONFIG)
    with pytest.raises(MorecError, match=r"nothere\.csv: no such file"):
        morec_meta.read(tmp_path / "nothere.csv", _write(tmp_path / "meta.csv", META), CONFIG)


@pytest.mark.parametrize(("row", "message"), [
    ("4,1e400,2,3", "column 'weight' has a non-finite value '1e400' in row 4"),
    ("4,1,1e30,3", "column 'fair_group' has a value 1e30 in row 4 outside the 64-bit "
                   "integer range"),
    ("4,1,2,-1e19", "column 'align_group' has a value -1e19 in row 4 outside the 64-bit "
                    "integer range"),
])
def test_values_out_of_range(tmp_path: Path, interactions: Path, row: str, message: str) -> None:
    meta = _write(tmp_path / "meta.csv", META + row + "\n")
    with pytest.raises(MorecError, match=rf"meta\.csv: {re.escape(message)}$"):
        morec_meta.read(interactions, meta, CONFIG)
