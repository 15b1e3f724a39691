"""Negative items for implicit-feedback losses, drawn by item popularity.

The paper's training protocol: negatives come from the item-popularity distribution
∝ count^β (β = 0.75 by default, as in word2vec); β = 0 draws uniformly over all items.
"""

from __future__ import annotations

import numpy as np

from morec_rec.data.arrays import InverseCDF
from morec_rec.errors import MorecError


class NegativeSampler:
    """Draws item ids ∝ ``train_count ** beta``, never a row's own positive.

    With ``beta > 0`` items that never occur in training have weight 0 and are never
    drawn; with ``beta == 0`` every item has weight 1. Draws are inverse-CDF lookups on
    the cumulative weights (:class:`~morec_rec.data.arrays.InverseCDF`): O(1)
    expected steps each, vectorised. Holds only numpy arrays, so it pickles to
    DataLoader workers.

    Args:
        train_count: int (num_items,), training interactions per item id.
        beta: the popularity exponent, >= 0.
    """

    def __init__(self, train_count: np.ndarray, beta: float = 0.75) -> None:
        counts = np.asarray(train_count, dtype=np.float64)
        if counts.ndim != 1 or (counts < 0).any():
            raise MorecError("negative sampler: train_count must be a 1-d array of counts >= 0")
        if beta < 0:
            raise MorecError(f"negative sampler: beta {beta} must be >= 0")
        weights = np.ones_like(counts) if beta == 0 else counts**beta
        drawable = np.flatnonzero(weights > 0)
        # With a single drawable item, a row whose positive is that item has no negative.
        if len(drawable) < 2:
            raise MorecError("negative sampler: fewer than 2 items can be drawn")
        self._inverse = InverseCDF.build(weights)
        self._last = int(drawable[-1])

    def draw(self, size: int | tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """int64 item ids of shape ``size``, independent draws ∝ weight."""
        ids = self._inverse.locate((rng.random(size) * self._inverse.total).ravel())
        # u * total can round up to total itself; the last drawable item owns that edge.
        return np.minimum(ids, self._last, out=ids).reshape(size)

    def sample(self, positives: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """int64 (B, n): ``n`` negatives per row, none equal to the row's positive.

        A row's negatives are independent draws from the distribution restricted to
        items other than its positive: collisions are re-drawn until none is left, in
        1 / (1 − largest item probability) rounds on average.
        """
        positives = np.asarray(positives, dtype=np.int64)
        negatives = self.draw((len(positives), n), rng)
        hit = np.nonzero(negatives == positives[:, None])
        while len(hit[0]):
            negatives[hit] = self.draw(len(hit[0]), rng)
            clash = negatives[hit] == positives[hit[0]]
            hit = (hit[0][clash], hit[1][clash])
        return negatives
