"""The sampler's batches through a job's collate, in index order: the jobs' loader and MoRec's.

A loader worker makes ``batches_per_request`` batches for each request of the loader and
sends them together (the ``DataLoader``'s ``batch_size`` over the sampler's batches), so
that the trainer pays a request's receive, and the wake-ups of the worker it causes, once
for that many batches; the batches themselves, and the rows each holds, are those of one
batch a request.

The loader knows which batches its workers may already have drawn: at most
:attr:`SamplerLoader.lookahead` beyond those it has yielded (the groups of the
DataLoader's outstanding requests) and none past the epoch it iterates, nor any while no
iterator is running (its workers persist between epochs, and draw the next epoch only when
its iteration starts; what they drew for an iteration left unfinished is dropped when the
next one starts). An update published to apply from
:attr:`SamplerLoader.undrawn` therefore reaches every worker before the batch it applies
to is drawn, whatever the pipeline in front of the loader holds.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

import torch

from morec_rec.config import TrainConfig
from morec_rec.errors import MorecError
from morec_rec.plugin.adapters import register_pipelineable
from morec_rec.plugin.sampling.sampled import SampledBatch
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler
from morec_rec.plugin.segments import SegmentedBatch
from morec_rec.plugin.workers import WorkerLoader, die_with_parent

T = TypeVar("T")

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


class Indexed:
    """``collate`` over the batches of one request, each made batch with its index."""

    def __init__(self, collate: Collate) -> None:
        self.collate = collate

    def __call__(self, group: list[SampledBatch]) -> list[tuple[int, Any]]:
        return [(sampled.batch_index, self.collate(sampled)) for sampled in group]


def in_index_order(groups: Iterable[list[tuple[int, T]]]) -> Iterator[tuple[int, T]]:
    """The ``(index, batch)`` pairs of ``groups``, one at a time, by index from the first
    group's first on.

    Each group holds consecutive batches of one worker's stream and the loader asks the
    workers in turn from the one holding the iteration's first batch (the sampler's
    contract), so the batches of one group from each worker span consecutive indices:
    at most that many wait here.

    Raises:
        RuntimeError: the groups ended with batches held back by a missing index.
    """
    waiting: dict[int, T] = {}
    expected: int | None = None
    for group in groups:
        waiting.update(group)
        if expected is None and group:
            expected = group[0][0]
        while expected in waiting:
            yield expected, waiting.pop(expected)
            expected += 1
    if waiting:
        raise RuntimeError(f"loader: batch {expected} never came; batches from "
                           f"{min(waiting)} on were held back")


def check_loader_settings(num_workers: int, prefetch_factor: int,
                          batches_per_request: int) -> None:
    """MorecError naming the first of a loader's counts that is not an int at or above
    its least value."""
    for name, value, least in (("num_workers", num_workers, 0),
                               ("prefetch_factor", prefetch_factor, 1),
                               ("batches_per_request", batches_per_request, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise MorecError(f"loader: {name} = {value!r} must be an int >= {least}")


class SamplerLoader(Generic[T]):
    """Yields the batches ``collate`` makes of the sampler's epoch set by
    :meth:`set_epoch`, in ``batch_index`` order.

    Args:
        sampler: the rank's sampler.
        collate: the job's collate.
        num_workers: loader worker processes (0: sample in the calling process).
        prefetch_factor: requests each worker prepares ahead.
        batches_per_request: batches a worker makes for one request (with workers; the
            jobs' default, ``TrainConfig.batches_per_request``, unless given).
        pin_memory: pin each batch before yielding it.
    """

    def __init__(self, sampler: WeightedStreamSampler, collate: Callable[[SampledBatch], T], *,
                 num_workers: int, prefetch_factor: int = 2,
                 batches_per_request: int = TrainConfig.batches_per_request,
                 pin_memory: bool = False) -> None:
        check_loader_settings(num_workers, prefetch_factor, batches_per_request)
        self.sampler = sampler
        self.collate = collate
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        # In process, a request's batches would all be drawn before the first is trained.
        self.batches_per_request = batches_per_request if num_workers else 1
        self.batches_per_epoch = sampler.batches_per_epoch(num_workers)
        #: The most batches the workers may have drawn beyond the last one yielded.
        self.lookahead = num_workers * ((prefetch_factor + 1) * self.batches_per_request - 1)
        self._loader = WorkerLoader(
            sampler, batch_size=self.batches_per_request, num_workers=num_workers,
            collate_fn=Indexed(collate),
            prefetch_factor=prefetch_factor if num_workers else None, pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            worker_init_fn=die_with_parent if num_workers else None,
            # Otherwise an iteration's start (a resumed run's first step) draws the workers'
            # base seed from the trainer's default generator, which its dropout draws from.
            generator=torch.Generator().manual_seed(sampler.config.seed))
        self._start = 0  # the epoch's first position
        self._next = 0  # the index of the next batch to yield
        self._end = self.batches_per_epoch  # the index past the epoch's last batch
        self._running = False

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields ``epoch`` from position ``start`` on."""
        self.sampler.set_epoch(epoch, start)
        self._start = start
        self._next = epoch * self.batches_per_epoch + start
        self._end = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch - self._start

    def __iter__(self) -> Iterator[T]:
        self._running = True
        try:
            for index, batch in in_index_order(self._loader):
                self._next = index + 1
                yield batch
        except MorecError as error:
            raised = _raised_in_worker(error)
            if raised is None:
                raise
            raise raised from error
        finally:
            self._running = False

    @property
    def undrawn(self) -> int:
        """The lowest batch index that no worker can have drawn yet."""
        return min(self._next + self.lookahead, self._end) if self._running else self._next


def _raised_in_worker(error: MorecError) -> MorecError | None:
    """The MorecError a loader worker raised (the sampler's or the job's collate's), as it
    was raised there; None for one raised in this process. The DataLoader re-raises a
    worker's exception with the worker's traceback in its message; the one-line message is
    the traceback's last line."""
    lines = str(error).rstrip().splitlines() or [""]
    message = lines[-1].partition(f"{MorecError.__name__}: ")[2]
    wrapped = lines[0].startswith(f"Caught {MorecError.__name__} in DataLoader worker")
    return MorecError(message) if wrapped and message else None


class MoRecLoader(SamplerLoader[SegmentedBatch]):
    """A :class:`SamplerLoader` of :class:`SegmentedBatch` es.

    Args:
        sampler, collate, num_workers, prefetch_factor, batches_per_request: as
            :class:`SamplerLoader`'s.
        pin_memory: pin each batch (``SegmentedBatch.pin_memory``) before yielding it.
        item_ids: keep the sampled rows' items in each batch (``SegmentedBatch.item_id``).
    """

    def __init__(self, sampler: WeightedStreamSampler, collate: Collate, *, num_workers: int,
                 prefetch_factor: int = 2,
                 batches_per_request: int = TrainConfig.batches_per_request,
                 pin_memory: bool = False, item_ids: bool = False) -> None:
        super().__init__(sampler, Segmenting(collate, item_ids=item_ids),
                         num_workers=num_workers, prefetch_factor=prefetch_factor,
                         batches_per_request=batches_per_request, pin_memory=pin_memory)

    def __iter__(self) -> Iterator[SegmentedBatch]:
        register_pipelineable()  # the job may have imported TorchRec after making MoRec
        return super().__iter__()
