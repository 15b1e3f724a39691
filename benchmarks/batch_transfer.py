"""What it costs to move a training batch from a loader worker to the trainer, two ways.

    python benchmarks/batch_transfer.py --out benchmarks/results/batch_transfer.json \\
        [--profile demo] [--batch-sizes 1024 4096 16384] [--repeats 3]

For each kind of batch at each batch size, one epoch of a loader with one worker is
drained with nothing else running, its batches crossing to this process either by value
(pickled arrays through the worker's pipe) or through shared memory (torch's tensor
sharing: a handshake per tensor). The kinds: the reference backbones' ``TrainBatch`` from
the base loader (MF: ids and 10 negatives a row; SASRec: also the history), a plugin job's
batch from MoRec's loader (``plugin``: the example job's dict of user, item and negative
ids, ``integration/example/torch_morec_job.py``, in a ``SegmentedBatch``), and the weighted
sampler's own ``SampledBatch`` (``sampler``: four objectives, every column, as a job that
collates in the trainer receives it). Per batch after 3 warm-up batches: wall time, this
process's CPU (what the trainer would pay) and the worker's CPU, medians over ``--repeats``
alternating runs. The threshold ``morec_rec.plugin.segments.BY_VALUE_MAX_BYTES`` is set
from these numbers.
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

from typing import Any, Callable, Iterable

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader
from train_throughput import children_cpu_s, cpu_since  # the script beside this one

from morec_rec import MoRec, SamplerConfig
from morec_rec.config import TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import distributed
from morec_rec.jobs.models import build_model
from morec_rec.jobs.train import training_loader
from morec_rec.plugin import segments
from morec_rec.plugin.eval.ranking import PopularityScorer
from morec_rec.plugin.sampling.objectives import build_objectives
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "example"))
from torch_morec_job import make_batch  # noqa: E402

WARMUP = 3
#: The two ways, as values of BY_VALUE_MAX_BYTES (read in the worker when it pickles).
MODES = {"by_value": float("inf"), "shared_memory": -1}


def drain(loader: Iterable, count: int, nbytes: Callable[[Any], int]) -> dict[str, float]:
    """Per batch of ``count`` batches after WARMUP: wall, trainer and worker CPU (ms), bytes."""
    batches = iter(loader)
    for _ in range(WARMUP):
        next(batches)
    start, trainer, workers = time.perf_counter(), time.process_time(), children_cpu_s()
    total = 0
    for _ in range(count):  # not to the epoch's end: the worker must still be there
        total += nbytes(next(batches))
    return {"wall_ms": 1e3 * (time.perf_counter() - start) / count,
            "trainer_cpu_ms": 1e3 * (time.process_time() - trainer) / count,
            "worker_cpu_ms": 1e3 * cpu_since(workers) / count,
            "bytes": total / count, "batches": count}


def base_drain(dataset: PreparedDataset, model: str, batch_size: int,
               env: distributed.Environment) -> dict[str, float]:
    """The base loader's TrainBatches of backbone ``model``."""
    manifest = dataset.manifest
    feature_names = build_model(model, manifest["num_users"], manifest["num_items"],
                                manifest["history_length"]).feature_names
    config = TrainConfig(model=model, batch_size=batch_size, num_workers=1)
    sampler, loader = training_loader(dataset, config, env, feature_names)
    return drain(loader, sampler.batches_per_epoch(config.num_workers) - WARMUP,
                 lambda b: sum(t.nbytes for t in (b.features.values(), b.features.lengths())))


def plugin_drain(dataset: PreparedDataset, batch_size: int) -> dict[str, float]:
    """MoRec's loader with the example job's dict batches (four objectives)."""
    num_items = dataset.manifest["num_items"]
    morec = MoRec(dataset, lambda rows: make_batch(rows.user_id, rows.item_id, num_items,
                                                   seed=rows.batch_index),
                  scorer=PopularityScorer(dataset.items()["train_count"].to_numpy()),
                  sampler=SamplerConfig(sub_batch_size=batch_size // 4), num_workers=1)
    morec.set_epoch(0)
    return drain(morec.loader, morec.loader.batches_per_epoch - WARMUP,
                 lambda b: sum(t.nbytes for t in tree_flatten(b.batch)[0]))


def sampler_drain(dataset: PreparedDataset, batch_size: int) -> dict[str, float]:
    """The weighted sampler's SampledBatches through a plain DataLoader."""
    config = SamplerConfig(sub_batch_size=batch_size // 4)
    sampler = WeightedStreamSampler(
        dataset, build_objectives(config.objectives, dataset.manifest), config)
    sampler.set_epoch(0)
    return drain(DataLoader(sampler, batch_size=None, num_workers=1),
                 sampler.batches_per_epoch(1) - WARMUP,
                 lambda b: sum(t.nbytes for t in vars(b).values() if isinstance(t, torch.Tensor)))


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
        kinds: dict[str, Callable[[int], dict[str, float]]] = {
            "mf": lambda size: base_drain(dataset, "mf", size, env),
            "sasrec": lambda size: base_drain(dataset, "sasrec", size, env),
            "plugin": lambda size: plugin_drain(dataset, size),
            "sampler": lambda size: sampler_drain(dataset, size)}
        for kind, drained in kinds.items():
            for batch_size in args.batch_sizes:
                runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
                for _ in range(args.repeats):
                    for mode, threshold in MODES.items():
                        segments.BY_VALUE_MAX_BYTES = threshold
                        runs[mode].append(drained(batch_size))
                row = {"model": kind, "batch_size": batch_size,
                       "bytes_per_batch": runs["by_value"][0]["bytes"],
                       "batches": runs["by_value"][0]["batches"]}
                for mode, measured in runs.items():
                    row[mode] = {key: statistics.median(m[key] for m in measured)
                                 for key in ("wall_ms", "trainer_cpu_ms", "worker_cpu_ms")}
                results.append(row)
                print(f"{kind} {batch_size:>6} rows, {row['bytes_per_batch'] / 2**20:.2f} MiB: "
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
