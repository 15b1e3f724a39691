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
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from morec_rec.config import MoRecConfig, SamplerConfig, TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import checkpoint, distributed
from morec_rec.jobs.collate import Collator
from morec_rec.jobs.loop import Progress, fit
from morec_rec.jobs.models import num_negatives, per_row_loss, representation
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.jobs.models.scorer import ModelScorer
from morec_rec.jobs.run import Run
from morec_rec.jobs.train import build_sharded, model_identity
from morec_rec.plugin.control.coordinator import Coordinator
from morec_rec.plugin.eval.metrics import VALIDITY_THRESHOLD, improvement, is_valid
from morec_rec.plugin.eval.ranking import K
from morec_rec.plugin.morec import MoRec


@dataclasses.dataclass
class MoRecProgress(Progress):
    """Where continued training stands; saved in every checkpoint's metadata."""

    #: Validation metrics of the base (the reference of validity and Imp).
    base: dict[str, float] | None = None
    #: The selected pass: [valid (0/1), Imp or Hit] and its validation metrics.
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
    distributed.share_cpus()
    distributed.keep_freed_memory()
    model, optimizer = build_sharded(train_config, dataset, env)
    identity = model_identity(train_config, dataset)
    meta = (checkpoint.load(run.last, model, optimizer, identity, ("progress", "morec"))
            if resume and checkpoint.resolve(run.last) else None)
    if meta is None:
        checkpoint.load(base.best, model, optimizer, identity)
    if config.continued_lr:  # a checkpoint's optimizer state carries the base's
        for group in optimizer.param_groups:
            group["lr"] = config.continued_lr
    progress = MoRecProgress.restore(meta["progress"], run.last) if meta else MoRecProgress()
    run.truncate_log(progress.step if meta else None)

    negatives = NegativeSampler(dataset.item_columns(["train_count"])["train_count"],
                                train_config.negative_beta)
    feature_names, n = model.module.feature_names, num_negatives(train_config.model)
    collate = Collator(feature_names, negatives, n, seed=train_config.seed, rank=env.rank)
    morec = MoRec(dataset, collate, rows=per_row_loss, columns=collate.columns,
                  # Rank 0's negatives on every rank: any world size measures the same.
                  validation_collate=Collator(feature_names, negatives, n,
                                              seed=train_config.seed),
                  scorer=ModelScorer(model.module, env.device), representation=representation,
                  sampler=sampler_config,
                  config=config, num_workers=train_config.num_workers,
                  batches_per_request=train_config.batches_per_request, device=env.device,
                  chunk_users=train_config.eval_chunk_users)
    if meta:  # before loss(), which would otherwise measure the resumed model's losses
        morec.load_state_dict(meta["morec"])
    hook = morec.loss(model)
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device, custom_model_fwd=hook)
    stage = _ContinuedTraining(morec, morec.coordinator, model, optimizer, identity, progress,
                               config, run, env)
    if progress.base is None:
        run.log({"kind": "update", "epoch": 0, "step": 0, "version": 0, "effective_from": 0,
                 "masses": {name: morec.masses[name].tolist() for name in _adaptive(morec)}})
        run.log({"kind": "targets", "target": morec.coordinator.targets,
                 "base_loss": morec.state_dict()["base_losses"]})
        stage.validate(model)
    fit(pipeline, stage, run, env, train_config.checkpoint_every, train_config.seed)
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


class _ContinuedTraining:
    """Continued training as a :class:`~morec_rec.jobs.loop.Stage`: MoRec's loader, its
    validation rounds ``updates_per_epoch`` times an epoch (the selection, the
    controllers, a mass update), ``epochs`` epochs.

    A step record holds the steps' mean per-objective losses (one collective), each held
    objective's β, target and mean controlled value over the steps (its loss, or its last
    validation measure, by ``config.control``), and the share of the steps at which β sat
    at a bound of its range (see :func:`saturated`).
    """

    name = "morec epoch"

    def __init__(self, morec: MoRec, coordinator: Coordinator, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, identity: dict[str, Any],
                 progress: MoRecProgress, config: MoRecConfig, run: Run,
                 env: distributed.Environment) -> None:
        self.morec, self.coordinator = morec, coordinator
        self.model, self.optimizer, self.identity = model, optimizer, identity
        self.progress, self.config, self.run = progress, config, run
        self.batches_per_epoch = morec.batches_per_epoch
        self.samples_per_step = morec.loader.sampler.batch_size * env.world_size
        self.update_every = max(1, self.batches_per_epoch // config.updates_per_epoch)
        self.at_bound: list[dict[str, bool]] = []
        self.controlled: list[dict[str, float]] = []

    def finished(self) -> bool:
        return self.progress.epoch >= self.config.epochs

    def epoch_batches(self) -> Iterator[Any]:
        self.morec.set_epoch(self.progress.epoch)
        return iter(self.morec.loader)

    def step(self, output: Any) -> dict[str, str]:
        coefficients = self.coordinator.coefficients
        self.at_bound.append({k: saturated(v, self.config) for k, v in coefficients.items()})
        self.controlled.append(self.coordinator.measured)
        return {f"beta_{k}": f"{v:.3f}" for k, v in coefficients.items()}

    def record(self) -> dict[str, Any]:
        losses = self.morec.objective_losses()
        shares = self.coordinator.q / self.coordinator.q.sum()
        defined = [(s, v) for s, v in zip(shares, losses.values()) if v is not None]
        coefficients = self.coordinator.coefficients
        record = {
            "loss": float(sum(s * v for s, v in defined) / sum(s for s, _ in defined)),
            "objective_loss": losses, "coefficient": coefficients,
            "target": self.coordinator.targets,
            "controlled": {k: float(np.mean([c[k] for c in self.controlled]))
                           for k in coefficients},
            "at_bound": {k: float(np.mean([b[k] for b in self.at_bound])) for k in coefficients}}
        weights = self.morec.weights
        if weights is not None:  # the loss forms' weights at the last step
            record["weights"] = dict(zip(self.morec.names, weights.tolist()))
        self.at_bound, self.controlled = [], []
        return record

    def validation_due(self, done: int) -> bool:
        # Not within half an interval of the epoch's end, where the epoch's own pass falls.
        return (done % self.update_every == 0
                and self.batches_per_epoch - done >= self.update_every // 2)

    def validate(self, model: torch.nn.Module) -> None:
        """One validation round: the selection, the controllers, a mass update."""
        progress, started = self.progress, time.perf_counter()
        record = self.morec.validate(model)
        selection = select(progress, record["metrics"], self.config.select_hit)
        if selection["selected"]:
            self._save(self.run.best)
        self.run.log({"kind": "eval", "split": "valid", "epoch": progress.epoch,
                      "step": progress.step, "users": record["users"], **selection,
                      "controlled": record["measures"],
                      "group_loss": record["group_loss"],
                      "seconds": round(time.perf_counter() - started, 3)})
        if "version" in record:
            self.run.log({"kind": "update", "epoch": progress.epoch, "step": progress.step,
                          **{k: record[k] for k in ("version", "effective_from", "masses")}})

    def end_epoch(self) -> None:
        """Nothing: a run's epochs are its validation rounds' business."""

    def save(self) -> None:
        self._save(self.run.last)

    def _save(self, path: Any) -> None:
        checkpoint.save(path, self.model, self.optimizer,
                        {**self.identity, "progress": dataclasses.asdict(self.progress),
                         "morec": self.morec.state_dict()})
