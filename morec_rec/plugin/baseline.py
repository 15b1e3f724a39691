"""A multi-objective baseline's loss hook: the objectives' losses of one batch, weighted
by a rule (static, MGDA, Pareto MTL, EPO, or MoRec's own coefficients) into one loss.

The objectives' losses are their *loss forms* (:class:`LossForms`): the loader draws every
row uniformly (accuracy's distribution), and each objective's loss is computed on the
whole batch (:mod:`~morec_rec.plugin.control.objective_losses`) from the model's
per-example losses and the rows' items. Or they are the *sub-batches' means*
(:class:`SubBatchMeans`): MoRec's sampler drew each objective's rows, and its loss is their
mean loss (a baseline as MoRec's coordinator). The hook returns ``Σ_o α_o L_o``. A
gradient-based rule compares the objectives' gradients with respect to the job's shared
representation (``representation(batch, output)``, e.g. the embedding lookups' output):
TorchRec's fused table optimizers never materialise the tables' gradients, and one
backward pass of the combined loss then updates every parameter once. Its Gram matrix
is summed and the losses averaged over the ranks (one collective a step), so that every rank
computes the same weights: a rank's gradient with respect to its own rows is its part
of the global one, and the global Gram matrix is the ranks' sum up to a positive scale,
which none of the rules depends on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from morec_rec.collectives import all_reduce, is_distributed
from morec_rec.errors import MorecError
from morec_rec.plugin.control.objective_losses import ItemSideInformation, objective_losses
from morec_rec.plugin.control.rules import Rule
from morec_rec.plugin.hook import (
    Examples,
    ObjectiveLosses,
    first_pass,
    is_training_step,
    model_output,
    segment_sums,
)
from morec_rec.plugin.segments import SegmentedBatch

#: ``(job batch, model output) -> tensor(s)``: the shared representation whose gradients a
#: gradient-based rule compares; every tensor in the graph of the per-example losses.
Representation = Callable[[Any, Any], "torch.Tensor | Sequence[torch.Tensor]"]


class LossForms:
    """Each objective's loss form on the whole batch, from the rows' items.

    Args:
        names: the objectives (built-ins with a loss form), in the rule's order.
        items: the items' side information (moved to the losses' device at the first call).
    """

    def __init__(self, names: Sequence[str], items: ItemSideInformation) -> None:
        self.names, self.items = list(names), items

    def __call__(self, per_example: torch.Tensor, segment: torch.Tensor,
                 item_id: torch.Tensor | None) -> torch.Tensor:
        """float (n,) from the (E,) per-example losses and each example's item."""
        if item_id is None:
            raise MorecError("the objectives' loss forms need each row's item: the loader "
                             "must keep them (MoRecLoader(item_ids=True))")
        if self.items.price.device != per_example.device:  # once: the model's device
            self.items = self.items.to(per_example.device)
        return objective_losses(self.names, per_example, item_id, self.items)


class SubBatchMeans:
    """Each objective's mean per-example loss over the rows its distribution drew (the
    batch's segment of it), 0 for an objective without rows in the batch."""

    def __init__(self, num_objectives: int) -> None:
        self.num_objectives = num_objectives

    def __call__(self, per_example: torch.Tensor, segment: torch.Tensor,
                 item_id: torch.Tensor | None) -> torch.Tensor:
        """float (n,) from the (E,) per-example losses and each example's segment."""
        sums, counts = segment_sums(per_example, segment, self.num_objectives)
        return sums / counts.clamp(min=1)


#: ``(per-example losses (E,), each example's segment (E,), each example's item (E,) or
#: None) -> (n,)``: the objectives' losses that a rule weighs.
ObjectiveTerms = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class BaselineLoss:
    """``custom_model_fwd`` for TrainPipelineSparseDist, and a plain-loop loss.

    Args:
        model: the (sharded) model, ``model(batch) -> (loss, output)``; called as is.
        rule: the weights α from the losses and their gradients' Gram matrix.
        names: the objectives, in the order of the rule's weights.
        examples: where the per-example losses are.
        terms: the objectives' losses from the per-example ones (:class:`LossForms` or
            :class:`SubBatchMeans`).
        losses: where each objective's loss is recorded (as one example per objective).
        representation: the job's shared representation; needed by a rule that reads
            gradients.
    """

    def __init__(self, model: nn.Module, rule: Rule, names: Sequence[str], examples: Examples,
                 terms: ObjectiveTerms, losses: ObjectiveLosses,
                 representation: Representation | None) -> None:
        if rule.needs_gradients and representation is None:
            raise MorecError(f"the {type(rule).__name__} coordinator compares the objectives' "
                             "gradients: pass representation=, a function of (batch, output) "
                             "giving the tensors they are taken with respect to")
        self.model, self.rule, self.names = model, rule, list(names)
        self.examples, self.terms, self.losses = examples, terms, losses
        self.representation = representation
        #: The index of the last batch trained on (None before the first).
        self.trained: int | None = None
        #: The weights α of the last training step (None before the first).
        self.weights: np.ndarray | None = None
        self._segments = torch.arange(len(self.names))

    def __call__(self, batch: SegmentedBatch) -> tuple[torch.Tensor, Any]:
        training = is_training_step(self.model, batch)
        loss, output = model_output(self.model, batch.batch)
        if not training:
            return loss, output
        per_example = self.examples.losses(batch.batch, loss, output, len(batch.segment))
        values = self.terms(per_example, self.examples.expand(batch.segment, per_example),
                            None if batch.item_id is None
                            else self.examples.expand(batch.item_id, per_example))
        if not values.requires_grad:
            raise MorecError("a baseline coordinator weighs the per-example losses, which "
                             "have no gradient here (rows= computes them from a detached "
                             "output?)")
        if first_pass(self.trained, batch.index):
            self.trained = batch.index
            if self._segments.device != values.device:  # once: the model's device
                self._segments = self._segments.to(values.device)
            self.losses.add(values, self._segments)
            if self.rule.needs_gradients:
                self.weights = self._weights(values.detach(), self._gram(values, batch.batch,
                                                                         output))
            else:
                self.weights = np.asarray(self.rule.weights(None, None), dtype=np.float64)
        assert self.weights is not None  # set by the batch's first pass
        return (torch.from_numpy(self.weights).to(values) * values).sum(), output

    def _gram(self, values: torch.Tensor, batch: Any, output: Any) -> torch.Tensor:
        """float64 (n, n): the inner products of the objectives' gradients with respect
        to this rank's shared representation."""
        given = self.representation(batch, output)
        tensors = [given] if isinstance(given, torch.Tensor) else list(given)
        if not tensors or not all(t.requires_grad for t in tensors):
            raise MorecError("representation= must give tensors in the loss's graph")
        rows = []
        for value in values:
            grads = torch.autograd.grad(value, tensors, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([torch.zeros(t.numel(), device=t.device, dtype=t.dtype)
                                   if g is None else g.reshape(-1)
                                   for g, t in zip(grads, tensors)]))
        flat = torch.stack(rows).to(torch.float64)
        return flat @ flat.T

    def _weights(self, values: torch.Tensor, gram: torch.Tensor) -> np.ndarray:
        """α from the losses averaged and the Gram matrix summed over the ranks (one
        collective)."""
        n = len(self.names)
        reduced = all_reduce(torch.cat([values.to(torch.float64), gram.reshape(-1)])).numpy()
        world = dist.get_world_size() if is_distributed() else 1
        return np.asarray(self.rule.weights(reduced[:n] / world, reduced[n:].reshape(n, n)),
                          dtype=np.float64)
