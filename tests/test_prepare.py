"""Preparation against hand-computed small cases: filters, k-core, split, ids, history."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import raw_data

from morec_rec.config import PrepareConfig
from morec_rec.data.format import FORMAT_VERSION, ROW_SCHEMA, PreparedDataset
from morec_rec.data import prepare as prepare_module
from morec_rec.data.prepare import check_output, prepare
from morec_rec.data.raw import RawData
from morec_rec.errors import MorecError


def _config(**fields: Any) -> PrepareConfig:
    """Settings for a few items: a 3-core and 3 popularity groups (at most one per item)."""
    return PrepareConfig(k_core=3, popularity_groups=3, **fields)


def _rows(root: Path, split: str) -> list[dict]:
    return PreparedDataset.open(root).split(split).sort_by("user_id").to_pylist()


def test_k_core_cascades_until_stable(cascade: RawData, tmp_path: Path) -> None:
    # Round 1 drops u4 (2 rows), u7 (2), items d (2), f (2), g (1); then u5 and u6 keep
    # 2 rows each and e keeps 2, so round 2 drops them. Left: u1..u3 × {a, b, c}.
    manifest = prepare(cascade, tmp_path / "d", _config(min_group_share=0))
    assert manifest["filtering"]["k_core"] == {
        "k": 3, "iterations": 2, "interactions_removed": 11, "users_removed": 4,
        "items_removed": 4,
    }
    assert manifest["num_users"] == 3 and manifest["num_items"] == 3
    assert manifest["num_interactions"] == {"train": 3, "valid": 3, "test": 3}
    items = PreparedDataset.open(tmp_path / "d").items()
    assert items["original_id"].to_pylist() == ["a", "b", "c"]
    # u1 and u2 train on a; u3's training item is one of its three same-time items.
    count = items["train_count"].to_pylist()
    assert sum(count) == 3 and count[0] >= 2


def test_leave_one_out_by_time_and_history(cascade: RawData, tmp_path: Path) -> None:
    prepare(cascade, tmp_path / "d", _config(history_length=1))
    train, valid, test = (_rows(tmp_path / "d", s) for s in ("train", "valid", "test"))
    # u1 (id 0): a@1 → train, b@2 → valid, c@3 → test; history keeps only the last item.
    assert (train[0]["item_id"], train[0]["history"]) == (0, [])
    assert (valid[0]["item_id"], valid[0]["history"]) == (1, [0])
    assert (test[0]["item_id"], test[0]["history"]) == (2, [1])
    assert [r["timestamp"] for r in (train[0], valid[0], test[0])] == [1, 2, 3]


def test_full_history_is_every_earlier_item(cascade: RawData, tmp_path: Path) -> None:
    prepare(cascade, tmp_path / "d", _config(history_length=50))
    test = _rows(tmp_path / "d", "test")
    assert test[0]["history"] == [0, 1]  # u1: a, b before c


def test_same_time_order_is_seeded_and_ignores_row_order(cascade: RawData, tmp_path: Path) -> None:
    # u3 bought a, b and c at the same time: which one is held out depends only on the seed.
    shuffled = RawData(cascade.interactions.take(np.random.default_rng(7).permutation(20)),
                       cascade.items, cascade.source)
    prepare(cascade, tmp_path / "one", _config())
    prepare(shuffled, tmp_path / "two", _config())
    for split in ("train", "valid", "test"):
        assert _rows(tmp_path / "one", split) == _rows(tmp_path / "two", split)
    orders = set()
    for seed in range(8):
        prepare(cascade, tmp_path / f"s{seed}", _config(seed=seed))
        orders.add(tuple(r["item_id"] for s in ("valid", "test")
                         for r in _rows(tmp_path / f"s{seed}", s) if r["user_id"] == 2))
    assert len(orders) > 1, "the tie-break should depend on the seed"


def test_rating_filter_and_duplicates(tmp_path: Path) -> None:
    rows = [(u, i, t) for u in ("x", "y", "z") for t, i in enumerate("pqr")]
    rows += [("x", "p", 9), ("y", "s", 9)]  # a repeat of (x, p) and a rating-2 row
    ratings = [5.0] * 9 + [4.0, 2.0]
    raw = raw_data(rows, {i: (1.0, "c") for i in "pqrs"}, ratings)
    manifest = prepare(raw, tmp_path / "d", _config())
    assert manifest["filtering"]["rating_below_min"] == 1
    assert manifest["filtering"]["duplicate_pairs"] == 1
    assert manifest["num_interactions"] == {"train": 3, "valid": 3, "test": 3}
    # The repeat of (x, p) at t=9 is dropped: p stays x's first (training) item.
    assert _rows(tmp_path / "d", "train")[0]["item_id"] == 0


def test_missing_price_and_category_imputed(tmp_path: Path) -> None:
    rows = [(u, i, t) for u in ("x", "y", "z") for t, i in enumerate("pqrs")]
    items = {"p": (2.0, "c1"), "q": (4.0, "c1"), "r": (None, "c1"), "s": (0.0, None)}
    manifest = prepare(raw_data(rows, items), tmp_path / "d",
                       _config(min_group_share=0))
    got = {i["original_id"]: (i["price"], i["category"])
           for i in PreparedDataset.open(tmp_path / "d").items().to_pylist()}
    # r: the median of c1's known prices (2, 4); s keeps its valid zero price.
    assert got == {"p": (2.0, "c1"), "q": (4.0, "c1"), "r": (3.0, "c1"), "s": (0.0, "unknown")}
    assert manifest["filtering"]["items_missing_price"] == 1
    assert manifest["filtering"]["items_missing_category"] == 1
    assert manifest["price"]["free_items"] == 1


def test_missing_policy_error(tmp_path: Path) -> None:
    rows = [(u, i, t) for u in ("x", "y", "z") for t, i in enumerate("pqr")]
    raw = raw_data(rows, {"p": (1.0, "c"), "q": (None, "c"), "r": (1.0, "c")})
    with pytest.raises(MorecError, match="1 item\\(s\\) without a price.*'q'"):
        prepare(raw, tmp_path / "d", _config(missing="error"))
    assert not (tmp_path / "d").exists()


def test_manifest_and_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{i}", int(t)) for u in range(60)
            for t, i in enumerate(rng.choice(40, size=12, replace=False))]
    items = {f"i{i}": (float(i), f"c{i % 4}") for i in range(40)}
    config = PrepareConfig(k_core=3, row_group_size=100, rows_per_shard=250, popularity_groups=4)
    manifest = prepare(raw_data(rows, items), tmp_path / "d", config)
    dataset = PreparedDataset.open(tmp_path / "d")
    assert dataset.manifest == json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["num_interactions"] == {"train": 600, "valid": 60, "test": 60}
    assert [s["rows"] for s in manifest["shards"]] == [250, 250, 100]
    for shard in manifest["shards"]:
        metadata = pq.ParquetFile(tmp_path / "d" / shard["path"]).metadata
        assert metadata.num_row_groups == shard["row_groups"] == -(-shard["rows"] // 100)
    train = dataset.split("train")
    assert train.schema == ROW_SCHEMA
    assert sorted(zip(train["user_id"].to_pylist(), train["timestamp"].to_pylist())) == sorted(
        (u, t) for u in range(60) for t in range(10)
    )
    popularity = manifest["groups"]["popularity"]
    assert popularity["num_items"] == [10, 10, 10, 10]
    assert sum(popularity["train_rows"]) == 600
    assert np.isclose(sum(popularity["q"]), 1.0)
    counts = np.bincount(train["item_id"].to_numpy(), minlength=40)
    np.testing.assert_array_equal(dataset.items()["train_count"].to_numpy(), counts)
    # Row attributes are the item's.
    items_table = dataset.items()
    for column in ("price", "fairness_group", "popularity_group"):
        np.testing.assert_array_equal(
            train[column].to_numpy(), items_table[column].to_numpy()[train["item_id"].to_numpy()]
        )
    assert manifest["source"] == {"name": "test"}
    assert manifest["parameters"]["rows_per_shard"] == 250
    assert manifest["format_version"] == FORMAT_VERSION
    assert (manifest["num_users"], manifest["num_items"]) == (60, 40)
    # Fairness groups: the four categories of 10 items each (none folded at 2%).
    fairness = manifest["groups"]["fairness"]
    assert sorted(fairness["names"]) == ["c0", "c1", "c2", "c3"]
    assert fairness["num_items"] == [10, 10, 10, 10] and fairness["folded_categories"] == []
    assert [sum(fairness[f"{s}_rows"]) for s in ("train", "valid", "test")] == [600, 60, 60]
    # Prices 0..39: statistics over items, and the mean over training rows.
    price = manifest["price"]
    assert (price["item_min"], price["item_max"], price["item_mean"]) == (0.0, 39.0, 19.5)
    assert price["free_items"] == 1 and price["imputed_items"] == 0
    assert np.isclose(price["train_row_mean"], train["price"].to_numpy().mean())


def test_train_rows_are_shuffled(tmp_path: Path) -> None:
    rows = [(f"u{u:03d}", f"i{i}", t) for u in range(200) for t, i in enumerate(range(6))]
    prepare(raw_data(rows, {f"i{i}": (1.0, "c") for i in range(6)}), tmp_path / "d",
            _config())
    users = PreparedDataset.open(tmp_path / "d").split("train")["user_id"].to_numpy()
    # Sorted order would give a correlation of 1; a random order about 0 (sd ~ 1/sqrt(800)).
    assert abs(np.corrcoef(users, np.arange(len(users)))[0, 1]) < 0.15


def test_open_rejects_incomplete_dataset(cascade: RawData, tmp_path: Path) -> None:
    prepare(cascade, tmp_path / "d", _config())
    (tmp_path / "d" / "valid.parquet").unlink()
    with pytest.raises(MorecError, match="valid.parquet is missing"):
        PreparedDataset.open(tmp_path / "d")
    with pytest.raises(MorecError, match="not a prepared dataset"):
        PreparedDataset.open(tmp_path)


def test_interrupted_write_leaves_nothing(cascade: RawData, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("morec_rec.data.prepare._write_train", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare(cascade, tmp_path / "d", _config())
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_is_one_line_and_leaves_nothing(cascade: RawData, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def full(root: Path, *args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / "train"))

    monkeypatch.setattr("morec_rec.data.prepare._write_train", full)
    with pytest.raises(MorecError, match=r"/\.d\.partial-\d+/train: cannot be written "
                                         r"\(No space left on device\)$"):
        prepare(cascade, tmp_path / "d", _config())
    assert list(tmp_path.iterdir()) == []


def test_an_output_written_meanwhile_keeps_the_prepared_data(
        cascade: RawData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_train = prepare_module._write_train

    def and_another_process(root: Path, *args: object) -> object:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "theirs").write_text("")
        return write_train(root, *args)

    monkeypatch.setattr("morec_rec.data.prepare._write_train", and_another_process)
    with pytest.raises(MorecError, match="something else was written there meanwhile; the "
                                         "prepared data is complete in") as raised:
        prepare(cascade, tmp_path / "d", _config())
    kept = Path(str(raised.value).rpartition(" in ")[2])
    assert PreparedDataset.open(kept).manifest["num_users"] == 3
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["theirs"]


def test_a_killed_process_staging_is_removed_by_the_next(cascade: RawData,
                                                         tmp_path: Path) -> None:
    abandoned = tmp_path / f".d.partial-{_gone_pid()}"
    (abandoned / "train").mkdir(parents=True)
    running = tmp_path / f".d.partial-{os.getppid()}"  # another prepare's, still running
    running.mkdir()
    prepare(cascade, tmp_path / "d", _config())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", running.name])


def _gone_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_current_directory_is_refused_as_output(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for out in (".", "", str(tmp_path.parent)):
        with pytest.raises(MorecError, match="output holds the current directory"):
            check_output(Path(out))


def test_prepare_into_existing_empty_directory(cascade: RawData, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    prepare(cascade, tmp_path / "d", _config())
    assert PreparedDataset.open(tmp_path / "d").manifest["num_users"] == 3
    with pytest.raises(MorecError, match="not an empty directory"):
        prepare(cascade, tmp_path / "d", _config())


def test_history_type_is_a_list_of_ints(cascade: RawData, tmp_path: Path) -> None:
    prepare(cascade, tmp_path / "d", _config())
    schema = pq.read_schema(tmp_path / "d" / "test.parquet")
    assert schema.field("history").type == pa.list_(pa.field("item", pa.int32(), nullable=False))
