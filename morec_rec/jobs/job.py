"""The main job: pretrain a base, continue it with MoRec (and without), judge on test.

    OUT/job.json       the job's settings (what ``--resume`` continues)
    OUT/base/          the base run (unless an existing one is given)
    OUT/morec/         MoRec continued from the base's best checkpoint
    OUT/continued/     accuracy-only continued training, same base and steps (optional)
    OUT/results.json   test metrics of each, Imp and validity against the base, the
                       controller's record over the last fifth of training, each stage's
                       wall time in the attempt that finished the job, the settings
    OUT/*.png          the controller, the masses, the metrics side by side

Every rank runs the whole job (each stage is a collective); rank 0 writes the results. A
resumed job continues each stage from its last checkpoint (a finished stage has nothing
left to do) and evaluates again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch.distributed as dist

from morec_rec.config import MoRecConfig, SamplerConfig, TrainConfig, build
from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.jobs import checkpoint, distributed
from morec_rec.jobs.continued import continue_training
from morec_rec.jobs.models.scorer import ModelScorer
from morec_rec.jobs.run import (
    RECORD,
    Run,
    data_fields,
    hold,
    leftover,
    read_log,
    read_record,
    recorded_data,
)
from morec_rec.jobs.train import build_sharded, model_identity, train
from morec_rec.plugin.eval.metrics import RankingMetrics, improvement, is_valid
from morec_rec.plugin.eval.ranking import evaluate, load_task
from morec_rec.plugin.morec import check_settings

JOB = "job.json"
#: The keys of a job's record (see :func:`run_job`).
JOB_KEYS = ("train", "sampler", "morec", "data", "base", "continued")
RESULTS = "results.json"
#: The keys of a job's results that its summary prints (see :func:`_run_stages`).
RESULT_KEYS = ("base", "morec", "imp_text", "valid", "control", "settings")
#: The share of training, at its end, over which the controller is judged.
JUDGED_SHARE = 0.2


def run_scorer(run: Run, env: distributed.Environment,
               ) -> tuple[ModelScorer, PreparedDataset, TrainConfig]:
    """A scorer of ``run``'s best checkpoint (sharded, in eval mode), with the run's dataset
    and training settings."""
    record = run.record
    config = build(TrainConfig, record["config"], None, f"{run.root / RECORD}: config")
    dataset = recorded_data(record, run.root / RECORD)
    model, _ = build_sharded(config, dataset, env)
    checkpoint.load(run.best, model, None, model_identity(config, dataset))
    model.eval()
    return ModelScorer(model.module, env.device), dataset, config


def evaluate_run(run: Run, split: str, env: distributed.Environment) -> RankingMetrics:
    """Full-ranking metrics of ``run``'s best checkpoint on ``split`` (a collective)."""
    import torch

    scorer, dataset, config = run_scorer(run, env)
    with torch.no_grad():
        task = load_task(dataset, split, rank=env.rank, world_size=env.world_size)
        return evaluate(scorer, task, chunk_users=config.eval_chunk_users)


def stage(root: Path, record: dict[str, Any], resume: bool) -> tuple[Run, bool]:
    """The run of one stage: the existing one when resuming (True), its record rewritten
    with ``record`` (the job's settings, which a resume may extend), else a new one."""
    if resume and (root / RECORD).is_file():
        run = Run.open(root)
        run.resume(record["world_size"], record)
        return run, True
    return Run.create(root, record), False


def pretrain(dataset: PreparedDataset, root: Path, config: TrainConfig,
             resume: bool = False) -> Run:
    """Trains the base to early stop into ``root``."""
    env = distributed.init()
    run, existing = stage(root, {"config": dataclasses.asdict(config),
                                 **data_fields(dataset),
                                 "world_size": env.world_size}, resume)
    train(dataset, config, run, resume=existing)
    return run


