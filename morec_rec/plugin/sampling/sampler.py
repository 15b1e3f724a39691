"""The weighted streaming sampler: MoRec's middle level as an ``IterableDataset``.

Each (rank, loader worker) reads its own stream of training rows (see
:mod:`~morec_rec.plugin.sampling.partition`) one *window* at a time: ``window_batches`` batches'
worth of rows, shuffled. Batch ``k`` of a window *visits* the next ``batch_size`` rows of
the shuffled window, cut into one chunk per objective, each as long as the objective's
share of the batch (the masses of :data:`BATCH`, equal unless published otherwise). A
uniform objective (accuracy) keeps its chunk, so an epoch of uniform objectives sees
every row of the stream exactly once; any other objective replaces its chunk by a draw
from the whole window by its distribution (group masses, then rows within a group
uniformly or by weight). The batches of a window are drawn together, a *block* at a
time: from the window's first batch, or from the batch where the masses changed, to the
window's end.

Masses come from the weight store: every published version carries the loader batch
index from which it applies, and the process that made the sampler announces each version
(:meth:`WeightedStreamSampler.announce`, memory it shares with its loader workers); before
each batch a worker reads the announced version and goes to the store only when it has
moved, so every worker of every rank switches at the same batch without a store round
trip per batch. A worker starts from the initial masses and replays every version
announced so far, so the masses in force at a batch are a function of the store's
versions and the batch index alone; a version that reaches a worker after it drew a batch
the version should have applied to raises rather than apply late. Memory is bounded by
two windows (the one being sampled and the next, read in a background thread), one block
and one Parquet row group, whatever the size of the log, besides the item attributes it
uses (one value an item each). Randomness is derived from (seed, epoch, stream, window or
block start), so no RNG state needs saving: an epoch and a position within it
(:meth:`WeightedStreamSampler.set_epoch`) resume the stream.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import operator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from morec_rec.config import SamplerConfig
from morec_rec.data.format import ITEM_ATTRIBUTES, PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.plugin.sampling.draw import GroupIndex, draw, largest_remainder
from morec_rec.plugin.sampling.objectives import (
    Objective,
    check_masses,
    row_groups,
    row_weights,
)
from morec_rec.plugin.sampling.partition import (
    Segment,
    list_row_groups,
    min_stream_rows,
    stream_segments,
)
from morec_rec.plugin.sampling.sampled import SampledBatch
from morec_rec.plugin.sampling.store import Masses, StoreSpec, WeightStore

logger = logging.getLogger(__name__)

#: Row columns every batch carries.
ID_COLUMNS = ("user_id", "item_id")
#: Row columns a batch carries where the job's collate asks for them (``columns``).
OPTIONAL_COLUMNS = ("price", "fairness_group", "popularity_group", "history")

#: The name under which masses give the objectives' shares of a batch, one per objective
#: in order: a draw at the level above the groups, published and checkpointed as theirs.
BATCH = "batch"


class WeightedStreamSampler(IterableDataset):
    """Yields :class:`SampledBatch` es of one epoch, in a plain or stateful ``DataLoader``.

    Use it with ``batch_size=None``, or ``k`` for ``k`` consecutive batches of a worker's
    stream a request (:class:`~morec_rec.plugin.loader.SamplerLoader` puts them back in
    order). Every worker of every rank yields the same number of batches per epoch
    (:meth:`batches_per_epoch`), so no rank waits for another, and a DataLoader's round
    robin over its workers yields the batches in ``batch_index`` order:
    ``batch_index = epoch · batches_per_epoch + position`` on every rank. Call
    :meth:`set_epoch` before each epoch, also with ``persistent_workers=True`` (workers
    read it when the loader's iteration starts); a resume needs the same world size and
    number of workers.

    Args:
        dataset: a prepared dataset (its ``train/`` shards are read).
        objectives: one sub-batch each, in this order (the batch's segment ids).
        config: sizes, draw mode and seed.
        rank, world_size: this process's place in the data-parallel job.
        store: where published masses come from; None keeps the initial masses.
        masses: initial masses by objective name (default: each objective's own), and
            the objectives' shares of a batch under :data:`BATCH` (default: equal).
        columns: the :data:`OPTIONAL_COLUMNS` that batches carry (default: all of them).
            The sampler reads those, the ids and the columns its objectives read from the
            training shards, except the item attributes
            (:data:`~morec_rec.data.format.ITEM_ATTRIBUTES`), which it looks up by item id.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        objectives: Sequence[Objective],
        config: SamplerConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        store: StoreSpec | None = None,
        masses: Mapping[str, np.ndarray] | None = None,
        columns: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise MorecError(f"sampler: rank {rank} is outside world size {world_size}")
        self.files: list[Path] = dataset.train_files
        self.row_groups = list_row_groups(self.files)
        self.objectives = list(objectives)
        self._num_groups = {o.name: o.num_groups for o in self.objectives}
        self._num_groups[BATCH] = len(self.objectives)
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.store = store
        if isinstance(columns, str):
            raise MorecError(f"sampler: columns {columns!r} is one name; give a list of them")
        self.carried = tuple(OPTIONAL_COLUMNS if columns is None else columns)
        unknown = sorted(set(self.carried) - set(OPTIONAL_COLUMNS))
        if unknown:
            raise MorecError(f"sampler: columns {unknown} are not among "
                             f"{', '.join(OPTIONAL_COLUMNS)}")
        needed = {*ID_COLUMNS, *self.carried}.union(*(o.columns for o in self.objectives))
        #: Item attributes by column name, looked up by item id rather than read by row.
        self.item_attributes = dataset.item_columns(sorted(needed & set(ITEM_ATTRIBUTES)))
        #: The columns read from the training shards.
        self.columns = sorted(needed - set(self.item_attributes))
        masses = dict(masses or {})
        unknown = set(masses) - set(self._num_groups)
        if unknown:
            raise MorecError(f"sampler: masses given for unknown objective(s) {sorted(unknown)}")
        initial = {o.name: o.initial_masses() for o in self.objectives}
        initial[BATCH] = np.ones(len(self.objectives))
        self._initial = {name: check_masses(name, masses.get(name, initial[name]), size)
                         for name, size in self._num_groups.items()}
        self._masses = dict(self._initial)
        self._version = 0
        # Shared with the loader workers (inherited when they start), so that workers
        # that outlive an epoch (``persistent_workers``) see set_epoch() and announce():
        # the epoch and the rank loader's first position in it, and the announced version.
        self._position = multiprocessing.RawArray("q", 2)
        self._announced = multiprocessing.RawValue("q", 0)

    @property
    def batch_size(self) -> int:
        return self.config.sub_batch_size * len(self.objectives)

    def batches_per_epoch(self, num_workers: int = 0) -> int:
        """Batches one rank's loader yields per epoch with ``num_workers`` workers."""
        streams = max(num_workers, 1)
        per_stream = min_stream_rows(self.row_groups, self.world_size * streams) // self.batch_size
        return per_stream * streams

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Starts ``epoch`` at ``start``: the number of its batches that this rank's loader
        has already yielded (0 for a new epoch; a resumed run's position)."""
        if epoch < 0 or start < 0:
            raise MorecError(f"sampler: epoch {epoch} and start {start} must be >= 0")
        self._position[:] = [epoch, start]

    def announce(self, version: int) -> None:
        """Makes the store's versions up to ``version`` visible to this sampler's
        iterators, here and in its loader workers, including those already running.

        Call it in the process that made the sampler once ``WeightStore.publish`` or
        :func:`~morec_rec.plugin.sampling.store.publish_and_sync` has returned
        ``version``, before the loader draws the batch the version applies from; the
        sampler never sees a version that was not announced.
        """
        self._announced.value = max(self._announced.value, operator.index(version))

    @property
    def masses(self) -> dict[str, np.ndarray]:
        """The masses in force, by objective name (in this process)."""
        return {k: v.copy() for k, v in self._masses.items()}

    def __iter__(self) -> Iterator[SampledBatch]:
        epoch, start = self._position
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker ``worker`` plays role ``r``: it draws positions r, r + W, ... of the epoch,
        # so that a loader's round robin, which starts at worker 0, yields position
        # ``start`` first.
        role = (worker + start) % num_workers
        num_streams = self.world_size * num_workers
        stream = self.rank * num_workers + role
        per_stream = min_stream_rows(self.row_groups, num_streams) // self.batch_size
        first = (start - role + num_workers - 1) // num_workers
        # Every pass starts from the initial masses and replays the store's versions.
        self._masses, self._version = dict(self._initial), 0
        weights = (_MassesFeed(WeightStore.connect(self.store), self._announced)
                   if self.store else None)
        per_window = self.config.window_batches
        windows = self._windows(epoch, stream, num_streams, per_stream,
                                first=first // per_window)
        # Batches are drawn a block at a time: from a window's first batch, or from the
        # batch where the masses last changed, to the window's end. A change inside a block
        # drops the rest of it, so a batch's rows depend on its block's start alone, which
        # the store's versions determine: a resumed worker redraws its block from there.
        changed = 0  # the position from which the masses in force apply
        block: _Block | None = None
        for k in range(first, per_stream):
            if k == first or k % per_window == 0:
                window, block = next(windows), None
            batch_index = (epoch * per_stream + k) * num_workers + role
            due = weights.due(batch_index) if weights is not None else []
            if due:
                self._apply(due)
                # The first position whose batch index is at or past the version's.
                changed = max(changed, *(-((role - m.effective_from) // num_workers)
                                         - epoch * per_stream for m in due))
                block = None
            if block is None:
                begin = max(window.first, changed)
                rng = np.random.default_rng([self.config.seed, epoch, stream, begin, 1])
                block = window.draw_block(begin, self._masses, self.config, rng)
            yield block.batch(k, batch_index, epoch, self._version)

    def _windows(self, epoch: int, stream: int, num_streams: int, per_stream: int,
                 first: int) -> Iterator[_Window]:
        """The stream's windows from ``first`` on, each read in a background thread while
        the one before it is sampled (Parquet decoding releases the GIL)."""
        reader = _StreamReader(
            self.files,
            stream_segments(self.row_groups, self.config.seed, epoch, stream, num_streams),
            self.columns,
        )
        window_rows = self.config.window_batches * self.batch_size
        end = per_stream * self.batch_size

        def build(number: int) -> _Window:
            begin = number * window_rows
            return _Window(reader.read(begin, min(begin + window_rows, end)),
                           self.item_attributes, number * self.config.window_batches,
                           self.objectives, {*ID_COLUMNS, *self.carried},
                           _torch_generator([self.config.seed, epoch, stream, number]))

        last = -(-end // window_rows) - 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(build, first)
            for number in range(first, last + 1):
                window = pending.result()
                if number < last:
                    pending = pool.submit(build, number + 1)
                yield window

    def _apply(self, published: list[Masses]) -> None:
        for masses in published:
            for name, values in masses.values.items():
                if name in self._num_groups:
                    self._masses[name] = check_masses(name, values, self._num_groups[name])
            self._version = masses.version


def _torch_generator(entropy: Sequence[int]) -> torch.Generator:
    """A torch CPU generator seeded from ``entropy`` as numpy's generators are."""
    seed = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


class _MassesFeed:
    """Announced masses not yet in force, read from the store as they are announced.

    The first poll reads every version announced so far (a replay: they apply from the
    batches their ``effective_from`` names); a version first seen later must apply from a
    batch this worker has not drawn yet.
    """

    def __init__(self, store: WeightStore, announced: Any) -> None:
        self._store = store
        self._announced = announced  # a shared ctypes int64
        self._seen = 0
        self._drawn: int | None = None  # the last batch index this worker drew
        self._pending: list[Masses] = []

    def due(self, batch_index: int) -> list[Masses]:
        """The versions that apply from ``batch_index`` on, oldest first.

        Raises MorecError for a version that should have applied to a batch already drawn.
        """
        latest = self._announced.value
        if latest > self._seen:
            if self._drawn is None:  # the first poll: every version so far in one round trip
                new = self._store.history()[:latest]
            else:
                new = [self._store.read(v) for v in range(self._seen + 1, latest + 1)]
            if len(new) != latest - self._seen:
                raise MorecError(f"weight version {latest} was announced to the sampler but "
                                 "is not in its store")
            late = [m for m in new if self._drawn is not None and m.effective_from <= self._drawn]
            if late:
                raise MorecError(
                    f"weight version {late[0].version} applies from batch "
                    f"{late[0].effective_from}, but reached a loader worker after it drew "
                    f"batch {self._drawn}: publish from past the batches the loader holds")
            self._pending.extend(new)
            self._seen = latest
        self._drawn = batch_index
        due = [m for m in self._pending if m.effective_from <= batch_index]
        self._pending = [m for m in self._pending if m.effective_from > batch_index]
        return due


class _StreamReader:
    """Reads row ranges of one stream, keeping the last row group for the next range."""

    def __init__(self, files: Sequence[Path], segments: Sequence[Segment],
                 columns: Sequence[str]) -> None:
        self._files = [pq.ParquetFile(f) for f in files]
        self._segments = segments
        self._sizes = np.array([s.rows for s in segments], dtype=np.int64)
        self._ends = np.cumsum(self._sizes)
        self._columns = list(columns)
        self._cached: tuple[Any, pa.Table] | None = None

    def read(self, begin: int, end: int) -> pa.Table:
        """Rows ``[begin, end)`` of the stream."""
        parts = []
        for i in np.flatnonzero((self._ends > begin) & (self._ends - self._sizes < end)):
            segment = self._segments[i]
            first = int(self._ends[i]) - segment.rows  # stream position of the segment
            lo = segment.start + max(begin - first, 0)
            hi = segment.start + min(end - first, segment.rows)
            parts.append(self._row_group(segment).slice(lo, hi - lo))
        return pa.concat_tables(parts)

    def _row_group(self, segment: Segment) -> pa.Table:
        key = (segment.group.file, segment.group.index)
        if self._cached is None or self._cached[0] != key:
            # Decoded in this thread: Arrow's pool would run one thread per core beside the
            # drawing thread and the trainer, and spends more CPU on these narrow columns.
            table = self._files[key[0]].read_row_group(key[1], columns=self._columns,
                                                      use_threads=False)
            self._cached = (key, table)
        return self._cached[1]


class _Window:
    """The rows of one window as numpy columns, shuffled, with each objective's index.

    Args:
        table: the window's rows, a whole number of batches.
        item_attributes: more columns of the rows, by item id: (num_items,) each.
        first: the stream position of the window's first batch.
    """

    def __init__(self, table: pa.Table, item_attributes: Mapping[str, np.ndarray], first: int,
                 objectives: Sequence[Objective], carried: Collection[str],
                 generator: torch.Generator) -> None:
        self.first = first
        self.objectives = objectives
        self.columns = {name: table[name].to_numpy() for name in table.column_names
                        if name != "history"}
        if item_attributes:
            item = self.columns["item_id"].astype(np.int64)  # numpy gathers slower by int32
            self.columns.update((name, values[item]) for name, values in item_attributes.items())
        # Converted to the batch's dtypes once per window; the int64 columns stacked, so
        # that a block takes them in one gather.
        names = [name for name in (*ID_COLUMNS, *OPTIONAL_COLUMNS)
                 if name in carried and name not in ("history", "price")]
        self.stacked = (names, np.stack([self.columns[name] for name in names],
                                        dtype=np.int64))
        self.price = (self.columns["price"].astype(np.float32) if "price" in carried
                      else None)
        # Kept in Arrow: a block takes its rows' lists there, in the stored dtype.
        self.history: pa.ListArray | None = (table["history"].combine_chunks()
                                             if "history" in carried else None)
        # torch's shuffle takes half the time of numpy's.
        self.visit_order = torch.randperm(table.num_rows, generator=generator).numpy()
        self._warned: set[str] = set()  # objectives already reported starved in this window

    @functools.cached_property
    def indexes(self) -> dict[str, GroupIndex]:
        """Each drawing objective's index of the window, built at the window's first draw,
        in the thread that draws: built with the read, they made the reading thread the
        sampler's slower one."""
        rows = len(self.visit_order)
        return {
            o.name: GroupIndex.build(row_groups(o, self.columns, rows),
                                     row_weights(o, self.columns, rows), o.num_groups, rows)
            for o in self.objectives if not o.is_uniform
        }

    def draw_block(self, begin: int, masses: Mapping[str, np.ndarray], config: SamplerConfig,
                   rng: np.random.Generator) -> _Block:
        """The window's batches from stream position ``begin`` to its end, drawn with
        ``masses``: each objective's rows as long as its share of the batch
        (largest-remainder rounding)."""
        batch_size = config.sub_batch_size * len(self.objectives)
        visited = self.visit_order[(begin - self.first) * batch_size:]
        visited = visited.reshape(-1, batch_size)
        sizes = largest_remainder(masses[BATCH] * batch_size, batch_size)
        starts = np.cumsum(sizes) - sizes
        rows = np.empty_like(visited)
        starved = np.zeros((len(visited), len(self.objectives)), dtype=np.int64)
        for position, (objective, start, size) in enumerate(zip(self.objectives, starts, sizes)):
            chunk = slice(start, start + size)
            if objective.is_uniform:
                rows[:, chunk] = visited[:, chunk]
                continue
            rows[:, chunk], lost = draw(self.indexes[objective.name], masses[objective.name],
                                        size, rng, config.draw, batches=len(visited))
            starved[:, position] = lost.sum(axis=1)
            if lost.any() and objective.name not in self._warned:
                self._warned.add(objective.name)
                logger.warning("objective %s: groups %s have mass but no row in this window; "
                               "their draws are re-drawn from the other groups and counted "
                               "in SampledBatch.starved", objective.name,
                               np.flatnonzero(lost.any(axis=0)).tolist())
        return _Block(self, begin, rows, sizes, starved)


class _Block:
    """Consecutive batches of a window drawn with the same masses, their columns gathered
    at once: each batch's fixed-width tensors are views of the block's; a jagged history
    is gathered in its stored dtype, and each batch gets its own int64 copy of its part."""

    def __init__(self, window: _Window, begin: int, rows: np.ndarray, sizes: np.ndarray,
                 starved: np.ndarray) -> None:
        self.begin = begin
        index = rows.ravel()
        names, stacked = window.stacked
        columns = dict(zip(names, torch.from_numpy(np.take(stacked, index, axis=1))))
        if window.price is not None:
            columns["price"] = torch.from_numpy(window.price[index])
        segments = np.repeat(np.arange(len(sizes)), sizes)
        columns["objective"] = torch.from_numpy(np.tile(segments, len(rows)))
        self.history: tuple[np.ndarray, np.ndarray] | None = None  # values, batch bounds
        if window.history is not None:
            history = window.history.take(index)
            offsets = history.offsets.to_numpy()
            self.history = (history.flatten().to_numpy(),
                            offsets[::rows.shape[1]] - offsets[0])
            columns["history_lengths"] = torch.from_numpy(np.diff(offsets).astype(np.int64))
        # Each column cut into its batches at once: a batch is then a lookup.
        self.batches = {name: column.split(rows.shape[1]) for name, column in columns.items()}
        self.starved = torch.from_numpy(starved).unbind()

    def batch(self, position: int, batch_index: int, epoch: int, version: int) -> SampledBatch:
        """The batch at stream ``position`` (one of this block's)."""
        j = position - self.begin
        columns = {name: batches[j] for name, batches in self.batches.items()}
        if self.history is not None:
            values, bounds = self.history
            columns["history_values"] = torch.from_numpy(
                values[bounds[j]:bounds[j + 1]].astype(np.int64))
        return SampledBatch(**columns, starved=self.starved[j], batch_index=batch_index,
                            epoch=epoch, masses_version=version)
