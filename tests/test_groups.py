"""Popularity and fairness groups, and the array helpers, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from morec_rec.data import arrays
from morec_rec.data.groups import fairness_groups, popularity_groups


def test_popularity_equal_items() -> None:
    # Sorted by (count, id): item 4 (0), 1 (1), 2 (3), 3 (3), 0 (5), 5 (8) → 2 items a group.
    groups = popularity_groups(np.array([5, 1, 3, 3, 0, 8]), 3, "equal_items")
    assert groups.group_of_item.tolist() == [2, 0, 1, 1, 0, 2]
    described = groups.describe()
    assert described["train_rows"] == [1, 6, 13]
    assert described["q"] == pytest.approx([0.05, 0.30, 0.65])
    assert described["min_train_count"] == [0, 3, 5]
    assert described["max_train_count"] == [1, 3, 8]


def test_popularity_equal_interactions() -> None:
    # Mid-points of the sorted counts 0,1,3,3,5,8 over 20: 0, .025, .125, .275, .475, .8.
    groups = popularity_groups(np.array([5, 1, 3, 3, 0, 8]), 3, "equal_interactions")
    assert groups.group_of_item.tolist() == [1, 0, 0, 0, 0, 2]


def test_popularity_more_groups_than_items() -> None:
    groups = popularity_groups(np.array([2, 1]), 4, "equal_items")
    assert groups.describe()["num_items"] == [1, 0, 1, 0]


def _fold(min_share: float, names: list[str] = list("ABCDE")):
    items = np.arange(5)
    return fairness_groups(
        pa.array(names),
        train_items=np.repeat(items, [10, 50, 30, 1, 1]),
        valid_items=np.repeat(items, [40, 30, 20, 6, 4]),
        test_items=np.repeat(items, [35, 35, 20, 2, 8]),
        min_share=min_share,
    )


def test_fairness_folds_fewest_smallest() -> None:
    # Smaller held-out shares: D .02, E .04, C .20, B .30, A .35. At 5%, folding D alone
    # leaves E too small; folding D and E gives "other" 10% of valid and of test.
    groups = _fold(0.05)
    assert groups.names == ["B", "C", "A", "other"]  # by training rows, "other" last
    assert groups.folded == ["D", "E"]
    assert groups.group_of_item.tolist() == [2, 0, 1, 3, 3]
    assert groups.rows["valid"].tolist() == [30, 20, 40, 10]
    assert groups.rows["test"].tolist() == [35, 20, 35, 10]


def test_fairness_folds_more_when_other_is_too_small() -> None:
    # At 11%, D+E (10%) is too small as a group: C (20%) joins it.
    groups = _fold(0.11)
    assert groups.names == ["B", "A", "other"]
    assert groups.folded == ["C", "D", "E"]


def test_fairness_no_folding_needed() -> None:
    groups = _fold(0.01)
    assert groups.folded == [] and "other" not in groups.names


def test_fairness_category_named_other_is_always_folded() -> None:
    groups = _fold(0.01, names=["A", "B", "other", "D", "E"])
    assert groups.folded == ["other"] and groups.names[-1] == "other"
    assert groups.group_of_item.tolist()[2] == len(groups.names) - 1


def test_median_and_mode() -> None:
    codes = np.array([0, 0, 0, 1, 1, 3])
    values = np.array([3.0, 1.0, 2.0, 4.0, 10.0, 5.0])
    median = arrays.median(codes, values, 4)
    assert median[[0, 1, 3]].tolist() == [2.0, 7.0, 5.0] and np.isnan(median[2])
    labels = np.array([2, 1, 2, 5, 4, 0])
    assert arrays.mode(codes, labels, 4).tolist() == [2, 4, -1, 0]  # group 1: tie → 4


def test_encode_sorted_round_trip() -> None:
    values = pa.chunked_array([["b", "a"], ["c", "a"]])
    codes, distinct = arrays.encode_sorted(values)
    assert codes.tolist() == [1, 0, 2, 0] and distinct.to_pylist() == ["a", "b", "c"]


def test_ranges() -> None:
    indices, offsets = arrays.ranges(np.array([5, 0, 9]), np.array([2, 0, 3]))
    assert indices.tolist() == [5, 6, 9, 10, 11] and offsets.tolist() == [0, 2, 2, 5]


@pytest.mark.parametrize("weights", [
    np.random.default_rng(0).lognormal(0.0, 2.0, 5000),  # heavy-tailed, like prices
    np.r_[np.full(4000, 1e-9), 1e6, np.zeros(500), np.ones(499)],  # crowded buckets
    np.r_[0.0, 0.0, 2.0, 0.0, 3.0, 0.0],  # runs of zero weight
], ids=["lognormal", "crowded", "zeros"])
@pytest.mark.parametrize("per_row", [None, 1 / 1000, 16])
def test_locate_matches_a_binary_search(weights: np.ndarray, per_row: float | None) -> None:
    # Guides of one bucket a row (the default), far fewer (long runs of steps, then the
    # binary search) and many more.
    buckets = None if per_row is None else max(1, int(per_row * len(weights)))
    inverse = arrays.InverseCDF.build(weights, buckets)
    running = inverse.cumulative[:len(weights)]
    np.testing.assert_allclose(running, np.cumsum(weights), rtol=1e-12)
    keys = np.r_[np.random.default_rng(1).random(20_000) * inverse.total, 0.0, running,
                 np.nextafter(inverse.total, 0), inverse.total, 2 * inverse.total]
    expected = np.searchsorted(running, keys, side="right")
    np.testing.assert_array_equal(inverse.locate(keys), expected)
