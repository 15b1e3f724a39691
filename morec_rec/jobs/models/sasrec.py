"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from morec_rec.jobs.models import ModelOutput

if TYPE_CHECKING:
    from morec_rec.jobs.collate import TrainBatch


class SASRec(nn.Module):
    """The sequence encoder of the original SASRec, trained one (history, item) row at a time.

    A row's user representation is the encoder's output at the most recent position of
    its history (the last ``max_len`` items); a user with an empty history gets a learned
    vector instead. Scores are dot products with the item table, which also embeds the
    history (one table, features ``history``, ``item_id`` and ``neg_item_id``). The
    per-row loss is binary cross-entropy with n negatives::

        −log σ(s⁺) − mean_j log(1 − σ(s⁻_j))

    The original trains on every position of a sequence at once; here each training row
    already is one position (its item, with the history before it), so the loss is the
    same sum taken over rows.

    Args:
        num_items: item table rows.
        max_len: the longest history used (the prepared dataset's ``history_length``).
        embedding_dim: D.
        num_blocks, num_heads, dropout: of the self-attention stack (original defaults).
        device: where the item table is created; ``meta`` leaves it to row-wise
            sharding. The dense layers are created on CPU.
    """

    feature_names = ("history", "item_id", "neg_item_id")

    def __init__(self, num_items: int, max_len: int = 50, embedding_dim: int = 64, *,
                 num_blocks: int = 2, num_heads: int = 1, dropout: float = 0.2,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.embeddings = EmbeddingCollection(
            tables=[EmbeddingConfig(num_embeddings=num_items, embedding_dim=embedding_dim,
                                    name="item", feature_names=list(self.feature_names))],
            device=device,
        )
        self.encoder = SequenceEncoder(max_len, embedding_dim, num_blocks, num_heads, dropout)

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, ModelOutput]:
        """Mean loss over the batch's B rows, and the per-row losses.

        ``batch.features``: a ``history`` (possibly empty), one ``item_id`` and the same
        number n ≥ 1 of ``neg_item_id`` per row.
        """
        embedded = self.embeddings(batch.features)
        users = self.encoder(embedded["history"])  # (B, D)
        positives, negatives = embedded["item_id"].values(), embedded["neg_item_id"].values()
        positive = (users * positives).sum(-1)  # (B,)
        negative = (negatives.unflatten(0, (users.size(0), -1))
                    * users.unsqueeze(1)).sum(-1)  # (B, n)
        # −log σ(x) = softplus(−x) and −log(1 − σ(x)) = softplus(x)
        per_row = F.softplus(-positive) + F.softplus(negative).mean(-1)
        return per_row.mean(), ModelOutput(per_row, (users, positives, negatives))

    def user_vectors(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """float (B, D): the representations of the rows' ``history``."""
        return self.encoder(self.embeddings(features)["history"])

    def item_vectors(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """float (N, D): the item embeddings of ``item_id`` (one id per row)."""
        return self.embeddings(features)["item_id"].values()


class SequenceEncoder(nn.Module):
    """SASRec's causal self-attention stack: embedded histories -> one vector per row.

    As in the original: item embeddings scaled by sqrt(D) plus learned absolute positions
    (the most recent item always at the last position), dropout, then blocks of
    ``LayerNorm``-ed queries attending causally over the sequence (with the residual from
    the normalised queries) and a point-wise feed-forward network with a residual, padded
    positions zeroed after each block, and a final LayerNorm.

    Padding never reaches a real position: histories are right-aligned, and attention
    keys are the row's real positions up to the query (a padded query sees only itself,
    so no softmax row is empty). The output is that of the last position; rows with an
    empty history get the learned vector ``empty`` instead. Only the last position is
    read, so the last block computes its query alone (exact: a block mixes positions only
    through the keys and values it attends to).
    """

    def __init__(self, max_len: int, dim: int, num_blocks: int, num_heads: int,
                 dropout: float) -> None:
        super().__init__()
        self.max_len = max_len
        self.positions = nn.Parameter(torch.empty(max_len, dim))
        self.empty = nn.Parameter(torch.empty(dim))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim, eps=1e-8)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.positions, std=0.02)
        nn.init.zeros_(self.empty)

    def forward(self, history: JaggedTensor) -> torch.Tensor:
        """``history``: values float (T, D), lengths (B,); returns float (B, D)."""
        lengths = history.lengths().long()
        items, valid = right_aligned(history.values(), lengths, self.max_len)
        x = items * math.sqrt(items.size(-1)) + self.positions
        keep = valid.unsqueeze(-1).to(x.dtype)
        x = self.dropout(x) * keep
        diagonal = torch.eye(self.max_len, dtype=torch.bool, device=x.device)
        allowed = (valid.unsqueeze(1) | diagonal).tril().unsqueeze(1)  # (B, 1, L queries, L keys)
        *blocks, final = self.blocks
        for block in blocks:
            x = block(x, allowed) * keep
        last = self.norm(final(x, allowed[:, :, -1:], last_only=True)[:, -1])
        return torch.where((lengths > 0).unsqueeze(-1), last, self.empty)