def continued(base: Run, dataset: PreparedDataset, root: Path, train_config: TrainConfig,
              sampler_config: SamplerConfig, config: MoRecConfig, resume: bool = False) -> Run:
    """Continues ``base`` with ``config`` into ``root``; MorecError, before anything is
    written, for a run in ``root`` that continued another best checkpoint of ``base``."""
    env = distributed.init()
    base_best = checkpoint.read_meta(base.best, ("progress",))["progress"]["best_step"]
    if resume and (root / RECORD).is_file():
        started = Run.open(root).record.get("base_best_step", base_best)
        if started != base_best:
            raise MorecError(f"{root}: continued {base.root}'s best checkpoint of step "
                             f"{started}, which is now one of step {base_best} (the base "
                             "trained on since): its results would mix two bases; start a "
                             "new job")
    run, existing = stage(root, {"config": dataclasses.asdict(train_config),
                                 "sampler": dataclasses.asdict(sampler_config),
                                 "morec": dataclasses.asdict(config),
                                 "base": str(base.root.resolve()),
                                 "base_best_step": base_best,
                                 **data_fields(dataset),
                                 "world_size": env.world_size}, resume)
    if existing and checkpoint.resolve(run.last) is not None:  # what resuming it reads
        checkpoint.read_meta(run.last, ("progress", "morec"))
    continue_training(base, dataset, train_config, sampler_config, config, run,
                      resume=existing)
    return run


def accuracy_only(sampler_config: SamplerConfig,
                  config: MoRecConfig) -> tuple[SamplerConfig, MoRecConfig]:
    """The settings of plain continued training matching a MoRec run: the same batch
    size, steps and validation passes, the accuracy objective alone, no controller."""
    batch = sampler_config.sub_batch_size * len(sampler_config.objectives)
    return (dataclasses.replace(sampler_config, objectives=("accuracy",), sub_batch_size=batch),
            dataclasses.replace(config, coordinator="morec", preference=(), hold={}))


def control_record(log: list[dict[str, Any]], share: float = JUDGED_SHARE) -> dict[str, Any]:
    """How well each held objective was held over the last ``share`` of the steps.

    Per held objective: its target, the mean of its controlled value (its loss, or its
    validation measure) over those steps, their relative difference, and the share of
    those steps with β at a bound of its range.
    """
    steps = [r for r in log if r.get("kind") == "step" and r.get("coefficient")]
    if not steps:
        return {}
    last = steps[-1]["step"]
    judged = [r for r in steps if r["step"] > (1 - share) * last]
    record = {}
    for name, target in judged[-1]["target"].items():
        value = float(np.mean([r["controlled"][name] for r in judged]))
        record[name] = {"target": target, "mean": value, "relative_error": value / target - 1,
                        "share_at_bound": float(np.mean([r["at_bound"][name] for r in judged])),
                        "steps": [judged[0]["step"] - 9, last]}
    return record


