"""MoRec's loss hook: per-objective means, the coordinator's q, gradients, the real
TrainPipelineSparseDist, and identical coefficients on every rank.

Expected numbers are worked out by hand from SPEC "Objective coordinator"::

    err = ℓ̂ − ℓ_acc;  I' = I − ki·err (kept only if the unclamped output stays in range);
    β = clamp(kp / (1 + exp(err)) + I + β_min, β_min, β_max);  q = (β, λ·p_1, λ·p_2, ...)
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_torchrun
from morec_rec.control.coordinator import Coordinator
from morec_rec.control.pi import PIGains
from morec_rec.models import ModelOutput
from morec_rec.models.mf import MatrixFactorization
from morec_rec.pipeline.batch import TrainBatch, features_kjt
from morec_rec.pipeline.hook import MoRecLoss, MoRecOutput, objective_means, segment_sums

OBJECTIVES = ("accuracy", "revenue", "fairness")
GAINS = PIGains(kp=0.5, ki=0.1, beta_min=0.6, beta_max=1.3)
# Rows of 3 objectives, interleaved: accuracy 0.5, 1.0 (mean 0.75); revenue 0.25, 0.5,
# 2.25 (mean 1.0); fairness 3.0 (mean 3.0).
SEGMENTS = [2, 0, 1, 0, 1, 1]
LOSSES = [3.0, 0.5, 0.25, 1.0, 0.5, 2.25]
MEANS = [0.75, 1.0, 3.0]


class FixedModel:
    """A fake model: returns the given per-row losses and segment ids, whatever the batch."""

    def __init__(self, losses: list[float], segments: list[int]) -> None:
        self.output = ModelOutput(torch.tensor(losses, dtype=torch.float64),
                                  torch.tensor(segments))
        self.calls = 0

    def __call__(self, batch: object) -> tuple[torch.Tensor, ModelOutput]:
        self.calls += 1
        return self.output.per_row_loss.mean(), self.output


def coordinator(target: float = 0.5, gains: PIGains = GAINS,
                preference: tuple[float, float] = (0.4, 0.6)) -> Coordinator:
    """λ = 0.2, so q = (β, 0.2·p_revenue, 0.2·p_fairness)."""
    return Coordinator(OBJECTIVES, preference, 0.2, {"accuracy": target}, gains)


def controller_steps(c: Coordinator) -> int:
    return c.state_dict()["controllers"]["accuracy"]["steps"]


def test_objective_losses_coefficients_and_loss_by_hand() -> None:
    c = coordinator()
    hook = MoRecLoss(FixedModel(LOSSES, SEGMENTS), c)
    loss, output = hook(None)

    assert isinstance(output, MoRecOutput)
    assert output.objective_loss.dtype == output.coefficients.dtype == torch.float64
    assert output.objective_loss.tolist() == MEANS  # exact: sums of dyadic numbers
    # err = 0.5 − 0.75 = −0.25: P = 0.5/(1 + e^−0.25) = 0.5/1.7788008 = 0.2810883;
    # I = −0.1·(−0.25) = 0.025; β = 0.2810883 + 0.025 + 0.6 = 0.9060883, inside [0.6, 1.3].
    beta = 0.5 / (1 + math.exp(-0.25)) + 0.025 + 0.6
    assert beta == pytest.approx(0.9060883, abs=1e-7)
    np.testing.assert_allclose(output.coefficients.numpy(), [beta, 0.08, 0.12], rtol=1e-12)
    assert c.coefficients["accuracy"] == pytest.approx(beta, rel=1e-12)
    assert loss.item() == pytest.approx(beta * 0.75 + 0.08 * 1.0 + 0.12 * 3.0, rel=1e-12)
    assert output.model.per_row_loss.tolist() == LOSSES  # the model's own output, passed on
    assert controller_steps(c) == 1

    # A second step with the accuracy rows at 10: err = −9.5, P = 0.5/(1 + e^−9.5);
    # the candidate I = 0.025 + 0.95 gives 0.49996 + 0.975 + 0.6 > 1.3: the integral stays
    # at 0.025 (anti-windup), β = 0.49996 + 0.025 + 0.6 = 1.12496.
    hook.model = FixedModel([10.0, 10.0, 1.0, 2.0], [0, 0, 1, 2])
    loss, output = hook(None)
    beta = 0.5 / (1 + math.exp(-9.5)) + 0.025 + 0.6
    assert output.objective_loss.tolist() == [10.0, 1.0, 2.0]
    assert output.coefficients[0].item() == pytest.approx(beta, rel=1e-12)
    assert loss.item() == pytest.approx(beta * 10 + 0.08 * 1 + 0.12 * 2, rel=1e-12)
    assert controller_steps(c) == 2


def test_without_control_per_step_the_hook_uses_the_coefficients_in_force() -> None:
    c = coordinator()
    c.observe({"accuracy": 1.0})  # err = −0.5: P = 0.5/(1 + e^−0.5), I = 0.05
    beta = 0.5 / (1 + math.exp(-0.5)) + 0.05 + 0.6
    hook = MoRecLoss(FixedModel(LOSSES, SEGMENTS), c, control_per_step=False)
    for _ in range(3):
        loss, output = hook(None)
        np.testing.assert_allclose(output.coefficients.numpy(), [beta, 0.08, 0.12], rtol=1e-12)
        assert loss.item() == pytest.approx(beta * 0.75 + 0.08 * 1.0 + 0.12 * 3.0, rel=1e-12)
    assert controller_steps(c) == 1  # only the observation stepped it


def test_under_sampling_coefficients_the_loss_is_the_plain_mean_over_the_rows() -> None:
    c = coordinator()
    c.observe({"accuracy": 1.0})
    hook = MoRecLoss(FixedModel(LOSSES, SEGMENTS), c, control_per_step=False,
                     coefficients="sampling")
    loss, output = hook(None)
    # The rows were drawn in proportion to q: the loss weighs each objective by its rows.
    assert output.coefficients.tolist() == pytest.approx([2 / 6, 3 / 6, 1 / 6], rel=1e-12)
    assert output.objective_loss.tolist() == MEANS
    assert loss.item() == pytest.approx(sum(LOSSES) / 6, rel=1e-12)
    assert controller_steps(c) == 1
    # Every row weighs 1/n in the gradient, and the reported means carry no graph.
    per_row = hook.model.output.per_row_loss.requires_grad_()
    loss, output = hook(None)
    loss.backward()
    assert per_row.grad.tolist() == pytest.approx([1 / 6] * 6, rel=1e-12)
    assert not output.objective_loss.requires_grad
    per_row.requires_grad_(False)

    # An objective that drew no row this step: no loss term, its mean NaN, no error.
    hook.model = FixedModel([1.0, 3.0, 2.0], [0, 0, 2])
    loss, output = hook(None)
    assert loss.item() == 2.0
    assert output.coefficients.tolist() == pytest.approx([2 / 3, 0, 1 / 3], rel=1e-12)
    assert math.isnan(output.objective_loss[1].item())


def test_sampling_coefficients_need_a_controller_stepped_between_calls() -> None:
    with pytest.raises(ValueError, match="draws batches ahead"):
        MoRecLoss(FixedModel(LOSSES, SEGMENTS), coordinator(), coefficients="sampling")
    with pytest.raises(ValueError, match="'weights' is not one of"):
        MoRecLoss(FixedModel(LOSSES, SEGMENTS), coordinator(), control_per_step=False,
                  coefficients="weights")


def test_segment_sums_and_objective_means() -> None:
    per_row = torch.tensor(LOSSES, requires_grad=True)
    sums, counts = segment_sums(per_row, torch.tensor(SEGMENTS), 4)  # segment 3 has no row
    assert sums.tolist() == [1.5, 3.0, 3.0, 0.0]
    assert counts.tolist() == [2.0, 3.0, 1.0, 0.0]
    sums.sum().backward()  # differentiable: every row counts once
    assert per_row.grad.tolist() == [1.0] * 6
    means = objective_means(per_row, torch.tensor(SEGMENTS), 4)
    assert means.dtype == np.float64
    np.testing.assert_array_equal(means[:3], MEANS)
    assert np.isnan(means[3])


@pytest.mark.parametrize(("losses", "segments"), [
    ([0.5, 1.0, 2.0], [0, 1, 1]),  # fairness has no row
    ([0.5, -1.0, 2.0], [0, 1, 2]),  # a negative loss
    ([0.5, math.inf, 2.0], [0, 1, 2]),
])
def test_bad_losses_are_refused_before_the_controller_steps(losses: list[float],
                                                            segments: list[int]) -> None:
    c = coordinator()
    with pytest.raises(ValueError, match="finite and >= 0"):
        MoRecLoss(FixedModel(losses, segments), c)(None)
    assert controller_steps(c) == 0


MF_FEATURES = MatrixFactorization.feature_names


def mf_batch() -> TrainBatch:
    """6 rows: users 0-3, items 0-9, 3 negatives each; objective sizes 2, 3, 1."""
    ones = torch.ones(6, dtype=torch.int32)
    features = features_kjt(MF_FEATURES, {
        "user_id": (torch.tensor([0, 1, 2, 3, 1, 0]), ones),
        "item_id": (torch.tensor([4, 5, 6, 7, 8, 9]), ones),
        "neg_item_id": (torch.tensor([0, 1, 2, 3, 2, 1, 9, 8, 7, 6, 5, 4, 1, 3, 5, 0, 2, 4]),
                        3 * ones),
    })
    return TrainBatch(features, torch.tensor(SEGMENTS))


def gradients(model: MatrixFactorization) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_gradients_are_those_of_the_weighted_sum_of_objective_means() -> None:
    torch.manual_seed(0)
    model = MatrixFactorization(4, 10, embedding_dim=8)
    batch = mf_batch()
    loss, output = MoRecLoss(model, coordinator(target=0.2))(batch)
    loss.backward()
    hooked = gradients(model)
    q = output.coefficients.tolist()
    assert q[1:] == pytest.approx([0.08, 0.12], rel=1e-12)

    _, own = model(batch)
    per_row, segment = own.per_row_loss, torch.tensor(SEGMENTS)
    weighted = sum(q[o] * per_row[segment == o].mean() for o in range(3))
    torch.testing.assert_close(loss, weighted)
    weighted.backward()
    expected = gradients(model)
    for name, grad in hooked.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)

    # Not the model's own loss: its mean over all rows has other gradients.
    own_loss, _ = model(batch)
    own_loss.backward()
    plain = gradients(model)
    assert not all(torch.allclose(plain[n], hooked[n], atol=1e-6) for n in hooked)


# Under torchrun: 2 ranks, the fixed-loss hook and the real pipeline (tests/dist/hook_job.py)

FIXED_TARGET, FIXED_GAINS = 2.0, PIGains(kp=0.2, ki=0.15, beta_min=0.6, beta_max=1.3)
PIPELINE_TARGET, PIPELINE_GAINS = 0.5, PIGains(kp=0.1, ki=0.05, beta_min=0.6, beta_max=1.3)


def betas_by_hand(losses: list[float], target: float, gains: PIGains) -> list[float]:
    """The PI recurrence of SPEC Eq. 13–14 with conditional integration, written out."""
    integral, betas = 0.0, []
    for loss in losses:
        err = target - loss
        proportional = gains.kp / (1 + math.exp(err))
        if gains.beta_min <= proportional + integral - gains.ki * err + gains.beta_min \
                <= gains.beta_max:
            integral -= gains.ki * err
        betas.append(min(max(proportional + integral + gains.beta_min, gains.beta_min),
                         gains.beta_max))
    return betas


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("hook_job")
    run_torchrun("tests/dist/hook_job.py", "--out", str(out), nproc=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def global_means(steps: list[dict]) -> np.ndarray:
    """Each objective's mean over the rows of every rank, from the ranks' own records."""
    losses = np.concatenate([s["per_row_loss"] for s in steps])
    segments = np.concatenate([s["objective"] for s in steps])
    return np.array([losses[segments == o].mean() for o in range(3)])


@pytest.mark.slow
def test_every_rank_gets_the_global_means_and_the_same_beta(two_ranks: list[dict]) -> None:
    first, second = (rank["fixed"] for rank in two_ranks)
    assert len(first) == len(second) == 6
    means = [global_means([a, b]) for a, b in zip(first, second)]
    betas = betas_by_hand([m[0] for m in means], FIXED_TARGET, FIXED_GAINS)
    uneven = 0
    for step, (a, b) in enumerate(zip(first, second)):
        counts = [np.bincount(r["objective"], minlength=3) for r in (a, b)]
        assert (counts[0] != counts[1]).any()  # the ranks' sub-batches differ in size
        for key in ("objective_loss", "q", "beta"):
            assert a[key] == b[key], (step, key)  # bit for bit
        assert a["dtypes"] == ["torch.float64", "torch.float64"]
        # Losses are multiples of 1/16: every sum is exact, so the means are too.
        assert a["objective_loss"] == means[step].tolist(), step
        assert a["beta"] == pytest.approx(betas[step], rel=1e-12)
        assert a["q"] == pytest.approx([betas[step], 0.08, 0.12], rel=1e-12)
        for rank in (a, b):  # each rank's loss weights its own means by the common q
            losses, segments = np.array(rank["per_row_loss"]), np.array(rank["objective"])
            local = [losses[segments == o].mean() for o in range(3)]
            assert rank["loss"] == pytest.approx(np.dot(rank["q"], local), rel=1e-6)
            uneven += not np.allclose(local, means[step])
    assert uneven > 0  # local means differ from the global ones: the reduce mattered
    assert len({round(b, 9) for b in betas}) == len(betas)  # β moved at every step


@pytest.mark.slow
def test_the_pipeline_trains_on_the_hooks_loss(two_ranks: list[dict]) -> None:
    first, second = (rank["pipeline"] for rank in two_ranks)
    assert first["sharded"] and second["sharded"]
    means = [global_means([a, b]) for a, b in zip(first["steps"], second["steps"])]
    betas = betas_by_hand([m[0] for m in means], PIPELINE_TARGET, PIPELINE_GAINS)
    for step, (a, b) in enumerate(zip(first["steps"], second["steps"])):
        assert a["type"] == "MoRecOutput"
        assert len(a["objective_loss"]) == 3
        assert a["controller_steps"] == b["controller_steps"] == step + 1  # one step a call
        for key in ("objective_loss", "q", "beta"):
            assert a[key] == b[key], (step, key)
        # Float32 per-row losses, summed in float32 then reduced in float64.
        np.testing.assert_allclose(a["objective_loss"], means[step], rtol=1e-6)
        assert a["q"] == pytest.approx([betas[step], 0.2, 0.0], rel=1e-6)
    assert len(first["steps"]) == 4

    # Fairness (q = 0) alone uses users 6, 7 and items 14, 15: those rows never moved, every
    # other row did (the model's own mean loss would have moved them all).
    for rank in (first, second):
        assert rank["before"] == first["before"] and rank["after"] == first["after"]
    for table, own in (("user", [6, 7]), ("item", [14, 15])):
        before, after = np.array(first["before"][table]), np.array(first["after"][table])
        moved = np.abs(after - before).max(axis=1) > 0
        assert not moved[own].any(), table
        assert np.delete(moved, own).all(), (table, moved)
    torch.manual_seed(0)  # the job's initial tables: sharding kept them
    initial = MatrixFactorization(8, 16, embedding_dim=4).embeddings.embeddings
    np.testing.assert_array_equal(first["before"]["user"], initial["user"].weight.detach())
