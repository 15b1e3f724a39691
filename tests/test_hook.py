"""MoRec's loss hook: per-objective sums, the coordinator's q, example layouts, gradients,
no host read on the step path, the real TrainPipelineSparseDist, and identical
coefficients on every rank.

Expected numbers are worked out by hand from SPEC "Objective coordinator"::

    err = ℓ̂ − ℓ_acc;  P = kp / (1 + exp(err));
    I = clamp(I − ki·err, −P, β_max − β_min − P);  β = P + I + β_min;
    q = (β, λ·p_1, λ·p_2, ...)
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from conftest import run_torchrun
from torch import nn

from morec_rec.errors import MorecError
from morec_rec.jobs.collate import TrainBatch, features_kjt
from morec_rec.jobs.models import ModelOutput, per_row_loss
from morec_rec.jobs.models.mf import MatrixFactorization
from morec_rec.plugin.control.coordinator import Coordinator
from morec_rec.plugin.control.pi import PIGains
from morec_rec.plugin.hook import Examples, MoRecLoss, ObjectiveLosses
from morec_rec.plugin.segments import ExampleLayout, SegmentedBatch

OBJECTIVES = ("accuracy", "revenue", "fairness")
GAINS = PIGains(kp=0.5, ki=0.1, beta_min=0.6, beta_max=1.3)
# Rows of 3 objectives, interleaved: accuracy 0.5, 1.0 (mean 0.75); revenue 0.25, 0.5,
# 2.25 (mean 1.0); fairness 3.0 (mean 3.0).
SEGMENTS = [2, 0, 1, 0, 1, 1]
LOSSES = [3.0, 0.5, 0.25, 1.0, 0.5, 2.25]
MEANS = [0.75, 1.0, 3.0]
PER_ROW = Examples(rows=per_row_loss)


class FixedModel(nn.Module):
    """A fake model: the given per-row losses (a leaf that requires grad), whatever the
    batch; its loss is their mean (or the vector itself with ``vector``). Keeps what it
    last returned."""

    def __init__(self, losses: list[float], *, vector: bool = False) -> None:
        super().__init__()
        self.per_row = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
        self.vector = vector
        self.returned: tuple[torch.Tensor, ModelOutput] | None = None

    def forward(self, batch: object) -> tuple[torch.Tensor, ModelOutput]:
        loss = self.per_row if self.vector else self.per_row.mean()
        self.returned = (loss, ModelOutput(self.per_row))
        return self.returned


def segmented(segments: list[int], index: int = 0, batch: Any = None) -> SegmentedBatch:
    return SegmentedBatch(batch, torch.tensor(segments), index)


def coordinator(target: float | None = 0.5, gains: PIGains = GAINS,
                preference: tuple[float, float] = (0.4, 0.6)) -> Coordinator:
    """λ = 0.2, so q = (β, 0.2·p_revenue, 0.2·p_fairness); β = 1 without a target."""
    return Coordinator(OBJECTIVES, preference, 0.2,
                       {} if target is None else {"accuracy": target}, gains)


def make_hook(model: nn.Module, c: Coordinator, *, weigh: bool = True,
              control_per_step: bool = False, examples: Examples = PER_ROW,
              losses: ObjectiveLosses | None = None) -> MoRecLoss:
    return MoRecLoss(model, c, examples, losses or ObjectiveLosses(OBJECTIVES),
                     weigh=weigh, control_per_step=control_per_step)


def controller_steps(c: Coordinator) -> int:
    return c.state_dict()["controllers"]["accuracy"]["steps"]


def test_training_control_steps_q_by_hand_and_weighs_the_means() -> None:
    c = coordinator()
    model = FixedModel(LOSSES)
    hook = make_hook(model, c, control_per_step=True)
    loss, output = hook(segmented(SEGMENTS, index=7))

    assert output is model.returned[1]  # the model's own output, passed on
    assert c.measured == {"accuracy": 0.75}  # exact: sums of dyadic numbers
    # err = 0.5 − 0.75 = −0.25: P = 0.5/(1 + e^−0.25) = 0.5/1.7788008 = 0.2810883;
    # I = −0.1·(−0.25) = 0.025, inside [−P, 0.7 − P]: β = 0.2810883 + 0.025 + 0.6
    # = 0.9060883.
    beta = 0.5 / (1 + math.exp(-0.25)) + 0.025 + 0.6
    assert beta == pytest.approx(0.9060883, abs=1e-7)
    np.testing.assert_allclose(c.q, [beta, 0.08, 0.12], rtol=1e-12)
    assert c.coefficients["accuracy"] == pytest.approx(beta, rel=1e-12)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(beta * 0.75 + 0.08 * 1.0 + 0.12 * 3.0, rel=1e-12)
    assert controller_steps(c) == 1 and hook.trained == 7

    # A second step, the accuracy rows at 10: err = −9.5, P = 0.5/(1 + e^−9.5) = 0.49996;
    # I − ki·err = 0.025 + 0.95 = 0.975 would carry β past 1.3: the integral is clamped
    # at 0.7 − P = 0.20004 (anti-windup), and β = P + 0.20004 + 0.6 = 1.3, the bound.
    hook.model = FixedModel([10.0, 10.0, 1.0, 2.0])
    loss, _ = hook(segmented([0, 0, 1, 2], index=8))
    beta = 1.3
    assert c.measured == {"accuracy": 10.0}
    assert c.state_dict()["controllers"]["accuracy"]["integral"] == pytest.approx(
        0.7 - 0.5 / (1 + math.exp(-9.5)), rel=1e-12)
    assert c.coefficients["accuracy"] == pytest.approx(beta, rel=1e-12)
    assert loss.item() == pytest.approx(beta * 10 + 0.08 * 1 + 0.12 * 2, rel=1e-12)
    assert controller_steps(c) == 2 and hook.trained == 8
    # The measured sums span both steps: accuracy (0.5 + 1 + 10 + 10) / 4, revenue
    # (0.25 + 0.5 + 2.25 + 1) / 4, fairness (3 + 2) / 2.
    assert hook.losses.reduce().tolist() == [5.375, 1.0, 2.5]


def test_under_validation_control_the_hook_uses_the_coefficients_in_force() -> None:
    c = coordinator()
    c.observe({"accuracy": 1.0})  # err = −0.5: P = 0.5/(1 + e^−0.5) = 0.3112, I = 0.05
    beta = 0.5 / (1 + math.exp(-0.5)) + 0.05 + 0.6
    hook = make_hook(FixedModel(LOSSES), c)
    for index in range(3):
        loss, _ = hook(segmented(SEGMENTS, index))
        assert loss.item() == pytest.approx(beta * 0.75 + 0.08 * 1.0 + 0.12 * 3.0, rel=1e-12)
    assert controller_steps(c) == 1  # only the observation stepped it
    # The job's next validation moves q: I = 0.05 + 0.05 = 0.1 (below 0.7 − P = 0.389).
    c.observe({"accuracy": 1.0})
    beta = 0.5 / (1 + math.exp(-0.5)) + 0.1 + 0.6
    loss, _ = hook(segmented(SEGMENTS, 3))
    assert loss.item() == pytest.approx(beta * 0.75 + 0.08 * 1.0 + 0.12 * 3.0, rel=1e-12)
    assert controller_steps(c) == 2


def test_under_sampling_coefficients_the_hook_returns_the_models_own_loss_and_output() -> None:
    c = coordinator()
    c.observe({"accuracy": 1.0})
    model = FixedModel(LOSSES)
    # Per-example losses without a gradient are fine here: they are only measured.
    hook = make_hook(model, c, weigh=False,
                     examples=Examples(lambda batch, output: output.per_row_loss.detach()))
    loss, output = hook(segmented(SEGMENTS, index=3))
    assert loss is model.returned[0] and output is model.returned[1]  # the objects themselves
    assert loss.item() == pytest.approx(sum(LOSSES) / 6, rel=1e-12)
    assert controller_steps(c) == 1  # the hook never steps it
    assert hook.losses.reduce().tolist() == MEANS
    assert hook.trained == 3
    # A pass through the hook in eval mode or without gradient (validation) trains
    # nothing: it neither counts as trained nor adds to the training losses.
    model.eval()
    hook(segmented(SEGMENTS, index=4))
    model.train()
    with torch.no_grad():
        hook(segmented(SEGMENTS, index=5))
    assert hook.trained == 3
    assert np.isnan(hook.losses.reduce()).all()


# Rows of 3 objectives (segments 2, 0, 1) with 2 examples each, the examples' losses
# 1, 2, ..., 6 in the collate's order. BLOCKED: example e is of row e mod 3, so the
# examples' segments are 2, 0, 1, 2, 0, 1: accuracy (2 + 5)/2, revenue (3 + 6)/2, fairness
# (1 + 4)/2. INTERLEAVED: example e is of row e // 2, segments 2, 2, 0, 0, 1, 1: accuracy
# (3 + 4)/2, revenue (5 + 6)/2, fairness (1 + 2)/2. With q = (1, 0.08, 0.12) each example's
# gradient is q of its segment over that segment's 2 examples.
LAYOUT_SEGMENTS = [2, 0, 1]
LAYOUTS = {
    ExampleLayout.BLOCKED: ([0, 1, 2, 0, 1, 2], [3.5, 4.5, 2.5], 3.5 + 0.08 * 4.5 + 0.12 * 2.5,
                            [0.06, 0.5, 0.04, 0.06, 0.5, 0.04]),
    ExampleLayout.INTERLEAVED: ([0, 0, 1, 1, 2, 2], [3.5, 5.5, 1.5], 3.5 + 0.08 * 5.5 + 0.12 * 1.5,
                                [0.06, 0.06, 0.5, 0.5, 0.04, 0.04]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=lambda layout: layout.value)
def test_example_layouts_map_each_example_to_its_row(layout: ExampleLayout) -> None:
    rows, means, weighted, grad = LAYOUTS[layout]
    assert layout.expand(torch.arange(3), 6).tolist() == rows
    two_columns = layout.expand(torch.arange(6).view(3, 2), 6)
    assert two_columns.tolist() == [[2 * r, 2 * r + 1] for r in rows]
    same = torch.arange(6)
    assert layout.expand(same, 6) is same  # E = B: every row's own entry, no copy
    model = FixedModel([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vector=True)
    # The model's own loss is the vector of per-example losses: rows=None takes it.
    hook = make_hook(model, coordinator(target=None), examples=Examples(layout=layout))
    loss, _ = hook(segmented(LAYOUT_SEGMENTS))
    assert loss.item() == pytest.approx(weighted, rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(model.per_row.grad.numpy(), grad, rtol=1e-12)
    assert hook.losses.reduce().tolist() == means


@pytest.mark.parametrize(("examples", "losses", "message"), [
    (Examples(), LOSSES,
     r"got Tensor of shape \(\): the model returns a reduced loss; pass rows="),
    (Examples(per_row_loss, ExampleLayout.ROWS), LOSSES + LOSSES,
     "12 per-example losses for 6 sampled rows: give the examples' layout"),
    (Examples(per_row_loss, ExampleLayout.BLOCKED), LOSSES + [1.0],
     "7 per-example losses for 6 sampled rows: expected one loss per row or the same number"),
    (Examples(lambda batch, output: output.per_row_loss.view(2, 3)), LOSSES,
     r"must be a vector, got Tensor of shape \(2, 3\): check rows="),
])
def test_per_example_losses_that_do_not_fit_the_rows_are_refused(
        examples: Examples, losses: list[float], message: str) -> None:
    hook = make_hook(FixedModel(losses), coordinator(), weigh=False, examples=examples)
    with pytest.raises(MorecError, match=message):
        hook(segmented(SEGMENTS))


def test_loss_coefficients_refuse_per_example_losses_without_a_gradient() -> None:
    c = coordinator()
    model = FixedModel(LOSSES)
    hook = make_hook(model, c, control_per_step=True,
                     examples=Examples(lambda batch, output: output.per_row_loss.detach()))
    with pytest.raises(MorecError, match="loss coefficients weigh the per-example losses, "
                                         "which have no gradient here"):
        hook(segmented(SEGMENTS))
    assert controller_steps(c) == 0  # refused before the controller stepped
    with torch.no_grad():  # a pass without gradient (validation) needs none
        loss, _ = hook(segmented(SEGMENTS))
    assert loss.item() == pytest.approx(np.dot(c.q, MEANS), rel=1e-12)
    assert controller_steps(c) == 0  # nor steps the controllers per step


def test_the_hook_takes_only_the_loaders_batches() -> None:
    hook = make_hook(FixedModel(LOSSES), coordinator())
    with pytest.raises(MorecError, match="loss hook: got a dict, expected the SegmentedBatch "
                                         "that morec.loader yields"):
        hook({"user": torch.zeros(6)})


def test_a_batch_trained_again_is_refused() -> None:
    # As a loader iterated again without set_epoch yields the batches of its last epoch.
    hook = make_hook(FixedModel(LOSSES), coordinator())
    hook(segmented(SEGMENTS, 4))
    with pytest.raises(MorecError, match="batch 3 comes after batch 4 was trained: call "
                                         r"morec.set_epoch\(epoch\) before iterating"):
        hook(segmented(SEGMENTS, 3))


def test_a_second_pass_on_a_batch_is_weighed_as_the_first_without_a_step() -> None:
    # SAM's second pass, an optimizer closure's: the same step, not another.
    c = coordinator()
    hook = make_hook(FixedModel(LOSSES), c, control_per_step=True)
    first, _ = hook(segmented(SEGMENTS, 4))
    second, _ = hook(segmented(SEGMENTS, 4))
    assert controller_steps(c) == 1 and hook.trained == 4
    assert second.item() == first.item()


def test_a_model_that_returns_only_its_output_is_refused() -> None:
    class Scores(nn.Module):
        def forward(self, batch: object) -> torch.Tensor:
            return torch.zeros(2, 2)  # would unpack into a "loss" and an "output"

    with pytest.raises(MorecError, match=r"the model returned Tensor of shape \(2, 2\): MoRec "
                                         r"calls model\(batch\) for \(loss, output\)"):
        make_hook(Scores(), coordinator())(segmented(SEGMENTS))


def test_objective_losses_reduce_to_the_means_since_the_last_call() -> None:
    losses = ObjectiveLosses([*OBJECTIVES, "alignment"])
    assert np.isnan(losses.reduce()).all()  # nothing added yet
    losses.add(torch.tensor(LOSSES), torch.tensor(SEGMENTS))
    losses.add(torch.tensor([1.5, 0.75], dtype=torch.float16), torch.tensor([0, 1]))
    means = losses.reduce()
    # Accuracy (0.5 + 1 + 1.5)/3, revenue (0.25 + 0.5 + 2.25 + 0.75)/4, fairness 3, segment
    # 3 no row.
    assert means.dtype == np.float64 and means.shape == (4,)
    np.testing.assert_array_equal(means[:3], [1.0, 0.9375, 3.0])
    assert np.isnan(means[3])
    assert np.isnan(losses.reduce()).all()  # reduce started over
    losses.add(torch.tensor([2.0]), torch.tensor([3]))
    np.testing.assert_array_equal(losses.reduce(), [np.nan, np.nan, np.nan, 2.0])

    # Sums and counts are kept in float64: 3,000 bfloat16 ones (a bfloat16 sum stops at 256).
    losses.add(torch.ones(3000, dtype=torch.bfloat16), torch.zeros(3000, dtype=torch.int64))
    losses.add(torch.full((1000,), 3.0, dtype=torch.bfloat16), torch.zeros(1000, dtype=torch.int64))
    assert losses.reduce()[0] == 1.5

    # Steps are summed FOLD at a time: 2.5 folds, and a step's losses changed in place
    # after add (a reused output buffer) count as they were.
    steps = 5 * ObjectiveLosses.FOLD // 2
    for step in range(steps):
        buffer = torch.tensor([float(step), 1.0])
        losses.add(buffer, torch.tensor([0, 1]))
        buffer.fill_(1e6)
    np.testing.assert_array_equal(losses.reduce()[:2], [(steps - 1) / 2, 1.0])

    # A NaN or infinite loss is refused, not read as an objective without rows.
    losses.add(torch.tensor([1.0, math.nan, 2.0]), torch.tensor([0, 2, 2]))
    with pytest.raises(MorecError, match=r"training loss since the last read: fairness nan: "
                                         r"the model's parameters or outputs hold NaN or inf"):
        losses.reduce()
    assert np.isnan(losses.reduce()).all()  # and started over


@pytest.mark.parametrize(("losses", "segments", "message"), [
    ([0.5, 1.0, 2.0], [0, 1, 1], r"needs rows of every objective .* \[1.0, 2.0, 0.0\]"),
    ([0.5, math.inf, 2.0], [0, 1, 2], "this step's training loss: revenue inf: "),
    ([0.5, math.nan, -math.inf], [0, 1, 2],
     "this step's training loss: revenue nan, fairness -inf: the model's parameters"),
])
def test_training_control_refuses_bad_losses_before_the_controller_steps(
        losses: list[float], segments: list[int], message: str) -> None:
    c = coordinator()
    with pytest.raises(MorecError, match=message):
        make_hook(FixedModel(losses), c, control_per_step=True)(segmented(segments))
    assert controller_steps(c) == 0


MF_FEATURES = MatrixFactorization.feature_names


def mf_batch() -> TrainBatch:
    """6 rows: users 0-3, items 0-9, 3 negatives each (segments SEGMENTS)."""
    ones = torch.ones(6, dtype=torch.int32)
    features = features_kjt(MF_FEATURES, {
        "user_id": (torch.tensor([0, 1, 2, 3, 1, 0]), ones),
        "item_id": (torch.tensor([4, 5, 6, 7, 8, 9]), ones),
        "neg_item_id": (torch.tensor([0, 1, 2, 3, 2, 1, 9, 8, 7, 6, 5, 4, 1, 3, 5, 0, 2, 4]),
                        3 * ones),
    })
    return TrainBatch(features)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_gradients_are_those_of_the_weighted_sum_of_objective_means() -> None:
    torch.manual_seed(0)
    model = MatrixFactorization(4, 10, embedding_dim=8)
    batch = mf_batch()
    c = coordinator(target=0.2)
    loss, _ = make_hook(model, c, control_per_step=True)(segmented(SEGMENTS, batch=batch))
    loss.backward()
    hooked = gradients(model)
    q = c.q.tolist()
    assert q[1:] == pytest.approx([0.08, 0.12], rel=1e-12) and q[0] != 1.0

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


# No host read on the step path.
#
# Why a CPU tensor subclass stands for a CUDA device here: the host gets a CUDA tensor's
# values only by copying them to host memory, which takes one of a few calls: an explicit
# copy (.cpu(), .to() a CPU device or a host tensor, a host tensor's copy_ from it), a
# host view of the data (.numpy(), __array__, pickling, printing), a Python value (.item(),
# .tolist(), bool(), float(), int(), operator.index(), complex(), `in`), or an op whose
# output shape or Python result depends on the values (nonzero, boolean-mask indexing,
# masked_select, unique, bincount, repeat_interleave without output_size, one-argument
# where, equal, allclose, is_nonzero), which synchronises with the device to size its
# output. Everything else (kernels, shapes, dtypes, devices, requires_grad) runs without
# waiting for the device. DeviceTensor's __torch_function__ sees every torch function and
# Tensor method that is given an instance, and super().__torch_function__ makes what those
# return instances too, so every value derived from the model's output or the segment ids
# carries the trap: a step that runs under it makes none of these calls, and so would
# read nothing back from a CUDA device either. What it does not watch: tensors the hook
# makes without touching an instance (torch.arange(device=...), q copied from numpy),
# which hold nothing the device computed; copies to the device, which are not reads
# (though q's, made when q changes, is a blocking copy from pageable memory, which on CUDA
# waits for the stream on that step); and calls that run inside another torch call, which
# is why __array__, __repr__ and __format__ are trapped themselves rather than the numpy()
# and item() they call.


class HostRead(AssertionError):
    """A (stand-in) device tensor's values were read on the host."""


