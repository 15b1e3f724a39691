"""What it costs to move a training batch from a loader worker to the trainer, two ways.

    python benchmarks/batch_transfer.py --out benchmarks/results/batch_transfer.json \\
        [--profile demo] [--batch-sizes 1024 4096 16384] [--repeats 3]

For each backbone's batches (MF: ids and 10 negatives a row; SASRec: also the history) at
each batch size, the base loader (one worker) is drained for one epoch with nothing else
running, its batches crossing to this process either by value (pickled arrays through the
worker's pipe) or through shared memory (torch's tensor sharing: a handshake per tensor).
Per batch after 3 warm-up batches: wall time, this process's CPU (what the trainer would
pay) and the worker's CPU, medians over ``--repeats`` alternating runs. The threshold
``morec_rec.jobs.collate.BY_VALUE_MAX_BYTES`` is set from these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import children_cpu_s, cpu_since  # the script beside this one

from morec_rec.config import TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import collate as batch_module
from morec_rec.jobs import distributed
from morec_rec.jobs.models import build_model
from morec_rec.jobs.train import training_loader

WARMUP = 3
#: The two ways, as values of BY_VALUE_MAX_BYTES (read in the worker when it pickles).
MODES = {"by_value": float("inf"), "shared_memory": -1}


def drain(dataset: PreparedDataset, config: TrainConfig, env: distributed.Environment,
          feature_names: tuple[str, ...]) -> dict[str, float]:
    """Per batch of one epoch after WARMUP: wall, trainer and worker CPU (ms), bytes."""
    sampler, loader = training_loader(dataset, config, env, feature_names)
    count = sampler.batches_per_epoch(config.num_workers) - WARMUP
    batches = iter(loader)
    for _ in range(WARMUP):
        next(batches)
    start, trainer, workers = time.perf_counter(), time.process_time(), children_cpu_s()
    nbytes = 0
    for _ in range(count):  # not to the epoch's end: the worker must still be there
        batch = next(batches)
        nbytes += sum(t.nbytes for t in (batch.features.values(), batch.features.lengths()))
    return {"wall_ms": 1e3 * (time.perf_counter() - start) / count,
            "trainer_cpu_ms": 1e3 * (time.process_time() - trainer) / count,
            "worker_cpu_ms": 1e3 * cpu_since(workers) / count,
            "bytes": nbytes / count, "batches": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = distributed.init()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / args.profile
        subprocess.run([sys.executable, "-m", "morec_rec.jobs.cli", "synth", "--profile",
                        args.profile, "--seed", "0", "--out", str(data)], check=True)
        dataset = PreparedDataset.open(data)
        manifest = dataset.manifest
        for model in ("mf", "sasrec"):
            feature_names = build_model(model, manifest["num_users"], manifest["num_items"],
                                        manifest["history_length"]).feature_names
            for batch_size in args.batch_sizes:
                config = TrainConfig(model=model, batch_size=batch_size, num_workers=1)
                runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
                for _ in range(args.repeats):
                    for mode, threshold in MODES.items():
                        batch_module.BY_VALUE_MAX_BYTES = threshold
                        runs[mode].append(drain(dataset, config, env, feature_names))
                row = {"model": model, "batch_size": batch_size,
                       "bytes_per_batch": runs["by_value"][0]["bytes"],
                       "batches": runs["by_value"][0]["batches"]}
                for mode, measured in runs.items():
                    row[mode] = {key: statistics.median(m[key] for m in measured)
                                 for key in ("wall_ms", "trainer_cpu_ms", "worker_cpu_ms")}
                results.append(row)
                print(f"{model} {batch_size:>6} rows, {row['bytes_per_batch'] / 2**20:.2f} MiB: "
                      + "; ".join(f"{mode} trainer {row[mode]['trainer_cpu_ms']:.2f} ms, worker "
                                  f"{row[mode]['worker_cpu_ms']:.2f} ms, wall "
                                  f"{row[mode]['wall_ms']:.2f} ms" for mode in MODES))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "profile": args.profile, "repeats": args.repeats, "warmup_batches": WARMUP,
        "results": results,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count()},
    }, indent=2) + "\n")
    distributed.shutdown()


if __name__ == "__main__":
    main()
