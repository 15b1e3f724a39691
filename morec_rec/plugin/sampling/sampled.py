"""The batch the sampler yields: rows of every objective's sub-batch, with segment ids."""

from __future__ import annotations

import dataclasses
from typing import Any, SupportsIndex

import numpy as np
import torch

from morec_rec.plugin import segments


@dataclasses.dataclass
class SampledBatch:
    """One training batch of ``n`` rows, sub-batches laid end to end in objective order.

    Attributes:
        user_id, item_id: int64 (n,).
        objective: int64 (n,), the segment id: which objective's distribution drew the row
            (an index into the sampler's objective list).
        starved: int64 (num_objectives,), draws that fell on groups absent from the window
            and were re-drawn elsewhere (see :func:`morec_rec.plugin.sampling.draw.draw`).
        batch_index: the batch's position in the loader's stream over all epochs.
        epoch: the epoch it belongs to.
        masses_version: the weight-store version of the masses it was drawn with.
        price: float32 (n,), the item's price.
        fairness_group, popularity_group: int64 (n,), the item's groups.
        history_values: int64 (sum of history_lengths,), the users' earlier items, jagged.
        history_lengths: int64 (n,).

    The last five are None where the sampler was not asked to carry them (its
    ``columns``).
    """

    user_id: torch.Tensor
    item_id: torch.Tensor
    objective: torch.Tensor
    starved: torch.Tensor
    batch_index: int
    epoch: int
    masses_version: int
    price: torch.Tensor | None = None
    fairness_group: torch.Tensor | None = None
    popularity_group: torch.Tensor | None = None
    history_values: torch.Tensor | None = None
    history_lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.user_id)

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        """Pickles a batch of CPU tensors within ``segments.BY_VALUE_MAX_BYTES`` by value
        (each tensor's own elements, not the block it is a view of): a loader worker sends
        it through its pipe rather than share each small tensor."""
        values = [getattr(self, field.name) for field in dataclasses.fields(self)]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if (any(t.device.type != "cpu" for t in tensors)
                or sum(t.nbytes for t in tensors) > segments.BY_VALUE_MAX_BYTES):
            return super().__reduce_ex__(protocol)
        return (_sampled_batch, tuple(v.numpy() if isinstance(v, torch.Tensor) else v
                                      for v in values))


def _sampled_batch(*values: Any) -> SampledBatch:
    return SampledBatch(*(torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                          for v in values))
