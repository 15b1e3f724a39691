"""The weighted streaming sampler: frequencies against masses and prices (chi-square),
coverage, equal batch counts, resume, starvation, and bad input.

Statistical tests use a fixed seed and reject at significance 0.001: a correct sampler
fails one with probability 1/1000 for a random seed, and never for the fixed one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
import re
import shutil
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import chi_square_p
from sampling_data import make_dataset
from torch.utils.data import DataLoader

from morec_rec.config import SamplerConfig
from morec_rec.data.format import ITEMS, PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.plugin import segments
from morec_rec.plugin.sampling.draw import GroupIndex, draw, largest_remainder
from morec_rec.plugin.sampling.objectives import Objective, build_objectives
from morec_rec.plugin.sampling.sampler import BATCH, WeightedStreamSampler
from morec_rec.plugin.sampling.store import StoreSpec, WeightStore

ALPHA = 1e-3
ALL = ("accuracy", "revenue", "fairness", "alignment")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("sampler") / "data")


def sampler(dataset: PreparedDataset, names: tuple[str, ...] = ALL,
            **kwargs) -> WeightedStreamSampler:
    masses, store = kwargs.pop("masses", None), kwargs.pop("store", None)
    config = SamplerConfig(objectives=names,
                           **{"sub_batch_size": 64, "window_batches": 8, **kwargs})
    return WeightedStreamSampler(dataset, build_objectives(names, dataset.manifest), config,
                                 masses=masses, store=store)


def epochs(s: WeightedStreamSampler, count: int) -> list:
    batches = []
    for epoch in range(count):
        s.set_epoch(epoch)
        batches.extend(s)
    return batches


@pytest.mark.parametrize("masses", [
    [0.2, 0.2, 0.2, 0.2, 0.2],
    [0.5, 0.0, 0.3, 0.2, 0.0],           # zero masses: never drawn
    [0.96, 0.02, 0.01, 0.007, 0.003],    # very skewed
])
def test_group_frequencies_match_masses(dataset: PreparedDataset, masses: list[float]) -> None:
    s = sampler(dataset, ("fairness",), masses={"fairness": np.array(masses)})
    drawn = torch.cat([b.fairness_group for b in epochs(s, 5)]).numpy()
    observed = np.bincount(drawn, minlength=5)
    expected = np.array(masses) * len(drawn)
    assert observed[expected == 0].sum() == 0
    assert chi_square_p(observed[expected > 0], expected[expected > 0]) > ALPHA, observed


class ExpensiveItems(Objective):
    """A user-defined objective: items priced 50 or more against the rest (test only)."""

    name, num_groups, columns = "expensive", 2, ("price",)

    def groups(self, rows):
        return (rows["price"] >= 50).astype(np.int64)

    def initial_masses(self) -> np.ndarray:
        return np.array([0.2, 0.8])


def test_user_defined_objective_through_the_sampler(dataset: PreparedDataset) -> None:
    objectives = [*build_objectives(("accuracy",), dataset.manifest), ExpensiveItems()]
    config = SamplerConfig(objectives=("accuracy", "expensive"), sub_batch_size=64)
    s = WeightedStreamSampler(dataset, objectives, config)
    drawn = torch.cat([b.price[b.objective == 1] for b in epochs(s, 3)]).numpy()
    observed = np.bincount((drawn >= 50).astype(int), minlength=2)
    assert chi_square_p(observed, np.array([0.2, 0.8]) * len(drawn)) > ALPHA


class Rows(Objective):
    """A job's objective whose groups and weights are whatever a test makes of the rows."""

    name, num_groups, columns = "rows", 2, ("price",)

    def __init__(self, groups: Callable | None = None, weights: Callable | None = None) -> None:
        self._groups, self._weights = groups, weights

    def initial_masses(self) -> np.ndarray:
        return np.array([0.5, 0.5])

    def groups(self, rows: dict) -> np.ndarray | None:
        return None if self._groups is None else self._groups(rows["price"])

    def weights(self, rows: dict) -> np.ndarray | None:
        return None if self._weights is None else self._weights(rows["price"])


