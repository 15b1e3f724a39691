"""A job's own batch, with the objective that drew each of its rows.

MoRec's loader wraps whatever the job's collate returns in a :class:`SegmentedBatch`; the
hook unwraps it, so the model sees the job's batch and nothing else. Attribute access
falls through to the job's batch, which is how TorchRec's pipeline finds the sparse
features its traced model reads (``batch.sparse_features``, ...). ``to``, ``pin_memory``
and ``record_stream`` move both parts, so a :class:`SegmentedBatch` is ``Pipelineable``
(registered as one when TorchRec is loaded: :mod:`morec_rec.plugin.adapters`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, SupportsIndex

import numpy as np
import torch
from torch.utils._pytree import tree_map

from morec_rec.errors import MorecError

_OWN = frozenset(("batch", "segment", "index", "item_id"))

#: A batch whose CPU tensors hold at most this many bytes leaves a loader worker by value
#: (its arrays pickled through the worker's pipe); a larger one through shared memory,
#: torch's way. Sharing costs a handshake per tensor, copying grows with the size; where
#: the two cross depends on the machine: ``benchmarks/batch_transfer.py`` measures both.
BY_VALUE_MAX_BYTES = 1 << 20


class ExampleLayout(enum.Enum):
    """How a job's collate lays out the examples it makes from B sampled rows.

    ``ROWS``: one example per row, in row order (E = B). ``BLOCKED``: r blocks of the B
    rows, e.g. every row's positive, then every row's sampled negative (E = r·B).
    ``INTERLEAVED``: each row's r examples together (E = r·B).
    """

    ROWS = "rows"
    BLOCKED = "blocked"
    INTERLEAVED = "interleaved"

    def check(self, num_examples: int, num_rows: int) -> None:
        """MorecError unless ``num_examples`` examples can be laid out over ``num_rows``."""
        if num_examples == num_rows:
            return
        if self is ExampleLayout.ROWS or num_rows == 0 or num_examples % num_rows:
            raise MorecError(
                f"{num_examples} per-example losses for {num_rows} sampled rows: "
                + ("give the examples' layout (ExampleLayout.BLOCKED or INTERLEAVED)"
                   if self is ExampleLayout.ROWS and num_rows and not num_examples % num_rows
                   else "expected one loss per row or the same number per row"))

    def expand(self, per_row: torch.Tensor, num_examples: int) -> torch.Tensor:
        """(E, ...): each of ``num_examples`` examples' entry of the (B, ...) ``per_row``
        (one entry per sampled row); ``per_row`` itself when E = B."""
        num_rows = per_row.shape[0]
        self.check(num_examples, num_rows)
        if num_examples == num_rows:
            return per_row
        repeats = num_examples // num_rows
        if self is ExampleLayout.BLOCKED:
            return per_row.repeat(repeats, *[1] * (per_row.dim() - 1))
        return per_row.repeat_interleave(repeats, dim=0)


@dataclasses.dataclass
class SegmentedBatch:
    """The job's batch and the segment id of each sampled row.

    Attributes:
        batch: what the job's collate made of the sampled rows.
        segment: int64 (B,), the objective (its position in MoRec's objectives) that drew
            each sampled row.
        index: the loader batch index, ``epoch · batches_per_epoch + position``.
        item_id: int64 (B,), each sampled row's item, where the loss reads the items'
            side information (a baseline coordinator's objective losses); else None.
    """

    batch: Any
    segment: torch.Tensor
    index: int
    item_id: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks; its own fields never fall through
        # (pickle looks them up before they are set).
        if name in _OWN or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.batch, name)

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        """Pickles the segment ids by value, and the job's batch too where it is a
        container (dict, list, tuple) of plain CPU tensors within
        :data:`BY_VALUE_MAX_BYTES`: a loader worker sends them through its pipe rather
        than share each small tensor. Any other batch pickles its own way."""
        if self.segment.device.type != "cpu":
            return super().__reduce_ex__(protocol)
        return (_segmented, (*_by_value(self.batch), self.segment.numpy(), self.index,
                             None if self.item_id is None else self.item_id.numpy()))

    def to(self, device: torch.device, non_blocking: bool = False) -> SegmentedBatch:
        return SegmentedBatch(move(self.batch, device, non_blocking),
                              *_ids(self, "to", device, non_blocking=non_blocking))

    def pin_memory(self) -> SegmentedBatch:
        return SegmentedBatch(_apply(self.batch, "pin_memory"), *_ids(self, "pin_memory"))

    def record_stream(self, stream: torch.Stream) -> None:
        if hasattr(self.batch, "record_stream"):
            self.batch.record_stream(stream)
        else:
            tree_map(lambda t: t.record_stream(stream) if isinstance(t, torch.Tensor) else t,
                     self.batch)
        self.segment.record_stream(stream)
        if self.item_id is not None:
            self.item_id.record_stream(stream)


def move(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """A job's batch on ``device``: its own ``to``, or each tensor of a container moved."""
    return _apply(batch, "to", device, non_blocking=non_blocking)


def _apply(batch: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """``batch.method(...)`` where the batch has it, else on each tensor of a container."""
    if hasattr(batch, method):
        return getattr(batch, method)(*args, **kwargs)
    return tree_map(lambda t: getattr(t, method)(*args, **kwargs)
                    if isinstance(t, torch.Tensor) else t, batch)


def _ids(batch: SegmentedBatch, method: str, *args: Any, **kwargs: Any
         ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The segment ids, index and item ids of ``batch``, each tensor's ``method`` applied."""
    item_id = None if batch.item_id is None else getattr(batch.item_id, method)(*args, **kwargs)
    return getattr(batch.segment, method)(*args, **kwargs), batch.index, item_id


class _Array:
    """A tensor's values in a pickled batch (not a bare array: the batch may hold some)."""

    __slots__ = ("values",)

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __reduce__(self) -> tuple[Any, ...]:
        return _Array, (self.values,)


def _map(batch: Any, leaf: type, function: Callable[[Any], Any]) -> Any:
    """``batch`` with ``function`` applied to every object of exactly type ``leaf`` found
    through nested dicts, lists, tuples and namedtuples (no other subclass of these is
    entered); anything else is kept as it is.

    A walk of its own rather than torch's pytree, which costs a loader worker several
    times more a batch; other containers pickle their own way, tensors and all.
    """
    kind = type(batch)
    if kind is leaf:
        return function(batch)
    if kind is dict:
        return {key: _map(value, leaf, function) for key, value in batch.items()}
    if kind is list or kind is tuple:
        return kind(_map(value, leaf, function) for value in batch)
    if issubclass(kind, tuple) and hasattr(kind, "_fields"):  # a namedtuple
        return kind(*(_map(value, leaf, function) for value in batch))
    return batch


def _by_value(batch: Any) -> tuple[Any, bool]:
    """``batch`` with each tensor as an :class:`_Array`, if the tensors that
    :func:`_map` finds are dense CPU tensors that numpy can hold (none requiring grad),
    at least one and within :data:`BY_VALUE_MAX_BYTES` together; else ``batch``. And
    whether it was converted."""
    arrays: list[np.ndarray] = []

    def to_array(tensor: torch.Tensor) -> _Array:
        arrays.append(tensor.numpy())
        return _Array(arrays[-1])

    try:
        converted = _map(batch, torch.Tensor, to_array)
    except (TypeError, RuntimeError):  # another device or layout, bfloat16, requires_grad
        return batch, False
    if not arrays or sum(array.nbytes for array in arrays) > BY_VALUE_MAX_BYTES:
        return batch, False
    return converted, True


def _segmented(batch: Any, by_value: bool, segment: np.ndarray, index: int,
               item_id: np.ndarray | None) -> SegmentedBatch:
    if by_value:
        batch = _map(batch, _Array, lambda array: torch.from_numpy(array.values))
    return SegmentedBatch(batch, torch.from_numpy(segment), index,
                          None if item_id is None else torch.from_numpy(item_id))
