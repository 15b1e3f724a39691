"""MF-BPR: matrix factorisation trained with the BPR loss (Rendle et al., 2009)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from morec_rec.jobs.models import ModelOutput

if TYPE_CHECKING:
    from morec_rec.jobs.collate import TrainBatch


class MatrixFactorization(nn.Module):
    """Scores ``s(u, e) = <p_u, q_e>``; BPR loss against n popularity-drawn negatives.

    Per-row loss: ``mean_j −log σ(s(u, e⁺) − s(u, e⁻_j))`` over the row's negatives.
    There is no bias term and no dense layer: every parameter is in the two tables of one
    EmbeddingCollection, ``user`` (feature ``user_id``) and ``item`` (features ``item_id``
    and ``neg_item_id``), initialised uniformly in ±sqrt(1 / rows) (TorchRec's default).
    TrainPipelineSparseDist needs no dense parameter beside them: it needs an optimizer,
    and with sharded tables the one :func:`~morec_rec.jobs.sharding.shard` returns is
    their fused optimizer alone.

    Args:
        num_users, num_items: table rows.
        embedding_dim: D.
        device: where the tables are created; ``meta`` leaves them to row-wise sharding.
    """

    feature_names = ("user_id", "item_id", "neg_item_id")

    def __init__(self, num_users: int, num_items: int, embedding_dim: int = 64, *,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(num_embeddings=num_users, embedding_dim=embedding_dim,
                                name="user", feature_names=["user_id"]),
                EmbeddingConfig(num_embeddings=num_items, embedding_dim=embedding_dim,
                                name="item", feature_names=["item_id", "neg_item_id"]),
            ],
            device=device,
        )

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, ModelOutput]:
        """Mean BPR loss over the batch's B rows, and the per-row losses.

        ``batch.features``: one ``user_id`` and one ``item_id`` per row, the same number
        n ≥ 1 of ``neg_item_id`` per row.
        """
        embedded = self.embeddings(batch.features)
        users = embedded["user_id"].values()  # (B, D)
        positives, negatives = embedded["item_id"].values(), embedded["neg_item_id"].values()
        positive = (users * positives).sum(-1)  # (B,)
        negative = (negatives.unflatten(0, (users.size(0), -1))
                    * users.unsqueeze(1)).sum(-1)  # (B, n)
        per_row = F.softplus(negative - positive.unsqueeze(-1)).mean(-1)  # −log σ(s⁺ − s⁻)
        return per_row.mean(), ModelOutput(per_row, (users, positives, negatives))

    def user_vectors(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """float (B, D): the user vectors p_u of ``user_id`` (one id per row)."""
        return self.embeddings(features)["user_id"].values()

    def item_vectors(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """float (N, D): the item vectors q_e of ``item_id`` (one id per row)."""
        return self.embeddings(features)["item_id"].values()
