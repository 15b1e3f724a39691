"""MoRec's overhead: training samples/s of the base pipeline against the MoRec pipeline.

    python benchmarks/morec_overhead.py --out benchmarks/results/morec_overhead.json \\
        [--profile demo | --data DIR] [--model mf] [--steps 40] [--pairs 30] \\
        [--processes 10] [--threads N]

Each process (a process group of one, as ``morec-rec run`` without torchrun) has one model and
one ``TrainPipelineSparseDist`` (batch 1,024 rows), fed in turn by:

* base: the accuracy-only sampler through the job's collate into the model's own loss, as
  ``morec-rec train`` builds them;
* ``base_again``: a second base loader, the A/A control: its ratio to the first is what
  the machine's noise alone gives, and with the first, MoRec's reference;
* MoRec (``morec``), the defaults: its loader (the four objectives' sampler checking for
  announced masses and batch shares before every batch; the initial shares, 91% of the
  rows drawn by the other objectives) and its loss hook (per-objective sums kept on the
  device; the controller steps at validation rounds, not here);
* MoRec under ``training`` control (``morec_training_control``): equal sub-batches
  (4 × 256 rows), and the hook also all-reduces the losses, steps the PI controller and
  weighs the means every step;
* MoRec with four uniform objectives (``morec_uniform``): accuracy and three more that
  draw nothing (the sampler serves each from the window's shuffled rows, as it serves
  accuracy), so that its loader, masses, segments and hook are timed without the weighted
  draws of the default objectives; ``morec`` over it is what the draws cost (with the
  rows they draw).

Each feed has its own loader worker (an idle one holds its prefetched batches and waits);
they share the model, its optimizer and the pipeline, whose forward sends each batch to
the hook of the MoRec feed it came from and a base feed's to the model. Separate pipelines,
each with its own model, differ by a few percent from one another on this machine
whatever they run, which this design leaves out. The feeds are timed in blocks of
``--steps`` steps, in turn, ``--pairs`` times, in the orders of a Williams design (every
feed right after every other twice in ten rounds, so that what a block leaves behind, the
previous feed's worker waking and its batches, weighs on every feed alike). A block
starts once the batches the pipeline holds from the previous feed are trained on
(untimed) and never crosses an epoch's end (the rest of an epoch, the next epoch's start
and its 20 warm-up steps run untimed). Each round gives MoRec's rate over the
geometric mean of the two base feeds' in the same round, a few seconds apart (the two are
the same, so both serve as the reference: a steadier one than either alone, and no choice
of one, whose ratio to the other has read 0.99–1.03 across runs); a process's median over
its rounds is recorded with a 95% bootstrap interval over them, for the rate and for the
trainer's CPU time per step and for its loader workers' (``trainer_cpu_over_base``,
``loader_cpu_over_base``: above 1 is MoRec's extra CPU). ``--processes`` such processes
run one after another, each with its own model and loaders; the result is the mean of
their medians with a 95% Student-t interval over the processes, since the medians of two
processes differ by more than one process's interval. Each feed's CPU time per step (ms)
is recorded too. ``--threads`` sets the trainer's intra-op threads (torch's default is
one a core, which the loader worker then shares). Each process then times one
validation-and-update round (``MoRec.validate``: ranking metrics and per-group losses on
the validation users, the controllers' step, the mass update, the publish) five times.
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
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import scipy.stats
import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from synthetic import synth  # beside this one
from train_throughput import WARMUP, StepTiming, children_cpu_s, cpu_since  # beside this one

from morec_rec.config import HoldTarget, MoRecConfig, SamplerConfig, TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import distributed
from morec_rec.jobs.collate import Collator
from morec_rec.jobs.models import num_negatives, per_row_loss
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.jobs.models.scorer import ModelScorer
from morec_rec.jobs.train import build_sharded, training_loader
from morec_rec.plugin.eval.ranking import load_task
from morec_rec.plugin.loader import SamplerLoader
from morec_rec.plugin.morec import MoRec
from morec_rec.plugin.sampling.objectives import Objective, OneGroup
from morec_rec.plugin.segments import SegmentedBatch


#: Batches ``TrainPipelineSparseDist`` holds ahead of the one it trains on.
PIPELINE_DEPTH = 2

#: A MoRec feed's loss hook.
Hook = Callable[[SegmentedBatch], tuple[torch.Tensor, Any]]


class Route:
    """The pipeline's forward: each batch to the hook of the feed it came from, or to the
    model for a base feed's, in the order the pipeline drew them (a MoRec hook trains
    its own loader's batches, in order, as it requires)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._hooks: deque[Hook | None] = deque()  # of the batches drawn, not yet trained

    def tag(self, batches: Iterator[Any], hook: Hook | None) -> Iterator[Any]:
        """``batches``, each noted as ``hook``'s (None: the model's) as it is drawn."""
        for batch in batches:
            self._hooks.append(hook)
            yield batch

    def __call__(self, batch: Any) -> tuple[torch.Tensor, Any]:
        hook = self._hooks.popleft()
        return self.model(batch) if hook is None else hook(batch)


