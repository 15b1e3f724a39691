"""Item groups of the objectives: popularity groups (alignment) and fairness groups.

Both are computed per item over contiguous item ids ``0..num_items-1``: popularity
groups from the items' training counts, fairness groups from their categories and the
item ids of each split's rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

OTHER = "other"


@dataclasses.dataclass(frozen=True)
class PopularityGroups:
    """Popularity group per item; group 0 holds the least popular items.

    Attributes:
        group_of_item: int16, shape (num_items,).
        train_count: int64, shape (num_items,), training interactions per item.
    """

    group_of_item: np.ndarray
    train_count: np.ndarray
    num_groups: int
    rule: str

    def describe(self) -> dict[str, Any]:
        rows = np.bincount(self.group_of_item, weights=self.train_count, minlength=self.num_groups)
        counts = [self.train_count[self.group_of_item == g] for g in range(self.num_groups)]
        return {
            "rule": self.rule,
            "order": "ascending popularity: group 0 holds the least popular items",
            "num_items": np.bincount(self.group_of_item, minlength=self.num_groups).tolist(),
            "train_rows": rows.astype(np.int64).tolist(),
            "min_train_count": [int(c.min()) if len(c) else None for c in counts],
            "max_train_count": [int(c.max()) if len(c) else None for c in counts],
            # Q: each group's share of the training interactions (the alignment target).
            "q": (rows / rows.sum()).tolist(),
        }


def popularity_groups(train_count: np.ndarray, num_groups: int, rule: str) -> PopularityGroups:
    """Cuts items, sorted by training count (ties by id), into ``num_groups`` groups.

    ``equal_items``: group sizes differ by at most one item. ``equal_interactions``: an
    item's group is the count-weighted quantile of its mid-point, so groups hold about
    equal shares of the training interactions (their sizes then differ widely).
    """
    num_items = len(train_count)
    order = np.lexsort((np.arange(num_items), train_count))
    if rule == "equal_items":
        sorted_group = np.arange(num_items) * num_groups // num_items
    elif rule == "equal_interactions":
        # The group of an item's mid-point in the cumulative training count.
        count = train_count[order].astype(np.int64)
        mid = 2 * (np.cumsum(count) - count) + count
        sorted_group = np.minimum(mid * num_groups // max(2 * count.sum(), 1), num_groups - 1)
    else:
        raise ValueError(f"unknown popularity rule {rule!r}")
    group = np.empty(num_items, dtype=np.int16)
    group[order] = sorted_group
    return PopularityGroups(group, train_count.astype(np.int64), num_groups, rule)


@dataclasses.dataclass(frozen=True)
class FairnessGroups:
    """Fairness group per item: its category, or "other" for folded small categories.

    Attributes:
        group_of_item: int16, shape (num_items,); groups ordered by training rows,
            largest first, with "other" (if any) last.
        names: group names, indexed by group id.
        folded: the categories folded into "other", sorted.
        rows: per split ("train", "valid", "test"), int64 rows per group.
    """

    group_of_item: np.ndarray
    names: list[str]
    folded: list[str]
    rows: dict[str, np.ndarray]
    min_share: float

    def describe(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "num_items": np.bincount(self.group_of_item, minlength=len(self.names)).tolist(),
            **{f"{split}_rows": r.tolist() for split, r in self.rows.items()},
            "folded_categories": self.folded,
            "min_share": self.min_share,
        }


def fairness_groups(
    category: pa.Array,
    train_items: np.ndarray,
    valid_items: np.ndarray,
    test_items: np.ndarray,
    min_share: float,
) -> FairnessGroups:
    """Folds the smallest categories into "other" until every group is measurable.

    Categories are taken in increasing order of their smaller held-out share (share of the
    validation rows, share of the test rows); the fewest smallest ones are folded such
    that every remaining category and the "other" group each hold at least ``min_share``
    of the validation rows and of the test rows. A category literally named "other" is
    always part of the folded group.

    Args:
        category: string array, shape (num_items,), each item's category.
        *_items: item ids of the rows of each split.
    """
    encoded = pc.dictionary_encode(category)
    names = encoded.dictionary.to_pylist()
    code = encoded.indices.to_numpy()
    n = len(names)
    split_items = {"train": train_items, "valid": valid_items, "test": test_items}
    rows = {s: np.bincount(code[items], minlength=n) for s, items in split_items.items()}
    share = np.minimum(rows["valid"] / max(len(valid_items), 1),
                       rows["test"] / max(len(test_items), 1))
    share[[i for i, name in enumerate(names) if name == OTHER]] = -np.inf
    order = sorted(range(n), key=lambda c: (share[c], names[c]))  # one entry per category

    # Folding the first k categories of ``order`` works when the (k+1)-th is large enough
    # and the folded group is large enough; take the smallest such k.
    sorted_share = share[order]
    folded_valid = np.concatenate([[0], np.cumsum(rows["valid"][order])])
    folded_test = np.concatenate([[0], np.cumsum(rows["test"][order])])
    k = np.arange(n + 1)
    rest_ok = np.append(sorted_share >= min_share, True)
    folded_ok = (k == 0) | ((folded_valid >= min_share * len(valid_items))
                            & (folded_test >= min_share * len(test_items)))
    always = int(np.count_nonzero(np.isneginf(share)))
    k_fold = int(np.flatnonzero(rest_ok & folded_ok & (k >= always))[0])

    kept = sorted(order[k_fold:], key=lambda c: (-rows["train"][c], names[c]))
    group_of_code = np.full(n, len(kept), dtype=np.int16)
    group_of_code[kept] = np.arange(len(kept))
    group_names = [names[c] for c in kept] + ([OTHER] if k_fold else [])
    group_rows = {
        s: np.bincount(group_of_code[code[items]], minlength=len(group_names)).astype(np.int64)
        for s, items in split_items.items()
    }
    return FairnessGroups(
        group_of_item=group_of_code[code],
        names=group_names,
        folded=sorted(names[c] for c in order[:k_fold]),
        rows=group_rows,
        min_share=min_share,
    )
