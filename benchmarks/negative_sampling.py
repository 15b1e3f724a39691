"""Negative sampling's CPU a batch: the reference collate's ``NegativeSampler`` with its
default guide (``BUCKETS_PER_ITEM`` buckets an item) against a guide of one bucket an item,
whose draws are the same.

    python benchmarks/negative_sampling.py --out benchmarks/results/negative_sampling.json \\
        [--profiles demo xbox] [--batch-size 1024] [--batches 200] [--rounds 9]

For each synthetic profile (seed 0), one process, one thread:

* ``sample_us``: ``NegativeSampler.sample`` (MF's 10 negatives a row) on batches of the
  training log's own items as positives (the first shard's, in order, so that popular
  positives collide with their negatives as in a job), each batch's generator seeded as
  the collate seeds it (seed, rank, batch index). The two guides' draws are compared
  first: they must be equal.
* ``loader_us``: the reference job's MF loader in process (``training_loader``, no worker:
  the sampler and the collate), its first ``--batches`` batches of epoch 0, with each
  guide in its collate.

The two take turns, ``--batches`` batches a block, for ``--rounds`` rounds (the order
alternating); each round gives the CPU time a batch of each and their ratio (default over
one bucket an item: below 1 is the default's saving); medians over the rounds, and the
ratios' range.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
from synthetic import synth  # the script beside this one

from morec_rec.config import TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs.distributed import Environment
from morec_rec.jobs.models import num_negatives
from morec_rec.jobs.models.mf import MatrixFactorization
from morec_rec.jobs.models.negatives import BUCKETS_PER_ITEM, NegativeSampler
from morec_rec.jobs.train import training_loader

#: The guides compared, by key in the results: buckets an item.
GUIDES = {"default": BUCKETS_PER_ITEM, "one_an_item": 1}


def cpu_us_a_batch(work: Callable[[], int]) -> float:
    """CPU microseconds a batch of ``work``, which returns the batches it made."""
    start = time.process_time()
    batches = work()
    return 1e6 * (time.process_time() - start) / batches


def summary(rounds: list[dict[str, float]]) -> dict[str, object]:
    """Medians of each guide's time a batch, and of the default's ratio to one an item."""
    ratios = [r["default"] / r["one_an_item"] for r in rounds]
    return {**{name: statistics.median(r[name] for r in rounds) for name in GUIDES},
            "ratio": {"median": statistics.median(ratios), "min": min(ratios),
                      "max": max(ratios)}}


def measure(data: Path, batch_size: int, batches: int, rounds: int) -> dict[str, object]:
    dataset = PreparedDataset.open(data)
    counts = dataset.item_columns(["train_count"])["train_count"]
    samplers = {name: NegativeSampler(counts, buckets_per_item=per_item)
                for name, per_item in GUIDES.items()}
    items = pq.read_table(dataset.train_files[0], columns=["item_id"])["item_id"].to_numpy()
    positives = [items[i * batch_size:(i + 1) * batch_size].astype(np.int64)
                 for i in range(min(batches, len(items) // batch_size))]
    seed, negatives = TrainConfig.seed, num_negatives("mf")

    def draws(sampler: NegativeSampler) -> list[np.ndarray]:
        return [sampler.sample(rows, negatives, np.random.default_rng([seed, 0, index]))
                for index, rows in enumerate(positives)]

    reference = draws(samplers["one_an_item"])
    if not all(np.array_equal(a, b) for a, b in zip(draws(samplers["default"]), reference)):
        raise AssertionError(f"{data}: the guides draw different negatives")

    config = TrainConfig(model="mf", batch_size=batch_size, num_workers=0)
    loader = training_loader(dataset, config, Environment(0, 1, torch.device("cpu")),
                             MatrixFactorization.feature_names)

    def load(sampler: NegativeSampler) -> int:
        loader.collate.negatives = sampler
        loader.set_epoch(0)
        return sum(1 for _ in itertools.islice(loader, batches))

    sample_rounds, loader_rounds = [], []
    for number in range(rounds):
        order = list(GUIDES) if number % 2 == 0 else list(reversed(GUIDES))
        sample_rounds.append({name: cpu_us_a_batch(lambda: len(draws(samplers[name])))
                              for name in order})
        loader_rounds.append({name: cpu_us_a_batch(lambda: load(samplers[name]))
                              for name in order})
    return {"items": len(counts), "buckets_per_item": GUIDES, "batches": len(positives),
            "sample_us": summary(sample_rounds), "loader_us": summary(loader_rounds),
            "rounds": {"sample_us": sample_rounds, "loader_us": loader_rounds}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profiles", nargs="+", default=["demo", "xbox"])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=200, help="batches a timed block")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for profile in args.profiles:
            results[profile] = measure(synth(profile, Path(tmp)), args.batch_size,
                                       args.batches, args.rounds)
            row = results[profile]
            print(f"{profile}: {row['items']:,} items; sample "
                  f"{row['sample_us']['default']:.0f} us a batch against "
                  f"{row['sample_us']['one_an_item']:.0f} at a bucket an item "
                  f"({row['sample_us']['ratio']['median']:.2f}); loader "
                  f"{row['loader_us']['default']:.0f} against "
                  f"{row['loader_us']['one_an_item']:.0f} "
                  f"({row['loader_us']['ratio']['median']:.2f})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "batch_size": args.batch_size, "negatives": num_negatives("mf"), "batches": args.batches,
        "rounds": args.rounds, "results": results,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "numpy": np.__version__, "cpus": os.cpu_count(), "threads": 1},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