@pytest.mark.parametrize(("objective", "message"), [
    (Rows(groups=lambda price: (price >= 50).astype(int) * 2),
     "groups() gave group 2, outside [0, 2)"),
    (Rows(groups=lambda price: -(price >= 50).astype(int)),
     "groups() gave group -1, outside [0, 2)"),
    (Rows(groups=lambda price: (price >= 50) * 1.0),
     "groups() gave float64 of shape (512,) for 512 rows"),
    (Rows(groups=lambda price: np.zeros(3, dtype=int)),
     "groups() gave int64 of shape (3,) for 512 rows"),
    (Rows(groups=lambda price: np.zeros(len(price), int), weights=lambda price: price - 50),
     "weights() gave weight -"),
    (Rows(groups=lambda price: np.zeros(len(price), int),
          weights=lambda price: np.full(len(price), np.inf)),
     "weights() gave weight inf, expected finite weights >= 0"),
    (Rows(groups=lambda price: np.zeros(len(price), int), weights=lambda price: price[:9]),
     "weights() gave float64 of shape (9,) for 512 rows"),
])
def test_an_objectives_groups_and_weights_are_checked_against_its_rows(
        dataset: PreparedDataset, objective: Objective, message: str) -> None:
    config = SamplerConfig(objectives=("accuracy", "rows"), sub_batch_size=64, window_batches=4)
    s = WeightedStreamSampler(dataset, [*build_objectives(("accuracy",), dataset.manifest),
                                        objective], config)
    s.set_epoch(0)
    with pytest.raises(MorecError, match="^" + re.escape(f"objective 'rows': {message}")):
        next(iter(s))


class EvenItems(Objective):
    """A job's objective of one group that weighs rows by a column every row has: it
    reads no other (``columns`` empty)."""

    name, num_groups, columns = "even_items", 1, ()

    def initial_masses(self) -> np.ndarray:
        return np.ones(1)

    def weights(self, rows: dict) -> np.ndarray:
        return (rows["item_id"] % 2 == 0).astype(float)


def test_a_one_group_objective_that_weighs_rows_is_drawn_by_its_weights(
        dataset: PreparedDataset) -> None:
    config = SamplerConfig(objectives=("accuracy", "even_items"), sub_batch_size=64,
                           window_batches=4)
    s = WeightedStreamSampler(dataset, [*build_objectives(("accuracy",), dataset.manifest),
                                        EvenItems()], config)
    for batch in epochs(s, 1):
        items = batch.item_id
        assert (items[batch.objective == 1] % 2 == 0).all()
        assert (items[batch.objective == 0] % 2 == 1).any()  # accuracy's: every row


def test_exact_mode_gives_rounded_counts(dataset: PreparedDataset) -> None:
    masses = np.array([0.5, 0.0, 0.3, 0.15, 0.05])
    s = sampler(dataset, ("fairness",), masses={"fairness": masses}, draw="exact")
    for batch in epochs(s, 1):
        counts = np.bincount(batch.fairness_group.numpy(), minlength=5)
        np.testing.assert_array_equal(counts, largest_remainder(masses * 64, 64))  # 32,0,19,10,3


def test_revenue_draws_are_proportional_to_price(dataset: PreparedDataset) -> None:
    # One window per stream: the window is the whole training set, so each training row's
    # chance is price / total price, and each item's is price × its training count.
    s = sampler(dataset, ("revenue",), window_batches=100)
    drawn = torch.cat([b.item_id for b in epochs(s, 5)]).numpy()
    items = dataset.items()
    weight = items["price"].to_numpy() * items["train_count"].to_numpy()
    observed = np.bincount(drawn, minlength=len(weight))
    assert observed[weight == 0].sum() == 0  # the free item is never drawn
    expected = weight / weight.sum() * len(drawn)
    assert chi_square_p(observed[weight > 0], expected[weight > 0]) > ALPHA


def _row_keys(batches: list) -> list[tuple[int, int]]:
    return [(u, i) for b in batches for u, i in zip(b.user_id.tolist(), b.item_id.tolist())]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uniform_epoch_visits_each_row_once(dataset: PreparedDataset, num_workers: int) -> None:
    s = sampler(dataset, ("accuracy",))
    batches = list(DataLoader(s, batch_size=None, num_workers=num_workers))
    assert len(batches) == s.batches_per_epoch(num_workers)
    keys = _row_keys(batches)
    assert len(set(keys)) == len(keys)  # no row twice
    # Only the tail of each stream that does not fill a batch is left out.
    streams = max(num_workers, 1)
    assert 4320 - streams * 64 < len(keys) <= 4320
    assert sorted(b.batch_index for b in batches) == list(range(len(batches)))


