"""Validation signals for the adaptive objectives (docs/method.md).

Two measurements of one validation pass feed the sampler's mass updates:

* per-group mean validation loss: the model's own training loss on each validation
  example (eval mode, no gradient; the job's collate must make the same batch for the same
  ``batch_index`` on every rank, e.g. negatives seeded by it), summed per group of the
  example's row and divided by the group's own example count;
* top-K exposure over popularity groups: the ``exposure`` of the ranking metrics.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from morec_rec.collectives import all_reduce, place
from morec_rec.data import arrays
from morec_rec.plugin.eval.metrics import RankingMetrics
from morec_rec.plugin.hook import Examples, check_finite, model_output
from morec_rec.plugin.loader import Collate
from morec_rec.plugin.sampling.objectives import ValidationSignal
from morec_rec.plugin.sampling.sampled import SampledBatch
from morec_rec.plugin.sampling.sampler import OPTIONAL_COLUMNS
from morec_rec.plugin.segments import move

#: The row column that top-K exposure is counted over.
EXPOSURE_GROUPS = "popularity_group"
#: The row column whose groups the ranking metrics' per-group Hit is over.
HIT_GROUPS = "fairness_group"
#: Keeps the validation sample's draws apart from the sampler's, which share its seed
#: (``b"valid"`` as an integer: no epoch or stream number reaches it).
_SAMPLE_STREAM = 0x76616C6964


def sample_users(rows: pa.Table, size: int, seed: int) -> pa.Table:
    """``size`` of a split's ``rows`` (one a user), drawn without replacement from ``seed``
    and kept in their order; all of them where ``size`` is 0 or not below their number."""
    if not 0 < size < rows.num_rows:
        return rows
    rng = np.random.default_rng([seed, _SAMPLE_STREAM])
    return rows.take(np.sort(rng.choice(rows.num_rows, size, replace=False)))


def loss_groups(manifest: Mapping[str, Any]) -> dict[str, int]:
    """The row columns whose groups get a mean validation loss, with their group counts."""
    groups = manifest["groups"]
    return {"fairness_group": len(groups["fairness"]["names"]),
            "popularity_group": len(groups["popularity"]["q"])}


def rows_batch(rows: pa.Table, batch_index: int,
               columns: Collection[str] = OPTIONAL_COLUMNS) -> SampledBatch:
    """Rows of a prepared split as one SampledBatch of a single objective (segment 0),
    carrying the optional ``columns`` (as the sampler's batches do)."""
    def column(name: str, dtype: type = np.int64) -> torch.Tensor:
        return torch.from_numpy(rows[name].to_numpy().astype(dtype))

    def optional(name: str, dtype: type = np.int64) -> torch.Tensor | None:
        return column(name, dtype) if name in columns else None

    history: dict[str, torch.Tensor] = {}
    if "history" in columns:
        lists = rows["history"].combine_chunks()
        offsets = lists.offsets.to_numpy()
        gather, _ = arrays.ranges(offsets[:-1], np.diff(offsets))
        history = {
            "history_values": torch.from_numpy(lists.values.to_numpy().astype(np.int64)[gather]),
            "history_lengths": torch.from_numpy(np.diff(offsets).astype(np.int64))}
    n = rows.num_rows
    return SampledBatch(
        user_id=column("user_id"), item_id=column("item_id"),
        price=optional("price", np.float32), fairness_group=optional("fairness_group"),
        popularity_group=optional("popularity_group"), **history,
        objective=torch.zeros(n, dtype=torch.int64), starved=torch.zeros(1, dtype=torch.int64),
        batch_index=batch_index, epoch=0, masses_version=0,
    )


def group_losses(model: nn.Module, rows: pa.Table, collate: Collate,
                 num_groups: dict[str, int], *, examples: Examples = Examples(),
                 chunk_rows: int = 4096, columns: Collection[str] = OPTIONAL_COLUMNS,
                 device: torch.device = torch.device("cpu")) -> dict[str, np.ndarray]:
    """Mean per-example loss of ``model`` per group of each column in ``num_groups``.

    ``rows`` are validation rows, every rank passing all of them: they are cut into chunks
    of ``chunk_rows``, chunk c scored by rank c mod world size as batch index c, so the
    result does not depend on the number of ranks. ``model(batch) -> (loss, output)`` is
    called in whatever mode the caller set (eval, under ``torch.no_grad``); ``examples``
    finds the per-example losses and lays them over the rows; ``collate`` gets the
    optional ``columns`` of the rows, as the training batches carry them. A collective under
    ``torch.distributed``: every rank makes the same number of model calls. Returns
    float64 (num_groups[column],) per column, NaN for a group without examples; raises
    MorecError where a loss is NaN or infinite.
    """
    rank, world = place()
    chunks = -(-rows.num_rows // chunk_rows)
    sums = {c: np.zeros(g) for c, g in num_groups.items()}
    counts = {c: np.zeros(g) for c, g in num_groups.items()}
    for c in range(rank, -(-chunks // world) * world, world):
        padding = c >= chunks  # no chunk left for this rank: still join the collective
        chunk = rows.slice(0 if padding else c * chunk_rows, 1 if padding else chunk_rows)
        batch = move(collate(rows_batch(chunk, c, columns)), device)
        loss, output = model_output(model, batch)
        if padding:
            continue
        per_example = examples.losses(batch, loss, output, chunk.num_rows)
        loss = per_example.detach().double().cpu().numpy()
        for column, groups in num_groups.items():
            group = examples.expand(torch.from_numpy(chunk[column].to_numpy().astype(np.int64)),
                                    per_example).numpy()
            sums[column] += np.bincount(group, weights=loss, minlength=groups)
            counts[column] += np.bincount(group, minlength=groups)
    flat = torch.from_numpy(np.concatenate([*sums.values(), *counts.values()]))
    total, count = np.split(all_reduce(flat).numpy(), 2)
    # Every rank raises alike: the sums are the all-reduced ones.
    check_finite([f"{column} {g}" for column, n in num_groups.items() for g in range(n)],
                 total, "validation loss")
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(count > 0, total / count, np.nan)
    split_at = np.cumsum(list(num_groups.values()))[:-1]
    return dict(zip(num_groups, np.split(means, split_at)))


def validation_signal(group_loss: dict[str, np.ndarray],
                      metrics: RankingMetrics) -> ValidationSignal:
    """The signal the objectives' ``update`` reads, from one validation pass."""
    return ValidationSignal(group_loss=group_loss, exposure={EXPOSURE_GROUPS: metrics.exposure},
                            group_hit={HIT_GROUPS: metrics.group_hit})
