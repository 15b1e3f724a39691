"""MoRec's loss hook on several ranks, under torchrun (gloo, CPU).

Run by ``tests/test_hook.py`` (and ``tests/test_signals.py`` with ``--data``)::

    python -m torch.distributed.run --nproc_per_node=N --master-port=PORT \\
        tests/dist/hook_job.py --out DIR [--data DIR]

Each rank writes ``rank<r>.json`` with these parts:

* ``fixed``: the hook under loss coefficients and training control over a fake model whose
  per-row losses are fixed, differ between ranks and have a different number of rows per
  objective on each rank; per step, this rank's rows (losses and segment ids), the loss
  the hook returned, and the coordinator's q, β and measured accuracy loss; then the
  hook's ``ObjectiveLosses.reduce()`` after ``REDUCE_AFTER`` steps and at the end.
* ``sampling``: the same rows through the hook under sampling coefficients: whether each
  step returned the model's own loss object, and the same two reductions.
* ``pipeline``: TrainPipelineSparseDist with ``custom_model_fwd=MoRecLoss`` (loss
  coefficients, training control) over an MF model whose tables are sharded row-wise
  (fused SGD), fed SegmentedBatches; per ``progress`` call, the type of what it returned,
  the rows, the coordinator's state and the hook's ``trained``; the reduction of every
  step's losses; then the table rows before and after. The fairness objective has
  preference 0 (q = 0) and its rows use users and items no other row uses, so those
  table rows must not move if the step's loss is the hook's.
* ``signals`` (with ``--data``, instead of the above): ``group_losses`` of an MF model
  (seed 0, D = 8, tables scaled ×10) with row-wise sharded tables on the
  dataset's validation rows, in chunks of ``CHUNK_ROWS`` rows spread over the ranks.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardedModule

from morec_rec.plugin.control.coordinator import Coordinator
from morec_rec.plugin.control.pi import PIGains
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs.models import ModelOutput, build_model, per_row_loss
from morec_rec.jobs.models.mf import MatrixFactorization
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.jobs import distributed
from morec_rec.jobs.collate import Collator, TrainBatch, features_kjt
from morec_rec.jobs.sharding import shard
from morec_rec.plugin.adapters import register_pipelineable
from morec_rec.plugin.segments import SegmentedBatch
from morec_rec.plugin.hook import Examples, MoRecLoss, ObjectiveLosses
from morec_rec.plugin.validation import group_losses, loss_groups

OBJECTIVES = ("accuracy", "revenue", "fairness")
#: Fixed losses: gains that move β by a visible amount per step (and saturate it at times).
FIXED_STEPS = 6
FIXED_TARGET = 2.0
FIXED_GAINS = PIGains(kp=0.2, ki=0.15, beta_min=0.6, beta_max=1.3)
#: The first ObjectiveLosses.reduce() comes after this many steps.
REDUCE_AFTER = 3
#: Pipeline: MF with 8 users and 16 items; users 6, 7 and items 14, 15 are fairness's alone.
PIPELINE_STEPS = 4
USERS, ITEMS = 8, 16
CHUNK_ROWS = 50


def fixed_rows(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank- and step-dependent per-row losses (multiples of 1/16: float32 sums are exact)
    and segment ids, with a different number of rows per objective on each rank."""
    rng = np.random.default_rng([rank, step])
    counts = [3 + step % 2, 1, 2] if rank == 0 else [1, 4, 2 + step % 3]
    segments = rng.permutation(np.repeat(np.arange(3), counts))
    losses = rng.integers(1, 64 * (1 + rank), len(segments)) / 16.0
    return torch.tensor(losses, dtype=torch.float32), torch.from_numpy(segments)


