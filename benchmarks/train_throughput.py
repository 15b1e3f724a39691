"""Training samples/s and evaluation users/s of both backbones, at the demo and xbox profiles.

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json \\
        [--profiles demo xbox] [--steps 100] [--repeats 3]

For each profile (generated with seed 0) and backbone, in one process (a process group of
one, as ``morec-rec train`` without torchrun): ``--steps`` steps of the training pipeline
(``TrainPipelineSparseDist``, batch 1024, one loader worker) after 20 warm-up steps, at
the start of each of ``--repeats`` epochs, then as many full-ranking evaluations of up to
``--eval-users`` validation users; the medians are reported, each block's rate beside
them. These are the base rates that MoRec's overhead is later compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from synthetic import synth  # the script beside this one

from morec_rec.config import TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import distributed
from morec_rec.jobs.models.scorer import ModelScorer
from morec_rec.jobs.train import build_sharded, training_loader
from morec_rec.plugin.eval.ranking import evaluate, load_task

WARMUP = 20


def train_rates(dataset: PreparedDataset, config: TrainConfig, steps: int, repeats: int,
                env: distributed.Environment) -> tuple[list[float], torch.nn.Module]:
    """Samples/s of ``steps`` steps at the start of each of ``repeats`` epochs; the model."""
    model, optimizer = build_sharded(config, dataset, env)
    loader = training_loader(dataset, config, env, model.module.feature_names)
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
    rates = []
    for epoch in range(repeats):
        loader.set_epoch(epoch)
        rates.append(timed_steps(pipeline, loader, steps, config.batch_size).samples_per_s)
    return rates, model


class StepTiming(NamedTuple):
    """``steps`` pipeline steps: samples/s, and CPU ms per step of this process (the
    trainer: every thread, the weight store's server included) and of its child processes
    (the loader workers)."""

    samples_per_s: float
    trainer_cpu_ms: float
    loader_cpu_ms: float


def timed_steps(pipeline: TrainPipelineSparseDist, loader: Iterable, steps: int,
                batch_size: int) -> StepTiming:
    """Times ``steps`` pipeline steps after ``WARMUP`` steps; detaches after."""
    batches = iter(loader)
    for _ in range(WARMUP):
        pipeline.progress(batches)
    start, trainer, workers = time.perf_counter(), time.process_time(), children_cpu_s()
    for _ in range(steps):
        pipeline.progress(batches)
    seconds = time.perf_counter() - start
    timing = StepTiming(steps * batch_size / seconds,
                        1e3 * (time.process_time() - trainer) / steps,
                        1e3 * cpu_since(workers) / steps)
    pipeline.detach()
    return timing


def children_cpu_s() -> dict[int, float]:
    """CPU seconds of each live thread of this process's child processes, by thread id:
    the scheduler's run time in ns (``/proc/<pid>/task/<tid>/schedstat``), where the
    process's ``utime + stime`` count 10 ms ticks, too coarse for a block of steps."""
    seconds = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != os.getpid():  # ppid
                continue
            for task in (stat.parent / "task").iterdir():
                seconds[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):  # the process or thread ended meanwhile
            continue
    return seconds


def cpu_since(before: dict[int, float]) -> float:
    """CPU seconds the child processes' threads used since ``before`` (a thread that has
    ended since is left out; one started since counts whole)."""
    return sum(now - before.get(tid, 0.0) for tid, now in children_cpu_s().items())


def eval_rate(model: torch.nn.Module, dataset: PreparedDataset, users: int) -> float:
    task = load_task(dataset, "valid")
    task = task.rows(0, users)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        evaluate(ModelScorer(model.module), task)
    return len(task) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profiles", nargs="+", default=["demo", "xbox"])
    parser.add_argument("--steps", type=int, default=100,
                        help="timed steps, after 20 warm-up ones, within one epoch of demo (198)")
    parser.add_argument("--eval-users", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed blocks of training, and evaluations, of each model")
    args = parser.parse_args()
    env = distributed.init()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for profile in args.profiles:
            data = synth(profile, Path(tmp))
            dataset = PreparedDataset.open(data)
            for name in ("mf", "sasrec"):
                config = TrainConfig(model=name, num_workers=1)
                train, model = train_rates(dataset, config, args.steps, args.repeats, env)
                evaluations = [eval_rate(model, dataset, args.eval_users)
                               for _ in range(args.repeats)]
                samples, users = statistics.median(train), statistics.median(evaluations)
                results.append({"profile": profile, "model": name,
                                "train_samples_per_s": samples, "eval_users_per_s": users,
                                "train_runs": train, "eval_runs": evaluations})
                print(f"{profile:5} {name:7} train {samples:9,.0f} samples/s   "
                      f"evaluate {users:9,.0f} users/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "results": results, "steps": args.steps, "warmup_steps": WARMUP,
        "repeats": args.repeats,
        "batch_size": TrainConfig().batch_size,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "device": str(env.device)},
    }, indent=2) + "\n")
    distributed.shutdown()


if __name__ == "__main__":
    main()
