"""SASRec's training step on CPU: its attention against torch's ``nn.MultiheadAttention``.

    python benchmarks/sasrec_step.py --out benchmarks/results/sasrec_step.json \\
        [--batch-size 1024] [--repeats 5] [--threads 1]

``morec_rec.jobs.models.sasrec`` computes attention with ``SelfAttention`` (the parameters
of ``nn.MultiheadAttention``, without its layout copies). This script times, in one
process at ``--threads`` intra-op threads, forward and backward of a batch (histories of
up to 50 items, 10 negatives a row, the item table of Ta-Feng's size, D = 64), in turn
within each repeat, after a warm-up:

- **reference**: the same model, the same weights, with ``nn.MultiheadAttention`` (fed
  the mask it takes) in place of each block's ``SelfAttention``;
- **project**: the model as it is.

Each time is the median over ``--repeats`` of the mean of 3 steps; ``speedup`` is the
reference's time over the project's. Both models' losses in eval mode are recorded
(equal up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from morec_rec.jobs.collate import TrainBatch, features_kjt
from morec_rec.jobs.models.sasrec import SASRec, SelfAttention

ITEMS, MAX_LEN, DIM, NEGATIVES = 15_000, 50, 64, 10
STEPS = 3


class TorchAttention(nn.Module):
    """``SelfAttention``'s call, computed by ``nn.MultiheadAttention`` with its weights."""

    def __init__(self, ours: SelfAttention) -> None:
        super().__init__()
        dim = ours.out_proj.in_features
        self.attention = nn.MultiheadAttention(dim, ours.num_heads, dropout=ours.dropout,
                                               batch_first=True)
        self.attention.load_state_dict(ours.state_dict())

    def forward(self, queries: torch.Tensor, x: torch.Tensor,
                allowed: torch.Tensor) -> torch.Tensor:
        mask = ~allowed.expand(-1, self.attention.num_heads, -1, -1).flatten(0, 1)
        return self.attention(queries, x, x, attn_mask=mask, need_weights=False)[0]


def with_torch_attention(model: SASRec) -> SASRec:
    """A copy of ``model`` whose blocks attend through ``nn.MultiheadAttention``."""
    copy = SASRec(ITEMS, MAX_LEN, DIM)
    copy.load_state_dict(model.state_dict())
    for block in copy.encoder.blocks:
        block.attention = TorchAttention(block.attention)
    return copy


def batch(batch_size: int) -> TrainBatch:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, MAX_LEN + 10, (batch_size,), generator=generator)
    history = torch.randint(ITEMS, (int(lengths.sum()),), generator=generator)
    ones = torch.ones(batch_size, dtype=torch.int32)
    return TrainBatch(features_kjt(SASRec.feature_names, {
        "history": (history, lengths.int()),
        "item_id": (torch.randint(ITEMS, (batch_size,), generator=generator), ones),
        "neg_item_id": (torch.randint(ITEMS, (batch_size * NEGATIVES,), generator=generator),
                        ones * NEGATIVES)}))


def step_of(model: SASRec, inputs: TrainBatch) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad()
        model(inputs)[0].backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    project = SASRec(ITEMS, MAX_LEN, DIM)
    models = {"reference": with_torch_attention(project), "project": project}
    inputs = batch(args.batch_size)
    with torch.no_grad():
        losses = {name: float(m.eval()(inputs)[0]) for name, m in models.items()}
    steps = {name: step_of(m.train(), inputs) for name, m in models.items()}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(STEPS):
                step()
            times[name].append((time.perf_counter() - start) / STEPS)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "seconds_per_step": median,
        "speedup": median["reference"] / median["project"],
        "eval_loss": losses,
        "batch_size": args.batch_size, "repeats": args.repeats, "steps_per_timing": STEPS,
        "shape": {"items": ITEMS, "max_len": MAX_LEN, "dim": DIM, "negatives": NEGATIVES},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "threads": args.threads},
    }
    print(f"reference {median['reference']:.3f} s, project {median['project']:.3f} s a step: "
          f"speedup {result['speedup']:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