_T = torch.Tensor
_READS = {_T.cpu, _T.numpy, _T.item, _T.tolist, _T.__bool__, _T.__float__, _T.__int__,
          _T.__index__, _T.__complex__, _T.__contains__, _T.__array__, _T.__repr__,
          _T.__format__, _T.__reduce_ex__}
_DATA_SHAPED = {torch.nonzero, _T.nonzero, torch.argwhere, _T.argwhere, torch.masked_select,
                _T.masked_select, torch.unique, _T.unique, torch.unique_consecutive,
                _T.unique_consecutive, torch.bincount, _T.bincount, torch.equal, _T.equal,
                torch.allclose, _T.allclose, torch.is_nonzero, _T.is_nonzero}


def _host_read(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """What makes ``func(*args, **kwargs)`` read device values on the host, if anything."""
    name = getattr(func, "__qualname__", repr(func))
    if func in _READS or func in _DATA_SHAPED:
        return name
    if func in (torch.repeat_interleave, _T.repeat_interleave) and "output_size" not in kwargs:
        return f"{name} without output_size"
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "torch.where(condition)"
    if func in (_T.__getitem__, _T.__setitem__):
        index = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            return f"{name} with a boolean mask"
    if func is _T.to:
        targets = [a for a in args[1:] if isinstance(a, (torch.device, str, int))]
        targets += [kwargs["device"]] if kwargs.get("device") is not None else []
        if any(torch.device(t).type == "cpu" for t in targets):
            return "Tensor.to(cpu)"
        if any(isinstance(a, torch.Tensor) and not isinstance(a, DeviceTensor) for a in args[1:]):
            return "Tensor.to(a host tensor)"
    if func is _T.copy_ and not isinstance(args[0], DeviceTensor):
        return "a host tensor's copy_ from a device tensor"
    return None


class DeviceTensor(torch.Tensor):
    """Stands for a tensor on an accelerator: while armed (:func:`no_host_reads`), a call
    that would read its values on the host raises :class:`HostRead`."""

    armed = False

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if cls.armed:
            read = _host_read(func, args, kwargs)
            if read is not None:
                raise HostRead(f"{read}: a device tensor read on the host")
        return super().__torch_function__(func, types, args, kwargs)


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    DeviceTensor.armed = True
    try:
        yield
    finally:
        DeviceTensor.armed = False


def on_device(tensor: torch.Tensor) -> DeviceTensor:
    return tensor.as_subclass(DeviceTensor)


@pytest.mark.parametrize("read", [
    lambda t: t.cpu(), lambda t: t.numpy(), lambda t: t.item(), lambda t: t.tolist(),
    bool, float, int, operator.index, np.asarray, repr, lambda t: f"{t}",
    lambda t: t.to("cpu"), lambda t: t.to(device=torch.device("cpu")),
    lambda t: t.to(torch.zeros(1)), lambda t: torch.zeros(1).copy_(t),
    lambda t: t[t > 0], lambda t: t.nonzero(), lambda t: torch.unique(t),
    lambda t: t.bincount(), lambda t: torch.equal(t, t), lambda t: 2 in t,
])
def test_the_trap_catches_host_reads(read: Callable[[torch.Tensor], Any]) -> None:
    t = on_device(torch.tensor([2]))
    with no_host_reads(), pytest.raises(HostRead):
        read(t + 0)  # on a value derived from the device tensor
    read(t)  # disarmed, the same call goes through


# Every example's loss is the weight of its id: 3 steps of 4 ids, with their segments.
TRAP_WEIGHTS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
TRAP_STEPS = [([0, 1, 2, 3], [0, 1, 0, 2]), ([4, 5, 0, 1], [1, 1, 2, 0]),
              ([2, 3, 4, 5], [2, 0, 1, 0])]


class Lookup(nn.Module):
    """A model whose batch is a (device) tensor of ids; each example's loss is its id's
    weight, so the losses derive from the batch and carry its trap."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(TRAP_WEIGHTS, dtype=torch.float64))
        self.returned: tuple[torch.Tensor, ModelOutput] | None = None

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        per_row = self.weight[ids]
        self.returned = (per_row.mean(), ModelOutput(per_row))
        return self.returned


@pytest.mark.parametrize("weigh", [False, True], ids=["sampling", "loss"])
def test_no_device_tensor_reaches_the_host_on_the_step_path(weigh: bool) -> None:
    model, c = Lookup().train(), coordinator()
    hook = make_hook(model, c, weigh=weigh, control_per_step=False)
    steps, qs = [], []
    with no_host_reads():
        for step, (ids, segments) in enumerate(TRAP_STEPS):
            c.observe({"accuracy": 1.0 + step})  # validation control: q moves between steps
            qs.append(c.q)
            loss, output = hook(SegmentedBatch(on_device(torch.tensor(ids)),
                                               on_device(torch.tensor(segments)), 10 + step))
            loss.backward()
            steps.append((loss, output, model.returned))
    # Outside the trap: what the steps computed.
    assert hook.trained == 12
    means = hook.losses.reduce()
    ids, segments = (np.concatenate(x) for x in zip(*TRAP_STEPS))
    values = np.array(TRAP_WEIGHTS)[ids]
    np.testing.assert_allclose(means, [values[segments == o].mean() for o in range(3)],
                               rtol=1e-12)
    grad = np.zeros(len(TRAP_WEIGHTS))
    for (loss, output, own), (ids, segments), q in zip(steps, TRAP_STEPS, qs):
        # The trap followed the values through the model and the hook.
        assert type(loss) is DeviceTensor and type(output.per_row_loss) is DeviceTensor
        assert output is own[1]
        counts = np.bincount(segments, minlength=3)
        local = np.bincount(segments, np.array(TRAP_WEIGHTS)[ids], minlength=3) / counts
        if weigh:
            assert loss.item() == pytest.approx(np.dot(q, local), rel=1e-12)
        else:
            assert loss is own[0]
        np.add.at(grad, ids, np.array(q)[segments] / counts[segments] if weigh
                  else np.full(len(ids), 1 / len(ids)))
    assert len({tuple(q) for q in qs}) == len(qs)  # q moved at every step
    np.testing.assert_allclose(model.weight.grad.numpy(), grad, rtol=1e-12)


def test_training_control_reads_the_host_by_design_and_the_trap_sees_it() -> None:
    hook = make_hook(Lookup(), coordinator(), control_per_step=True)
    ids, segments = TRAP_STEPS[0]
    with no_host_reads(), pytest.raises(HostRead):
        hook(SegmentedBatch(on_device(torch.tensor(ids)), on_device(torch.tensor(segments)), 0))


# Under torchrun: 2 ranks, the fixed-loss hook and the real pipeline (tests/dist/hook_job.py)

FIXED_TARGET, FIXED_GAINS = 2.0, PIGains(kp=0.2, ki=0.15, beta_min=0.6, beta_max=1.3)
PIPELINE_TARGET, PIPELINE_GAINS = 0.5, PIGains(kp=0.1, ki=0.05, beta_min=0.6, beta_max=1.3)
REDUCE_AFTER = 3  # the jobs' first ObjectiveLosses.reduce() covers this many steps


def betas_by_hand(losses: list[float], target: float, gains: PIGains) -> list[float]:
    """The PI recurrence of SPEC Eq. 13–14, the integral clamped where β meets a bound."""
    integral, betas = 0.0, []
    for loss in losses:
        err = target - loss
        proportional = gains.kp / (1 + math.exp(err))
        integral = min(max(integral - gains.ki * err, -proportional),
                       gains.beta_max - gains.beta_min - proportional)
        betas.append(proportional + integral + gains.beta_min)
    return betas


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("hook_job")
    run_torchrun("tests/dist/hook_job.py", "--out", str(out), nproc=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def global_means(steps: list[dict]) -> np.ndarray:
    """Each objective's mean over the rows of every rank, from the ranks' own records."""
    losses = np.concatenate([s["per_row_loss"] for s in steps])
    segments = np.concatenate([s["segment"] for s in steps])
    return np.array([losses[segments == o].mean() for o in range(3)])


@pytest.mark.slow
def test_every_rank_gets_the_global_means_and_the_same_beta(two_ranks: list[dict]) -> None:
    first, second = (rank["fixed"] for rank in two_ranks)
    assert len(first["steps"]) == len(second["steps"]) == 6
    means = [global_means([a, b]) for a, b in zip(first["steps"], second["steps"])]
    betas = betas_by_hand([m[0] for m in means], FIXED_TARGET, FIXED_GAINS)
    uneven = 0
    for step, (a, b) in enumerate(zip(first["steps"], second["steps"])):
        counts = [np.bincount(r["segment"], minlength=3) for r in (a, b)]
        assert (counts[0] != counts[1]).any()  # the ranks' sub-batches differ in size
        for key in ("measured", "q", "beta"):
            assert a[key] == b[key], (step, key)  # bit for bit
        # Losses are multiples of 1/16: every sum is exact, so the means are too.
        assert a["measured"] == means[step][0], step
        assert a["beta"] == pytest.approx(betas[step], rel=1e-12)
        assert a["q"] == pytest.approx([betas[step], 0.08, 0.12], rel=1e-12)
        for rank in (a, b):  # each rank's loss weighs its own means by the common q
            losses, segments = np.array(rank["per_row_loss"]), np.array(rank["segment"])
            local = [losses[segments == o].mean() for o in range(3)]
            assert rank["loss"] == pytest.approx(np.dot(rank["q"], local), rel=1e-6)
            assert rank["dtype"] == "torch.float32"
            uneven += not np.allclose(local, means[step])
    assert uneven > 0  # local means differ from the global ones: the reduce mattered
    assert len({round(b, 9) for b in betas}) == len(betas)  # β moved at every step

    # Both hooks' reduce(): the global means since the last call, the same on every rank,
    # exact; under sampling coefficients every step returned the model's own loss object.
    for part in ("fixed", "sampling"):
        reduced = [rank[part]["reduced"] for rank in two_ranks]
        assert reduced[0] == reduced[1], part
        for got, steps in zip(reduced[0], (slice(0, REDUCE_AFTER), slice(REDUCE_AFTER, None))):
            assert got == global_means(first["steps"][steps] + second["steps"][steps]).tolist()
    assert all(rank["sampling"]["own"] == [True] * 6 for rank in two_ranks)


@pytest.mark.slow
def test_the_pipeline_trains_on_the_hooks_loss(two_ranks: list[dict]) -> None:
    first, second = (rank["pipeline"] for rank in two_ranks)
    assert first["sharded"] and second["sharded"]
    means = [global_means([a, b]) for a, b in zip(first["steps"], second["steps"])]
    betas = betas_by_hand([m[0] for m in means], PIPELINE_TARGET, PIPELINE_GAINS)
    for step, (a, b) in enumerate(zip(first["steps"], second["steps"])):
        assert a["type"] == "ModelOutput"  # the model's own output, through the pipeline
        assert a["controller_steps"] == b["controller_steps"] == step + 1  # one step a call
        assert a["trained"] == b["trained"] == step
        for key in ("measured", "q", "beta"):
            assert a[key] == b[key], (step, key)
        # Float32 per-row losses, summed in float32 then reduced in float64.
        assert a["measured"] == pytest.approx(means[step][0], rel=1e-6)
        assert a["q"] == pytest.approx([betas[step], 0.2, 0.0], rel=1e-6)
    assert len(first["steps"]) == 4
    assert first["reduced"] == second["reduced"]
    np.testing.assert_allclose(first["reduced"], global_means(first["steps"] + second["steps"]),
                               rtol=1e-6)

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
