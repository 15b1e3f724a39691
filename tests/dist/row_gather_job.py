"""RowWiseAdam's gradient averaging under torchrun (gloo, CPU).

Run by ``tests/test_row_wise_adam.py``::

    python -m torch.distributed.run --nproc_per_node=2 --master-port=PORT \\
        tests/dist/row_gather_job.py --out DIR

Rank r looks up rows ``IDS[r]`` of a 6×2 table (sparse gradient: 1 per use of a row,
all-ones upstream), and writes ``rank<r>.json`` with the gradient ``all_gather_rows``
returns (summed into a dense table), and the table after one ``RowWiseAdam`` step; then
the 4×2 table ``START`` after a ``RowWiseAdam`` step on each of ``STEPS`` (rank r looks
up ``STEPS[k][r]``, the rows' sum the loss).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from morec_rec.jobs.row_wise_adam import RowWiseAdam, all_gather_rows, sum_rows

#: Rank 0 touches rows 1 (twice) and 4; rank 1 touches rows 4 and 5, three rows in all.
IDS = ([1, 1, 4], [4, 5])
START = [[1.0, -1.0], [2.0, 0.5], [-3.0, 1.0], [0.0, 2.0]]
#: Touching, over both ranks, 3 of 4 rows (updated over the table), then 1 (summed over
#: the table, updated by row), then all 4 (by row, then over the table).
STEPS = (([0, 1, 1], [2, 1]), ([3], [3, 3]), ([0, 1], [2, 3]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    table = nn.Embedding.from_pretrained(torch.zeros(6, 2), freeze=False, sparse=True)
    table(torch.tensor(IDS[rank])).sum().backward()
    grad, scratch = table.weight.grad, torch.empty(6, dtype=torch.long)
    rows, sums = all_gather_rows(*sum_rows(grad._indices()[0], grad._values(), scratch),
                                 scratch)
    gathered = torch.zeros(6, 2).index_add_(0, rows, sums)
    RowWiseAdam(table.parameters(), lr=0.1).step()
    steps = nn.Embedding.from_pretrained(torch.tensor(START), freeze=False, sparse=True)
    optimizer = RowWiseAdam(steps.parameters(), lr=0.1)
    for ids in STEPS:
        optimizer.zero_grad()
        steps(torch.tensor(ids[rank])).sum().backward()
        optimizer.step()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "gathered": gathered.to_dense().tolist(),
        "table": table.weight.detach().tolist(),
        "steps": steps.weight.detach().tolist()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
