"""MoRec's loss hook: the unchanged model, its per-example losses regrouped by objective.

    pipeline = TrainPipelineSparseDist(model, optimizer, device,
                                       custom_model_fwd=morec.loss(model))

The pipeline calls the hook instead of the model with a
:class:`~morec_rec.plugin.segments.SegmentedBatch`; the hook calls the model with the job's
own batch, so the pipelined embedding lookups and fused table optimizers are untouched,
and returns ``(loss, the model's own output)``, so the job's loop is unchanged. In a plain
training loop the hook is called like the model.

Nothing on the step path reads a device tensor on the host: the per-objective losses
are summed on the device and reduced when :meth:`ObjectiveLosses.reduce` is called (at
the job's log interval). The one exception is ``training`` control, whose controllers
step on every batch's all-reduced losses (a host synchronisation per step, by design).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from morec_rec.collectives import all_reduce
from morec_rec.errors import MorecError
from morec_rec.plugin.control.coordinator import Coordinator
from morec_rec.plugin.segments import ExampleLayout, SegmentedBatch

#: ``(job batch, model output) -> float (E,)``: each example's loss. Differentiable
#: wherever the losses are weighed (``loss`` or ``loss_forms`` coefficients, and any
#: baseline coordinator); detached is enough for MoRec's own coordinator under
#: ``sampling`` coefficients, where they are only measured.
Rows = Callable[[Any, Any], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Examples:
    """Where a step's per-example losses are, and which sampled row each example is of.

    Attributes:
        rows: computes them from the job's batch and the model's output; None takes the
            model's own loss, which must then be one loss per example (a vector).
        layout: how the job's collate laid the examples out over the sampled rows.
    """

    rows: Rows | None = None
    layout: ExampleLayout = ExampleLayout.ROWS

    def losses(self, batch: Any, loss: torch.Tensor, output: Any,
               num_rows: int) -> torch.Tensor:
        """float (E,): the per-example losses of a batch of ``num_rows`` sampled rows."""
        per_example = loss if self.rows is None else self.rows(batch, output)
        if not isinstance(per_example, torch.Tensor) or per_example.dim() != 1:
            shape = tuple(per_example.shape) if isinstance(per_example, torch.Tensor) else None
            raise MorecError(
                f"per-example losses must be a vector, got {type(per_example).__name__} of "
                f"shape {shape}: " + ("the model returns a reduced loss; pass rows=, a "
                                      "function of (batch, output) giving each example's loss"
                                      if self.rows is None else "check rows="))
        self.layout.check(per_example.shape[0], num_rows)
        return per_example

    def expand(self, per_row: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
        """(E, ...): each example's entry of the (B, ...) ``per_row`` (see
        :meth:`ExampleLayout.expand`)."""
        return self.layout.expand(per_row, per_example.shape[0])


def is_training_step(model: nn.Module, batch: Any) -> bool:
    """Whether a hook's call on ``batch`` trains ``model`` (train mode, with gradient): only
    those steps count as trained, record training losses and step per-step controllers.
    MorecError for a batch that is not the loader's :class:`SegmentedBatch`."""
    if not isinstance(batch, SegmentedBatch):
        raise MorecError(f"loss hook: got a {type(batch).__name__}, expected the "
                         "SegmentedBatch that morec.loader yields (move it with "
                         "batch.to(device), which keeps its objectives' segments)")
    return model.training and torch.is_grad_enabled()


def model_output(model: Callable[[Any], Any], batch: Any) -> tuple[torch.Tensor, Any]:
    """``model(batch)`` as ``(loss, output)``, the pair TorchRec's pipeline takes from a
    model; MorecError for a model that returns anything else."""
    result = model(batch)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        shape = f" of shape {tuple(result.shape)}" if isinstance(result, torch.Tensor) else ""
        raise MorecError(f"the model returned {type(result).__name__}{shape}: MoRec calls "
                         "model(batch) for (loss, output), as TorchRec's pipeline does; wrap "
                         "a model that returns only its output in a module that adds the loss")
    return result[0], result[1]


def first_pass(trained: int | None, index: int) -> bool:
    """Whether training on batch ``index`` is a first pass on it, ``trained`` being the
    last batch trained on: a second pass on that one (SAM's, an optimizer closure's) is
    neither measured nor stepped again. MorecError for an earlier batch: a loader iterated
    again without ``set_epoch`` yields the epoch it yielded before."""
    if trained is not None and index < trained:
        raise MorecError(f"loss hook: batch {index} comes after batch {trained} was trained: "
                         "call morec.set_epoch(epoch) before iterating morec.loader for each "
                         "epoch")
    return trained is None or index > trained


def segment_sums(values: torch.Tensor, segment: torch.Tensor,
                 num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) sums of the (E,) ``values`` by their (E,) segment, and (n,) counts, in
    ``values``' dtype and device (differentiable in ``values``)."""
    sums = values.new_zeros(num_segments).index_add(0, segment, values)
    counts = values.new_zeros(num_segments).index_add_(0, segment, torch.ones_like(values))
    return sums, counts


def check_finite(names: Sequence[str], losses: np.ndarray, what: str) -> None:
    """MorecError naming the entries (objectives, groups, steps) whose ``losses`` (float
    (n,), in ``names``' order) are NaN or infinite: a diverged model, whose measurements
    no controller should read."""
    bad = [f"{name} {value}" for name, value in zip(names, losses) if not np.isfinite(value)]
    if bad:
        raise MorecError(f"{what}: {', '.join(bad)}: the model's parameters or outputs hold "
                         "NaN or inf; training diverged?")


