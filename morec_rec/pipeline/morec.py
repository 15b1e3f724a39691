"""MoRec continued training: from a converged base, several objectives at once.

    base run's best checkpoint ─► DMP model + optimizer (state continued)
    weighted sampler (one sub-batch per objective) ─► TrainPipelineSparseDist
        custom_model_fwd = MoRecLoss: per-objective means, all-reduced, PI coordinator
    every epoch / updates_per_epoch: validation pass (ranking metrics, per-group losses)
        ─► rank 0 steps the group masses ─► weight store ─► every loader worker

The first validation pass measures the base itself: its metrics are the reference of
validity (Hit@10 ≥ 97% of the base's) and Imp on validation, and its signal makes the
first mass update. The selected checkpoint (``best``) is, among the passes, the valid one
(Hit at least ``select_hit`` of the base's, SPEC's 0.97 by default) with the highest
validation Imp (the base itself, Imp 0, included), or the highest Hit if none is. A run
with the single objective ``accuracy`` and no controller is plain continued training from
the same base: the row every MoRec result must beat.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from morec_rec.config import MoRecConfig, SamplerConfig, TrainConfig
from morec_rec.control.coordinator import Coordinator, needs_base_losses
from morec_rec.data.format import PreparedDataset
from morec_rec.eval.metrics import VALIDITY_THRESHOLD, RankingMetrics, improvement, is_valid
from morec_rec.eval.ranking import ModelScorer, RankingTask, evaluate, load_task
from morec_rec.models import num_negatives
from morec_rec.models.negatives import NegativeSampler
from morec_rec.pipeline import checkpoint, distributed
from morec_rec.pipeline.batch import Collator
from morec_rec.pipeline.plugin import MoRec
from morec_rec.pipeline.run import Run
from morec_rec.pipeline.train import LOG_EVERY, build_sharded, model_identity
from morec_rec.sampling.objectives import ValidationSignal


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

    With ``resume``, continues ``run`` from its last checkpoint (the end of an epoch):
    model, optimizer, group masses, controllers and progress, so that the rest of the run
    is the one an uninterrupted run would have had; its log keeps the records up to that
    checkpoint. Without a last checkpoint it starts over.
    """
    env = distributed.init()
    model, optimizer = build_sharded(train_config, dataset, env)
    identity = model_identity(train_config, dataset)
    progress, masses, base_losses, coordinator_state = MoRecProgress(), None, None, None
    if resume and run.last.exists():
        meta = checkpoint.load(run.last, model, optimizer, identity)
        progress = MoRecProgress(**meta["progress"])
        masses = {k: np.asarray(v) for k, v in meta["masses"].items()}
        base_losses, coordinator_state = meta["base_losses"], meta["coordinator"]
        run.truncate_log(progress.step)
    else:
        checkpoint.load(base.best, model, optimizer, identity)
        run.truncate_log(None)
    if config.continued_lr:
        for group in optimizer.param_groups:
            group["lr"] = config.continued_lr

    morec = MoRec(dataset, sampler_config, config, rank=env.rank, world_size=env.world_size,
                  num_workers=train_config.num_workers, masses=masses, namespace=run.root.name)
    negatives = NegativeSampler(dataset.items()["train_count"].to_numpy(),
                                train_config.negative_beta)
    feature_names = model.module.feature_names
    n = num_negatives(train_config.model)
    collate = Collator(feature_names, negatives, n, seed=train_config.seed, rank=env.rank)
    if coordinator_state is None and needs_base_losses(config):
        base_losses = morec.calibrate(model, collate, env.device)
    hook = morec.loss(model, base_losses, state=coordinator_state)
    coordinator = hook.coordinator
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device, custom_model_fwd=hook)
    loader = morec.loader(collate)

    # Rank 0's negatives on every rank: any world size measures the same validation losses.
    validation_collate = Collator(feature_names, negatives, n, seed=train_config.seed)
    task = load_task(dataset, "valid")
    batches = morec.batches_per_epoch
    update_every = max(1, batches // config.updates_per_epoch)

    def checkpoint_meta() -> dict[str, Any]:
        return {**identity, "progress": dataclasses.asdict(progress),
                "base_losses": base_losses, "coordinator": coordinator.state_dict(),
                "masses": {k: v.tolist() for k, v in morec.masses.items()}}

    def validate_and_update(batch_index: int, drawn_ahead: bool = True) -> None:
        """One validation pass, the selection, then a mass update applying from past the
        loader's batches that may be drawn already (none between epochs)."""
        pipeline.detach()
        metrics, signal = validation_pass(morec, model, task, validation_collate,
                                          train_config.eval_chunk_users, env.device)
        record = select(progress, metrics, config.select_hit)
        if record["selected"]:
            checkpoint.save(run.best, model, optimizer, checkpoint_meta())
        controlled = morec.control(hook, progress.base, metrics.as_dict(), metrics.k)
        run.log({"kind": "eval", "split": "valid", "epoch": progress.epoch,
                 "step": progress.step, **record, "controlled": controlled,
                 "group_loss": {k: v.tolist() for k, v in signal.group_loss.items()}})
        update = morec.update(signal, batch_index, drawn_ahead=drawn_ahead)
        if update is not None:
            run.log({"kind": "update", "epoch": progress.epoch, "step": progress.step,
                     **update})

    if progress.base is None:
        run.log({"kind": "update", "epoch": 0, "step": 0, "version": 0, "effective_from": 0,
                 "masses": {name: morec.masses[name].tolist() for name in morec.adaptive}})
        run.log({"kind": "targets", "target": coordinator.targets, "base_loss": base_losses})
        validate_and_update(batch_index=0, drawn_ahead=False)

    while progress.epoch < config.epochs:
        morec.set_epoch(progress.epoch)
        first = progress.epoch * batches
        _train_epoch(pipeline, iter(loader), progress, run, coordinator, config, batches,
                     update_every, lambda done, end: validate_and_update(first + done, not end),
                     morec.sampler.batch_size * env.world_size, env)
        progress.epoch += 1
        checkpoint.save(run.last, model, optimizer, checkpoint_meta())
    return progress


def validation_pass(morec: MoRec, model: torch.nn.Module, task: RankingTask, collate: Collator,
                    chunk_users: int, device: torch.device,
                    ) -> tuple[RankingMetrics, ValidationSignal]:
    """A backbone's validation metrics and the sampler's signal, in eval mode without
    gradient (the model is left in training mode); a collective."""
    model.eval()
    with torch.no_grad():
        metrics = evaluate(ModelScorer(model.module, device), task, chunk_users=chunk_users)
    model.train()
    return metrics, morec.validation_signal(model, collate, device, metrics)


def select(progress: MoRecProgress, metrics: RankingMetrics,
           select_hit: float = VALIDITY_THRESHOLD) -> dict[str, Any]:
    """Scores a validation pass against the base; updates the selection in ``progress``.

    A pass is selectable when its Hit is at least ``select_hit`` times the base's (SPEC's
    validity, 0.97, unless a margin is asked for); the selection is the selectable pass
    with the highest Imp, else the pass with the highest Hit. Returns the pass's record:
    its metrics, Imp (over the defined terms where a base metric is 0, with
    ``imp_undefined`` naming them), validity (SPEC's 97%) and whether it is selected.
    """
    current = metrics.as_dict()
    if progress.base is None:
        progress.base = current
    gain = improvement(progress.base, current)
    imp = gain.imp if gain.imp is not None else gain.imp_defined
    base_hit = progress.base[f"hit@{metrics.k}"]
    selectable = is_valid(base_hit, metrics.hit, select_hit)
    key = [1.0, imp if imp is not None else 0.0] if selectable else [0.0, metrics.hit]
    selected = progress.best_key is None or key > progress.best_key
    record = {**current, "imp": imp, "imp_undefined": list(gain.undefined),
              "valid": is_valid(base_hit, metrics.hit), "selected": selected}
    if selected:
        progress.best_key, progress.best_step, progress.best = key, progress.step, record
    return record


def saturated(beta: float, config: MoRecConfig) -> bool:
    """Whether β is at a bound of its range, to 1% of the range: the anti-windup freezes
    the integral up to one integral step short of a bound, where β is as good as clamped."""
    tolerance = 0.01 * (config.beta_max - config.beta_min)
    return not config.beta_min + tolerance < beta < config.beta_max - tolerance


def _train_epoch(pipeline: TrainPipelineSparseDist, batches_iter: Any, progress: MoRecProgress,
                 run: Run, coordinator: Coordinator, config: MoRecConfig, total: int,
                 update_every: int, validate: Callable[[int, bool], None],
                 samples_per_step: int,
                 env: distributed.Environment) -> None:
    """One epoch of MoRec steps, validating every ``update_every`` steps and at the end.

    Every ``LOG_EVERY`` steps a "step" record holds the mean per-objective losses of those
    steps, each held objective's β, target and mean controlled value (its loss, or its
    last validation measure, by ``config.control``) over those steps, and the share of
    those steps at which β sat at a bound of its range (see :func:`saturated`).
    """
    losses: list[np.ndarray] = []
    at_bound: list[dict[str, bool]] = []
    controlled: list[dict[str, float]] = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc=f"morec epoch {progress.epoch}", unit="batch", leave=False,
               disable=None if env.is_main else True)
    done = 0
    while True:
        try:
            output = pipeline.progress(batches_iter)
        except StopIteration:
            break
        progress.step += 1
        done += 1
        losses.append(output.objective_loss.numpy())
        coefficients = coordinator.coefficients
        at_bound.append({k: saturated(v, config) for k, v in coefficients.items()})
        controlled.append(coordinator.measured)
        rate = done * samples_per_step / (time.perf_counter() - started)
        # nansum: under sampling coefficients an objective may draw no row in a step.
        loss = float(np.nansum(output.coefficients.numpy() * losses[-1]))
        bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:,.0f}",
                        **{f"beta_{k}": f"{v:.3f}" for k, v in coefficients.items()})
        bar.update()
        if progress.step % LOG_EVERY == 0:
            run.log({"kind": "step", "epoch": progress.epoch, "step": progress.step,
                     "loss": loss, "samples_per_s": rate,
                     "objective_loss": dict(zip(coordinator.objectives,
                                                _mean_of_defined(losses[-LOG_EVERY:]))),
                     "coefficient": coefficients, "target": coordinator.targets,
                     "controlled": {k: float(np.mean([c[k] for c in controlled[-LOG_EVERY:]]))
                                    for k in coefficients},
                     "at_bound": {k: float(np.mean([b[k] for b in at_bound[-LOG_EVERY:]]))
                                  for k in coefficients}})
        if done % update_every == 0 and total - done >= update_every // 2:
            validate(done, False)
    bar.close()
    validate(done, True)


def _mean_of_defined(values: list[np.ndarray]) -> list[float | None]:
    """Per column, the mean of the non-NaN entries of equal-length vectors; None where
    every entry is NaN (an objective that drew no row in those steps)."""
    stacked = np.stack(values)
    defined = ~np.isnan(stacked)
    total, count = np.where(defined, stacked, 0.0).sum(axis=0), defined.sum(axis=0)
    return [float(t / c) if c else None for t, c in zip(total, count)]