def test_workers_have_disjoint_rows_and_equal_batches(dataset: PreparedDataset) -> None:
    s = sampler(dataset, ("accuracy",), sub_batch_size=50)
    batches = list(DataLoader(s, batch_size=None, num_workers=3))
    by_worker = {w: [b for b in batches if b.batch_index % 3 == w] for w in range(3)}
    assert len({len(v) for v in by_worker.values()}) == 1
    keys = [set(_row_keys(v)) for v in by_worker.values()]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def test_epochs_shuffle_differently(dataset: PreparedDataset) -> None:
    s = sampler(dataset, ("accuracy",))
    first, second = (_row_keys(epochs_of) for epochs_of in ([*s], (s.set_epoch(1), [*s])[1]))
    assert first != second and len(set(first) & set(second)) > 0.9 * len(first)


def test_batch_layout_and_history(dataset: PreparedDataset) -> None:
    batch = next(iter(sampler(dataset)))
    assert len(batch) == 4 * 64
    assert batch.objective.tolist() == [o for o in range(4) for _ in range(64)]
    train = {(r["user_id"], r["item_id"]): r for r in dataset.split("train").to_pylist()}
    rows = [train[key] for key in zip(batch.user_id.tolist(), batch.item_id.tolist())]
    values = batch.history_values.split(batch.history_lengths.tolist())
    assert [past.tolist() for past in values] == [row["history"] for row in rows]
    # Looked up by item id, the item attributes are the rows' own values.
    np.testing.assert_array_equal(batch.price.numpy(),
                                  np.array([row["price"] for row in rows], dtype=np.float32))
    for name in ("fairness_group", "popularity_group"):
        assert getattr(batch, name).tolist() == [row[name] for row in rows], name


@pytest.mark.parametrize("threshold, by_value", [(1 << 20, True), (100, False)])
def test_a_batch_pickles_its_own_rows_by_value_within_the_threshold(
        dataset: PreparedDataset, threshold: int, by_value: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments, "BY_VALUE_MAX_BYTES", threshold)
    batch = next(iter(sampler(dataset)))  # its tensors are views of its block's columns
    own = sum(getattr(batch, f.name).nbytes for f in dataclasses.fields(batch)
              if isinstance(getattr(batch, f.name), torch.Tensor))
    sent = ForkingPickler.dumps(batch)  # what a loader worker sends (torch's reductions)
    if not by_value:  # torch's way: a handle per tensor
        assert len(sent) < own
        return
    assert own < len(sent) < 2 * own  # the batch's own elements, not its block's
    received = pickle.loads(sent)
    _compare([received], [batch])
    for name in ("price", "fairness_group", "popularity_group", "starved"):
        assert torch.equal(getattr(received, name), getattr(batch, name)), name


