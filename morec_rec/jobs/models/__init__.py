"""Reference backbones on TorchRec modules (the paper's training protocol): MF-BPR, SASRec.

A backbone is an ``nn.Module`` whose embedding tables live in one ``EmbeddingCollection``
(so DistributedModelParallel can shard them) and which offers:

* ``feature_names``: the KJT keys it reads (see :class:`~morec_rec.jobs.collate.Collator`);
* ``forward(batch: TrainBatch) -> (loss, ModelOutput)``: what ``TrainPipelineSparseDist``
  calls; the loss is the mean of ``ModelOutput.per_row_loss``. The pipeline FX-traces it
  to find the EmbeddingCollection's input (``batch.features``), so it holds no Python
  control flow on tensors outside leaf submodules;
* ``user_vectors(features) -> (B, D)`` and ``item_vectors(features) -> (N, D)``: full-ranking
  scores are ``user_vectors @ item_vectors.T``. Each call runs the EmbeddingCollection
  once, which is a collective once sharded: every rank must call it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from morec_rec.errors import MorecError

#: Negatives per training row (the paper's training protocol).
NEGATIVES = {"mf": 10, "sasrec": 3}


class ModelOutput(NamedTuple):
    """What a backbone's forward returns beside the loss (a NamedTuple so FX can trace it).

    Attributes:
        per_row_loss: float (B,), each row's training loss; the returned loss is its mean.
        representation: the vectors the loss is computed from: the users' (B, D), the
            positives' (B, D) and the negatives' (B·n, D). A gradient-based baseline
            coordinator compares the objectives' gradients with respect to them (the
            shared representation, as MGDA-UB does); empty where a model gives none.
    """

    per_row_loss: torch.Tensor
    representation: tuple[torch.Tensor, ...] = ()


def per_row_loss(batch: object, output: ModelOutput) -> torch.Tensor:
    """A backbone's per-row losses (MoRec's ``rows``)."""
    return output.per_row_loss


def representation(batch: object, output: ModelOutput) -> tuple[torch.Tensor, ...]:
    """A backbone's shared representation (MoRec's ``representation``)."""
    return output.representation


def build_model(name: str, num_users: int, num_items: int, history_length: int, *,
                embedding_dim: int = 64, dropout: float = 0.2,
                device: torch.device | None = None) -> nn.Module:
    """A backbone by name (``mf`` or ``sasrec``) with default hyper-parameters.

    ``history_length`` is the prepared dataset's (SASRec's maximum sequence length);
    ``dropout`` is SASRec's (MF has none).
    ``device`` is where the tables are created (CPU by default; create the model alike on
    every rank, with the same seed): ``meta`` leaves their allocation to row-wise
    sharding (see :func:`morec_rec.jobs.sharding.shard`).
    """
    # Imported here: the backbones import ModelOutput from this module.
    from morec_rec.jobs.models.mf import MatrixFactorization
    from morec_rec.jobs.models.sasrec import SASRec

    check_backbone(name, history_length, embedding_dim)
    if name == "mf":
        return MatrixFactorization(num_users, num_items, embedding_dim, device=device)
    return SASRec(num_items, history_length, embedding_dim, dropout=dropout, device=device)


def check_backbone(name: str, history_length: int, embedding_dim: int) -> None:
    """MorecError for a backbone that cannot learn from a dataset of ``history_length``
    with ``embedding_dim``: an unknown one, SASRec without histories, or SASRec below 3
    dimensions (its last layer norm over the embedding leaves one vector for every user
    at 1, two at 2)."""
    num_negatives(name)
    if name == "sasrec" and history_length < 1:
        raise MorecError("model = 'sasrec' needs histories: the dataset has history_length 0")
    if name == "sasrec" and embedding_dim < 3:
        raise MorecError(f"model = 'sasrec' needs embedding_dim >= 3, got {embedding_dim}: "
                         "its layer norm over the embedding gives every user one vector at "
                         "1, one of two at 2")


def num_negatives(name: str) -> int:
    """Negatives per training row for the backbone ``name``."""
    if name not in NEGATIVES:
        raise MorecError(f"unknown model {name!r} (expected one of {', '.join(NEGATIVES)})")
    return NEGATIVES[name]
