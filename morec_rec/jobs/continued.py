"""MoRec continued training: from a converged base, several objectives at once.

    base run's best checkpoint ─► DMP model + optimizer (state continued)
    MoRec's loader (one sub-batch per objective) ─► TrainPipelineSparseDist
        custom_model_fwd = MoRec's hook: the backbone's loss, per-objective means measured
    updates_per_epoch times an epoch and at its end: MoRec.validate (ranking metrics,
        per-group losses, the controllers) ─► new masses ─► every loader worker
    every checkpoint_every steps and at every epoch's end: ``last`` (model, optimizer,
        MoRec's state, progress)

The first validation pass measures the base itself: its metrics are the reference of
validity (Hit@10 ≥ 97% of the base's) and Imp on validation, and its signal makes the
first mass update. The selected checkpoint (``best``) is, among the passes, the valid one
(Hit at least ``select_hit`` of the base's, the paper's 0.97 by default) with the highest
validation Imp (the base itself, Imp 0, included), or the highest Hit if none is. A run
with the single objective ``accuracy`` and no controller is plain continued training from
the same base: the row every MoRec result must beat.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from morec_rec.config import MoRecConfig, SamplerConfig, TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import checkpoint, distributed
from morec_rec.jobs.collate import Collator
from morec_rec.jobs.models import num_negatives, per_row_loss
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.jobs.models.scorer import ModelScorer
from morec_rec.jobs.run import Run
from morec_rec.jobs.train import LOG_EVERY, build_sharded, model_identity
from morec_rec.plugin.control.coordinator import Coordinator
from morec_rec.plugin.eval.metrics import VALIDITY_THRESHOLD, improvement, is_valid
from morec_rec.plugin.eval.ranking import K
from morec_rec.plugin.morec import MoRec


@dataclasses.dataclass
class MoRecProgress:
    """Where continued training stands; saved in every checkpoint's metadata."""

    epoch: int = 0
    step: int = 0
    #: Validation metrics of the base (the reference of validity and Imp).
    base: dict[str, float] | None = None
    #: The selected pass: its step, [valid (0/1), Imp or Hit] and validation metrics.
    best_step: int = -1
    best_key: list[float] | None = None
    best: dict[str, Any] | None = None


