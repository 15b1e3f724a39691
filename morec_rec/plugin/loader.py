"""MoRec's training loader: the sampler's batches through the job's collate, in order.

It knows which batches its workers may already have drawn: at most ``prefetch_factor``
per worker beyond those it has yielded (the DataLoader's outstanding tasks), none that it
will yield while no iterator is running (its workers persist between epochs; what they
drew for an iteration left unfinished is dropped when the next one starts). An update
published to apply from :attr:`MoRecLoader.undrawn` therefore reaches every worker
before the batch it applies to is drawn, whatever the pipeline in front of the loader
holds.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from morec_rec.plugin.sampling.sampled import SampledBatch
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler
from morec_rec.plugin.segments import SegmentedBatch
from morec_rec.plugin.workers import WorkerLoader, die_with_parent

#: SampledBatch -> the job's batch.
Collate = Callable[[SampledBatch], Any]


class Segmenting:
    """``collate``, with the sampled rows' segment ids and batch index (and, with
    ``item_ids``, their items) kept beside the job's batch (picklable to loader workers
    when ``collate`` is)."""

    def __init__(self, collate: Collate, *, item_ids: bool = False) -> None:
        self.collate = collate
        self.item_ids = item_ids

    def __call__(self, sampled: SampledBatch) -> SegmentedBatch:
        return SegmentedBatch(self.collate(sampled), sampled.objective, sampled.batch_index,
                              sampled.item_id if self.item_ids else None)


class MoRecLoader:
    """Yields :class:`SegmentedBatch` es of the epoch set by :meth:`set_epoch`, in
    ``index`` order.

    Args:
        sampler: the rank's sampler.
        collate: the job's collate.
        num_workers: loader worker processes (0: sample in the calling process).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: pin each batch (``SegmentedBatch.pin_memory``) before yielding it.
        item_ids: keep the sampled rows' items in each batch (``SegmentedBatch.item_id``).
    """

    def __init__(self, sampler: WeightedStreamSampler, collate: Collate, *, num_workers: int,
                 prefetch_factor: int, pin_memory: bool = False,
                 item_ids: bool = False) -> None:
        self.sampler = sampler
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.batches_per_epoch = sampler.batches_per_epoch(num_workers)
        self._loader = WorkerLoader(
            sampler, batch_size=None, num_workers=num_workers,
            collate_fn=Segmenting(collate, item_ids=item_ids),
            prefetch_factor=prefetch_factor if num_workers else None, pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            worker_init_fn=die_with_parent if num_workers else None)
        self._start = 0  # the epoch's first position
        self._next = 0  # the index of the next batch to yield
        self._running = False

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields ``epoch`` from position ``start`` on."""
        self.sampler.set_epoch(epoch, start)
        self._start = start
        self._next = epoch * self.batches_per_epoch + start

    def __len__(self) -> int:
        return self.batches_per_epoch - self._start

    def __iter__(self) -> Iterator[SegmentedBatch]:
        self._running = True
        try:
            for batch in self._loader:
                self._next = batch.index + 1
                yield batch
        finally:
            self._running = False

    @property
    def undrawn(self) -> int:
        """The lowest batch index that no worker can have drawn yet."""
        return self._next + (self.prefetch_factor * self.num_workers if self._running else 0)
