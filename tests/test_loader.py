"""SamplerLoader: several batches a worker request yield the batches of one a request, in
index order, from any start; ``undrawn`` bounds what the workers drew, tightly."""

from __future__ import annotations

import multiprocessing
import time
from typing import Iterator

import numpy as np
import pytest
from sampling_data import make_dataset

from morec_rec.config import SamplerConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.plugin.loader import SamplerLoader, in_index_order
from morec_rec.plugin.sampling.objectives import Objective, build_objectives
from morec_rec.plugin.sampling.sampled import SampledBatch
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler

NAMES = ("accuracy", "revenue")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("loader") / "data")


class Drawing(WeightedStreamSampler):
    """Records the highest batch index any of its iterators drew (in shared memory)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.highest = multiprocessing.RawValue("q", -1)

    def __iter__(self) -> Iterator[SampledBatch]:
        for batch in super().__iter__():
            self.highest.value = max(self.highest.value, batch.batch_index)
            yield batch


def sampler(dataset: PreparedDataset) -> Drawing:
    config = SamplerConfig(objectives=NAMES, sub_batch_size=32, window_batches=8)
    return Drawing(dataset, build_objectives(NAMES, dataset.manifest), config)


def as_is(batch: SampledBatch) -> SampledBatch:
    return batch


def signature(batch: SampledBatch) -> tuple:
    return (batch.batch_index, batch.epoch, batch.user_id.tolist(), batch.item_id.tolist(),
            batch.objective.tolist())


def test_in_index_order_merges_each_workers_groups() -> None:
    # Two workers, three batches a request: worker w holds indices w, w + 2, ...; a resumed
    # epoch starting at 5 gives worker 0 the odd ones; the last groups are short.
    def groups(start: int, end: int, k: int) -> list[list[tuple[int, str]]]:
        streams = [list(range(start + w, end, 2)) for w in (0, 1)]
        out = []
        for g in range(0, len(streams[0]), k):
            out += [[(i, f"b{i}") for i in s[g:g + k]] for s in streams if s[g:g + k]]
        return out

    for start in (0, 5):
        merged = list(in_index_order(groups(start, 14, 3)))
        assert merged == [(i, f"b{i}") for i in range(start, 14)]
    with pytest.raises(RuntimeError, match="batch 3 never came"):
        list(in_index_order([[(0, "a"), (2, "c")], [(1, "b")], [(4, "e")]]))


@pytest.mark.parametrize("num_workers", [1, 2])
def test_grouped_requests_yield_the_batches_of_one_a_request(dataset: PreparedDataset,
                                                             num_workers: int) -> None:
    one, grouped = (SamplerLoader(sampler(dataset), as_is, num_workers=num_workers,
                                  batches_per_request=k) for k in (1, 3))
    # Epochs in turn over persistent workers, a resumed one (start 5) among them.
    for epoch, start in ((0, 0), (1, 5), (2, 0)):
        for loader in (one, grouped):
            loader.set_epoch(epoch, start)
        expected = [signature(b) for b in one]
        assert [b[0] for b in expected] == [epoch * one.batches_per_epoch + start + i
                                            for i in range(one.batches_per_epoch - start)]
        assert [signature(b) for b in grouped] == expected


@pytest.mark.parametrize("num_workers, batches_per_request", [(1, 1), (2, 1), (2, 3)])
def test_undrawn_is_the_first_batch_no_worker_drew(dataset: PreparedDataset, num_workers: int,
                                                   batches_per_request: int) -> None:
    drawing = sampler(dataset)
    loader = SamplerLoader(drawing, as_is, num_workers=num_workers, prefetch_factor=2,
                           batches_per_request=batches_per_request)
    assert loader.lookahead == num_workers * (3 * batches_per_request - 1)
    loader.set_epoch(0)
    reached = 0
    for batch in loader:
        time.sleep(0.01)  # the workers fill every request they have
        assert drawing.highest.value < loader.undrawn
        # The workers draw the next epoch only when its iteration starts.
        assert loader.undrawn == min(batch.batch_index + 1 + loader.lookahead,
                                     loader.batches_per_epoch)
        reached += drawing.highest.value == loader.undrawn - 1
    assert reached  # the bound is met, not just kept
    assert loader.undrawn == loader.batches_per_epoch  # no iterator running


def test_in_process_loading_draws_one_batch_at_a_time(dataset: PreparedDataset) -> None:
    drawing = sampler(dataset)
    loader = SamplerLoader(drawing, as_is, num_workers=0, batches_per_request=4)
    loader.set_epoch(0)
    assert loader.lookahead == 0
    for batch in loader:
        assert drawing.highest.value == batch.batch_index == loader.undrawn - 1
    for counts, message in (({"batches_per_request": 0}, "batches_per_request = 0 must be"),
                            ({"prefetch_factor": 0}, "prefetch_factor = 0 must be an int >= 1"),
                            ({"num_workers": 1.5}, "num_workers = 1.5 must be an int >= 0")):
        with pytest.raises(MorecError, match=f"^loader: {message}"):
            SamplerLoader(drawing, as_is, **{"num_workers": 1, **counts})


class Unpriced(Objective):
    """A job's objective whose groups() fails on every window: a user's bug."""

    name, num_groups, columns = "unpriced", 2, ("price",)

    def initial_masses(self) -> np.ndarray:
        return np.array([0.5, 0.5])

    def groups(self, rows: dict) -> np.ndarray:
        return np.full(len(rows["price"]), 2)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_error_in_a_worker_reaches_the_trainer_as_raised(dataset: PreparedDataset,
                                                             num_workers: int) -> None:
    config = SamplerConfig(objectives=("accuracy", "unpriced"), sub_batch_size=32,
                           window_batches=8)
    loader = SamplerLoader(
        WeightedStreamSampler(dataset, [*build_objectives(("accuracy",), dataset.manifest),
                                        Unpriced()], config),
        as_is, num_workers=num_workers)
    loader.set_epoch(0)
    with pytest.raises(MorecError) as raised:
        next(iter(loader))
    assert str(raised.value) == ("objective 'unpriced': groups() gave group 2, outside [0, 2)")
