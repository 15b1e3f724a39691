"""Vectorised array helpers: sorted codes, per-group reductions, gathers of ranges, and
inverse-CDF lookups."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


def encode_sorted(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Codes for ``values``: each value's rank among the sorted distinct values.

    Returns:
        (codes, distinct): int64 array of shape (len(values),), and the sorted distinct
        values, so that ``distinct.take(codes)`` equals ``values``.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = pc.dictionary_encode(values)
    order = pc.array_sort_indices(encoded.dictionary).to_numpy().astype(np.int64)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[encoded.indices.to_numpy()], encoded.dictionary.take(order)


def median(codes: np.ndarray, values: np.ndarray, num_groups: int) -> np.ndarray:
    """Exact median of ``values`` per group ``codes`` (0..num_groups-1); NaN for empty groups.

    Args:
        codes: int array, shape (n,), the group of each value.
        values: float array, shape (n,).
    Returns:
        float64 array, shape (num_groups,).
    """
    order = np.lexsort((values, codes))
    sorted_values = values[order].astype(np.float64)
    count = np.bincount(codes, minlength=num_groups)
    start = np.cumsum(count) - count
    result = np.full(num_groups, np.nan)
    has = count > 0
    low = start[has] + (count[has] - 1) // 2
    high = start[has] + count[has] // 2
    result[has] = (sorted_values[low] + sorted_values[high]) / 2
    return result


def mode(codes: np.ndarray, labels: np.ndarray, num_groups: int) -> np.ndarray:
    """The most frequent label per group, the smallest label among equally frequent ones.

    Args:
        codes: int array, shape (n,), the group of each row.
        labels: non-negative int array, shape (n,).
    Returns:
        int64 array, shape (num_groups,); -1 for empty groups.
    """
    base = int(labels.max(initial=0)) + 1
    unique_pairs, frequency = np.unique(codes.astype(np.int64) * base + labels, return_counts=True)
    group, label = unique_pairs // base, unique_pairs % base
    # Within each group: highest frequency first, then the smallest label.
    order = np.lexsort((label, -frequency, group))
    first = np.ones(len(order), dtype=bool)
    first[1:] = group[order][1:] != group[order][:-1]
    result = np.full(num_groups, -1, dtype=np.int64)
    result[group[order][first]] = label[order][first]
    return result


def ranges(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the ranges ``[starts[i], starts[i] + sizes[i])`` laid end to end.

    Returns:
        (indices, offsets): int64 indices of shape (sizes.sum(),), and int32 offsets of
        shape (len(sizes) + 1,) such that range i is ``indices[offsets[i]:offsets[i+1]]``.
    """
    offsets = np.zeros(len(sizes) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    indices = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], sizes)
    return indices + np.arange(offsets[-1]), offsets


@dataclasses.dataclass(frozen=True)
class InverseCDF:
    """Inverse-CDF lookups over the running sums of ``n`` weights >= 0 with a guide of
    ``m`` buckets: a lookup, then at most ``n / m`` steps on average whatever the weights.

    Attributes:
        cumulative: float64 (n + 1,), the running sums, then +inf.
        guide: int64 (m + 1,), ``guide[b]``: how many running sums fall in the buckets
            before ``b`` of ``m`` equal buckets of the total.
    """

    cumulative: np.ndarray
    guide: np.ndarray

    @classmethod
    def build(cls, weights: np.ndarray, buckets: int | None = None) -> "InverseCDF":
        """The lookups of ``weights`` (n,), >= 0, in order, with a guide of ``buckets``
        equal buckets of the total (default ``n``): more buckets take more memory and
        fewer steps a key."""
        num_rows = len(weights)
        buckets = num_rows if buckets is None else buckets
        cumulative = np.empty(num_rows + 1)
        cumulative[:num_rows] = _cumsum(np.asarray(weights, dtype=np.float64))
        cumulative[num_rows] = np.inf
        running = cumulative[:num_rows]
        total = running[-1] if num_rows else 0.0
        guide = np.zeros(buckets + 1, dtype=np.int64)
        # A running sum's bucket is at most m, as the sum is at most the total.
        counts = np.bincount(cls._bucket(running, total, buckets), minlength=buckets + 1)
        guide[1:] = _cumsum(counts[:buckets])
        return cls(cumulative, guide)

    @property
    def total(self) -> float:
        """The sum of the weights."""
        return float(self.cumulative[-2]) if len(self.cumulative) > 1 else 0.0

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """int64 positions of weight ``keys`` in [0, total): for each key, the first
        position whose running sum exceeds it (``searchsorted(..., side="right")``; a key
        at the total or above gets ``n``).

        The guide puts each key before its position by at most the running sums in its
        bucket: ``n / m`` on average, whatever the weights, for keys spread evenly over
        the total; keys still short after :data:`GUIDE_STEPS` steps are binary-searched.
        """
        buckets = len(self.guide) - 1
        bucket = self._bucket(keys, self.total, buckets)
        position = self.guide[np.minimum(bucket, buckets, out=bucket)]
        short = np.flatnonzero(self.cumulative[position] <= keys)
        for _ in range(GUIDE_STEPS):
            if not short.size:
                return position
            position[short] += 1
            short = short[self.cumulative[position[short]] <= keys[short]]
        position[short] = np.searchsorted(self.cumulative, keys[short], side="right")
        return position

    @staticmethod
    def _bucket(values: np.ndarray, total: float, buckets: int) -> np.ndarray:
        """int64 ``floor(values / total · buckets)``: the bucket of each value among
        ``buckets`` equal buckets of ``total``; monotone in the value, as rounding is."""
        scale = buckets / total if total > 0 else 0.0
        return (values * scale).astype(np.int64)


#: Rows :meth:`InverseCDF.locate` steps through before it binary-searches a key.
GUIDE_STEPS = 4


def _cumsum(values: np.ndarray) -> np.ndarray:
    """``np.cumsum(values)`` in torch's kernel, about four times numpy's on 64k rows; a
    read-only ``values`` (a view of an Arrow column) is copied first, as torch needs."""
    return torch.from_numpy(np.require(values, requirements="W")).cumsum(0).numpy()