class ObjectiveLosses:
    """Per-objective sums of per-example losses, kept on the losses' device until read.

    A step's losses are copied into a buffer made once (the model may reuse its output's
    memory after the step); its segment ids, MoRec's own, are kept as they are. Both are
    summed ``FOLD`` steps at a time: a step allocates no memory and runs one copy rather
    than a handful of small kernels.
    """

    FOLD = 32

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.num_objectives = len(self.names)
        self._sums: torch.Tensor | None = None  # float64 (2n,): sums, then counts
        self._values: torch.Tensor | None = None  # float64 (FOLD·E,): pending losses
        self._segments: list[torch.Tensor] = []  # int64 (E,) each: their segments
        self._filled = 0

    def add(self, per_example: torch.Tensor, segment: torch.Tensor) -> None:
        """Adds (E,) losses of (E,) segments (on one device); no host synchronisation."""
        size = per_example.shape[0]
        buffer = self._values
        if (buffer is None or buffer.device != per_example.device
                or self._filled + size > buffer.shape[0]):
            self._fold()  # into the sums on the buffer's device
            if buffer is None or buffer.device != per_example.device or size > buffer.shape[0]:
                self._values = buffer = per_example.new_empty(self.FOLD * size,
                                                              dtype=torch.float64)
        buffer[self._filled:self._filled + size].copy_(per_example.detach())
        self._segments.append(segment)
        self._filled += size

    def _fold(self) -> None:
        if not self._filled:
            return
        assert self._values is not None
        values, segment = self._values[:self._filled], torch.cat(self._segments)
        self._filled, self._segments = 0, []
        if self._sums is None or self._sums.device != values.device:
            self._sums = values.new_zeros(2 * self.num_objectives)
        self._sums.index_add_(0, segment, values)
        self._sums.index_add_(0, segment + self.num_objectives, torch.ones_like(values))

    def reduce(self) -> np.ndarray:
        """float64 (n,): each objective's mean loss since the last call, over every rank
        (NaN where none); then starts over. A collective; reads the device once. Raises
        MorecError on every rank where a loss was NaN or infinite."""
        self._fold()
        flat = (torch.zeros(2 * self.num_objectives, dtype=torch.float64)
                if self._sums is None else self._sums)
        self._sums = None
        total, count = all_reduce(flat).numpy().reshape(2, -1)
        check_finite(self.names, total, "training loss since the last read")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / count, np.nan)


class MoRecLoss:
    """``custom_model_fwd`` for TrainPipelineSparseDist, and a plain-loop loss.

    Under ``sampling`` coefficients (the default) the loader drew each objective's share
    of the batch, and the loss is the model's own: the hook only measures. Under ``loss``
    coefficients it returns ``Σ_o q_o · ℓ_o``, ℓ_o the mean per-example loss of objective
    o's rows on this rank; with equal sub-batches on every rank the data-parallel average
    of its gradients is that of the weighted global means.

    Args:
        model: the (sharded) model, ``model(batch) -> (loss, output)``; called as is.
        coordinator: the coefficients q (stepped per batch under ``training`` control).
        examples: where the per-example losses are.
        losses: where the measured per-objective losses accumulate.
        weigh: whether q weighs the losses (``loss`` coefficients).
        control_per_step: step the coordinator with every batch's global means.
    """

    def __init__(self, model: nn.Module, coordinator: Coordinator, examples: Examples,
                 losses: ObjectiveLosses, *, weigh: bool, control_per_step: bool) -> None:
        self.model = model
        self.coordinator = coordinator
        self.examples = examples
        self.losses = losses
        self.weigh = weigh
        self.control_per_step = control_per_step
        #: The index of the last batch trained on (None before the first).
        self.trained: int | None = None
        self._q: tuple[np.ndarray, torch.Tensor] | None = None  # q, and its device copy

    def __call__(self, batch: SegmentedBatch) -> tuple[torch.Tensor, Any]:
        training = (is_training_step(self.model, batch)
                    and first_pass(self.trained, batch.index))
        loss, output = model_output(self.model, batch.batch)
        per_example = self.examples.losses(batch.batch, loss, output, batch.segment.shape[0])
        segment = self.examples.expand(batch.segment, per_example)
        if training:
            self.trained = batch.index
            self.losses.add(per_example, segment)
        if not self.weigh:
            return loss, output
        if torch.is_grad_enabled() and not per_example.requires_grad:
            raise MorecError("loss coefficients weigh the per-example losses, which have no "
                             "gradient here (rows= computes them from a detached output?): "
                             "use sampling coefficients, or per-example losses with one")
        n = self.losses.num_objectives
        values = per_example.to(torch.promote_types(per_example.dtype, torch.float32))
        sums, counts = segment_sums(values, segment, n)
        q = self._coefficients(sums, counts, step=training and self.control_per_step)
        return (q * sums / counts.clamp(min=1)).sum(), output

    def _coefficients(self, sums: torch.Tensor, counts: torch.Tensor, step: bool) -> torch.Tensor:
        """q on the losses' device, after a controller step on this batch's losses if
        ``step``: copied only when it changes (never read back)."""
        if step:
            total, count = all_reduce(torch.cat([sums, counts]).to(torch.float64)
                                      ).numpy().reshape(2, -1)
            if not (count > 0).all():
                raise MorecError(f"training control needs rows of every objective in each "
                                 f"step; counts {count.tolist()}")
            check_finite(self.losses.names, total, "this step's training loss")
            self.coordinator.step(total / count)
        q = self.coordinator.q
        if self._q is None or not np.array_equal(self._q[0], q) \
                or self._q[1].device != sums.device:
            host = torch.from_numpy(q).to(sums.dtype)
            if sums.device.type == "cuda":  # a pinned source: the copy does not wait
                host = host.pin_memory()
            self._q = (q, host.to(sums.device, non_blocking=True))
        return self._q[1]
