"""A reference backbone's input: its sparse features as one KeyedJaggedTensor."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence, SupportsIndex

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from morec_rec.errors import MorecError
from morec_rec.plugin import segments
from morec_rec.plugin.sampling.sampled import SampledBatch

if TYPE_CHECKING:
    from morec_rec.jobs.models.negatives import NegativeSampler

#: Features a Collator can build from a SampledBatch.
FEATURES = ("user_id", "item_id", "neg_item_id", "history")


@dataclasses.dataclass
class TrainBatch(Pipelineable):
    """What a reference backbone's forward takes: its sparse features as one KJT.

    Attributes:
        features: the model's ``feature_names``, each with batch size B.
    """

    features: KeyedJaggedTensor

    def to(self, device: torch.device, non_blocking: bool = False) -> TrainBatch:
        return TrainBatch(self.features.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)

    def pin_memory(self) -> TrainBatch:
        return TrainBatch(self.features.pin_memory())

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        """Pickles a small CPU batch by value (``segments.BY_VALUE_MAX_BYTES``)."""
        features = self.features
        tensors = (features.values(), features.lengths())
        if (features.weights_or_none() is not None
                or any(t.device.type != "cpu" for t in tensors)
                or sum(t.nbytes for t in tensors) > segments.BY_VALUE_MAX_BYTES):
            return super().__reduce_ex__(protocol)
        return (_batch_from_arrays, (features.keys(), features.stride(),
                                     features.length_per_key(), *(t.numpy() for t in tensors)))


def _batch_from_arrays(keys: list[str], stride: int, length_per_key: list[int],
                       values: np.ndarray, lengths: np.ndarray) -> TrainBatch:
    return TrainBatch(KeyedJaggedTensor(keys=keys, values=torch.from_numpy(values),
                                        lengths=torch.from_numpy(lengths), stride=stride,
                                        length_per_key=length_per_key))


def features_kjt(feature_names: Sequence[str],
                 values: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> KeyedJaggedTensor:
    """A KJT with keys ``feature_names`` from ``{name: (values, lengths)}``.

    Values are int64 ids, lengths int32 (B,), the same B for every given key. Keys not
    given get B zero lengths: a sharded EmbeddingCollection needs every one of its
    features in each input KJT.
    """
    unknown = set(values) - set(feature_names)
    if unknown:
        raise MorecError(f"features {sorted(unknown)} are not among {list(feature_names)}")
    sizes = {len(lengths) for _, lengths in values.values()}
    if len(sizes) != 1:  # none given, or several batch sizes
        raise MorecError(f"features need one batch size, got {sorted(sizes)}")
    (stride,) = sizes
    given = next(iter(values.values()))[0]
    empty = (given.new_empty(0, dtype=torch.int64), given.new_zeros(stride, dtype=torch.int32))
    columns = [values.get(name, empty) for name in feature_names]
    return KeyedJaggedTensor(
        keys=list(feature_names),
        values=torch.cat([ids.to(torch.int64) for ids, _ in columns]),
        lengths=torch.cat([lengths.to(torch.int32) for _, lengths in columns]),
        stride=stride,
        length_per_key=[len(ids) for ids, _ in columns],
    )


def sampler_columns(feature_names: Sequence[str]) -> tuple[str, ...]:
    """The sampler's optional columns (its ``columns``) that a model reading
    ``feature_names`` needs: ``history`` where it takes that feature, else none."""
    return tuple(c for c in ("history",) if c in feature_names)


class Collator:
    """SampledBatch -> TrainBatch: picks the model's features and draws negatives.

    Features: ``user_id`` and ``item_id`` (one id per row), ``neg_item_id``
    (``num_negatives`` per row, never the row's item), ``history`` (the row's earlier
    items, oldest first). Negatives for a batch come from an RNG seeded by
    ``(seed, rank, batch.batch_index)``: the same batch always gets the same negatives, and
    ranks (whose loaders number their batches alike) draw independently. Use as a
    DataLoader's ``collate_fn`` with ``batch_size=None``; it pickles to loader workers.

    Args:
        feature_names: the model's ``feature_names``, a subset of :data:`FEATURES`.
        negatives: draws the negatives.
        num_negatives: negatives per row.
        seed: the run's seed.
        rank: this process's rank in the data-parallel job.
    """

    def __init__(self, feature_names: Sequence[str], negatives: NegativeSampler,
                 num_negatives: int, seed: int, *, rank: int = 0) -> None:
        unknown = set(feature_names) - set(FEATURES)
        if unknown:
            raise MorecError(f"collator: unknown feature(s) {sorted(unknown)}; "
                             f"expected some of {', '.join(FEATURES)}")
        if num_negatives < 1 and "neg_item_id" in feature_names:
            raise MorecError(f"collator: num_negatives {num_negatives} must be >= 1")
        self.feature_names = tuple(feature_names)
        self.negatives = negatives
        self.num_negatives = num_negatives
        self.seed, self.rank = seed, rank

    @property
    def columns(self) -> tuple[str, ...]:
        """The sampler's optional columns that this collate reads (see
        :func:`sampler_columns`)."""
        return sampler_columns(self.feature_names)

    def __call__(self, batch: SampledBatch) -> TrainBatch:
        features = features_kjt(self.feature_names,
                                {name: self._column(name, batch) for name in self.feature_names})
        return TrainBatch(features)

    def _column(self, name: str, batch: SampledBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, lengths) of one feature."""
        ones = torch.ones(len(batch), dtype=torch.int32)
        match name:
            case "user_id":
                return batch.user_id, ones
            case "item_id":
                return batch.item_id, ones
            case "neg_item_id":
                rng = np.random.default_rng([self.seed, self.rank, batch.batch_index])
                drawn = self.negatives.sample(batch.item_id.numpy(), self.num_negatives, rng)
                return torch.from_numpy(drawn.reshape(-1)), ones * self.num_negatives
            case _:  # "history"
                return batch.history_values, batch.history_lengths
