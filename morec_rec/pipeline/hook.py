"""MoRec's loss hook: the unchanged model's per-row losses, regrouped by objective.

    pipeline = TrainPipelineSparseDist(model, optimizer, device,
                                       custom_model_fwd=MoRecLoss(model, coordinator))

The pipeline calls the hook instead of the model; the hook calls the model, so the
pipelined (sharded, prefetched) embedding lookups and the fused table optimizers are
untouched. In a plain training loop the hook is called like the model:
``loss, output = hook(batch); loss.backward(); optimizer.step()``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from morec_rec.config import COEFFICIENTS
from morec_rec.control.coordinator import Coordinator
from morec_rec.models import ModelOutput


#: ``(batch, model output) -> (per-row losses (B,), segment ids (B,))``.
RowsOf = Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]]


def backbone_rows(batch: Any, output: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row losses and segment ids of a reference backbone's output."""
    return output.per_row_loss, output.objective


class MoRecOutput(NamedTuple):
    """What the hook returns beside the loss.

    Attributes:
        model: the model's own output.
        objective_loss: float64 (num_objectives,), each objective's mean per-row loss over
            the step's rows of every rank (NaN for an objective with no row): what the
            controllers saw.
        coefficients: float64 (num_objectives,): the step's loss is Σ_o c_o · ℓ_o over
            this rank's means; q under ``loss`` coefficients, each objective's share of
            this rank's rows under ``sampling``.
    """

    model: Any
    objective_loss: torch.Tensor
    coefficients: torch.Tensor


class MoRecLoss:
    """``custom_model_fwd`` for TrainPipelineSparseDist, and a plain-loop loss.

    For a batch whose rows carry segment ids ``0..n-1`` (the sampler's objectives), it
    runs ``model(batch) -> (loss, output)``, takes each objective's mean per-row loss
    ℓ_o on this rank, all-reduces the sums and counts so that every rank hands the
    coordinator the same global means (and gets the same coefficients q), and returns
    ``Σ_o q_o · ℓ_o`` over this rank's means. With equal sub-batch sizes on every rank,
    the data-parallel average of these losses' gradients is the gradient of the weighted
    sum of the global means. Where q sets the objectives' shares of the batch instead
    (``sampling``: the loader drew them so), it returns the plain mean over this rank's
    rows, which is ``Σ_o (n_o / n) · ℓ_o``.

    Args:
        model: the (sharded) model; called as is.
        coordinator: turns the global means into coefficients.
        group: the process group to reduce over (default: the world, when initialised).
        rows: finds the per-row losses (differentiable) and the segment ids in the batch
            and the model's output (default: a reference backbone's ``ModelOutput``).
        control_per_step: step the coordinator with every call's means (``training``
            control); otherwise use the coefficients it holds (``validation`` control,
            stepped by the job between calls).
        coefficients: ``loss``, q weighs the objectives' means; ``sampling``, q sets the
            objectives' shares of the batch, which the loss takes as they were drawn.
    """

    def __init__(self, model: nn.Module, coordinator: Coordinator,
                 group: dist.ProcessGroup | None = None, *,
                 rows: RowsOf = backbone_rows, control_per_step: bool = True,
                 coefficients: str = "loss") -> None:
        if coefficients not in COEFFICIENTS:
            raise ValueError(f"coefficients {coefficients!r} is not one of {COEFFICIENTS}")
        if coefficients == "sampling" and control_per_step:
            raise ValueError("sampling coefficients cannot follow a controller stepped at "
                             "every batch: the loader draws batches ahead")
        self.model = model
        self.coordinator = coordinator
        self.group = group
        self.rows = rows
        self.control_per_step = control_per_step
        self.coefficients = coefficients

    @property
    def num_objectives(self) -> int:
        return len(self.coordinator.objectives)

    def __call__(self, batch: Any) -> tuple[torch.Tensor, MoRecOutput]:
        _, output = self.model(batch)
        per_row, segment = self.rows(batch, output)
        if self.coefficients == "sampling":
            # Σ_o (n_o / n) · ℓ_o is the plain mean: the means are only reported, so they
            # stay out of the graph.
            sums, counts = segment_sums(per_row.detach(), segment, self.num_objectives)
            global_means = reduced_means(sums, counts, self.group)
            shares = (counts / counts.sum()).to(torch.float64)
            loss = per_row.to(torch.promote_types(per_row.dtype, torch.float32)).mean()
            return loss, MoRecOutput(output, global_means, shares)
        sums, counts = segment_sums(per_row, segment, self.num_objectives)
        local_means = sums / counts.clamp(min=1)
        global_means = reduced_means(sums.detach(), counts, self.group)
        if not torch.isfinite(global_means).all() or (global_means < 0).any():
            raise ValueError(f"per-objective losses must be finite and >= 0, "
                             f"got {global_means.tolist()} (an objective with no row?)")
        q = torch.from_numpy(self.coordinator.step(global_means.numpy())
                             if self.control_per_step else self.coordinator.q)
        loss = (q.to(local_means) * local_means).sum()
        return loss, MoRecOutput(output, global_means, q)


def segment_sums(per_row: torch.Tensor, segment: torch.Tensor,
                 num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment sums of ``per_row`` (differentiable) and row counts, both (n,), in at
    least float32 (a bfloat16 sum or count stops growing after a few hundred rows)."""
    per_row = per_row.to(torch.promote_types(per_row.dtype, torch.float32))
    sums = per_row.new_zeros(num_segments).index_add(0, segment, per_row)
    counts = torch.bincount(segment, minlength=num_segments).to(per_row.dtype)
    return sums, counts


def reduced_means(sums: torch.Tensor, counts: torch.Tensor,
                  group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """float64 (n,) CPU: per-segment means over every rank (NaN for a segment with no row)."""
    flat = torch.cat([sums, counts]).to(torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat = flat.cpu()
    total, count = flat.chunk(2)
    return torch.where(count > 0, total / count.clamp(min=1), torch.nan)


def objective_means(per_row: torch.Tensor, segment: torch.Tensor,
                    num_objectives: int) -> np.ndarray:
    """float64 (n,): the per-objective mean losses of one batch's rows, over every rank."""
    sums, counts = segment_sums(per_row.detach(), segment, num_objectives)
    return reduced_means(sums, counts).numpy()