class Feed:
    """A loader into the shared pipeline, stepped in timed blocks that never cross an
    epoch's end."""

    def __init__(self, pipeline: TrainPipelineSparseDist, route: Route, hook: Hook | None,
                 loader: SamplerLoader, set_epoch: Callable[[int], None],
                 batch_size: int) -> None:
        self.pipeline, self.route, self.hook = pipeline, route, hook
        self.loader, self.set_epoch = loader, set_epoch
        self.batches_per_epoch, self.batch_size = loader.batches_per_epoch, batch_size
        self.epoch = -1
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.set_epoch(self.epoch)
        self.batches, self.stepped = self.route.tag(iter(self.loader), self.hook), 0
        for _ in range(WARMUP):
            self._step()

    def _step(self) -> None:
        self.pipeline.progress(self.batches)
        self.stepped += 1

    def timed(self, steps: int) -> StepTiming:
        """``steps`` steps, timed, after those of the batches the pipeline holds from the
        previous feed; first the rest of the epoch if it has too few left."""
        if self.stepped + 2 * PIPELINE_DEPTH + steps > self.batches_per_epoch:
            try:
                while True:
                    self._step()
            except StopIteration:
                self._next_epoch()
        for _ in range(PIPELINE_DEPTH):
            self._step()
        start, trainer, workers = time.perf_counter(), time.process_time(), children_cpu_s()
        for _ in range(steps):
            self._step()
        seconds = time.perf_counter() - start
        return StepTiming(steps * self.batch_size / seconds,
                          1e3 * (time.process_time() - trainer) / steps,
                          1e3 * cpu_since(workers) / steps)


def base_feed(dataset: PreparedDataset, config: TrainConfig, env: distributed.Environment,
              pipeline: TrainPipelineSparseDist, route: Route) -> Feed:
    loader = training_loader(dataset, config, env, route.model.module.feature_names)
    return Feed(pipeline, route, None, loader, loader.set_epoch, config.batch_size)


class Uniform(OneGroup):
    """Every row equally likely, under a name of its own: drawn like accuracy."""

    columns = ()

    def __init__(self, name: str) -> None:
        self.name = name


#: The MoRec feeds timed against the base, by their key in the results: the configuration
#: and the objectives (None: the defaults). Training control holds a fixed target:
#: measuring the base's losses is not part of a step.
VARIANTS: dict[str, tuple[MoRecConfig, list[Objective | str] | None]] = {
    "morec": (MoRecConfig(), None),
    "morec_training_control": (MoRecConfig(control="training", coefficients="loss",
                                           hold={"accuracy": HoldTarget(value=0.5)}), None),
    "morec_uniform": (MoRecConfig(), ["accuracy", *(Uniform(f"uniform{i}") for i in (1, 2, 3))]),
}


