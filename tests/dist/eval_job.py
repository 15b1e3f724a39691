"""Full-ranking evaluation on several ranks, under torchrun (gloo, CPU).

Run by ``tests/test_ranking.py``::

    python -m torch.distributed.run --nproc_per_node=N --master-port=PORT \\
        tests/dist/eval_job.py --data DIR --out DIR

Each rank evaluates the dataset's validation task, in chunks of ``CHUNK_USERS``, with a
popularity scorer that meets the other ranks in a collective at every call (as a sharded
model's lookups do); then again with the last user's scores NaN at every item (the last
rank's user). Each rank writes ``rank<r>.json``: the metrics, and the second evaluation's
error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.jobs import distributed
from morec_rec.plugin.eval.ranking import PopularityScorer, RankingTask, evaluate, load_task

CHUNK_USERS = 7


class CollectiveScorer:
    """A popularity scorer whose calls are collectives; ``nan_user``'s scores are NaN."""

    def __init__(self, train_count: np.ndarray, nan_user: int | None = None) -> None:
        self.scorer = PopularityScorer(train_count)
        self.nan_user = nan_user

    def __call__(self, users: RankingTask) -> torch.Tensor:
        dist.all_reduce(torch.zeros(1))
        scores = self.scorer(users)
        scores[torch.from_numpy(users.user_id == self.nan_user)] = torch.nan
        return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = distributed.init()
    dataset = PreparedDataset.open(args.data)
    task = load_task(dataset, "valid")
    train_count = dataset.items()["train_count"].to_numpy()
    metrics = evaluate(CollectiveScorer(train_count), task, chunk_users=CHUNK_USERS)
    try:
        evaluate(CollectiveScorer(train_count, int(task.user_id[-1])), task,
                 chunk_users=CHUNK_USERS)
        error = None
    except MorecError as e:
        error = str(e)
    (args.out / f"rank{env.rank}.json").write_text(
        json.dumps({"metrics": metrics.as_dict(), "error": error}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
