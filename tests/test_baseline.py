"""The baseline coordinators' hook: the gradient of the loss it returns is the rule's
combination of the objectives' gradients, on cases computed by hand (the objectives' loss
forms on a uniform batch, and the means of MoRec's sub-batches)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from morec_rec.errors import MorecError
from morec_rec.plugin.baseline import BaselineLoss, LossForms, SubBatchMeans
from morec_rec.plugin.control.objective_losses import ItemSideInformation
from morec_rec.plugin.control.rules import EPO, MGDA, Coefficients, ParetoMTL, Static
from morec_rec.plugin.hook import Examples, ObjectiveLosses
from morec_rec.plugin.segments import SegmentedBatch


class Linear(nn.Module):
    """Row i's representation is z_i = θ_i and its loss c_i·z_i, with c = (1, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.3, 0.2]))
        self.register_buffer("scale", torch.tensor([1.0, 2.0]))

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        z = self.theta[rows]
        per_row = self.scale[rows] * z
        return per_row.mean(), (per_row, z)


# Item 0 costs 1, item 1 costs nothing: revenue's loss is row 0's alone.
ITEMS = ItemSideInformation(price=torch.tensor([1.0, 0.0]), popularity=torch.ones(2),
                            fairness_group=torch.zeros(2, dtype=torch.long),
                            num_fairness_groups=1)
NAMES = ["accuracy", "revenue"]
# With respect to z: ∇L_acc = (c1/2, c2/2) = (0.5, 1), ∇L_rev = (c1, 0) = (1, 0).
GRADIENTS = np.array([[0.5, 1.0], [1.0, 0.0]])
GRAM = GRADIENTS @ GRADIENTS.T  # [[1.25, 0.5], [0.5, 1]]


def _hook(rule: Any, terms: Any = None) -> BaselineLoss:
    return BaselineLoss(Linear(), rule, NAMES, Examples(rows=lambda batch, output: output[0]),
                        terms or LossForms(NAMES, ITEMS), ObjectiveLosses(NAMES),
                        representation=lambda batch, output: output[1])


def _step(rule: Any, hook: BaselineLoss | None = None,
          segment: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, BaselineLoss]:
    hook = hook or _hook(rule)
    hook.model.zero_grad()
    rows = torch.tensor([0, 1])
    index = 0 if hook.trained is None else hook.trained + 1  # the hook's next batch
    loss, _ = hook(SegmentedBatch(rows, torch.tensor(segment), index, item_id=rows))
    loss.backward()
    assert hook.model.theta.grad is not None
    return hook.model.theta.grad, hook


def test_mgda_gradient_is_the_min_norm_combination_computed_by_hand() -> None:
    # |(1−γ)(0.5, 1) + γ(1, 0)|² is smallest at γ = 0.6: α = (0.4, 0.6), and the
    # combined gradient 0.4·(0.5, 1) + 0.6·(1, 0) = (0.8, 0.4); z = θ, so it is θ's.
    grad, hook = _step(MGDA())
    np.testing.assert_allclose(hook.weights, [0.4, 0.6], atol=1e-6)
    torch.testing.assert_close(grad, torch.tensor([0.8, 0.4]))


@pytest.mark.parametrize("make", [
    lambda: ParetoMTL(np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), index=0),
    lambda: EPO(np.array([1.0, 3.0])),
], ids=["pe-mtl", "epo"])
def test_gradient_is_the_rules_weights_over_the_hand_computed_gradients(
        make: Callable[[], Any]) -> None:
    # L = (mean(c·θ), θ_0) = (0.5·0.3 + 0.5·2·0.2, 0.3) = (0.35, 0.3).
    expected = make().weights(np.array([0.35, 0.3]), GRAM)
    grad, hook = _step(make())
    np.testing.assert_allclose(hook.weights, expected, atol=1e-6)
    torch.testing.assert_close(grad, torch.from_numpy(expected @ GRADIENTS).float())


def test_static_weighs_the_losses_without_their_gradients() -> None:
    grad, hook = _step(Static(np.array([3.0, 1.0])))
    np.testing.assert_allclose(hook.weights, [0.75, 0.25])
    torch.testing.assert_close(grad, torch.from_numpy(np.array([0.75, 0.25]) @ GRADIENTS).float())


def test_morec_without_its_sampler_weighs_the_losses_by_the_current_coefficients() -> None:
    # q as MoRec's coordinator holds it (β for accuracy, λ·p for revenue), not normalised,
    # read at every step: a validation pass that moves β changes the next step's weights.
    q = np.array([0.5, 1.0])
    rule = Coefficients(lambda: q)
    grad, hook = _step(rule)
    np.testing.assert_allclose(hook.weights, [0.5, 1.0])
    torch.testing.assert_close(grad, torch.from_numpy(q @ GRADIENTS).float())
    q = np.array([2.0, 1.0])
    grad, _ = _step(rule, hook)
    np.testing.assert_allclose(hook.weights, [2.0, 1.0])
    torch.testing.assert_close(grad, torch.from_numpy(q @ GRADIENTS).float())


def test_a_pass_without_training_returns_the_models_loss_and_records_nothing() -> None:
    hook = _hook(Static(np.array([3.0, 1.0])))
    rows = torch.tensor([0, 1])
    hook.model.eval()
    loss, _ = hook(SegmentedBatch(rows, torch.tensor([0, 0]), 0, item_id=rows))
    assert loss.item() == pytest.approx(0.35)  # the model's own mean loss, unweighed
    assert hook.trained is None and hook.weights is None
    assert np.isnan(hook.losses.reduce()).all()


def test_a_second_pass_on_a_batch_keeps_the_first_passes_weights() -> None:
    # SAM's second pass, at perturbed parameters: the weights of the batch's first pass
    # (MGDA's from its gradients), and no second measurement.
    rows = torch.tensor([0, 1])
    grad, hook = _step(MGDA())
    first = hook.weights.copy()
    with torch.no_grad():
        hook.model.theta.add_(torch.tensor([5.0, -5.0]))
    hook.model.zero_grad()
    loss, _ = hook(SegmentedBatch(rows, torch.tensor([0, 0]), 0, item_id=rows))
    loss.backward()
    assert hook.trained == 0 and np.array_equal(hook.weights, first)
    torch.testing.assert_close(hook.model.theta.grad, grad)  # the losses are linear in θ
    np.testing.assert_allclose(hook.losses.reduce(), [0.35, 0.3])  # the first pass's only


def test_mgda_over_sub_batches_weighs_each_segments_mean_loss() -> None:
    # MoRec's sampler drew row 0 for accuracy and row 1 for revenue: ℓ = (c1·z_0, c2·z_1),
    # ∇ℓ = (1, 0) and (0, 2); the min-norm point of their hull is at α = (0.8, 0.2), and
    # the combined gradient (0.8, 0.4).
    grad, hook = _step(None, _hook(MGDA(), SubBatchMeans(2)), segment=(0, 1))
    np.testing.assert_allclose(hook.weights, [0.8, 0.2], atol=1e-6)
    torch.testing.assert_close(grad, torch.tensor([0.8, 0.4]))


def test_a_gradient_rule_without_a_representation_is_refused() -> None:
    with pytest.raises(MorecError, match="representation="):
        BaselineLoss(Linear(), MGDA(), NAMES, Examples(), LossForms(NAMES, ITEMS),
                     ObjectiveLosses(NAMES), None)
