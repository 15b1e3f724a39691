"""Splitting the training rows of an epoch into disjoint streams, one per (rank, worker).

The row groups of all training shards are shuffled per epoch (the same permutation on
every rank), laid end to end, and the resulting sequence of rows is cut into
``num_streams`` contiguous ranges whose lengths differ by at most one row. Stream
``rank * num_workers + role`` reads its range (a worker's role, which the sampler sets
from its position in the epoch). Every row thus belongs to exactly one
stream, and every stream holds at least ``total_rows // num_streams`` rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from morec_rec.errors import MorecError


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of a training shard."""

    file: int  # index into the shard list
    index: int  # row group index within the file
    rows: int


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one row group."""

    group: RowGroup
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def list_row_groups(files: Sequence[Path]) -> list[RowGroup]:
    """The row groups of ``files`` in file order, from the Parquet footers only; an
    unreadable footer (a truncated file) is a :class:`MorecError` naming the file."""
    groups = []
    for number, path in enumerate(files):
        try:
            metadata = pq.read_metadata(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise MorecError(f"{path}: corrupt Parquet file ({str(e).splitlines()[0]})") from None
        groups.extend(RowGroup(number, i, metadata.row_group(i).num_rows)
                      for i in range(metadata.num_row_groups))
    return groups


def stream_segments(
    groups: Sequence[RowGroup], seed: int, epoch: int, stream: int, num_streams: int
) -> list[Segment]:
    """The rows of ``stream`` in ``epoch``, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(groups))
    rows = np.array([groups[i].rows for i in order], dtype=np.int64)
    ends = np.cumsum(rows)
    total = int(ends[-1]) if len(ends) else 0
    begin, end = stream * total // num_streams, (stream + 1) * total // num_streams
    segments = []
    for position in np.flatnonzero((ends > begin) & (ends - rows < end)):
        first_row = int(ends[position] - rows[position])
        segments.append(Segment(groups[order[position]], max(begin - first_row, 0),
                                min(end - first_row, int(rows[position]))))
    return segments


def min_stream_rows(groups: Sequence[RowGroup], num_streams: int) -> int:
    """The fewest rows any stream holds in an epoch (the same for every epoch)."""
    return sum(g.rows for g in groups) // num_streams
