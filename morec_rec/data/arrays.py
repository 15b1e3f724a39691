"""Vectorised array helpers: sorted codes, per-group reductions, and gathers of ranges."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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
