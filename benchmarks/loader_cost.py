"""What a loader with a worker process costs the trainer a step, beside making the batches.

    python benchmarks/loader_cost.py --out benchmarks/results/loader_cost.json \\
        [--profile demo] [--steps 100] [--rounds 12] [--group K]

One process, MF-BPR on the profile (seed 0), the reference job's model and
``TrainPipelineSparseDist`` at one trainer thread (the worker on a core of its own; what
it takes from the trainer's core shows as preemption), fed in turn, in blocks of
``--steps`` steps, by:

* ``in_process``: 64 batches of the reference loader made ahead, pickled as a worker
  pickles them, and unpickled in the trainer as it steps (no worker at all);
* ``worker_ready``: a ``WorkerLoader`` whose one worker sends those same batches (its only
  work a batch: pickling it), one a request;
* ``worker_ready_grouped``: the same, ``--group`` batches a request (a list the trainer
  unrolls);
* ``loader``: the reference job's loader (``training_loader``: sampler and collate in the
  worker), one batch a request (``batches_per_request=1``);
* ``loader_grouped``: the same, ``--group`` batches a request (``TrainConfig``'s default
  unless given).

For each block, a step's wall time, the trainer process's CPU time (all its threads) and
the time its main thread was runnable but waited for a CPU (``preempted_us``: the worker's
threads on its core), in microseconds; the feeds' order alternates between rounds;
medians over ``--rounds``. ``worker_ready`` less ``in_process`` is what torch's DataLoader
costs the trainer to receive a batch from a worker, ``worker_ready_grouped`` the same
spread over ``--group`` batches; ``loader`` less ``worker_ready``, what the worker making
the batches beside the trainer costs it; ``loader_grouped``, both with fewer requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pickle
import platform
import statistics
import tempfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from synthetic import synth  # the script beside this one

from morec_rec.config import TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import distributed
from morec_rec.jobs.train import build_sharded, training_loader
from morec_rec.plugin.loader import SamplerLoader
from morec_rec.plugin.workers import WorkerLoader

READY = 64  # batches made ahead


class Ready(torch.utils.data.IterableDataset):
    """The pickled batches, unpickled in the worker and yielded ``group`` at a time (a list),
    round and round."""

    def __init__(self, payloads: list[bytes], group: int) -> None:
        self.payloads, self.group = payloads, group

    def __iter__(self) -> Iterator[list[Any]]:
        batches = [pickle.loads(p) for p in self.payloads]
        for i in itertools.count():
            yield [batches[(i * self.group + j) % len(batches)] for j in range(self.group)]


def _as_is(batch: Any) -> Any:
    return batch


def unrolled(loader: WorkerLoader) -> Iterator[Any]:
    return (batch for group in loader for batch in group)


def epochs(loader: SamplerLoader) -> Iterator[Any]:
    """The loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def runqueue_s() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (the scheduler's
    ``schedstat``): preempted, as opposed to waiting for a batch."""
    return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9


def block(pipeline: TrainPipelineSparseDist, batches: Iterator[Any],
          steps: int) -> dict[str, float]:
    """``steps`` steps after 4 untimed ones (the pipeline's held batches of another feed)."""
    for _ in range(4):
        pipeline.progress(batches)
    start, cpu, queued = time.perf_counter(), time.process_time(), runqueue_s()
    for _ in range(steps):
        pipeline.progress(batches)
    return {"wall_us": 1e6 * (time.perf_counter() - start) / steps,
            "trainer_cpu_us": 1e6 * (time.process_time() - cpu) / steps,
            "preempted_us": 1e6 * (runqueue_s() - queued) / steps}


def measure(data: Path, steps: int, rounds: int, group: int) -> dict[str, dict[str, float]]:
    env = distributed.init()
    distributed.keep_freed_memory()
    config = TrainConfig(model="mf", num_workers=1)
    torch.set_num_threads(1)  # the worker on a core of its own
    dataset = PreparedDataset.open(data)
    model, optimizer = build_sharded(config, dataset, env)
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
    real, real_grouped = (
        epochs(training_loader(dataset, dataclasses.replace(config, batches_per_request=k), env,
                               model.module.feature_names))
        for k in (1, group))
    made = epochs(training_loader(dataset, TrainConfig(model="mf", num_workers=0), env,
                                  model.module.feature_names))
    payloads = [bytes(ForkingPickler.dumps(next(made))) for _ in range(READY)]
    ready = {k: unrolled(WorkerLoader(Ready(payloads, k), batch_size=None, num_workers=1,
                                      collate_fn=_as_is))
             for k in (1, group)}

    def in_process() -> dict[str, float]:
        cycle = itertools.cycle(payloads)
        return block(pipeline, (pickle.loads(next(cycle)) for _ in itertools.count()), steps)

    feeds: dict[str, Callable[[], dict[str, float]]] = {
        "in_process": in_process,
        "worker_ready": lambda: block(pipeline, ready[1], steps),
        "worker_ready_grouped": lambda: block(pipeline, ready[group], steps),
        "loader": lambda: block(pipeline, real, steps),
        "loader_grouped": lambda: block(pipeline, real_grouped, steps),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in feeds}
    for round_ in range(rounds):
        for name in (list(feeds) if round_ % 2 == 0 else list(feeds)[::-1]):
            runs[name].append(feeds[name]())
    distributed.shutdown()
    return {name: {key: statistics.median(r[key] for r in measured)
                   for key in ("wall_us", "trainer_cpu_us", "preempted_us")}
            for name, measured in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--group", type=int, default=TrainConfig.batches_per_request)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = synth(args.profile, Path(tmp))
        results = measure(data, args.steps, args.rounds, args.group)
    for name, row in results.items():
        print(f"{name:22} wall {row['wall_us']:7.0f} us a step, trainer CPU "
              f"{row['trainer_cpu_us']:7.0f} us, preempted {row['preempted_us']:5.0f} us",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "profile": args.profile, "steps": args.steps, "rounds": args.rounds,
        "group": args.group, "ready_batches": READY, "results": results,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "trainer_threads": torch.get_num_threads()},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