class FixedLosses(nn.Module):
    """A fake model: batch ``s`` is a step number; returns this rank's losses of step ``s``
    (as a leaf that requires grad, as a model's would)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.returned: tuple[torch.Tensor, ModelOutput] | None = None

    def forward(self, step: int) -> tuple[torch.Tensor, ModelOutput]:
        losses = fixed_rows(self.rank, step)[0].requires_grad_()
        self.returned = (losses.mean(), ModelOutput(losses))
        return self.returned


def run_fixed(rank: int) -> dict[str, dict]:
    coordinator = Coordinator(OBJECTIVES, (0.4, 0.6), 0.2, {"accuracy": FIXED_TARGET},
                              FIXED_GAINS)
    model = FixedLosses(rank)
    weighed = MoRecLoss(model, coordinator, Examples(per_row_loss), ObjectiveLosses(OBJECTIVES),
                        weigh=True, control_per_step=True)
    sampling = MoRecLoss(model, coordinator, Examples(per_row_loss), ObjectiveLosses(OBJECTIVES),
                         weigh=False, control_per_step=False)
    steps, own, reduced = [], [], {"fixed": [], "sampling": []}
    for step in range(FIXED_STEPS):
        losses, segments = fixed_rows(rank, step)
        loss, _ = weighed(SegmentedBatch(step, segments, step))
        steps.append({
            "per_row_loss": losses.tolist(),
            "segment": segments.tolist(),
            "loss": loss.item(),
            "dtype": str(loss.dtype),
            "q": coordinator.q.tolist(),
            "beta": coordinator.coefficients["accuracy"],
            "measured": coordinator.measured["accuracy"],
        })
        loss, _ = sampling(SegmentedBatch(step, segments, step))
        own.append(loss is model.returned[0])
        if step + 1 in (REDUCE_AFTER, FIXED_STEPS):
            reduced["fixed"].append(weighed.losses.reduce().tolist())
            reduced["sampling"].append(sampling.losses.reduce().tolist())
    return {"fixed": {"steps": steps, "reduced": reduced["fixed"]},
            "sampling": {"own": own, "reduced": reduced["sampling"]}}


def pipeline_batch(rank: int, step: int) -> SegmentedBatch:
    """Batch ``step``: objectives 0 and 1 on users 0-5 and items 0-13; objective 2 on users
    6, 7 and items 14, 15 alone; two negatives per row."""
    rng = np.random.default_rng([7, rank, step])
    rows = []  # (segment, user, item, negatives)
    for segment, count in ((0, 3), (1, 2), (2, 2)):
        for _ in range(count):
            if segment < 2:
                user = int(rng.integers(0, 6))
                item, *negatives = rng.choice(14, 3, replace=False).tolist()
            else:
                user = int(rng.integers(6, 8))
                item, *negatives = [14, 15] if rng.random() < 0.5 else [15, 14]
                negatives = negatives * 2
            rows.append((segment, user, item, negatives))
    ones = torch.ones(len(rows), dtype=torch.int32)
    features = features_kjt(MatrixFactorization.feature_names, {
        "user_id": (torch.tensor([r[1] for r in rows]), ones),
        "item_id": (torch.tensor([r[2] for r in rows]), ones),
        "neg_item_id": (torch.tensor([n for r in rows for n in r[3]]), 2 * ones),
    })
    return SegmentedBatch(TrainBatch(features), torch.tensor([r[0] for r in rows]), step)


def table_rows(model: MatrixFactorization) -> dict[str, list]:
    """Every row of both tables, read through the (sharded) model: a collective."""
    def ids(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(n), torch.ones(n, dtype=torch.int32)

    names = model.feature_names
    with torch.no_grad():
        return {"user": model.user_vectors(features_kjt(names, {"user_id": ids(USERS)})).tolist(),
                "item": model.item_vectors(features_kjt(names, {"item_id": ids(ITEMS)})).tolist()}


def run_pipeline(rank: int) -> dict:
    torch.manual_seed(0)  # the same initial tables on every rank
    model = MatrixFactorization(USERS, ITEMS, embedding_dim=4)
    dmp, optimizer = shard(model, torch.device("cpu"), lr=0.5,
                           table_optimizer=EmbOptimType.EXACT_SGD)
    before = table_rows(dmp.module)
    # Fairness has preference 0: q = (β, 0.2 · 1, 0).
    coordinator = Coordinator(OBJECTIVES, (1.0, 0.0), 0.2, {"accuracy": 0.5},
                              PIGains(kp=0.1, ki=0.05, beta_min=0.6, beta_max=1.3))
    hook = MoRecLoss(dmp, coordinator, Examples(per_row_loss), ObjectiveLosses(OBJECTIVES),
                     weigh=True, control_per_step=True)
    register_pipelineable()  # as MoRec does: TorchRec takes a SegmentedBatch
    pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"),
                                       custom_model_fwd=hook)
    segments: dict[int, list[int]] = {}  # the segment ids of each batch handed over

    def batches() -> Iterator[SegmentedBatch]:
        for step in itertools.count():
            batch = pipeline_batch(rank, step)
            segments[step] = batch.segment.tolist()
            yield batch

    stream = batches()
    steps = []
    for step in range(PIPELINE_STEPS):
        output = pipeline.progress(stream)
        steps.append({
            "type": type(output).__name__,
            "per_row_loss": output.per_row_loss.tolist(),
            "segment": segments[step],
            "measured": coordinator.measured["accuracy"],
            "q": coordinator.q.tolist(),
            "beta": coordinator.coefficients["accuracy"],
            "controller_steps": coordinator.state_dict()["controllers"]["accuracy"]["steps"],
            "trained": hook.trained,
        })
    pipeline.detach()
    return {"steps": steps, "reduced": hook.losses.reduce().tolist(),
            "sharded": isinstance(dmp.module.embeddings, ShardedModule),
            "before": before, "after": table_rows(dmp.module)}


def run_signals(data: Path) -> dict[str, list]:
    dataset = PreparedDataset.open(data)
    manifest = dataset.manifest
    torch.manual_seed(0)
    model = build_model("mf", manifest["num_users"], manifest["num_items"],
                        manifest["history_length"], embedding_dim=8).eval()
    with torch.no_grad():  # as tests/test_signals.py: losses that differ row to row
        for parameter in model.parameters():
            parameter.mul_(10)
    dmp, _ = shard(model, torch.device("cpu"), table_optimizer=EmbOptimType.EXACT_SGD)
    collate = Collator(model.feature_names,
                       NegativeSampler(dataset.items()["train_count"].to_numpy()), 10, seed=0)
    with torch.no_grad():
        losses = group_losses(dmp.module, dataset.split("valid"), collate,
                              loss_groups(manifest), examples=Examples(per_row_loss),
                              chunk_rows=CHUNK_ROWS)
    return {column: values.tolist() for column, values in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.data is not None:
        result = {"signals": run_signals(args.data)}
    else:
        result = {**run_fixed(rank), "pipeline": run_pipeline(rank)}
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