def versus(base: Mapping[str, float], run: Mapping[str, float]) -> dict[str, Any]:
    """Imp (over the defined terms where a base metric is 0, named) and validity."""
    gain = improvement(base, run)
    return {"imp": gain.imp if gain.imp is not None else gain.imp_defined,
            "imp_undefined": list(gain.undefined), "imp_text": gain.describe(),
            "valid": is_valid(base["hit@10"], run["hit@10"])}


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Records the wall time of the ``with`` block, in seconds, as ``seconds[name]``."""
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 3)


def read_job(out: Path) -> dict[str, Any]:
    """The settings a job in ``out`` was started with (see :func:`run_job`): a JSON object
    holding :data:`JOB_KEYS`, each of its type; else MorecError naming ``job.json``."""
    if not (out / JOB).is_file():
        raise MorecError(f"{out}: no {JOB}: not the output of a job to resume")
    job = read_record(out / JOB, JOB_KEYS)
    kinds = {"train": dict, "sampler": dict, "morec": dict, "data": str,
             "base": (str, type(None)), "continued": bool}
    for key, kind in kinds.items():
        if not isinstance(job[key], kind):
            raise MorecError(f"{out / JOB}: {key} = {job[key]!r} is not what a job records "
                             "(damaged or edited?)")
    return job


def run_job(dataset: PreparedDataset, out: Path, train_config: TrainConfig,
            sampler_config: SamplerConfig, config: MoRecConfig, *, base: Path | None = None,
            with_continued: bool = False, resume: bool = False) -> dict[str, Any]:
    """The whole job into ``out`` (see the module docstring); returns the results.

    With ``resume``, continues the job in ``out`` (the settings may extend its own, e.g.
    more epochs); otherwise ``out`` must be absent or empty but for the dataset.
    """
    env = distributed.init()
    if not resume and out.is_dir():
        taken = [name for name in (JOB, "base", "morec", "continued", RESULTS)
                 if (out / name).exists()]
        if taken:
            raise MorecError(f"{out}: holds {', '.join(taken)} of an earlier job; pass "
                             "--resume to continue it, or choose another --out")
        if any(path.resolve() != dataset.root.resolve() and not leftover(path)
               for path in out.iterdir()):
            raise MorecError(f"{out}: output exists and is not an empty directory")
    check_settings(dataset, sampler_config, config)  # before hours of pretraining
    if with_continued:
        check_settings(dataset, *accuracy_only(sampler_config, config))
    settings = {"train": dataclasses.asdict(train_config),
                "sampler": dataclasses.asdict(sampler_config),
                "morec": dataclasses.asdict(config), **data_fields(dataset),
                "base": None if base is None else str(Path(base).resolve()),
                "continued": with_continued}
    dist.barrier()  # every rank has checked ``out`` before rank 0 writes to it
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    with hold(out):  # a resumed stage completes its interrupted saves (Run.resume)
        if env.is_main:
            for path in out.glob("*.partial"):  # what a kill left (a plot, a record)
                if leftover(path):
                    path.unlink()
            (out / (JOB + ".partial")).write_text(json.dumps(settings, indent=2) + "\n")
            (out / (JOB + ".partial")).rename(out / JOB)
        return _run_stages(dataset, out, train_config, sampler_config, config, settings,
                           base, with_continued, resume)


def _run_stages(dataset: PreparedDataset, out: Path, train_config: TrainConfig,
                sampler_config: SamplerConfig, config: MoRecConfig, settings: dict[str, Any],
                base: Path | None, with_continued: bool, resume: bool) -> dict[str, Any]:
    """:func:`run_job`'s stages and results, once ``out`` holds the job's record."""
    env = distributed.init()
    wall_s: dict[str, float] = {}
    if base is None:
        with timed(wall_s, "base"):
            base_run = pretrain(dataset, out / "base", train_config, resume)
    else:
        base_run = Run.open(base)
    runs = {"base": base_run}
    with timed(wall_s, "morec"):
        runs["morec"] = continued(base_run, dataset, out / "morec", train_config,
                                  sampler_config, config, resume)
    if with_continued:
        with timed(wall_s, "continued"):
            runs["continued"] = continued(base_run, dataset, out / "continued", train_config,
                                          *accuracy_only(sampler_config, config), resume)
    with timed(wall_s, "test"):
        test = {name: evaluate_run(run, "test", env).as_dict() for name, run in runs.items()}
    results: dict[str, Any] = {
        **data_fields(dataset), "world_size": env.world_size,
        "base": test["base"], "morec": test["morec"], **versus(test["base"], test["morec"]),
    }
    if with_continued:
        results["continued"] = test["continued"]
        results["continued_versus_base"] = versus(test["base"], test["continued"])
        results["morec_versus_continued"] = versus(test["continued"], test["morec"])
    morec_log = read_log(runs["morec"].root / "log.jsonl") if env.is_main else []
    results["selected"] = {name: checkpoint.read_meta(run.best, ("progress",))["progress"]["best"]
                           for name, run in runs.items() if name != "base"}
    results["control"] = control_record(morec_log)
    results["settings"] = {**settings, "base": str(base_run.root.resolve())}
    results["wall_s"] = wall_s
    if env.is_main:
        _plot(runs["morec"].root / "log.jsonl", out, test)
        partial = out / (RESULTS + ".partial")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        partial.rename(out / RESULTS)  # last: the job's completion marker
    return results


def _plot(log: Path, out: Path, test: Mapping[str, Mapping[str, float]]) -> None:
    """The run's plots, where matplotlib is installed (the ``plot`` extra)."""
    try:
        from morec_rec.jobs.plots import plot_run
    except ModuleNotFoundError as error:
        warnings.warn(f"no plots in {out}: {error} (pip install 'morec-rec[plot]')",
                      stacklevel=2)
        return
    plot_run(log, out, test)