def morec_feed(dataset: PreparedDataset, config: TrainConfig, env: distributed.Environment,
               pipeline: TrainPipelineSparseDist, route: Route, name: str
               ) -> tuple[MoRec, Feed]:
    """The MoRec feed ``VARIANTS[name]``, its loader and hook made as
    ``morec_rec.jobs.continued.continue_training`` makes them."""
    model, (morec_config, objectives) = route.model, VARIANTS[name]
    sampler_config = SamplerConfig(sub_batch_size=config.batch_size // 4, seed=config.seed)
    collate = Collator(model.module.feature_names,
                       NegativeSampler(dataset.item_columns(["train_count"])["train_count"],
                                       config.negative_beta),
                       num_negatives(config.model), seed=config.seed, rank=env.rank)
    morec = MoRec(dataset, collate, rows=per_row_loss, columns=collate.columns,
                  scorer=ModelScorer(model.module, env.device), objectives=objectives,
                  sampler=sampler_config, config=morec_config, num_workers=config.num_workers,
                  batches_per_request=config.batches_per_request, device=env.device,
                  chunk_users=config.eval_chunk_users)
    return morec, Feed(pipeline, route, morec.loss(model), morec.loader, morec.set_epoch,
                       config.batch_size)


#: The feeds compared with the base: the MoRec variants and the A/A control.
COMPARED = (*VARIANTS, "base_again")


def over_base(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Each compared feed's :func:`paired_ratio` to the base: a MoRec variant's to the
    geometric mean of the two base feeds in the same round, the A/A control's to the
    first."""
    both = np.sqrt(np.array(values["base"]) * np.array(values["base_again"]))
    return {name: paired_ratio(values[name], values["base"] if name == "base_again" else both)
            for name in COMPARED}


def paired_ratio(morec: list[float], base: list[float] | np.ndarray, resamples: int = 2000,
                 seed: int = 0) -> dict[str, float]:
    """The median over rounds of MoRec's rate over the base's in the same round, with a
    95% bootstrap interval over the rounds."""
    ratios = np.array(morec) / np.array(base)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, (resamples, len(ratios))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return {"median": float(np.median(ratios)), "low": float(low), "high": float(high)}


def williams_orders(n: int) -> list[list[int]]:
    """A Williams design: orders of ``range(n)`` (``n`` of them, ``2n`` for an odd ``n``)
    in which every item comes right after every other equally often."""
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]
    orders = [[(x + shift) % n for x in first] for shift in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 else orders


def measure(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """One process's measurement on the prepared dataset ``data``: the rounds of blocks,
    then the validation rounds."""
    env = distributed.init()
    distributed.keep_freed_memory()  # as morec-rec train and run do
    config = TrainConfig(model=args.model, num_workers=1)
    dataset = PreparedDataset.open(data)
    model, optimizer = build_sharded(config, dataset, env)
    route = Route(model)
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device, custom_model_fwd=route)
    morecs, feeds = {}, {"base": base_feed(dataset, config, env, pipeline, route),
                         "base_again": base_feed(dataset, config, env, pipeline, route)}
    for name in VARIANTS:
        morecs[name], feeds[name] = morec_feed(dataset, config, env, pipeline, route, name)
    runs: dict[str, list[StepTiming]] = {name: [] for name in feeds}
    names = list(feeds)
    orders = williams_orders(len(names))
    for round_ in range(args.pairs):
        for index in orders[round_ % len(orders)]:
            runs[names[index]].append(feeds[names[index]].timed(args.steps))
        if round_ % 10 == 9:
            print(f"round {round_ + 1}: samples/s " + "; ".join(
                f"{k} {v[-1].samples_per_s:,.0f}" for k, v in runs.items()), flush=True)

    morec, rounds = morecs["morec"], []
    detached = pipeline.detach()
    task = load_task(dataset, "valid")
    for _ in range(5):
        start = time.perf_counter()
        morec.validate(detached)
        rounds.append(time.perf_counter() - start)
    distributed.shutdown()

    rate = {k: [t.samples_per_s for t in v] for k, v in runs.items()}
    cpu = {k: [t.trainer_cpu_ms for t in v] for k, v in runs.items()}
    loader_cpu = {k: [t.loader_cpu_ms for t in v] for k, v in runs.items()}
    return {
        "samples_per_s": {k: statistics.median(v) for k, v in rate.items()},
        "over_base": over_base(rate),
        "trainer_cpu_over_base": over_base(cpu),
        "loader_cpu_over_base": over_base(loader_cpu),
        "cpu_ms_per_step": {
            k: {"trainer": statistics.median(t.trainer_cpu_ms for t in v),
                "loader_workers": statistics.median(t.loader_cpu_ms for t in v)}
            for k, v in runs.items()},
        "runs": {k: [t._asdict() for t in v] for k, v in runs.items()},
        "validation_round_s": statistics.median(rounds), "validation_rounds_s": rounds,
        "validation_users": len(task),
        "device": str(env.device),
    }


def across_processes(values: list[float]) -> dict[str, Any]:
    """The mean of one value per process, with a 95% Student-t interval over the
    processes."""
    mean = statistics.fmean(values)
    half = (scipy.stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values)
            / len(values) ** 0.5)
    return {"mean": mean, "low": mean - half, "high": mean + half, "per_process": values}


def summarise(processes: list[dict[str, Any]]) -> dict[str, Any]:
    """The processes' results under ``processes``, and each ratio's mean over them (of
    each process's median over its rounds)."""
    return {
        key: {name: across_processes([p[key][name]["median"] for p in processes])
              for name in COMPARED}
        for key in ("over_base", "trainer_cpu_over_base", "loader_cpu_over_base")
    } | {"processes": processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--data", type=Path,
                        help="a prepared dataset (default: synth --profile, seed 0)")
    parser.add_argument("--model", default="mf", choices=["mf", "sasrec"])
    parser.add_argument("--steps", type=int, default=40, help="steps a timed block")
    parser.add_argument("--pairs", type=int, default=30,
                        help="rounds of blocks a process (a multiple of 10 balances the orders)")
    parser.add_argument("--processes", type=int, default=10,
                        help="processes measured one after another (1: this one)")
    parser.add_argument("--threads", type=int,
                        help="the trainer's intra-op threads (default: torch's, one a core)")
    args = parser.parse_args()
    if args.processes < 1:
        parser.error(f"--processes {args.processes} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synth(args.profile, Path(tmp))
        if args.processes == 1:
            results = measure(args, data)
        else:
            processes = []
            for number in range(args.processes):
                out = Path(tmp) / f"process{number}.json"
                command = [sys.executable, __file__, "--out", str(out), "--data", str(data),
                           "--model", args.model, "--steps", str(args.steps),
                           "--pairs", str(args.pairs), "--processes", "1"]
                if args.threads is not None:
                    command += ["--threads", str(args.threads)]
                subprocess.run(command, check=True)
                processes.append(json.loads(out.read_text()))
            results = summarise(processes)
    results = {
        "profile": args.profile if args.data is None else str(args.data), "model": args.model,
        "batch_size": TrainConfig(model=args.model).batch_size,
        "steps_per_block": args.steps, "pairs": args.pairs, "warmup_steps": WARMUP,
        **results,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "trainer_threads": torch.get_num_threads()},
    }
    for name, ratio in results["over_base"].items():
        reference = "base" if name == "base_again" else "the two bases"
        print(f"{name} over {reference}: {ratio.get('mean', ratio.get('median')):.3f} "
              f"[{ratio['low']:.3f}, {ratio['high']:.3f}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
