"""Drawing sub-batches from a window of rows: group counts from masses, then rows in groups.

All vectorised: one ``GroupIndex`` per (objective, window) orders the window's rows by
group once; the sub-batches of many batches are then drawn together in a handful of numpy
operations; draws by weight look rows up in an
:class:`~morec_rec.data.arrays.InverseCDF`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from morec_rec.data.arrays import InverseCDF


@dataclasses.dataclass(frozen=True)
class GroupIndex:
    """An objective's view of a window of ``n`` rows.

    Attributes:
        order: int64 (n,), window rows sorted by group (stable).
        start: int64 (G,), first position in ``order`` of each group.
        count: int64 (G,), rows of each group.
        weighted: the weights' running sums along ``order``; None when rows are drawn
            uniformly within a group.
        group_weight: float64 (G,), total weight of each group (row counts if uniform).
        weight_before: float64 (G,), the running sum just before each group's first row;
            None when uniform.
    """

    order: np.ndarray
    start: np.ndarray
    count: np.ndarray
    weighted: InverseCDF | None
    group_weight: np.ndarray
    weight_before: np.ndarray | None

    @classmethod
    def build(cls, groups: np.ndarray | None, weights: np.ndarray | None, num_groups: int,
              num_rows: int) -> "GroupIndex":
        """Indexes a window; ``groups`` None puts every row in group 0."""
        if groups is None:  # one group, in row order: no sort, no gather
            order = np.arange(num_rows)
            count = np.array([num_rows] + [0] * (num_groups - 1))
            ordered = weights
        else:
            # The narrowest dtype lets numpy's stable sort use radix sort.
            order = np.argsort(groups.astype(np.min_scalar_type(max(num_groups - 1, 0))),
                               kind="stable")
            count = np.bincount(groups, minlength=num_groups)
            ordered = None if weights is None else weights[order]
        start = np.cumsum(count) - count
        if ordered is None:
            return cls(order, start, count, None, count.astype(np.float64), None)
        weighted = InverseCDF.build(ordered)
        before = np.concatenate([[0.0], weighted.cumulative[:num_rows]])
        weight_before = before[start]
        group_weight = before[start + count] - weight_before
        return cls(order, start, count, weighted, group_weight, weight_before)

    @property
    def available(self) -> np.ndarray:
        """bool (G,): groups that hold rows of positive weight in this window."""
        return self.group_weight > 0


def largest_remainder(quota: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, each ``floor`` or ``ceil`` of ``quota``.

    ``quota`` sums to ``total``; the leftover units go to the largest fractional parts
    (ties to the lower index).
    """
    base = np.floor(quota).astype(np.int64)
    leftover = total - int(base.sum())
    if leftover > 0:
        base[np.argsort(-(quota - base), kind="stable")[:leftover]] += 1
    return base


def group_counts(masses: np.ndarray, totals: np.ndarray, rng: np.random.Generator,
                 mode: str) -> np.ndarray:
    """int64 (len(totals), G): how each of ``totals`` rows splits over the groups,
    ``multinomial`` or ``exact``."""
    if len(masses) == 1:
        return totals[:, None]
    p = masses / masses.sum()
    if mode == "exact":
        rounded = {t: largest_remainder(p * t, t) for t in set(totals.tolist())}
        return np.stack([rounded[t] for t in totals.tolist()])
    return rng.multinomial(totals, p)


def draw(index: GroupIndex, masses: np.ndarray, total: int, rng: np.random.Generator,
         mode: str, batches: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``batches`` sub-batches of ``total`` window rows each: group counts by
    ``masses``, rows by weight within a group, every row independently.

    Draws that fall on a group with no row (of positive weight) in the window are
    *starved*: they are re-drawn over the available groups in proportion to their masses
    (or, if those are all zero, to their weights) and counted.

    Returns:
        (rows, starved): int64 window row indices of shape (batches, total), each
        sub-batch grouped by group; int64 (batches, G) starved draws per group.
    """
    available = index.available
    counts = group_counts(masses, np.full(batches, total), rng, mode)
    starved = np.where(available, 0, counts)
    if starved.any():
        fallback = np.where(available, masses, 0.0)
        if fallback.sum() == 0:
            fallback = np.where(available, index.group_weight, 0.0)
        if fallback.sum() == 0:  # nothing in the window can be drawn: uniform over rows
            return rng.integers(0, len(index.order), (batches, total)), starved
        counts = np.where(available, counts, 0) + group_counts(
            fallback, starved.sum(axis=1), rng, mode)
    group = np.repeat(np.tile(np.arange(counts.shape[1]), batches), counts.ravel())
    u = rng.random(len(group))
    if index.weighted is None:
        # floor(u·count) < count for u < 1 and count < 2**53 (the product rounds down).
        position = index.start[group] + (u * index.count[group]).astype(np.int64)
    else:
        keys = index.weight_before[group] + u * index.group_weight[group]
        # Guard against float round-off at a group's upper end.
        last = index.start[group] + index.count[group] - 1
        position = np.minimum(index.weighted.locate(keys), last)
    return index.order[position].reshape(batches, total), starved
