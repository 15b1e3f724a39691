"""What it costs to move a training batch from a loader worker to the trainer, three ways.

    python benchmarks/batch_transfer.py --out benchmarks/results/batch_transfer.json \\
        [--profile demo] [--batch-sizes 1024 4096 16384] [--repeats 3] [--step-ms 3]

For each kind of batch at each batch size, one epoch of a loader with one worker, one
batch a request, is drained, the trainer's step between two batches stood for by a sleep
of ``--step-ms`` (its core left to nothing else), the batches crossing to this process by
value (pickled arrays through the worker's result pipe, ``by_value``: the pipe sized to hold
``morec_rec.plugin.workers.RESULT_PIPE_BYTES``, as the package's loaders size it;
``by_value_64k``: left at Linux's 64 KiB) or through shared memory (torch's tensor
sharing: a handshake per tensor; ``shared_memory``). The kinds: the reference backbones'
``TrainBatch`` from the base loader (MF: ids and 10 negatives a row; SASRec: also the
history), a plugin job's batch from MoRec's loader (``plugin``: the example job's dict of
user, item and negative ids, ``integration/example/torch_morec_job.py``, in a
``SegmentedBatch``), and the weighted sampler's own ``SampledBatch`` (``sampler``: four
objectives, every column, as a job that collates in the trainer receives it). Per batch
after 3 warm-up batches: ``receive_ms``, the trainer's wait for the next batch (the time
in ``next``; its median), its CPU and the worker's, medians over ``--repeats`` alternating
runs. The threshold ``morec_rec.plugin.segments.BY_VALUE_MAX_BYTES`` is set from these
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from typing import Any, Callable, Iterable

import torch
from torch.utils._pytree import tree_flatten
from synthetic import synth  # the script beside this one
from train_throughput import children_cpu_s, cpu_since  # the script beside this one

from morec_rec import MoRec, SamplerConfig
from morec_rec.config import TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import distributed
from morec_rec.jobs.models import build_model
from morec_rec.jobs.train import training_loader
from morec_rec.plugin import segments, workers
from morec_rec.plugin.eval.ranking import PopularityScorer
from morec_rec.plugin.sampling.objectives import build_objectives
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "example"))
from torch_morec_job import make_batch  # noqa: E402

WARMUP = 3
#: The three ways, as values of (BY_VALUE_MAX_BYTES, RESULT_PIPE_BYTES), read in the worker
#: when it pickles and by the loader when its iteration starts.
MODES = {"by_value": (float("inf"), workers.RESULT_PIPE_BYTES),
         "by_value_64k": (float("inf"), 1 << 16),
         "shared_memory": (-1, workers.RESULT_PIPE_BYTES)}


def drain(loader: Iterable, count: int, nbytes: Callable[[Any], int],
          step_s: float) -> dict[str, float]:
    """Per batch of ``count`` batches after WARMUP, with a step of ``step_s`` seconds before
    each: the trainer's wait (median), its CPU and the worker's (ms), bytes."""
    batches = iter(loader)
    for _ in range(WARMUP):
        next(batches)
    trainer, worker = time.process_time(), children_cpu_s()
    total, waits = 0, []
    for _ in range(count):  # not to the epoch's end: the worker must still be there
        time.sleep(step_s)
        start = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - start)
        total += nbytes(batch)
    return {"receive_ms": 1e3 * statistics.median(waits),
            "trainer_cpu_ms": 1e3 * (time.process_time() - trainer) / count,
            "worker_cpu_ms": 1e3 * cpu_since(worker) / count,
            "bytes": total / count, "batches": count}


def base_drain(dataset: PreparedDataset, model: str, batch_size: int,
               env: distributed.Environment, step_s: float) -> dict[str, float]:
    """The base loader's TrainBatches of backbone ``model``."""
    manifest = dataset.manifest
    feature_names = build_model(model, manifest["num_users"], manifest["num_items"],
                                manifest["history_length"]).feature_names
    config = TrainConfig(model=model, batch_size=batch_size, num_workers=1,
                         batches_per_request=1)
    loader = training_loader(dataset, config, env, feature_names)
    return drain(loader, loader.batches_per_epoch - WARMUP,
                 lambda b: sum(t.nbytes for t in (b.features.values(), b.features.lengths())),
                 step_s)


