"""One round of the adaptive objectives' mass update, end to end without training.

A validation signal crafted by hand -> Fairness.update / Alignment.update (hand-computed
sign steps) -> WeightStore.publish(effective_from=K) while the sampler streams -> the
sampler switches at batch K, and its fairness and alignment sub-batches follow the new
masses from then on.

Statistical tests use a fixed seed and reject at significance 0.001 (chi-square): a correct
sampler fails one with probability 1/1000 for a random seed, and never for the fixed one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import chi_square_p
from sampling_data import make_dataset

from morec_rec.config import SamplerConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.plugin.sampling.objectives import (
    Alignment,
    Fairness,
    ValidationSignal,
    build_objectives,
)
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler
from morec_rec.plugin.sampling.store import StoreSpec, WeightStore

ALPHA = 1e-3
NAMES = ("fairness", "alignment")
# Validation loss per fairness group: groups 1 and 4 tie for the largest (the lowest index,
# 1, gains), group 2 had no validation row.
GROUP_LOSS = np.array([0.5, 0.9, np.nan, 0.7, 0.9])
# Top-K exposure P per popularity group, against Q = the training shares of the manifest,
# (0.0794, 0.0884, 0.0914, 0.0949, 0.0977, 0.1016, 0.1067, 0.1100, 0.1127, 0.1171):
# P − Q < 0 in groups 0, 1, 2, 3, 5 (they gain α), > 0 in groups 4, 6, 7, 8, 9 (they lose α).
EXPOSURE = np.array([0.0, 0.0, 0.05, 0.05, 0.1, 0.1, 0.15, 0.15, 0.2, 0.2])
ALIGNMENT_SIGN = np.array([1, 1, 1, 1, -1, 1, -1, -1, -1, -1])
K = 10  # the new masses apply from loader batch K on
PUBLISH_AFTER = 5  # published once the loader has yielded this many batches
SUB_BATCH = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("update_round") / "data")


def signal() -> ValidationSignal:
    return ValidationSignal(group_loss={"fairness_group": GROUP_LOSS,
                                        "popularity_group": np.full(10, 0.5)},
                            exposure={"popularity_group": EXPOSURE})


def expected_masses(rule: str, fairness_rows: np.ndarray,
                    popularity_rows: np.ndarray) -> dict[str, np.ndarray]:
    """The update worked out by hand, from the initial masses (training-row shares);
    step α = 0.1 (the default) for the additive rule, 0.5 for the multiplicative one."""
    m_f = fairness_rows / fairness_rows.sum()
    m_a = popularity_rows / popularity_rows.sum()
    if rule == "additive":
        # Fairness: group 1 gains 0.1, the sum becomes 1.1, nothing reaches the floor.
        fairness = (m_f + 0.1 * np.eye(5)[1]) / 1.1
        # Alignment: m ± 0.1; group 4 (0.0977 − 0.1 < 0) is clipped to 0 and set to the
        # floor 1e-3, the other nine (all above it) share the remaining 1 − 1e-3.
        stepped = m_a + 0.1 * ALIGNMENT_SIGN
        assert stepped[4] < 0 and np.delete(stepped, 4).min() > 0.006
        alignment = stepped * (1 - 1e-3) / np.delete(stepped, 4).sum()
        alignment[4] = 1e-3
    else:
        # Multiplicative: m·e^(0.5·s), renormalised; every entry stays far above the floor
        # (the smallest, 0.0977·e^−0.5 / 1.16 = 0.051).
        fairness = m_f * np.exp(0.5 * np.eye(5)[1])
        fairness /= fairness.sum()
        alignment = m_a * np.exp(0.5 * ALIGNMENT_SIGN)
        alignment /= alignment.sum()
    return {"fairness": fairness, "alignment": alignment}


def frequencies(batches: list, position: int, column: str, groups: int) -> np.ndarray:
    """Group counts of the sub-batches of objective ``position`` in ``batches``."""
    drawn = torch.cat([getattr(b, column)[b.objective == position] for b in batches])
    return np.bincount(drawn.numpy(), minlength=groups)


@pytest.mark.parametrize(("rule", "step", "kind"), [("additive", 0.1, "hash"),
                                                    ("multiplicative", 0.5, "tcp")])
def test_update_round_reaches_the_sampler_from_batch_k(
        dataset: PreparedDataset, tmp_path: Path, tcp_store: Callable[..., StoreSpec],
        rule: str, step: float, kind: str) -> None:
    groups = dataset.manifest["groups"]
    objectives = build_objectives(NAMES, dataset.manifest, step=step, rule=rule)
    fairness, alignment = objectives
    assert isinstance(fairness, Fairness) and isinstance(alignment, Alignment)
    np.testing.assert_array_equal(alignment.direction(signal()), ALIGNMENT_SIGN)
    np.testing.assert_array_equal(fairness.direction(signal()), np.eye(5)[1])

    old = {o.name: o.initial_masses() for o in objectives}
    new = {o.name: o.update(old[o.name], signal()) for o in objectives}
    expected = expected_masses(rule, np.array(groups["fairness"]["train_rows"], float),
                               np.array(groups["popularity"]["train_rows"], float))
    for name in NAMES:
        np.testing.assert_allclose(new[name], expected[name], rtol=1e-12, atol=0)
        assert new[name].sum() == pytest.approx(1, abs=1e-12) and new[name].min() >= 1e-3

    spec = (StoreSpec(kind="hash", prefix=f"test/{tmp_path.name}", timeout_s=5) if kind == "hash"
            else tcp_store())
    store = WeightStore.connect(spec)
    config = SamplerConfig(objectives=NAMES, sub_batch_size=SUB_BATCH, window_batches=8)
    sampler = WeightedStreamSampler(dataset, objectives, config, store=spec)
    per_epoch = sampler.batches_per_epoch()
    assert per_epoch == 33  # 4,320 training rows // 128

    batches = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            batches.append(batch)
            if len(batches) == PUBLISH_AFTER:  # the trainer's update, ahead of the loader
                assert store.publish(new, effective_from=K) == 1
                sampler.announce(1)
    assert [b.batch_index for b in batches] == list(range(3 * per_epoch))
    assert [b.masses_version for b in batches] == [0] * K + [1] * (3 * per_epoch - K)
    assert all(b.starved.sum() == 0 for b in batches)  # every group has rows in each window
    published = store.read(1)
    assert (published.version, published.effective_from) == (1, K)
    for name in NAMES:
        np.testing.assert_array_equal(published.values[name], new[name])  # exact through JSON
        # The sampler renormalises what it reads (a change in the last bit at most).
        np.testing.assert_array_equal(sampler.masses[name], new[name] / new[name].sum())

    before, after = batches[:K], batches[K:]
    for position, (name, column, count) in enumerate(
            (("fairness", "fairness_group", 5), ("alignment", "popularity_group", 10))):
        # After K: 89 batches × 64 = 5,696 draws; the smallest expected count (the floored
        # group, 5,696 × 1e-3) is 5.7, enough for the chi-square approximation.
        observed = frequencies(after, position, column, count)
        assert observed.sum() == len(after) * SUB_BATCH
        assert chi_square_p(observed, new[name] * observed.sum()) > ALPHA, (name, observed)
        # The test has power: the old masses are rejected on the same draws.
        assert chi_square_p(observed, old[name] * observed.sum()) < ALPHA, (name, observed)
        # Before K: 640 draws from the old masses.
        observed = frequencies(before, position, column, count)
        assert chi_square_p(observed, old[name] * observed.sum()) > ALPHA, (name, observed)
