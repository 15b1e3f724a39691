"""Full-ranking evaluation on several ranks, under torchrun (gloo, CPU).

Run by ``tests/test_ranking.py``::

    python -m torch.distributed.run --nproc_per_node=N --master-port=PORT \\
        tests/dist/eval_job.py --data DIR --out DIR

Each rank evaluates the dataset's validation task, in chunks of ``CHUNK_USERS``, with a
popularity scorer that meets the other ranks in a collective at every call (as a sharded
model's lookups do): the whole task (``whole``), its own share of it (``share``), and its
share of a task of the first user alone (``first_user``: rank 0 scores it, rank 1 pads);
then its share again with the last user's scores NaN at every item (the last rank's
user), and the other rank's share. Each rank writes ``rank<r>.json``: the metrics, and
the errors of the last two.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

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


def error(evaluation: Callable[[], object]) -> str | None:
    """The MorecError that ``evaluation`` raises, or None."""
    try:
        evaluation()
    except MorecError as e:
        return str(e)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = distributed.init()
    dataset = PreparedDataset.open(args.data)
    rows = dataset.split("valid")
    train_count = dataset.items()["train_count"].to_numpy()
    scorer = CollectiveScorer(train_count)
    share = load_task(dataset, "valid", rank=env.rank, world_size=env.world_size)
    tasks = {"whole": load_task(dataset, "valid"), "share": share,
             "first_user": load_task(dataset, "valid", rows.slice(0, 1), rank=env.rank,
                                     world_size=env.world_size)}
    metrics = {name: evaluate(scorer, task, chunk_users=CHUNK_USERS).as_dict()
               for name, task in tasks.items()}
    last_user = CollectiveScorer(train_count, rows["user_id"][-1].as_py())
    other = load_task(dataset, "valid", rank=(env.rank + 1) % env.world_size,
                      world_size=env.world_size)
    errors = {"nan": error(lambda: evaluate(last_user, share, chunk_users=CHUNK_USERS)),
              "other_share": error(lambda: evaluate(scorer, other))}
    (args.out / f"rank{env.rank}.json").write_text(
        json.dumps({"metrics": metrics, "errors": errors}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
