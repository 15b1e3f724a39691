"""The baselines' weight rules (MGDA, Pareto MTL, EPO, static) against hand-computed cases,
and the objectives' loss forms (SPEC Eq. 15–17)."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from morec_rec.errors import MorecError
from morec_rec.plugin.control.objective_losses import ItemSideInformation, objective_losses
from morec_rec.plugin.control.rules import EPO, MGDA, ParetoMTL, Static, min_norm


def test_min_norm_of_two_orthogonal_gradients_weighs_them_by_inverse_squared_norm() -> None:
    # |a·g1 + b·g2|² = 4a² + b² on a + b = 1 is smallest at 8a = 2b: a = 0.2.
    np.testing.assert_allclose(min_norm(np.diag([4.0, 1.0])), [0.2, 0.8], atol=1e-6)


@pytest.mark.parametrize("scale", [1e-10, 1e-6, 1.0, 1e6])
def test_min_norm_does_not_depend_on_the_gradients_scale(scale: float) -> None:
    # |a·g1 + b·g2|² = s(4a² + b²): the same a = 0.2 whatever s (the demo's gradients have
    # squared norms near 1e-6; an absolute stopping tolerance gave uniform weights at 1e-10).
    np.testing.assert_allclose(min_norm(scale * np.diag([4.0, 1.0])), [0.2, 0.8], atol=1e-6)


def test_min_norm_takes_a_vertex_when_it_is_the_closest_point() -> None:
    # g1 = (1, 0), g2 = (1, 1): the segment's points (1, γ) are shortest at γ = 0.
    np.testing.assert_allclose(min_norm(np.array([[1.0, 1.0], [1.0, 2.0]])), [1.0, 0.0],
                               atol=1e-6)


def test_min_norm_matches_a_grid_search_over_the_simplex() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 5))
    gram = vectors @ vectors.T
    alpha = min_norm(gram)
    grid = [np.array([a, b, 1 - a - b]) for a, b in itertools.product(
        np.linspace(0, 1, 201), repeat=2) if a + b <= 1]
    best = min(w @ gram @ w for w in grid)
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-9
    assert alpha @ gram @ alpha <= best + 1e-6


def test_mgda_direction_descends_every_objective() -> None:
    vectors = np.array([[1.0, 0.2], [-0.3, 1.0], [0.5, 0.5]])
    alpha = MGDA().weights(np.ones(3), vectors @ vectors.T)
    direction = alpha @ vectors
    assert (vectors @ direction > 0).all()


def test_static_weights_are_the_normalised_preference_and_need_no_gradients() -> None:
    rule = Static(np.array([2.0, 1.0, 1.0]))
    assert not rule.needs_gradients
    np.testing.assert_allclose(rule.weights(np.ones(3), None), [0.5, 0.25, 0.25])


def test_pareto_mtl_first_leaves_a_violated_constraint_then_adds_the_objectives() -> None:
    references = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    rule = ParetoMTL(references, index=0)
    # Losses (3, 1) lie closer in angle to (1, 0) than to (1, 1): the constraint of
    # reference (1, 0) is violated, with direction d = (1, 0) − (1, 1)/√2. The initial
    # phase descends it alone; scaled to Σ|α| = 2.
    d = np.array([1 - 1 / np.sqrt(2), -1 / np.sqrt(2)])
    np.testing.assert_allclose(rule.weights(np.array([3.0, 1.0]), np.eye(2)),
                               d * 2 / np.abs(d).sum(), atol=1e-6)
    assert not rule.feasible
    # At (1, 1) no constraint is violated: MGDA over the objectives, (0.5, 0.5) scaled.
    np.testing.assert_allclose(rule.weights(np.array([1.0, 1.0]), np.eye(2)), [1.0, 1.0],
                               atol=1e-6)
    assert rule.feasible
    # Once feasible, a violated constraint joins the objectives: with G = I the min-norm
    # point of {e1, e2, d} is d's projection... computed by hand as a QP over 3 weights.
    alpha = rule.weights(np.array([3.0, 1.0]), np.eye(2))
    directions = np.vstack([np.eye(2), d])
    weights = min_norm(directions @ directions.T)
    np.testing.assert_allclose(alpha, directions.T @ weights * 2 / np.abs(
        directions.T @ weights).sum(), atol=1e-6)


def test_epo_balances_towards_the_worse_objective() -> None:
    # r = (1, 1), L = (2, 1), G = I: the adjustment a = log(2·l̂) − μ is positive for
    # objective 0 only; the balance LP maximises 0.231·α0 − 0.462·α1: α = (1, 0), times n.
    rule = EPO(np.array([1.0, 1.0]))
    np.testing.assert_allclose(rule.weights(np.array([2.0, 1.0]), np.eye(2)), [2.0, 0.0],
                               atol=1e-6)


def test_epo_descends_when_the_losses_match_the_preference() -> None:
    # r ⊙ L uniform: the descent LP maximises Σ Gα = α0 + 4·α1 subject to Gα >= 0.
    rule = EPO(np.array([1.0, 2.0]))
    np.testing.assert_allclose(rule.weights(np.array([2.0, 1.0]), np.diag([1.0, 4.0])),
                               [0.0, 2.0], atol=1e-6)
    assert rule.fallbacks == 0


def test_epo_falls_back_to_the_preference_when_the_lp_fails(
        caplog: pytest.LogCaptureFixture) -> None:
    rule = EPO(np.array([3.0, 1.0]))
    rule._linprog = lambda *args, **kwargs: SimpleNamespace(status=2, x=np.full(2, np.nan))
    for _ in range(2):
        np.testing.assert_allclose(rule.weights(np.array([2.0, 1.0]), np.eye(2)), [1.5, 0.5])
    assert rule.fallbacks == 2
    assert [r.message for r in caplog.records].count(  # the first one is logged, once
        "EPO: a linear program of this step has no solution; the step weighs the preference "
        "r instead (EPO.fallbacks counts such steps)") == 1


def test_epo_refuses_a_preference_with_a_zero_entry() -> None:
    with pytest.raises(MorecError, match="preference"):
        EPO(np.array([1.0, 0.0]))


ITEMS = ItemSideInformation(price=torch.tensor([1.0, 3.0, 0.0]),
                            popularity=torch.tensor([1.0, 4.0, 2.0]),
                            fairness_group=torch.tensor([0, 1, 1]), num_fairness_groups=3)


def test_objective_losses_match_hand_computed_values() -> None:
    per_row = torch.tensor([1.0, 2.0, 4.0, 1.0], requires_grad=True)
    items = torch.tensor([0, 1, 2, 0])
    losses = objective_losses(["accuracy", "revenue", "alignment", "fairness"], per_row,
                              items, ITEMS)
    accuracy = 8 / 4
    revenue = (1 * 1 + 3 * 2 + 0 * 4 + 1 * 1) / 5
    alignment = (1 / 1 + 2 / 4 + 4 / 2 + 1 / 1) / (1 + 1 / 4 + 1 / 2 + 1)
    # Groups 0 (rows 0, 3) and 1 (rows 1, 2) split the batch; group 2 is absent. The
    # indicators are complements, so both have |ρ| = the correlation of (1,2,4,1) with
    # (1,0,0,1): centred x = (-1,0,2,-1), y = (.5,-.5,-.5,.5); <x,y> = -2, |x| = √6, |y| = 1.
    fairness = 2 / np.sqrt(6)
    torch.testing.assert_close(losses.detach(), torch.tensor(
        [accuracy, revenue, alignment, fairness], dtype=torch.float32), rtol=1e-6, atol=1e-6)
    losses.sum().backward()
    assert per_row.grad is not None and torch.isfinite(per_row.grad).all()


def test_fairness_penalty_is_zero_when_one_group_holds_the_batch() -> None:
    losses = objective_losses(["fairness"], torch.tensor([1.0, 5.0]), torch.tensor([1, 2]),
                              ITEMS)
    assert losses.item() == 0.0


def test_unknown_objective_is_refused() -> None:
    with pytest.raises(MorecError, match="no loss form"):
        objective_losses(["novelty"], torch.ones(2), torch.zeros(2, dtype=torch.long), ITEMS)