def _compare(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("user_id", "item_id", "objective", "history_values", "history_lengths"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert (x.batch_index, x.epoch, x.masses_version) == (y.batch_index, y.epoch,
                                                              y.masses_version)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("start", [13, 16])  # mid-window (8 batches a window), and on a window
def test_a_start_position_replays_the_rest_of_the_stream(dataset: PreparedDataset,
                                                         num_workers: int, start: int) -> None:
    def loader(position: int) -> DataLoader:
        s = sampler(dataset)
        s.set_epoch(1, position)
        return DataLoader(s, batch_size=None, num_workers=num_workers)

    uninterrupted = list(loader(0))
    assert [b.batch_index for b in uninterrupted] == [len(uninterrupted) + i
                                                      for i in range(len(uninterrupted))]
    _compare(uninterrupted[start:], list(loader(start)))


def test_persistent_workers_follow_set_epoch(dataset: PreparedDataset) -> None:
    # Workers that outlive an epoch yield what fresh ones would, for each set_epoch,
    # including after an iteration left unfinished (its prefetched batches are dropped).
    s = sampler(dataset)
    persistent = DataLoader(s, batch_size=None, num_workers=2, persistent_workers=True)
    s.set_epoch(0)
    assert len(list(itertools.islice(persistent, 3))) == 3
    for epoch, start in ((1, 0), (2, 5), (3, 0)):
        s.set_epoch(epoch, start)
        fresh = sampler(dataset)
        fresh.set_epoch(epoch, start)
        _compare(list(DataLoader(fresh, batch_size=None, num_workers=2)), list(persistent))


def test_a_restarted_loader_replays_the_published_masses(
        dataset: PreparedDataset, tcp_store: Callable[..., StoreSpec]) -> None:
    # Both runs publish the same versions at the same consumed counts; the second stops
    # at batch 13 and a new loader goes on from there over the same store: it replays
    # version 1 (in force from batch 9) and takes version 2 as it appears.
    publishes = {5: (np.eye(5)[4], 9), 20: (np.eye(5)[2], 24)}

    def run(store: str, start: int, stop: int | None = None) -> list:
        spec = tcp_store(store)
        weights = WeightStore.connect(spec)
        s = sampler(dataset, store=spec, sub_batch_size=16)
        s.announce(weights.latest_version())  # a restarted loader: every version so far
        s.set_epoch(0, start)
        batches = []
        for batch in DataLoader(s, batch_size=None, num_workers=2, prefetch_factor=2):
            batches.append(batch)
            consumed = batch.batch_index + 1
            if consumed in publishes and list(publishes).index(consumed) == \
                    weights.latest_version():
                s.announce(weights.publish({"fairness": publishes[consumed][0]},
                                           publishes[consumed][1]))
            if consumed == stop:
                break
        return batches

    uninterrupted = run("a", 0)
    assert len(uninterrupted) == 66  # 2 streams × 2160 rows // 64
    head = run("b", 0, stop=13)
    _compare(uninterrupted, head + run("b", 13))
    versions = [b.masses_version for b in uninterrupted]
    assert versions[:9] == [0] * 9 and versions[9:24] == [1] * 15 and set(versions[24:]) == {2}
    late = uninterrupted[30]
    assert set(late.fairness_group[late.objective == ALL.index("fairness")].tolist()) == {2}


def test_a_version_published_after_its_batch_was_drawn_raises(
        dataset: PreparedDataset, tcp_store: Callable[..., StoreSpec]) -> None:
    spec = tcp_store()
    weights = WeightStore.connect(spec)
    s = sampler(dataset, store=spec)
    batches = iter(s)
    next(batches), next(batches)  # batches 0 and 1 drawn
    s.announce(weights.publish({"fairness": np.eye(5)[0]}, effective_from=1))
    with pytest.raises(MorecError, match="version 1 applies from batch 1, but reached a "
                                         "loader worker after it drew batch 1"):
        next(batches)


def test_only_announced_versions_apply(
        dataset: PreparedDataset, tcp_store: Callable[..., StoreSpec]) -> None:
    spec = tcp_store()
    weights = WeightStore.connect(spec)
    s = sampler(dataset, store=spec)
    version = weights.publish({"fairness": np.eye(5)[0]}, effective_from=0)
    assert [b.masses_version for b in itertools.islice(s, 3)] == [0, 0, 0]
    s.announce(version)
    assert [b.masses_version for b in itertools.islice(s, 3)] == [1, 1, 1]
    s.announce(version + 1)
    with pytest.raises(MorecError, match="version 2 was announced to the sampler but is not "
                                         "in its store"):
        next(iter(s))


def test_published_masses_show_in_every_workers_frequencies(
        dataset: PreparedDataset, tcp_store: Callable[..., StoreSpec]) -> None:
    # Published after 10 consumed batches, in force from batch 14 (2 workers × prefetch 2
    # past the consumed ones): each worker's group frequencies match the old masses before
    # and the new ones after, and the new frequencies reject the old masses.
    before = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    after = before[::-1].copy()
    spec = tcp_store()
    weights = WeightStore.connect(spec)
    s = sampler(dataset, ("fairness",), masses={"fairness": before}, store=spec)
    batches = []
    for batch in DataLoader(s, batch_size=None, num_workers=2, prefetch_factor=2):
        batches.append(batch)
        if batch.batch_index + 1 == 10:
            s.announce(weights.publish({"fairness": after}, effective_from=14))
    assert len(batches) == s.batches_per_epoch(2) == 66
    for worker in (0, 1):
        mine = [b for b in batches if b.batch_index % 2 == worker]
        for masses, version, phase in ((before, 0, [b for b in mine if b.batch_index < 14]),
                                       (after, 1, [b for b in mine if b.batch_index >= 14])):
            assert {b.masses_version for b in phase} == {version}
            drawn = torch.cat([b.fairness_group for b in phase]).numpy()
            observed = np.bincount(drawn, minlength=5)
            assert chi_square_p(observed, masses * len(drawn)) > ALPHA, (worker, observed)
        assert chi_square_p(observed, before * len(drawn)) < ALPHA  # the change shows


def test_shares_of_the_batch_set_each_objectives_rows(
        dataset: PreparedDataset, tcp_store: Callable[..., StoreSpec]) -> None:
    # Batches of 4 × 64 = 256 rows. Initial shares (4, 2, 1, 1)/8: 128, 64, 32, 32 rows.
    # Published for batch 5 on: (0.7, 0.1, 0.1, 0.1) × 256 = 179.2, 25.6, 25.6, 25.6,
    # rounded by largest remainder (ties to the lower index): 179, 26, 26, 25.
    spec = tcp_store()
    version = WeightStore.connect(spec).publish({BATCH: np.array([0.7, 0.1, 0.1, 0.1])},
                                                effective_from=5)
    s = sampler(dataset, masses={BATCH: np.array([4.0, 2, 1, 1])}, store=spec)
    s.announce(version)
    batches = list(s)
    sizes = [np.bincount(b.objective.numpy(), minlength=4).tolist() for b in batches]
    assert sizes[:5] == [[128, 64, 32, 32]] * 5
    assert sizes[5:] == [[179, 26, 26, 25]] * (len(batches) - 5)
    assert [b.masses_version for b in batches[4:6]] == [0, 1]
    # The uniform objective still takes rows it has not taken before in the epoch.
    accuracy = [(u, i) for b in batches for o, u, i in
                zip(b.objective.tolist(), b.user_id.tolist(), b.item_id.tolist()) if o == 0]
    assert len(set(accuracy)) == len(accuracy)
    np.testing.assert_allclose(s.masses[BATCH], [0.7, 0.1, 0.1, 0.1])


class RareGroup(Objective):
    """Three groups by price, the last (price over 1000) with no row in the dataset."""

    name, num_groups, columns = "rare", 3, ("price",)

    def groups(self, rows):
        return np.digitize(rows["price"], [50, 1000]).astype(np.int64)

    def initial_masses(self) -> np.ndarray:
        return np.array([0.25, 0.25, 0.5])


def test_sampler_counts_and_logs_starved_draws(dataset: PreparedDataset,
                                               caplog: pytest.LogCaptureFixture) -> None:
    objectives = [*build_objectives(("accuracy",), dataset.manifest), RareGroup()]
    config = SamplerConfig(objectives=("accuracy", "rare"), sub_batch_size=64,
                           window_batches=8)
    s = WeightedStreamSampler(dataset, objectives, config)
    with caplog.at_level("WARNING", logger="morec_rec.plugin.sampling.sampler"):
        batches = epochs(s, 1)
    starved = torch.stack([b.starved for b in batches]).numpy()
    assert starved[:, 0].sum() == 0  # accuracy never starves
    # Half of the rare objective's draws fall on the empty group; the stream keeps going.
    assert len(batches) == s.batches_per_epoch() == 33
    assert 0.4 < starved[:, 1].sum() / (64 * len(batches)) < 0.6
    prices = torch.cat([b.price[b.objective == 1] for b in batches]).numpy()
    observed = np.bincount((prices >= 50).astype(int), minlength=2)
    assert chi_square_p(observed, np.array([0.5, 0.5]) * len(prices)) > ALPHA  # re-drawn 1:1
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings and all("objective rare: groups [2] have mass but no row" in w
                            for w in warnings)


def test_starved_draws_are_redrawn_and_counted() -> None:
    groups = np.array([0, 0, 1, 1, 1, 0])  # group 2 has no row in this window
    index = GroupIndex.build(groups, None, 3, len(groups))
    rows, starved = draw(index, np.array([0.5, 0.0, 0.5]), 100, np.random.default_rng(0),
                         "multinomial", batches=10)
    assert rows.shape == (10, 100) and starved.shape == (10, 3)
    assert set(groups[rows.ravel()]) == {0}  # group 1 has zero mass, group 2 no rows
    assert 400 < starved[:, 2].sum() < 600 and starved[:, [0, 1]].sum() == 0


def test_each_sub_batch_of_a_block_has_its_own_group_counts() -> None:
    # 4,000 sub-batches of 16 rows drawn together over two groups at masses 0.25/0.75:
    # group 0's count in each follows Binomial(16, 0.25), so the block's sub-batches are
    # independent draws and not one draw split up.
    index = GroupIndex.build(np.array([0, 1, 1, 1]), None, 2, 4)
    rows, _ = draw(index, np.array([0.25, 0.75]), 16, np.random.default_rng(3), "multinomial",
                   batches=4000)
    counts = np.bincount((rows == 0).sum(axis=1), minlength=17)
    pmf = np.array([math.comb(16, c) * 0.25 ** c * 0.75 ** (16 - c) for c in range(17)])
    pooled = [counts[:1].sum(), *counts[1:8], counts[8:].sum()]  # expected >= 5 per cell
    expected = [pmf[:1].sum(), *pmf[1:8], pmf[8:].sum()]
    assert chi_square_p(np.array(pooled), 4000 * np.array(expected)) > ALPHA, counts


def test_weighted_draw_never_takes_zero_weight_rows() -> None:
    weights = np.array([0.0, 1.0, 0.0, 3.0, 0.0])
    index = GroupIndex.build(None, weights, 1, 5)
    rows, _ = draw(index, np.array([1.0]), 400, np.random.default_rng(1), "multinomial",
                   batches=10)
    counts = np.bincount(rows.ravel(), minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert chi_square_p(counts[[1, 3]], np.array([1000.0, 3000.0])) > ALPHA


@pytest.mark.parametrize("weights", [None, np.ones(2000)], ids=["uniform", "weighted"])
def test_rows_within_every_group_are_drawn_alike(weights: np.ndarray | None) -> None:
    # Four groups of 500 rows at equal masses, 100 sub-batches drawn together: in the
    # first and in the last 50 sub-batches alike, every row of every group, the first
    # group's low rows and the last group's high rows alike, is drawn 1/2000 of the time.
    groups = np.repeat(np.arange(4), 500)
    index = GroupIndex.build(groups, weights, 4, len(groups))
    rows, _ = draw(index, np.full(4, 0.25), 2000, np.random.default_rng(2), "multinomial",
                   batches=100)
    for half in (rows[:50], rows[50:]):
        deciles = np.bincount(half.ravel() // 50, minlength=40)  # 10 bins of 50 rows a group
        assert chi_square_p(deciles, np.full(40, half.size / 40)) > ALPHA, deciles


def test_largest_remainder() -> None:
    assert largest_remainder(np.array([0.5, 0.3, 0.2]) * 64, 64).tolist() == [32, 19, 13]
    assert largest_remainder(np.array([1 / 3] * 3) * 10, 10).tolist() == [4, 3, 3]


@pytest.mark.parametrize(("masses", "message"), [
    ({"fairness": [0.5, 0.5]}, "fairness"),
    ({"fairness": [0.5, 0.5, -0.1, 0.05, 0.05]}, "must be >= 0"),
    ({"fairness": [np.nan, 0.5, 0.2, 0.2, 0.1]}, "must be finite"),
    ({"novelty": [1.0]}, "unknown objective"),
])
def test_bad_masses(dataset: PreparedDataset, masses: dict, message: str) -> None:
    with pytest.raises(MorecError, match=message):
        sampler(dataset, masses={k: np.array(v) for k, v in masses.items()})


def test_item_attributes_need_the_items_in_id_order(dataset: PreparedDataset,
                                                    tmp_path: Path) -> None:
    shutil.copytree(dataset.root, tmp_path / "data")
    items = tmp_path / "data" / ITEMS
    table = pq.read_table(items)
    pq.write_table(table.take(np.arange(table.num_rows)[::-1]), items)
    with pytest.raises(MorecError, match=f"{items}: item_id must run 0..{table.num_rows - 1} "):
        sampler(PreparedDataset.open(tmp_path / "data"))
    with pytest.raises(MorecError, match=f"{dataset.root / ITEMS}: no column\\(s\\) timestamp"):
        dataset.item_columns(["price", "timestamp"])


def test_unknown_objective_name(dataset: PreparedDataset) -> None:
    with pytest.raises(MorecError, match="unknown objective 'novelty'"):
        sampler(dataset, ("accuracy", "novelty"))


def test_batches_carry_only_the_columns_asked_for(dataset: PreparedDataset) -> None:
    s = WeightedStreamSampler(dataset, build_objectives(("accuracy", "fairness"),
                                                        dataset.manifest),
                              SamplerConfig(objectives=("accuracy", "fairness"),
                                            sub_batch_size=64, window_batches=8),
                              columns=["price"])
    # The ids from the shards, the column asked for and fairness's own from the items:
    # no list column, nor any column a lookup by item gives, is read row by row.
    assert s.columns == ["item_id", "user_id"]
    assert sorted(s.item_attributes) == ["fairness_group", "price"]
    batch = next(iter(s))
    assert batch.price is not None and batch.user_id.dtype == torch.int64
    assert (batch.fairness_group, batch.popularity_group, batch.history_values,
            batch.history_lengths) == (None, None, None, None)
    with pytest.raises(MorecError, match="columns \\['genre'\\] are not among"):
        WeightedStreamSampler(dataset, [], SamplerConfig(), columns=["genre"])
