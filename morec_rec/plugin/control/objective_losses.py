"""The objectives as differentiable losses of one batch (the paper's Eq. 15–17), for baselines.

MoRec turns each objective into a sampling distribution and trains on the model's own
loss; the multi-objective baselines instead weigh one batch's per-row losses ``ℓ_i`` (of
rows drawn uniformly) into one loss per objective:

- accuracy: ``mean_i ℓ_i``;
- revenue (Eq. 15): ``Σ r(e_i) ℓ_i / Σ r(e_i)``, r the item's price;
- alignment (Eq. 16): ``Σ ℓ_i / pop(e_i) / Σ 1 / pop(e_i)``, pop the item's training
  interactions (at least 1);
- fairness (Eq. 17): the mean over item categories c of ``|ρ(ℓ, 1[c(e_i) = c])|``, the
  Pearson correlation between the rows' losses and the category's indicator, over the
  categories that the batch holds but does not consist of (ρ is undefined otherwise).
  The paper correlates the model's predictions; the loss is the prediction every job
  hands the hook (``rows=``), a decreasing function of the positive's score for the
  reference backbones, so a category whose rows are systematically worse served raises
  the penalty either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError

#: The objectives that have a loss form, in no particular order.
LOSS_OBJECTIVES = ("accuracy", "revenue", "fairness", "alignment")


@dataclasses.dataclass(frozen=True)
class ItemSideInformation:
    """Per-item columns the losses read, indexed by item id.

    Attributes:
        price: float32 (num_items,), >= 0.
        popularity: float32 (num_items,), training interactions, at least 1.
        fairness_group: int64 (num_items,), in ``[0, num_fairness_groups)``.
        num_fairness_groups: the number of categories.
    """

    price: torch.Tensor
    popularity: torch.Tensor
    fairness_group: torch.Tensor
    num_fairness_groups: int

    @classmethod
    def from_dataset(cls, dataset: PreparedDataset) -> ItemSideInformation:
        """From the prepared dataset's ``items.parquet``."""
        items = dataset.item_columns(["price", "train_count", "fairness_group"])
        groups = items["fairness_group"].astype(np.int64)
        return cls(
            price=torch.from_numpy(items["price"].astype(np.float32)),
            popularity=torch.from_numpy(np.maximum(items["train_count"], 1).astype(np.float32)),
            fairness_group=torch.from_numpy(groups),
            num_fairness_groups=int(groups.max()) + 1 if len(groups) else 0)

    def to(self, device: torch.device) -> ItemSideInformation:
        return dataclasses.replace(self, price=self.price.to(device),
                                   popularity=self.popularity.to(device),
                                   fairness_group=self.fairness_group.to(device))


def check_loss_objectives(names: Sequence[str]) -> None:
    """Raises :class:`MorecError` naming any objective without a loss form."""
    unknown = [name for name in names if name not in LOSS_OBJECTIVES]
    if unknown:
        raise MorecError(f"objectives {unknown} have no loss form for a baseline "
                         f"coordinator; known: {', '.join(LOSS_OBJECTIVES)}")


def objective_losses(names: Sequence[str], per_row: torch.Tensor, item_id: torch.Tensor,
                     items: ItemSideInformation) -> torch.Tensor:
    """Each objective's loss on one batch, differentiable in ``per_row``.

    Args:
        names: objective names, each in :data:`LOSS_OBJECTIVES`.
        per_row: float (B,), each row's loss, B >= 1.
        item_id: int64 (B,), each row's item, on ``per_row``'s device (as ``items``).
        items: the items' side information.

    Returns:
        float (len(names),), in the order of ``names``.
    """
    check_loss_objectives(names)
    losses = {"accuracy": lambda: per_row.mean(),
              "revenue": lambda: _weighted_mean(per_row, items.price[item_id]),
              "alignment": lambda: _weighted_mean(per_row, 1.0 / items.popularity[item_id]),
              "fairness": lambda: _correlation_penalty(per_row, items.fairness_group[item_id],
                                                       items.num_fairness_groups)}
    return torch.stack([losses[name]() for name in names])


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ w·x / Σ w``; the plain mean where the weights sum to 0 (every price 0)."""
    weights = weights.to(values.dtype)
    total = weights.sum()
    return torch.where(total > 0, (weights * values).sum() / total.clamp(min=1e-12),
                       values.mean())


def _correlation_penalty(values: torch.Tensor, groups: torch.Tensor,
                         num_groups: int) -> torch.Tensor:
    """Mean over the groups that split the batch of ``|ρ(values, 1[group = c])|``; 0 where
    none does."""
    indicator = torch.nn.functional.one_hot(groups, num_groups).to(values.dtype)  # (B, C)
    centred_values = values - values.mean()
    centred = indicator - indicator.mean(dim=0)
    spread = centred.norm(dim=0)  # 0 for a group absent from the batch or all of it
    # ρ_c = <x̃, ỹ_c> / (|x̃| |ỹ_c|), and 0 where ỹ_c = 0; the 1e-12 keep it finite
    # without a host sync.
    rho = (centred_values @ centred) / ((centred_values.norm() + 1e-12)
                                        * spread.clamp(min=1e-12))
    return rho.abs().sum() / (spread > 0).sum().clamp(min=1)
