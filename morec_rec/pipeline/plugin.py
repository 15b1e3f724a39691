"""MoRec inside an existing TorchRec job: its loader, its loss hook, its update round.

    morec = MoRec(dataset, sampler_config, morec_config, rank=rank, world_size=world_size,
                  num_workers=1)
    loader = morec.loader(collate)        # SampledBatch -> the job's own batch type
    hook = morec.loss(model, morec.calibrate(model, collate, device))
    pipeline = TrainPipelineSparseDist(model, optimizer, device, custom_model_fwd=hook)
    ...
    every N steps:
        pipeline.detach()
        metrics = the job's validation metrics (needed for alignment and validation control)
        morec.control(hook, base_metrics, metrics)     # validation control only
        morec.update(morec.validation_signal(model, collate, device, metrics), batch_index)

The job keeps its model, its batch type (which gains the rows' segment ids) and its
pipeline. :func:`morec_rec.pipeline.morec.continue_training` is this loop with the
reference backbones, checkpoints and selection around it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from morec_rec.config import MoRecConfig, SamplerConfig
from morec_rec.control.coordinator import Coordinator
from morec_rec.control.measures import relative_measures
from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.eval.metrics import RankingMetrics
from morec_rec.eval.signals import group_losses, loss_groups, validation_signal
from morec_rec.pipeline.hook import MoRecLoss, RowsOf, backbone_rows, objective_means
from morec_rec.sampling.batch import SampledBatch
from morec_rec.sampling.objectives import Objective, ValidationSignal, build_objectives
from morec_rec.sampling.sampler import BATCH, WeightedStreamSampler
from morec_rec.sampling.store import StoreSpec, WeightStore, publish_and_sync

#: Batches each loader worker prepares ahead (StatefulDataLoader's prefetch_factor).
PREFETCH = 2
#: Batches TrainPipelineSparseDist has taken from the loader beyond the one it trains on.
PIPELINE_DEPTH = 2

#: SampledBatch -> the job's batch (which carries the rows' segment ids).
Collate = Callable[[SampledBatch], Any]


def check_objectives(objectives: Sequence[Objective], dataset: PreparedDataset) -> None:
    """MorecError naming the column an objective needs and the data lack."""
    columns = set(pq.read_schema(dataset.train_files[0]).names)
    for objective in objectives:
        missing = sorted(set(objective.columns) - columns)
        if missing:
            raise MorecError(f"{dataset.root}: objective {objective.name!r} needs column(s) "
                             f"{', '.join(missing)}, which the data lack")


def check_settings(dataset: PreparedDataset, sampler_config: SamplerConfig,
                   config: MoRecConfig) -> list[Objective]:
    """The objectives, after checking every setting that can be checked before training
    (objective names and columns, p against them, held objectives and targets)."""
    objectives = build_objectives(sampler_config.objectives, dataset.manifest,
                                  step=sampler_config.step, floor=sampler_config.floor,
                                  rule=sampler_config.update_rule,
                                  fairness_signal=sampler_config.fairness_signal)
    check_objectives(objectives, dataset)
    names = [o.name for o in objectives]
    Coordinator.from_config(config, names, dict.fromkeys(names, 1.0))  # raises if inconsistent
    return objectives


class MoRec:
    """The sampler and weight store of one MoRec job on one rank, and its loss hook.

    Args:
        dataset: the prepared data (``train/`` is sampled, ``valid`` measured).
        sampler_config: objectives (the batch's segment ids, in order), sizes, seed.
        config: the coordinator's settings (preference, scale, held objectives, gains).
        rank, world_size: this process's place in the data-parallel job.
        num_workers: loader worker processes per rank (a process outside torchrun
            hosts a local store for them).
        masses: the masses in force, by objective, and the objectives' shares of a batch
            under :data:`~morec_rec.sampling.sampler.BATCH` (default: each objective's
            initial masses, and shares ∝ the initial coefficients under ``sampling``
            coefficients, equal otherwise); pass the checkpointed ones to resume.
        namespace: where this job's versions live in the weight store; each MoRec of one
            process group (a MoRec run, then its continued-training row) needs its own.

    Raises:
        MorecError: an unknown objective, a column it needs that the data lack, or
            coordinator settings that do not fit the objectives.
    """

    def __init__(self, dataset: PreparedDataset, sampler_config: SamplerConfig,
                 config: MoRecConfig, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, masses: Mapping[str, np.ndarray] | None = None,
                 namespace: str = "morec") -> None:
        self.objectives = check_settings(dataset, sampler_config, config)
        self.names = [o.name for o in self.objectives]
        self.dataset, self.sampler_config, self.config = dataset, sampler_config, config
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        initial = {o.name: o.initial_masses() for o in self.objectives}
        initial[BATCH] = (self._shares(Coordinator.from_config(config, self.names, None))
                          if config.coefficients == "sampling"
                          else np.full(len(self.names), 1 / len(self.names)))
        self.masses = {name: np.asarray((masses or {}).get(name, value))
                       for name, value in initial.items()}
        spec, self._store_server = StoreSpec.for_loader(num_workers)
        spec = dataclasses.replace(spec, prefix=f"{spec.prefix}/{namespace}")
        self.store = WeightStore.connect(spec)
        self.sampler = WeightedStreamSampler(dataset, self.objectives, sampler_config,
                                             rank=rank, world_size=world_size, store=spec,
                                             masses=self.masses)
        self._valid_rows = dataset.split("valid")
        self._pending_shares: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches the loader yields per epoch on this rank."""
        return self.sampler.batches_per_epoch(self.num_workers)

    @property
    def adaptive(self) -> list[str]:
        """The masses that validation passes update: the adaptive objectives', and the
        shares of a batch (:data:`~morec_rec.sampling.sampler.BATCH`) under ``sampling``
        coefficients."""
        names = [o.name for o in self.objectives if o.num_groups > 1]
        return names + [BATCH] if self.config.coefficients == "sampling" else names

    @property
    def lookahead(self) -> int:
        """Loader batches that may be drawn before an update published now can apply:
        the pipeline's in-flight batches, every worker's prefetch, and the next one."""
        return PIPELINE_DEPTH + PREFETCH * self.num_workers + 1

    def loader(self, collate: Collate) -> StatefulDataLoader:
        """The training loader: each batch one sub-batch per objective, in order (each as
        long as the objective's share), through ``collate``. Call
        ``loader.dataset.set_epoch(e)`` (or :meth:`set_epoch`) per epoch."""
        return StatefulDataLoader(self.sampler, batch_size=None, num_workers=self.num_workers,
                                  collate_fn=collate,
                                  prefetch_factor=PREFETCH if self.num_workers else None)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def calibrate(self, model: nn.Module, collate: Collate, device: torch.device,
                  num_batches: int | None = None, *,
                  rows: RowsOf = backbone_rows) -> dict[str, float]:
        """Each objective's mean loss under ``model`` before training on: what an
        ``auto`` target is derived from. Measured without gradient, in the model's
        current mode, over ``num_batches`` (default ``calibration_batches``) batches of a
        stream seeded apart from training's, from the initial masses; averaged over ranks."""
        sampler = WeightedStreamSampler(
            self.dataset, self.objectives,
            dataclasses.replace(self.sampler_config, seed=self.sampler_config.seed + 1),
            rank=self.rank, world_size=self.world_size)
        num_batches = min(num_batches or self.config.calibration_batches,
                          sampler.batches_per_epoch())
        if num_batches < 1:
            raise MorecError(f"{self.dataset.root}: too few training rows for one batch of "
                             f"{sampler.batch_size} per rank")
        means = []
        with torch.no_grad():
            for _, sampled in zip(range(num_batches), sampler):
                batch = collate(sampled).to(device)
                per_row, segments = rows(batch, model(batch)[1])
                means.append(objective_means(per_row, segments, len(self.objectives)))
        return dict(zip(self.names, np.mean(means, axis=0).tolist()))

    def loss(self, model: nn.Module, base_losses: Mapping[str, float] | None = None, *,
             state: Mapping[str, Any] | None = None, rows: RowsOf = backbone_rows) -> MoRecLoss:
        """The ``custom_model_fwd`` (and plain-loop loss) for ``model``.

        ``base_losses`` (from :meth:`calibrate`) resolve ``auto`` targets; ``state`` is a
        checkpointed coordinator state to resume from; ``rows(batch, output)`` finds the
        per-row losses and segment ids (default: the reference backbones' output).
        """
        coordinator = Coordinator.from_config(self.config, self.names, base_losses)
        if state is not None:
            coordinator.load_state_dict(state)
        return MoRecLoss(model, coordinator, rows=rows,
                         control_per_step=self.config.control == "training",
                         coefficients=self.config.coefficients)

    def control(self, hook: MoRecLoss, base: Mapping[str, float],
                metrics: Mapping[str, float], k: int = 10) -> dict[str, float]:
        """Under ``validation`` control, steps ``hook``'s controllers with each held
        objective's validation measure (:mod:`morec_rec.control.measures`): ``metrics`` of
        this pass against ``base``, the base model's, both keyed like
        ``RankingMetrics.as_dict()`` (``hit@10``, ...) at cut-off ``k``. Under ``sampling``
        coefficients, the new shares of a batch go out with the next :meth:`update`.
        Returns the measures. Under ``training`` control (the hook steps the controllers)
        it does nothing and returns {}. Every rank passes the same metrics."""
        if self.config.control == "training":
            return {}
        coordinator = hook.coordinator
        measures = relative_measures(coordinator.targets, base, metrics, k)
        coordinator.observe(measures)
        if self.config.coefficients == "sampling":
            shares = self._shares(coordinator)
            if not np.array_equal(shares, self.masses[BATCH]):
                self._pending_shares = shares
        return measures

    @staticmethod
    def _shares(coordinator: Coordinator) -> np.ndarray:
        """The objectives' shares of a batch: the coefficients q, normalised."""
        q = coordinator.q
        return q / q.sum()

    def validation_signal(self, model: nn.Module, collate: Collate, device: torch.device,
                          metrics: RankingMetrics | None = None) -> ValidationSignal:
        """The signal of one validation pass: ``model``'s mean loss per fairness and
        popularity group on the validation rows (in eval mode, without gradient; the mode
        is restored), and the top-K exposure of ``metrics`` (needed by ``alignment``). A
        collective. ``collate`` must draw the same negatives on every rank for the same
        ``batch_index`` (the reference Collator does with rank 0). Detach a
        TrainPipelineSparseDist first (``pipeline.detach()``)."""
        if metrics is None and ("alignment" in self.names
                                or self.sampler_config.fairness_signal == "hit"):
            raise MorecError("objective 'alignment' needs the top-K exposure, and fairness "
                             "by hit the per-group Hit: pass the validation pass's ranking "
                             "metrics")
        training = model.training
        model.eval()
        with torch.no_grad():
            losses = group_losses(model, self._valid_rows, collate,
                                  loss_groups(self.dataset.manifest), device=device)
        model.train(training)
        if metrics is None:
            return ValidationSignal(group_loss=losses, exposure={})
        return validation_signal(losses, metrics)

    def update(self, signal: ValidationSignal, batch_index: int, *,
               drawn_ahead: bool = True) -> dict[str, Any] | None:
        """Steps each adaptive objective's masses by ``signal`` and publishes them to apply
        from loader batch ``batch_index + lookahead`` (``batch_index``: batches the loader
        has yielded so far, over all epochs), or from ``batch_index`` itself when nothing
        is ``drawn_ahead`` (the loader's iterator is exhausted: between epochs). A
        collective: every rank calls it, rank 0's masses are published, with the shares
        of a batch that :meth:`control` set. Returns the update's record, or None when
        there is nothing to publish."""
        updated = {o.name: o.update(self.masses[o.name], signal)
                   for o in self.objectives if o.num_groups > 1}
        if self._pending_shares is not None:
            updated[BATCH], self._pending_shares = self._pending_shares, None
        if not updated:
            return None
        effective_from = batch_index + (self.lookahead if drawn_ahead else 0)
        version = publish_and_sync(self.store, updated, effective_from)
        self.masses.update(self.store.read(version).values)
        return {"version": version, "effective_from": effective_from,
                "masses": {k: v.tolist() for k, v in updated.items()}}