def continue_training(base: Run, dataset: PreparedDataset, train_config: TrainConfig,
                      sampler_config: SamplerConfig, config: MoRecConfig, run: Run, *,
                      resume: bool = False) -> MoRecProgress:
    """Continues ``base``'s best checkpoint with MoRec into ``run``; returns the progress.

    Checkpoints (``last``) are taken every ``train_config.checkpoint_every`` steps and at
    the end of every epoch. With ``resume``, continues ``run`` from ``last``: model,
    optimizer, MoRec's state (position, published masses, controllers) and progress, so
    that the rest of the run, batch for batch, is the one an uninterrupted run would have
    had; its log keeps the records up to that checkpoint. Without ``last`` it starts over.
    """
    env = distributed.init()
    model, optimizer = build_sharded(train_config, dataset, env)
    identity = model_identity(train_config, dataset)
    meta = (checkpoint.load(run.last, model, optimizer, identity)
            if resume and checkpoint.resolve(run.last) else None)
    if meta is None:
        checkpoint.load(base.best, model, optimizer, identity)
    if config.continued_lr:  # a checkpoint's optimizer state carries the base's
        for group in optimizer.param_groups:
            group["lr"] = config.continued_lr
    progress = MoRecProgress(**meta["progress"]) if meta else MoRecProgress()
    run.truncate_log(progress.step if meta else None)

    negatives = NegativeSampler(dataset.items()["train_count"].to_numpy(),
                                train_config.negative_beta)
    feature_names, n = model.module.feature_names, num_negatives(train_config.model)
    collate = Collator(feature_names, negatives, n, seed=train_config.seed, rank=env.rank)
    morec = MoRec(dataset, collate, rows=per_row_loss,
                  columns=[c for c in ("history",) if c in feature_names],
                  # Rank 0's negatives on every rank: any world size measures the same.
                  validation_collate=Collator(feature_names, negatives, n,
                                              seed=train_config.seed),
                  scorer=ModelScorer(model.module, env.device), sampler=sampler_config,
                  config=config, num_workers=train_config.num_workers, device=env.device,
                  chunk_users=train_config.eval_chunk_users)
    hook = morec.loss(model)
    if meta:
        morec.load_state_dict(meta["morec"])
    coordinator = hook.coordinator
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device, custom_model_fwd=hook)
    batches = morec.batches_per_epoch
    update_every = max(1, batches // config.updates_per_epoch)

    def save(path: Any) -> None:
        checkpoint.save(path, model, optimizer,
                        {**identity, "progress": dataclasses.asdict(progress),
                         "morec": morec.state_dict()})

    def validate() -> None:
        """One validation round: the selection, the controllers, a mass update."""
        record = morec.validate(pipeline.detach())
        selection = select(progress, record["metrics"], config.select_hit)
        if selection["selected"]:
            save(run.best)
        run.log({"kind": "eval", "split": "valid", "epoch": progress.epoch,
                 "step": progress.step, **selection, "controlled": record["measures"],
                 "group_loss": record["group_loss"]})
        if "version" in record:
            run.log({"kind": "update", "epoch": progress.epoch, "step": progress.step,
                     **{k: record[k] for k in ("version", "effective_from", "masses")}})

    if progress.base is None:
        run.log({"kind": "update", "epoch": 0, "step": 0, "version": 0, "effective_from": 0,
                 "masses": {name: morec.masses[name].tolist() for name in _adaptive(morec)}})
        run.log({"kind": "targets", "target": coordinator.targets,
                 "base_loss": morec.state_dict()["base_losses"]})
        validate()

    records = _StepRecords(coordinator, config, run, morec, samples_per_step=(
        morec.loader.sampler.batch_size * env.world_size))
    while progress.epoch < config.epochs:
        morec.set_epoch(progress.epoch)
        batches_iter = iter(morec.loader)
        done = morec.position - progress.epoch * batches
        bar = tqdm(total=batches, initial=done, desc=f"morec epoch {progress.epoch}",
                   unit="batch", leave=False, disable=None if env.is_main else True)
        while True:
            try:
                pipeline.progress(batches_iter)
            except StopIteration:
                break
            progress.step += 1
            done += 1
            records.step(progress, bar)
            if done % update_every == 0 and batches - done >= update_every // 2:
                validate()
            if train_config.checkpoint_every and progress.step % train_config.checkpoint_every == 0:
                records.flush(progress)
                save(run.last)
        bar.close()
        validate()
        progress.epoch += 1
        records.flush(progress)
        save(run.last)
    return progress


def _adaptive(morec: MoRec) -> list[str]:
    """The masses that validation rounds update: the adaptive objectives', and the
    shares of a batch under ``sampling`` coefficients."""
    names = [o.name for o in morec.objectives if o.num_groups > 1]
    return names + ["batch"] if morec.config.coefficients == "sampling" else names


def select(progress: MoRecProgress, metrics: Mapping[str, float],
           select_hit: float = VALIDITY_THRESHOLD, k: int = K) -> dict[str, Any]:
    """Scores a validation pass against the base; updates the selection in ``progress``.

    ``metrics`` are keyed like ``RankingMetrics.as_dict()`` at cut-off ``k``. A pass is
    selectable when its Hit is at least ``select_hit`` times the base's (the paper's validity,
    0.97, unless a margin is asked for); the selection is the selectable pass with the
    highest Imp, else the pass with the highest Hit. Returns the pass's record: its
    metrics, Imp (over the defined terms where a base metric is 0, with ``imp_undefined``
    naming them), validity (the paper's 97%) and whether it is selected.
    """
    current = dict(metrics)
    if progress.base is None:
        progress.base = current
    gain = improvement(progress.base, current)
    imp = gain.imp if gain.imp is not None else gain.imp_defined
    hit, base_hit = current[f"hit@{k}"], progress.base[f"hit@{k}"]
    selectable = is_valid(base_hit, hit, select_hit)
    key = [1.0, imp if imp is not None else 0.0] if selectable else [0.0, hit]
    selected = progress.best_key is None or key > progress.best_key
    record = {**current, "imp": imp, "imp_undefined": list(gain.undefined),
              "valid": is_valid(base_hit, hit), "selected": selected}
    if selected:
        progress.best_key, progress.best_step, progress.best = key, progress.step, record
    return record


def saturated(beta: float, config: MoRecConfig) -> bool:
    """Whether β is at a bound of its range, to 1% of the range."""
    tolerance = 0.01 * (config.beta_max - config.beta_min)
    return not config.beta_min + tolerance < beta < config.beta_max - tolerance


class _StepRecords:
    """A "step" record every ``LOG_EVERY`` steps and at every checkpoint: the steps' mean
    per-objective losses (one collective), each held objective's β, target and mean
    controlled value over the steps (its loss, or its last validation measure, by
    ``config.control``), and the share of the steps at which β sat at a bound of its
    range (see :func:`saturated`). A record covers the steps since the one before, so a
    run resumed from a checkpoint logs what an uninterrupted one does."""

    def __init__(self, coordinator: Coordinator, config: MoRecConfig, run: Run, morec: MoRec,
                 samples_per_step: int) -> None:
        self.coordinator, self.config, self.run, self.morec = coordinator, config, run, morec
        self.samples_per_step = samples_per_step
        self.at_bound: list[dict[str, bool]] = []
        self.controlled: list[dict[str, float]] = []
        self.started, self.steps = time.perf_counter(), 0

    def step(self, progress: MoRecProgress, bar: tqdm) -> None:
        """Notes a step; logs the record when it is due."""
        coefficients = self.coordinator.coefficients
        self.at_bound.append({k: saturated(v, self.config) for k, v in coefficients.items()})
        self.controlled.append(self.coordinator.measured)
        self.steps += 1
        bar.set_postfix(samples_per_s=f"{self.rate:,.0f}",
                        **{f"beta_{k}": f"{v:.3f}" for k, v in coefficients.items()})
        bar.update()
        if progress.step % LOG_EVERY == 0:
            self.flush(progress)

    @property
    def rate(self) -> float:
        return self.steps * self.samples_per_step / (time.perf_counter() - self.started)

    def flush(self, progress: MoRecProgress) -> None:
        """Logs the record of the steps since the last one (a collective), if any."""
        if not self.controlled:
            return
        losses = self.morec.objective_losses()
        shares = self.coordinator.q / self.coordinator.q.sum()
        defined = [(s, v) for s, v in zip(shares, losses.values()) if v is not None]
        coefficients = self.coordinator.coefficients
        self.run.log({
            "kind": "step", "epoch": progress.epoch, "step": progress.step,
            "loss": float(sum(s * v for s, v in defined) / sum(s for s, _ in defined)),
            "samples_per_s": self.rate, "objective_loss": losses, "coefficient": coefficients,
            "target": self.coordinator.targets,
            "controlled": {k: float(np.mean([c[k] for c in self.controlled]))
                           for k in coefficients},
            "at_bound": {k: float(np.mean([b[k] for b in self.at_bound])) for k in coefficients}})
        self.at_bound, self.controlled = [], []
