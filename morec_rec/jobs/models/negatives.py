"""Negative items for implicit-feedback losses, drawn by item popularity.

The paper's training protocol: negatives come from the item-popularity distribution
∝ count^β (β = 0.75 by default, as in word2vec); β = 0 draws uniformly over all items.
"""

from __future__ import annotations

import numpy as np

from morec_rec.data.arrays import InverseCDF
from morec_rec.errors import MorecError


#: Guide buckets an item (:class:`~morec_rec.data.arrays.InverseCDF`): about one draw in
#: 30 then steps past its bucket's first item, against one in two at a bucket an item.
BUCKETS_PER_ITEM = 16
#: At most this many buckets (8 MiB of guide), unless the catalogue has more items.
MAX_BUCKETS = 1 << 20


class NegativeSampler:
    """Draws item ids ∝ ``train_count ** beta``, never a row's own positive.

    With ``beta > 0`` items that never occur in training have weight 0 and are never
    drawn; with ``beta == 0`` every item has weight 1. Draws are inverse-CDF lookups on
    the cumulative weights (:class:`~morec_rec.data.arrays.InverseCDF`), vectorised,
    with a fine guide: about one lookup each. Holds only numpy arrays, so it pickles to
    DataLoader workers.

    Args:
        train_count: int (num_items,), training interactions per item id.
        beta: the popularity exponent, >= 0.
        buckets_per_item: the guide's buckets an item (at most :data:`MAX_BUCKETS` in
            all, at least one an item); the draws do not depend on it, their cost does.
    """

    def __init__(self, train_count: np.ndarray, beta: float = 0.75, *,
                 buckets_per_item: int = BUCKETS_PER_ITEM) -> None:
        counts = np.asarray(train_count, dtype=np.float64)
        if counts.ndim != 1 or (counts < 0).any():
            raise MorecError("negative sampler: train_count must be a 1-d array of counts >= 0")
        if beta < 0:
            raise MorecError(f"negative sampler: beta {beta} must be >= 0")
        if buckets_per_item < 1:
            raise MorecError(f"negative sampler: buckets_per_item {buckets_per_item} must be "
                             ">= 1")
        # Relative to the largest count, whose power cannot overflow (a large beta leaves
        # the rarest items a weight of 0).
        weights = np.ones_like(counts) if beta == 0 else (counts / counts.max()) ** beta
        drawable = np.flatnonzero(weights > 0)
        # With a single drawable item, a row whose positive is that item has no negative.
        if len(drawable) < 2:
            raise MorecError("negative sampler: fewer than 2 items can be drawn")
        buckets = min(buckets_per_item * len(weights), max(len(weights), MAX_BUCKETS))
        self._inverse = InverseCDF.build(weights, buckets)
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
        flat = negatives.reshape(-1)  # a view; hits in row-major order, as np.nonzero's
        hit = np.flatnonzero(negatives == positives[:, None])
        while hit.size:
            flat[hit] = self.draw(hit.size, rng)
            hit = hit[flat[hit] == positives[hit // n]]
        return negatives
