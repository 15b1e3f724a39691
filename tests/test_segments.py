"""A SegmentedBatch leaving a loader worker: a small container of plain CPU tensors goes by
value (its arrays through the worker's pipe), anything else torch's way (shared memory);
the same batch arrives either way."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, NamedTuple

import pytest
import torch
from torch.utils._pytree import tree_flatten

from morec_rec.plugin import segments
from morec_rec.plugin.segments import SegmentedBatch


class Pair(NamedTuple):
    left: torch.Tensor
    right: int


@dataclasses.dataclass
class OwnBatch:
    """A job's batch class that no pytree knows: it pickles its own way."""

    user: torch.Tensor


def job_batch(kind: str) -> Any:
    user = torch.arange(6)
    if kind == "bfloat16":
        return {"user": user, "score": torch.ones(6, dtype=torch.bfloat16)}
    if kind == "requires grad":
        return {"user": user, "score": torch.ones(6, requires_grad=True)}
    if kind == "own class":
        return OwnBatch(user)
    # Nested containers, non-tensor leaves and a strided view of a larger tensor.
    return {"user": user, "pair": Pair(torch.arange(12).view(6, 2)[:, 1], 7),
            "more": [(user + 1, None)], "tag": "x"}


def segmented(kind: str) -> SegmentedBatch:
    return SegmentedBatch(job_batch(kind), torch.tensor([0, 1, 1, 2, 2, 2]), 3,
                          item_id=torch.arange(6) + 10)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, OwnBatch):
        return isinstance(b, OwnBatch) and same(a.user, b.user)
    return a == b


def same_segmented(a: SegmentedBatch, b: SegmentedBatch) -> bool:
    return (same(a.batch, b.batch) and same(a.segment, b.segment) and a.index == b.index
            and same(a.item_id, b.item_id))


def sent_by_value(batch: SegmentedBatch) -> bool:
    """Whether every tensor of the job's batch is pickled as its values."""
    _, args = batch.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    leaves, _ = tree_flatten(args[0])
    return (any(isinstance(leaf, segments._Array) for leaf in leaves)
            and not any(isinstance(leaf, torch.Tensor) for leaf in leaves))


@pytest.mark.parametrize("kind, threshold, by_value", [
    ("containers", 1 << 20, True),
    ("containers", 8 * 6 * 2 - 1, False),  # one byte short of its two tensors' 96 bytes
    ("bfloat16", 1 << 20, False),  # numpy has no bfloat16
    ("requires grad", 1 << 20, False),
    ("own class", 1 << 20, False),
])
def test_a_batch_pickles_by_value_only_where_it_can(kind: str, threshold: int, by_value: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments, "BY_VALUE_MAX_BYTES", threshold)
    batch = segmented(kind)
    assert sent_by_value(batch) == by_value
    assert same_segmented(pickle.loads(pickle.dumps(batch)), batch)


class Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> SegmentedBatch:
        return segmented(("containers", "bfloat16", "own class")[i])


@pytest.mark.parametrize("threshold", [1 << 20, 0])
def test_batches_cross_from_a_loader_worker_unchanged(threshold: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker is forked after the patch, so it reads the same threshold.
    monkeypatch.setattr(segments, "BY_VALUE_MAX_BYTES", threshold)
    received = list(torch.utils.data.DataLoader(Batches(), batch_size=None, num_workers=1))
    assert len(received) == 3
    assert all(same_segmented(r, e) for r, e in zip(received, Batches()))
