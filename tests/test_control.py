"""The PI controller and the objective coordinator (SPEC, "Objective coordinator").

Expected numbers are worked out by hand in the comments beside them.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

from morec_rec.config import HoldTarget, MoRecConfig
from morec_rec.errors import MorecError
from morec_rec.plugin.control.coordinator import Coordinator, needs_base_losses
from morec_rec.plugin.control.measures import METRICS, relative_measures
from morec_rec.plugin.control.pi import PIController, PIGains

PAPER = PIGains(kp=0.01, ki=0.001, beta_min=0.6, beta_max=1.3)
OBJECTIVES = ("accuracy", "revenue", "fairness", "alignment")
PREFERENCE = (0.4, 0.3, 0.3)

# kp/(1 + e^±0.1) with kp = 0.01: 1/(1 + 0.904837418) = 0.524979187, 1/(1 + 1.105170918) =
# 0.475020813.
P_ERR_MINUS = 0.01 * 0.52497918747894
P_ERR_PLUS = 0.01 * 0.47502081252106


# PI controller ----------------------------------------------------------------------------


def test_one_step_by_hand() -> None:
    controller = PIController(0.2, PAPER)
    # err = 0.2 − 0.3 = −0.1; I = 0 − 0.001·(−0.1) = 0.0001;
    # β = 0.01/(1 + e^−0.1) + 0.0001 + 0.6 = 0.0052497919 + 0.6001.
    assert controller.step(0.3) == pytest.approx(P_ERR_MINUS + 0.6001, abs=1e-12)
    assert controller.integral == pytest.approx(1e-4, abs=1e-15)
    assert controller.steps == 1
    assert controller.beta == pytest.approx(0.60534979187479, abs=1e-12)
    # Second step, same loss: I = 0.0002.
    assert controller.step(0.3) == pytest.approx(P_ERR_MINUS + 0.6002, abs=1e-12)


def test_output_before_any_step() -> None:
    assert PIController(0.2, PAPER).beta == 0.605  # err = 0: kp/2 + beta_min
    clamped = PIController(0.2, PIGains(kp=2.0, ki=0.0, beta_min=0.6, beta_max=1.3))
    assert clamped.beta == 1.3  # 1 + 0.6, clamped


def test_loss_above_target_raises_beta_and_below_lowers_it() -> None:
    controller = PIController(0.2, PAPER)
    betas = [controller.step(0.3) for _ in range(100)]
    # Inside the range the integral grows by ki·|err| = 1e-4 per step.
    assert controller.integral == pytest.approx(100 * 1e-4, abs=1e-12)
    assert np.all(np.diff(betas) > 0)
    assert betas[-1] == pytest.approx(P_ERR_MINUS + 0.01 + 0.6, abs=1e-12)

    betas = [controller.step(0.1) for _ in range(50)]  # err = +0.1
    assert controller.integral == pytest.approx(0.01 - 50 * 1e-4, abs=1e-12)
    assert np.all(np.diff(betas) < 0)
    assert betas[-1] == pytest.approx(P_ERR_PLUS + 0.005 + 0.6, abs=1e-12)


def test_output_stays_in_range_and_integral_is_bounded() -> None:
    gains = PIGains(kp=0.2, ki=0.05, beta_min=0.6, beta_max=1.3)
    controller = PIController(0.2, gains)
    rng = np.random.default_rng(0)
    losses = np.concatenate([0.2 * np.exp(rng.normal(0, 2, 2000)), [0.0, 1e6, 1e300, 0.0]])
    bounce_backs = 0
    for loss in losses:
        before = controller.beta
        beta = controller.step(loss)  # err up to −1e300: the logistic must not overflow
        assert gains.beta_min <= beta <= gains.beta_max
        # The documented invariant for kp/2 <= beta_max − beta_min.
        assert -0.1 - 1e-12 <= controller.integral <= 0.7 - 0.1 + 1e-12
        # From a bound, an error pointing back into the range leaves it at once.
        if before == gains.beta_max and loss < 0.2:
            assert beta < gains.beta_max
            bounce_backs += 1
        if before == gains.beta_min and loss > 0.2:
            assert beta > gains.beta_min
            bounce_backs += 1
    assert bounce_backs > 10


def test_anti_windup_recovers_where_a_naive_integrator_stays_pinned() -> None:
    gains = PIGains(kp=0.01, ki=0.05, beta_min=0.6, beta_max=1.3)
    target, high, low = 0.2, 1.0, 0.1

    def naive(losses: list[float]) -> list[float]:
        """The same law, integrating every step (no anti-windup)."""
        integral, out = 0.0, []
        for loss in losses:
            err = target - loss
            integral -= gains.ki * err
            u = gains.kp / (1 + math.exp(err)) + integral + gains.beta_min
            out.append(min(max(u, gains.beta_min), gains.beta_max))
        return out

    losses = [high] * 500 + [low] * 5000
    controller = PIController(target, gains)
    betas = [controller.step(loss) for loss in losses[:500]]
    # err = −0.8 adds 0.04 per step: 17 steps reach 0.68; the 18th (0.72) is clamped where
    # β meets beta_max, I = 0.7 − P with P = 0.01 / (1 + e^−0.8), and stays there.
    proportional = gains.kp / (1 + math.exp(-0.8))
    assert controller.integral == pytest.approx(0.7 - proportional, abs=1e-12)
    assert betas[16] < gains.beta_max and betas[17:] == pytest.approx([gains.beta_max] * 483)
    betas += [controller.step(loss) for loss in losses[500:]]

    def steps_to_recover(betas: list[float]) -> int:
        return next(i for i, b in enumerate(betas[500:], 1) if b <= gains.beta_max - 0.05)

    # err = +0.1: the integral falls 0.005 per step from 0.6931; β = 0.00475 + 0.6931
    # − 0.005k + 0.6 <= 1.25 from k = 10 on. The naive integral reached 500·0.04 = 20 and
    # needs ~3870 steps.
    assert steps_to_recover(betas) == 10
    assert steps_to_recover(naive(losses)) > 3800


def test_closed_loop_reaches_target() -> None:
    """A toy plant whose loss falls as β rises: at rest, loss = 0.4 − 0.15·β."""

    def run(ki: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
        controller = PIController(0.22, PIGains(kp=0.01, ki=ki, beta_min=0.6, beta_max=1.3))
        loss, losses, betas = 0.31, [], []  # the plant at rest at β = 0.6
        for _ in range(steps):
            beta = controller.step(loss)
            loss = 0.5 * loss + 0.5 * (0.4 - 0.15 * beta)
            losses.append(loss)
            betas.append(beta)
        return np.array(losses), np.array(betas)

    # ki = 0.3 holds the loss within 1% of 0.22 from step 150 on, at β = (0.4 − 0.22)/0.15.
    losses, betas = run(ki=0.3, steps=300)
    assert np.all(np.abs(losses[150:] - 0.22) <= 0.01 * 0.22)
    assert betas[-1] == pytest.approx(1.2, abs=1e-6)
    # The paper's ki = 0.001 has barely moved β after as many steps.
    losses, betas = run(ki=0.001, steps=300)
    assert losses[-1] > 1.3 * 0.22 and betas[-1] < 0.65


def test_state_round_trip_through_json() -> None:
    original = PIController(0.2, PAPER)
    losses = 0.2 + 0.15 * np.sin(np.arange(70))
    for loss in losses[:50]:
        original.step(loss)
    state = json.loads(json.dumps(original.state_dict()))
    assert state == {"integral": original.integral, "steps": 50, "beta": original.beta}
    restored = PIController(0.2, PAPER)
    restored.load_state_dict(state)
    assert (restored.integral, restored.steps, restored.beta) == (
        original.integral, original.steps, original.beta)
    assert [restored.step(loss) for loss in losses[50:]] == [
        original.step(loss) for loss in losses[50:]]


@pytest.mark.parametrize("kwargs, field", [
    ({"kp": math.nan}, "kp"),
    ({"ki": math.inf}, "ki"),
    ({"kp": -0.01}, "kp"),
    ({"ki": -0.001}, "ki"),
    ({"beta_min": -0.1}, "beta_min"),
    ({"beta_min": 1.4}, "beta_min"),
])
def test_bad_gains(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(MorecError, match=field):
        PIGains(**{**dict(kp=0.01, ki=0.001, beta_min=0.6, beta_max=1.3), **kwargs})


@pytest.mark.parametrize("target", [0.0, -0.2, math.nan, math.inf])
def test_bad_target(target: float) -> None:
    with pytest.raises(MorecError, match="target"):
        PIController(target, PAPER)


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_non_finite_loss(loss: float) -> None:
    controller = PIController(0.2, PAPER)
    with pytest.raises(ValueError, match="loss"):
        controller.step(loss)
    assert controller.steps == 0


def test_bad_controller_state() -> None:
    with pytest.raises(MorecError, match="integral"):
        PIController(0.2, PAPER).load_state_dict({"steps": 1, "beta": 0.7})


# Coordinator ------------------------------------------------------------------------------


def test_held_accuracy_scales_only_its_term() -> None:
    coordinator = Coordinator(OBJECTIVES, PREFERENCE, 0.2, {"accuracy": 0.2}, PAPER)
    # w = [1, λ·p] = [1, 0.2·0.4, 0.2·0.3, 0.2·0.3].
    np.testing.assert_allclose(coordinator.weights, [1.0, 0.08, 0.06, 0.06], rtol=1e-15)
    q = coordinator.step(np.array([0.3, 5.0, 5.0, 5.0]))
    # q_acc = β of the one-step hand computation; the others stay λ·p_o.
    np.testing.assert_allclose(q, [P_ERR_MINUS + 0.6001, 0.08, 0.06, 0.06], rtol=1e-12)
    assert coordinator.coefficients == {"accuracy": q[0]}
    assert coordinator.targets == {"accuracy": 0.2}


def test_objectives_without_accuracy_and_accuracy_alone() -> None:
    coordinator = Coordinator(("revenue", "fairness"), (0.25, 0.75), 0.4, {}, PAPER)
    np.testing.assert_allclose(coordinator.step(np.ones(2)), [0.1, 0.3], rtol=1e-15)
    alone = Coordinator(("accuracy",), (), 0.2, {"accuracy": 0.2}, PAPER)
    assert alone.step(np.array([0.2])).tolist() == [0.605]  # err = 0, I = 0


def test_two_controllers_follow_their_own_losses() -> None:
    coordinator = Coordinator(OBJECTIVES, PREFERENCE, 0.2, {"accuracy": 0.2, "revenue": 0.5},
                              PAPER)
    losses = np.array([0.3, 0.4, 9.0, 9.0])  # accuracy above its target, revenue below
    q = coordinator.step(losses)
    # Revenue: err = +0.1, I = −0.0001, β = 0.0047502081 − 0.0001 + 0.6; q = 0.08·β.
    np.testing.assert_allclose(
        q, [P_ERR_MINUS + 0.6001, 0.08 * (P_ERR_PLUS + 0.5999), 0.06, 0.06], rtol=1e-12)
    accuracy, revenue = PIController(0.2, PAPER), PIController(0.5, PAPER)
    accuracy.step(0.3)
    revenue.step(0.4)
    for _ in range(99):
        q = coordinator.step(losses)
        assert q[0] == accuracy.step(0.3)
        assert q[1] == coordinator.weights[1] * revenue.step(0.4)
    assert coordinator.coefficients["accuracy"] > 0.61
    assert coordinator.coefficients["revenue"] < 0.601


def test_step_rejects_bad_losses() -> None:
    coordinator = Coordinator(OBJECTIVES, PREFERENCE, 0.2, {"accuracy": 0.2}, PAPER)
    with pytest.raises(ValueError, match="shape"):
        coordinator.step(np.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        coordinator.step(np.array([0.3, math.nan, 1.0, 1.0]))
    assert coordinator.coefficients == {"accuracy": 0.605}  # no controller was stepped


def test_from_config() -> None:
    config = MoRecConfig(control="training", coefficients="loss",
                         preference=(0.5, 0.25, 0.25), scale=0.3, kp=0.02, ki=0.003,
                         beta_min=0.5, beta_max=1.5,
                         hold={"accuracy": HoldTarget(relative=1.0),
                               "revenue": HoldTarget(relative=1.1),
                               "fairness": HoldTarget(value=0.7)})
    base = {"accuracy": 0.2, "revenue": 0.5, "fairness": 0.9, "alignment": 0.4}
    coordinator = Coordinator.from_config(config, OBJECTIVES, base)
    assert coordinator.objectives == OBJECTIVES
    assert coordinator.targets == pytest.approx({"accuracy": 0.2, "revenue": 0.55,
                                                 "fairness": 0.7})
    np.testing.assert_allclose(coordinator.weights, [1.0, 0.15, 0.075, 0.075], rtol=1e-15)
    gains = PIGains(kp=0.02, ki=0.003, beta_min=0.5, beta_max=1.5)
    expected = [PIController(target, gains) for target in (0.2, 1.1 * 0.5, 0.7)]
    losses = np.array([0.3, 0.4, 0.8, 1.0])
    betas = [controller.step(loss) for controller, loss in zip(expected, losses)]
    assert coordinator.step(losses).tolist() == (coordinator.weights * [*betas, 1.0]).tolist()


def test_needs_base_losses() -> None:
    training = functools.partial(MoRecConfig, control="training", coefficients="loss")
    assert needs_base_losses(training())  # accuracy relative to the base
    assert not needs_base_losses(MoRecConfig(control="validation"))  # the base is 1 there
    assert not needs_base_losses(training(hold={"accuracy": HoldTarget(value=0.2)}))
    assert needs_base_losses(training(hold={"accuracy": HoldTarget(value=0.2),
                                            "revenue": HoldTarget(relative=2.0)}))
    assert not needs_base_losses(training(hold={}))


@pytest.mark.parametrize("preference, scale, targets, message", [
    ((0.5, 0.5), 0.2, {},
     r"preference \(0.5, 0.5\) has 2 entries for 3 objectives other than accuracy "
     r"\(revenue, fairness, alignment\)"),
    ((1.2, -0.2, 0.0), 0.2, {}, r"preference \(1.2, -0.2, 0.0\) must have finite entries"),
    ((0.4, 0.3, 0.4), 0.2, {}, "preference .* must sum to 1, got 1.1"),
    (PREFERENCE, 0.0, {}, "scale must be a finite number > 0, got 0.0"),
    (PREFERENCE, 0.2, {"accuracy": 0.0}, r"targets\['accuracy'\] must be .* > 0, got 0.0"),
    (PREFERENCE, 0.2, {"accuracy": -1.0}, r"targets\['accuracy'\] must be .* > 0, got -1.0"),
    (PREFERENCE, 0.2, {"price": 0.3}, "targets: 'price' is not among the objectives "
                                      r"\(accuracy, revenue, fairness, alignment\)"),
])
def test_bad_coordinator_input(preference: tuple[float, ...], scale: float,
                               targets: dict[str, float], message: str) -> None:
    with pytest.raises(MorecError, match=message):
        Coordinator(OBJECTIVES, preference, scale, targets, PAPER)


def test_repeated_objective() -> None:
    with pytest.raises(MorecError, match="'revenue' is listed twice"):
        Coordinator(("accuracy", "revenue", "revenue"), (0.5, 0.5), 0.2, {}, PAPER)


@pytest.mark.parametrize("relative, base, message", [
    ({"accuracy": 1.0}, None, r"hold accuracy \(relative = 1.0\) needs the base model's loss"),
    ({"revenue": 1.1}, {"accuracy": 0.2}, r"hold revenue \(relative = 1.1\) needs the base"),
    ({"price": 1.0}, {"price": 0.3}, "hold: 'price' is not among the objectives"),
])
def test_bad_hold(relative: dict[str, float], base: dict[str, float] | None,
                  message: str) -> None:
    hold = {name: HoldTarget(relative=r) for name, r in relative.items()}
    with pytest.raises(MorecError, match=message):
        Coordinator.from_config(MoRecConfig(control="training", coefficients="loss", hold=hold),
                                OBJECTIVES, base)


def test_coordinator_state_round_trip_and_mismatch() -> None:
    targets = {"accuracy": 0.2, "revenue": 0.5}
    original = Coordinator(OBJECTIVES, PREFERENCE, 0.2, targets, PAPER)
    rng = np.random.default_rng(1)
    losses = rng.uniform(0.1, 0.7, size=(70, 4))
    for row in losses[:50]:
        original.step(row)
    state = json.loads(json.dumps(original.state_dict()))
    restored = Coordinator(OBJECTIVES, PREFERENCE, 0.2, targets, PAPER)
    restored.load_state_dict(state)
    assert restored.coefficients == original.coefficients
    assert restored.measured == original.measured == {"accuracy": losses[49][0],
                                                      "revenue": losses[49][1]}
    for row in losses[50:]:
        assert restored.step(row).tolist() == original.step(row).tolist()

    other_target = Coordinator(OBJECTIVES, PREFERENCE, 0.2, {**targets, "revenue": 0.6}, PAPER)
    with pytest.raises(MorecError, match="coordinator state holds targets"):
        other_target.load_state_dict(state)
    fewer_held = Coordinator(OBJECTIVES, PREFERENCE, 0.2, {"accuracy": 0.2}, PAPER)
    with pytest.raises(MorecError, match="coordinator state holds targets"):
        fewer_held.load_state_dict(state)
    assert fewer_held.coefficients == {"accuracy": 0.605}  # nothing loaded


# Validation control -----------------------------------------------------------------------

BASE_METRICS = {"hit@10": 0.05, "rhit@10": 4.0, "pop_kl@10": 0.5, "min_hit@10": 0.02}


def test_relative_measures_by_hand() -> None:
    current = {"hit@10": 0.049, "rhit@10": 4.4, "pop_kl@10": 0.4, "min_hit@10": 0.0}
    measures = relative_measures(METRICS, BASE_METRICS, current, 10)
    # Higher is better: 2 − m/m_base; Pop-KL, lower is better: m/m_base.
    assert measures == pytest.approx({"accuracy": 2 - 0.98, "revenue": 2 - 1.1,
                                      "alignment": 0.8, "fairness": 2.0}, abs=1e-12)
    assert relative_measures(["accuracy"], BASE_METRICS, BASE_METRICS, 10) == {"accuracy": 1.0}


def test_relative_measures_refuse_what_they_cannot_measure() -> None:
    with pytest.raises(MorecError, match="base's validation min_hit@10 is 0"):
        relative_measures(["fairness"], {**BASE_METRICS, "min_hit@10": 0.0}, BASE_METRICS, 10)
    with pytest.raises(MorecError, match="'novelty' has no validation metric"):
        relative_measures(["novelty"], BASE_METRICS, BASE_METRICS, 10)


def test_validation_control_targets_observe_and_q() -> None:
    config = MoRecConfig(control="validation", scale=0.2, kp=0.01, ki=0.001, beta_min=0.6,
                         beta_max=1.3, hold={"accuracy": HoldTarget(relative=1.02),
                               "revenue": HoldTarget(relative=1.0)})
    coordinator = Coordinator.from_config(config, OBJECTIVES, None)  # no base losses needed
    assert coordinator.targets == pytest.approx({"accuracy": 1.02, "revenue": 1.0})
    q = coordinator.q  # before any observation: β = kp/2 + β_min = 0.605 for both
    np.testing.assert_allclose(q, [0.605, 0.08 * 0.605, 0.06, 0.06], rtol=1e-15)
    coordinator.observe({"accuracy": 1.12, "revenue": 0.9})
    # Accuracy: err = 1.02 − 1.12 = −0.1 (P_ERR_MINUS, I = 0.0001); revenue: err = +0.1.
    np.testing.assert_allclose(coordinator.q, [P_ERR_MINUS + 0.6001,
                                               0.08 * (P_ERR_PLUS + 0.5999), 0.06, 0.06],
                               rtol=1e-12)
    assert coordinator.measured == {"accuracy": 1.12, "revenue": 0.9}
    with pytest.raises(ValueError, match="expected the held objectives"):
        coordinator.observe({"accuracy": 1.0})


def test_validation_control_needs_a_metric() -> None:
    config = MoRecConfig(control="validation", preference=(1.0,),
                         hold={"novelty": HoldTarget(relative=1.0)})
    with pytest.raises(MorecError, match="'novelty' has no validation metric to control on"):
        Coordinator.from_config(config, ("accuracy", "novelty"), None)