def plugin_drain(dataset: PreparedDataset, batch_size: int, step_s: float) -> dict[str, float]:
    """MoRec's loader with the example job's dict batches (four objectives)."""
    num_items = dataset.manifest["num_items"]
    morec = MoRec(dataset, lambda rows: make_batch(rows.user_id, rows.item_id, num_items,
                                                   seed=rows.batch_index),
                  scorer=PopularityScorer(dataset.item_columns(["train_count"])["train_count"]),
                  sampler=SamplerConfig(sub_batch_size=batch_size // 4), num_workers=1)
    morec.set_epoch(0)
    return drain(morec.loader, morec.loader.batches_per_epoch - WARMUP,
                 lambda b: sum(t.nbytes for t in tree_flatten(b.batch)[0]), step_s)


def sampler_drain(dataset: PreparedDataset, batch_size: int, step_s: float) -> dict[str, float]:
    """The weighted sampler's SampledBatches through the package's DataLoader."""
    config = SamplerConfig(sub_batch_size=batch_size // 4)
    sampler = WeightedStreamSampler(
        dataset, build_objectives(config.objectives, dataset.manifest), config)
    sampler.set_epoch(0)
    return drain(workers.WorkerLoader(sampler, batch_size=None, num_workers=1),
                 sampler.batches_per_epoch(1) - WARMUP,
                 lambda b: sum(t.nbytes for t in vars(b).values() if isinstance(t, torch.Tensor)),
                 step_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=3.0,
                        help="the trainer's step between two batches (a sleep)")
    args = parser.parse_args()
    step_s = args.step_ms / 1e3
    env = distributed.init()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = synth(args.profile, Path(tmp))
        dataset = PreparedDataset.open(data)
        kinds: dict[str, Callable[[int], dict[str, float]]] = {
            "mf": lambda size: base_drain(dataset, "mf", size, env, step_s),
            "sasrec": lambda size: base_drain(dataset, "sasrec", size, env, step_s),
            "plugin": lambda size: plugin_drain(dataset, size, step_s),
            "sampler": lambda size: sampler_drain(dataset, size, step_s)}
        for kind, drained in kinds.items():
            for batch_size in args.batch_sizes:
                runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
                for _ in range(args.repeats):
                    for mode, (threshold, pipe) in MODES.items():
                        segments.BY_VALUE_MAX_BYTES, workers.RESULT_PIPE_BYTES = threshold, pipe
                        runs[mode].append(drained(batch_size))
                row = {"model": kind, "batch_size": batch_size,
                       "bytes_per_batch": runs["by_value"][0]["bytes"],
                       "batches": runs["by_value"][0]["batches"]}
                for mode, measured in runs.items():
                    row[mode] = {key: statistics.median(m[key] for m in measured)
                                 for key in ("receive_ms", "trainer_cpu_ms", "worker_cpu_ms")}
                results.append(row)
                print(f"{kind} {batch_size:>6} rows, {row['bytes_per_batch'] / 2**20:.2f} MiB: "
                      + "; ".join(f"{mode} trainer {row[mode]['trainer_cpu_ms']:.2f} ms, worker "
                                  f"{row[mode]['worker_cpu_ms']:.2f} ms, receive "
                                  f"{row[mode]['receive_ms']:.3f} ms" for mode in MODES))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "profile": args.profile, "repeats": args.repeats, "warmup_batches": WARMUP,
        "step_ms": args.step_ms,
        "results": results,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count()},
    }, indent=2) + "\n")
    distributed.shutdown()


if __name__ == "__main__":
    main()