class _Block(nn.Module):
    """One SASRec block: x ← LN(x) + Attn(LN(x), x, x); x ← LN(x) + FFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-8)
        self.attention = SelfAttention(dim, num_heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(dim, eps=1e-8)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(dim, dim), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """x: float (B, L, D); allowed: bool (B, 1, Q, L), True where a query sees a key.

        Returns (B, Q, D): every position (Q = L), or with ``last_only`` the last (Q = 1).
        """
        queries = self.attention_norm(x[:, -1:] if last_only else x)
        x = self.feed_forward_norm(queries + self.attention(queries, x, allowed))
        return x + self.feed_forward(x)


class SelfAttention(nn.Module):
    """Multi-head attention of queries over a sequence that gives both keys and values.

    What ``nn.MultiheadAttention(dim, num_heads, dropout, batch_first=True)`` computes
    for ``(queries, x, x)``, with its parameters, their names and their initialisation (so
    that either module's state loads into the other), but in the batch-first layout
    throughout: ``scaled_dot_product_attention`` reads the projections as views, where
    ``nn.MultiheadAttention`` copies them to and from a sequence-first layout.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))  # queries, keys, values
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, queries: torch.Tensor, x: torch.Tensor,
                allowed: torch.Tensor) -> torch.Tensor:
        """queries: float (B, Q, D); x: float (B, L, D); allowed: bool, broadcastable to
        (B, heads, Q, L), True where a query attends to a key. Returns float (B, Q, D)."""
        weight, bias = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q = F.linear(queries, weight[0], bias[0])
        k, v = F.linear(x, weight[1], bias[1]), F.linear(x, weight[2], bias[2])
        attended = F.scaled_dot_product_attention(
            *(t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v)),
            attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(attended.transpose(1, 2).flatten(2))


def right_aligned(values: torch.Tensor, lengths: torch.Tensor,
                  max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads jagged rows to ``max_len``, keeping each row's last ``max_len`` values.

    Args:
        values: (T, D), the rows' values laid end to end, each row oldest first.
        lengths: int64 (B,), summing to T.

    Returns:
        float (B, max_len, D) with each row's values at the end (zeros before them), and
        bool (B, max_len), True at the positions that hold a value.
    """
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=values.size(0))
    ends = torch.repeat_interleave(offsets[1:], lengths, output_size=values.size(0))
    # Reverse each row (most recent first) so that padding cuts the oldest values off.
    index = starts + ends - 1 - torch.arange(values.size(0), device=values.device)
    # index_select, not values[index]: on CPU, gather and backward cost a third as much.
    padded = torch.ops.fbgemm.jagged_to_padded_dense(values.index_select(0, index), [offsets],
                                                     [max_len], 0.0)
    position = torch.arange(max_len, device=values.device)
    valid = position >= max_len - lengths.clamp(max=max_len).unsqueeze(-1)
    return padded.flip(1), valid
