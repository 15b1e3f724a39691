"""MoRec's overhead: training samples/s of the base pipeline against the MoRec pipeline.

    python benchmarks/morec_overhead.py --out benchmarks/results/morec_overhead.json \\
        [--profile demo] [--model mf] [--steps 100] [--repeats 3] [--threads N]

One process (a process group of one, as ``morec-rec run`` without torchrun), the same
model, data and batch size (1,024 rows, one loader worker):

* base: the accuracy-only sampler and the model's own loss (``TrainPipelineSparseDist``);
* MoRec (``morec``), the defaults: the four objectives' sampler reading masses and batch
  shares from the weight store before every batch (the initial shares, 91% of the rows
  drawn by the other objectives), and the loss hook (per-objective means, all-reduce, the
  plain mean; the controller steps at validation rounds, not here);
* MoRec under ``training`` control (``morec_training_control``): equal sub-batches
  (4 × 256 rows), and the hook also steps the PI controller and weighs the means.

Each pipeline trains ``--steps`` steps after 20 warm-up steps, ``--repeats`` times,
in turn (the base first in even repeats, last in odd ones), from the same initial model;
the medians are compared. Each is timed twice:
end to end (its loader's worker process running beside it on the shared cores), and over
batches drawn beforehand (the step alone: model, hook and optimizer). End to end, MoRec's
rate over the base's in the same repeat is summarised too (median and a bootstrap
interval over the repeats), and the CPU time per step of the trainer process and of its
loader worker is recorded, to show where the time goes. ``--threads`` sets the trainer's
intra-op threads (torch's default is one a core, which the loader worker then shares).
Then the time of one
validation-and-update round (``MoRec.validate``: ranking metrics and per-group losses on
the validation users, the controllers' step, the mass update, the publish) is measured
``--repeats`` times.
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

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from train_throughput import WARMUP, StepTiming, timed_steps  # the script beside this one

from morec_rec.config import HoldTarget, MoRecConfig, SamplerConfig, TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import distributed
from morec_rec.jobs.collate import Collator
from morec_rec.jobs.models import num_negatives, per_row_loss
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.jobs.models.scorer import ModelScorer
from morec_rec.jobs.train import build_sharded, training_loader
from morec_rec.plugin.eval.ranking import load_task
from morec_rec.plugin.loader import MoRecLoader
from morec_rec.plugin.morec import MoRec


def base_parts(dataset: PreparedDataset, config: TrainConfig, env: distributed.Environment,
               ) -> tuple[TrainPipelineSparseDist, DataLoader]:
    model, optimizer = build_sharded(config, dataset, env)
    _, loader = training_loader(dataset, config, env, model.module.feature_names)
    return TrainPipelineSparseDist(model, optimizer, env.device), loader


def rates(pipeline: TrainPipelineSparseDist, loader: DataLoader | MoRecLoader, steps: int,
          batch_size: int) -> tuple[StepTiming, StepTiming]:
    """Timed end to end, then over batches drawn from ``loader`` beforehand."""
    end_to_end = timed_steps(pipeline, loader, steps, batch_size)
    batches = iter(loader)
    drawn = [next(batches) for _ in range(WARMUP + steps)]
    return end_to_end, timed_steps(pipeline, drawn, steps, batch_size)


#: The MoRec pipelines timed against the base, by their key in the results. Training
#: control holds a fixed target: measuring the base's losses is not part of a step.
VARIANTS = {
    "morec": MoRecConfig(),
    "morec_training_control": MoRecConfig(control="training", coefficients="loss",
                                          hold={"accuracy": HoldTarget(value=0.5)}),
}


def morec_parts(dataset: PreparedDataset, config: TrainConfig, env: distributed.Environment,
                name: str) -> tuple[MoRec, TrainPipelineSparseDist]:
    """The MoRec pipeline ``VARIANTS[name]`` with the default objectives, made as
    ``morec_rec.jobs.continued.continue_training`` makes it."""
    sampler_config = SamplerConfig(sub_batch_size=config.batch_size // 4, seed=config.seed)
    model, optimizer = build_sharded(config, dataset, env)
    collate = Collator(model.module.feature_names,
                       NegativeSampler(dataset.items()["train_count"].to_numpy(),
                                       config.negative_beta),
                       num_negatives(config.model), seed=config.seed, rank=env.rank)
    morec = MoRec(dataset, collate, rows=per_row_loss,
                  scorer=ModelScorer(model.module, env.device), sampler=sampler_config,
                  config=VARIANTS[name], num_workers=config.num_workers, device=env.device,
                  chunk_users=config.eval_chunk_users)
    morec.set_epoch(0)
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device,
                                       custom_model_fwd=morec.loss(model))
    return morec, pipeline


def paired_ratio(morec: list[float], base: list[float], resamples: int = 2000,
                 seed: int = 0) -> dict[str, float]:
    """The median over repeats of MoRec's rate over the base's in the same repeat, with a
    95% bootstrap interval over the repeats: how sure one run is of the ratio."""
    ratios = np.array(morec) / np.array(base)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, (resamples, len(ratios))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return {"median": float(np.median(ratios)), "low": float(low), "high": float(high)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--model", default="mf", choices=["mf", "sasrec"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int,
                        help="the trainer's intra-op threads (default: torch's, one a core)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = distributed.init()
    config = TrainConfig(model=args.model, num_workers=1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / args.profile
        subprocess.run([sys.executable, "-m", "morec_rec.jobs.cli", "synth", "--profile",
                        args.profile, "--seed", "0", "--out", str(data)], check=True)
        dataset = PreparedDataset.open(data)
        runs: dict[str, list[tuple[StepTiming, StepTiming]]] = {
            "base": [], **{k: [] for k in VARIANTS}}
        for repeat in range(args.repeats):
            # The base goes first in even repeats and last in odd ones; the defaults' parts
            # are kept for the validation round.
            if repeat % 2 == 0:
                runs["base"].append(rates(*base_parts(dataset, config, env), args.steps,
                                          config.batch_size))
            for name in reversed(VARIANTS):
                morec, pipeline = morec_parts(dataset, config, env, name)
                runs[name].append(rates(pipeline, morec.loader, args.steps,
                                        config.batch_size))
            if repeat % 2 == 1:
                runs["base"].append(rates(*base_parts(dataset, config, env), args.steps,
                                          config.batch_size))
            print(f"repeat {repeat}: samples/s end to end, step alone: " + "; ".join(
                f"{k} {v[-1][0].samples_per_s:,.0f}, {v[-1][1].samples_per_s:,.0f}"
                for k, v in runs.items()))

        detached = pipeline.detach()
        task = load_task(dataset, "valid")
        rounds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            morec.validate(detached)
            rounds.append(time.perf_counter() - start)
        print(f"validation and update round: {statistics.median(rounds):.2f} s "
              f"({len(task):,} validation users)")

    median = {k: statistics.median(r[0].samples_per_s for r in v) for k, v in runs.items()}
    step = {k: statistics.median(r[1].samples_per_s for r in v) for k, v in runs.items()}
    paired = paired_ratio([r[0].samples_per_s for r in runs["morec"]],
                          [r[0].samples_per_s for r in runs["base"]])
    cpu = {k: {"trainer": statistics.median(r[0].trainer_cpu_ms for r in v),
               "loader_workers": statistics.median(r[0].loader_cpu_ms for r in v)}
           for k, v in runs.items()}
    results = {
        "profile": args.profile, "model": args.model, "batch_size": config.batch_size,
        "steps": args.steps, "warmup_steps": WARMUP, "repeats": args.repeats,
        "base_samples_per_s": median["base"], "morec_samples_per_s": median["morec"],
        "morec_over_base": median["morec"] / median["base"],
        "overhead_per_step": median["base"] / median["morec"] - 1,
        "paired_end_to_end": paired,
        "step_alone": {"base_samples_per_s": step["base"],
                       "morec_samples_per_s": step["morec"],
                       "morec_over_base": step["morec"] / step["base"]},
        "training_control": {
            "samples_per_s": median["morec_training_control"],
            "over_base": median["morec_training_control"] / median["base"],
            "step_alone_samples_per_s": step["morec_training_control"],
            "step_alone_over_base": step["morec_training_control"] / step["base"]},
        "cpu_ms_per_step_end_to_end": cpu,
        "runs": {k: {"end_to_end": [r[0]._asdict() for r in v],
                     "step_alone": [r[1]._asdict() for r in v]} for k, v in runs.items()},
        "validation_round_s": statistics.median(rounds), "validation_rounds_s": rounds,
        "validation_users": len(task),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "trainer_threads": torch.get_num_threads(),
                        "device": str(env.device)},
    }
    print(f"paired per repeat: {paired['median']:.3f} [{paired['low']:.3f}, "
          f"{paired['high']:.3f}]")
    print(f"MoRec / base = {results['morec_over_base']:.3f} end to end "
          f"(per-step overhead {100 * results['overhead_per_step']:+.1f}%), "
          f"{results['step_alone']['morec_over_base']:.3f} for the step alone; under "
          f"training control {results['training_control']['over_base']:.3f} and "
          f"{results['training_control']['step_alone_over_base']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    distributed.shutdown()


if __name__ == "__main__":
    main()
