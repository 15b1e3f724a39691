"""MoRec inside an existing training job: one object per rank.

    morec = MoRec(data, collate, rows=per_example_loss, scorer=scorer)
    pipeline = TrainPipelineSparseDist(model, optimizer, device,
                                       custom_model_fwd=morec.loss(model))
    for epoch in range(morec.epoch, epochs):
        morec.set_epoch(epoch)
        batches = iter(morec.loader)
        ... pipeline.progress(batches) ...
        every N steps: morec.validate(pipeline.detach())
                       pipeline.attach(model, sparse_dist=False)

It owns the sampler (with its loader), the weight store, the coordinator and the loss
hook. The model and the job's batch type stay as they are: the loader hands the pipeline
the job's batches wrapped with their rows' segment ids, and the hook unwraps them.
:meth:`MoRec.validate` runs the validation round: the job's scorer ranks the validation
users (validation control, alignment's exposure), the job's model measures each group's
validation loss (the objectives' signal), the controllers step, and the new masses are
published to apply from the first batch no loader worker has drawn. With a baseline
coordinator (``MoRecConfig.coordinator``) the same object draws plain batches and its hook
is a :class:`~morec_rec.plugin.baseline.BaselineLoss`; validation rounds then step no
controller (under ``loss`` coefficients they still update the objectives' masses).
With ``loss_forms`` coefficients (MoRec without its data sampler) it draws plain batches
too, and the same hook weighs the loss forms by MoRec's controlled coefficients; a
baseline under ``loss`` coefficients keeps MoRec's sampler and weighs its sub-batches'
mean losses (MoRec with the baseline as its coordinator).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from morec_rec.collectives import all_reduce, is_distributed, place
from morec_rec.config import MoRecConfig, SamplerConfig, TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.plugin.baseline import BaselineLoss, LossForms, Representation, SubBatchMeans
from morec_rec.plugin.control.coordinator import Coordinator, needs_base_losses
from morec_rec.plugin.control.measures import relative_measures
from morec_rec.plugin.control.objective_losses import ItemSideInformation, check_loss_objectives
from morec_rec.plugin.control.rules import Coefficients, Rule, build_rule
from morec_rec.plugin.eval.metrics import RankingMetrics
from morec_rec.plugin.eval.ranking import K, Scorer, evaluate, load_task
from morec_rec.plugin.hook import Examples, MoRecLoss, ObjectiveLosses, Rows, model_output
from morec_rec.plugin.loader import Collate, MoRecLoader, Segmenting, check_loader_settings
from morec_rec.plugin.sampling.objectives import (
    Objective,
    ValidationSignal,
    build_objectives,
    check_masses,
)
from morec_rec.plugin.sampling.sampler import BATCH, WeightedStreamSampler
from morec_rec.plugin.sampling.store import Masses, StoreSpec, WeightStore, publish_and_sync
from morec_rec.plugin.segments import ExampleLayout
from morec_rec.plugin.validation import (
    group_losses,
    loss_groups,
    sample_users,
    validation_signal,
)

logger = logging.getLogger(__name__)

Hook = TypeVar("Hook", MoRecLoss, BaselineLoss)

#: The version of :meth:`MoRec.state_dict`'s layout.
STATE_FORMAT = 1


def check_settings(dataset: PreparedDataset, sampler_config: SamplerConfig,
                   config: MoRecConfig,
                   objectives: Sequence[Objective | str] | None = None) -> list[Objective]:
    """The objectives, after checking every setting that can be checked before training
    (objective names and the columns they read, p against them, held objectives and
    their targets)."""
    built = _objectives(dataset, sampler_config, objectives)
    names = [o.name for o in built]
    if _loss_forms(config):
        _check_loss_forms(dataset, names)
    if config.coordinator == "morec":
        Coordinator.from_config(config, names, dict.fromkeys(names, 1.0))  # raises if inconsistent
    else:
        coordinator = Coordinator.from_config(_without_controllers(config), names, None)
        build_rule(config.coordinator, coordinator.weights)
    return built


class MoRec:
    """One rank's MoRec: its sampler and loader, weight store, coordinator and loss hook.

    Every rank of a job makes one, with the same arguments, after ``init_process_group``
    (construction is a collective there); every method named a collective below is
    called by every rank.

    Args:
        dataset: a prepared dataset (``train/`` is sampled, ``valid`` measured).
        collate: the sampled rows -> the job's batch (its model's input). Picklable when
            ``num_workers > 0``. On validation rows it must make the same batch for the
            same ``SampledBatch.batch_index`` on every rank (they are cut alike on every
            rank), e.g. drawing negatives from a seed of the batch index.
        rows: the model's per-example losses from ``(batch, output)``; default: the
            model's own loss, which must then be a vector of them.
        layout: how ``collate`` lays examples out over the sampled rows.
        scorer: the job's full-ranking scorer (users -> scores of every item); needed by
            ``validation`` control, ``alignment`` and fairness by ``hit``.
        representation: the tensors of the model's output that a gradient-based baseline
            coordinator (``config.coordinator``: ``mgda``, ``pe-mtl``, ``epo``) takes the
            objectives' gradients with respect to, from ``(batch, output)``.
        validation_collate: ``collate`` for the validation rows (default: ``collate``),
            for a job whose training collate differs by rank.
        columns: the row columns ``collate`` reads besides ``user_id`` and ``item_id``
            (``price``, ``fairness_group``, ``popularity_group``, ``history``); the
            sampler reads those and what the objectives read, nothing else.
        objectives: in segment order, ``Objective`` instances (user subclasses welcome)
            or built-in names; default: ``sampler.objectives``.
        sampler: sizes, draw mode, the built-ins' update rule, seed.
        config: the coordinator (preference, held objectives, gains, coefficients) and
            the validation users a round measures.
        num_workers, prefetch_factor: the loader's worker processes and the requests each
            prepares ahead.
        batches_per_request: batches a worker makes for one request of the loader
            (:class:`~morec_rec.plugin.loader.SamplerLoader`): more cost the trainer less
            a batch to receive, and draw more batches ahead of training, which a mass
            update then reaches later (default: the jobs',
            ``TrainConfig.batches_per_request``).
        pin_memory: the loader puts each batch in page-locked memory (torch's pinning
            thread), so that its copy to a CUDA device can run ahead of the host.
        device: where validation batches go (the model's device).
        chunk_users: users scored at a time in the validation ranking pass.

    Raises:
        MorecError: an unknown objective, a column an objective reads that the data
            lack, coordinator settings that do not fit the objectives, or a setting that
            needs a scorer without one.
    """

    def __init__(self, dataset: PreparedDataset | str | os.PathLike[str], collate: Collate, *,
                 rows: Rows | None = None, layout: ExampleLayout = ExampleLayout.ROWS,
                 scorer: Scorer | None = None, representation: Representation | None = None,
                 validation_collate: Collate | None = None,
                 columns: Sequence[str] = (),
                 objectives: Sequence[Objective | str] | None = None,
                 sampler: SamplerConfig | None = None, config: MoRecConfig | None = None,
                 num_workers: int = 0, prefetch_factor: int = 2,
                 batches_per_request: int = TrainConfig.batches_per_request,
                 pin_memory: bool = False, device: torch.device | str = "cpu",
                 chunk_users: int = 1024) -> None:
        check_loader_settings(num_workers, prefetch_factor, batches_per_request)
        given = {"collate": collate, "rows": rows, "scorer": scorer,
                 "representation": representation, "validation_collate": validation_collate}
        for name, function in given.items():
            if (function is not None or name == "collate") and not callable(function):
                raise MorecError(f"{name} = {function!r:.80} is not a function")
        if not isinstance(chunk_users, numbers.Integral) or chunk_users < 1:
            raise MorecError(f"chunk_users = {chunk_users!r} must be an int >= 1")
        try:
            layout = ExampleLayout(layout)
        except ValueError:
            raise MorecError(f"layout = {layout!r} is not an ExampleLayout nor one's value "
                             f"({', '.join(repr(e.value) for e in ExampleLayout)})") from None
        self.dataset = (dataset if isinstance(dataset, PreparedDataset)
                        else PreparedDataset.open(Path(dataset)))
        sampler, config = sampler or SamplerConfig(), config or MoRecConfig()
        self.objectives = _objectives(self.dataset, sampler, objectives)
        #: The objectives the coefficients weigh, in segment (or weight) order.
        self.names = [o.name for o in self.objectives]
        self.rank, self.world_size = place()
        self.dataset.check_batch(
            sampler.sub_batch_size * len(self.objectives), self.world_size * max(num_workers, 1),
            f"sub_batch_size = {sampler.sub_batch_size} × {len(self.objectives)} objective(s)")
        self.rule: Rule | None = None
        self._terms: LossForms | SubBatchMeans | None = None
        if config.coordinator != "morec":
            config = _without_controllers(config)
        if _loss_forms(config):
            # A baseline, and MoRec without its data sampler, draw MoRec's batch size from
            # accuracy's uniform distribution and weigh the objectives' loss forms.
            _check_loss_forms(self.dataset, self.names)
            sampler = dataclasses.replace(
                sampler, sub_batch_size=sampler.sub_batch_size * len(self.names))
            self.objectives = _objectives(self.dataset, sampler, ["accuracy"])
        self.config, self.sampler_config = config, sampler
        needs = _needs_scorer(config, self.objectives, sampler)
        if needs and scorer is None:
            raise MorecError(f"{needs} needs the job's scorer: pass scorer=, a function of a "
                             "chunk of users giving every item's score")
        self.collate, self.scorer = collate, scorer
        self.validation_collate = validation_collate or collate
        self.examples = Examples(rows, layout)
        self.representation = representation
        self.device = torch.device(device)
        self.chunk_users = chunk_users

        self._base_losses: dict[str, float] | None = None
        self.coordinator: Coordinator | None = None  # made by loss() after calibration
        if needs_base_losses(config):
            check_settings(self.dataset, sampler, config, self.objectives)
        else:
            self.coordinator = Coordinator.from_config(config, self.names, None)
        if _weighed_by_rule(config):
            coordinator = self.coordinator
            assert coordinator is not None  # no calibration: validation control
            self.rule = (Coefficients(lambda: coordinator.q) if config.coordinator == "morec"
                         else build_rule(config.coordinator, coordinator.weights))
            self._terms = (LossForms(self.names, ItemSideInformation.from_dataset(
                self.dataset).to(self.device)) if _loss_forms(config)
                else SubBatchMeans(len(self.names)))
        self._initial = {o.name: o.initial_masses() for o in self.objectives}
        self._initial[BATCH] = (_shares(self.coordinator) if self._sampling
                                else np.full(len(self.objectives), 1 / len(self.objectives)))
        self._masses = dict(self._initial)  # the latest published, rank 0's update input
        self._journal: list[Masses] = []  # every version published by this job
        # The job's number of a version is its number in this MoRec's store plus this: a
        # restored job republishes its versions merged, under new numbers.
        self._renumbered = 0
        self._warned_unseen = False

        spec, self._store_server = StoreSpec.for_loader(num_workers)
        self._spec = dataclasses.replace(spec, prefix=f"{spec.prefix}/{_generation()}")
        self.store = WeightStore.connect(self._spec)
        self.loader = MoRecLoader(
            WeightedStreamSampler(self.dataset, self.objectives, sampler, rank=self.rank,
                                  world_size=self.world_size, store=self._spec,
                                  masses=self._initial, columns=columns),
            collate, num_workers=num_workers, prefetch_factor=prefetch_factor,
            batches_per_request=batches_per_request, pin_memory=pin_memory,
            item_ids=isinstance(self._terms, LossForms))
        self._losses = ObjectiveLosses(self.names)
        self._hook: MoRecLoss | BaselineLoss | None = None
        self._position = 0  # the next batch to train, before the hook has trained any
        self._base: dict[str, float] | None = None
        self._valid_rows = sample_users(self.dataset.split("valid"), config.validation_users,
                                        sampler.seed)
        self._task = (load_task(self.dataset, "valid", self._valid_rows, rank=self.rank,
                                world_size=self.world_size) if scorer is not None else None)

    @property
    def _data(self) -> dict[str, Any]:
        """What identifies the training data in a saved state: its counts and shards' rows."""
        manifest = self.dataset.manifest
        return {"users": manifest["num_users"], "items": manifest["num_items"],
                "shard_rows": [shard["rows"] for shard in manifest["shards"]]}

    @property
    def _method(self) -> dict[str, str]:
        """How the objectives weigh, which a saved state's controllers and masses are of."""
        return {"coordinator": self.config.coordinator,
                "coefficients": self.config.coefficients, "control": self.config.control}

    @property
    def _sampling(self) -> bool:
        return self.rule is None and self.config.coefficients == "sampling"

    @property
    def weights(self) -> np.ndarray | None:
        """The weights α of the objectives' losses at the last training step (a
        baseline's, or q under ``loss_forms`` coefficients; None under MoRec's own hook,
        and before the first step)."""
        hook = self._hook
        return None if not isinstance(hook, BaselineLoss) or hook.weights is None \
            else hook.weights.copy()

    @property
    def batches_per_epoch(self) -> int:
        """Batches the loader yields per epoch on this rank."""
        return self.loader.batches_per_epoch

    @property
    def position(self) -> int:
        """The index of the next batch to train on (``epoch · batches_per_epoch +``
        its position): past the last batch the hook trained on."""
        trained = None if self._hook is None else self._hook.trained
        return self._position if trained is None else max(self._position, trained + 1)

    @property
    def epoch(self) -> int:
        """The epoch that :attr:`position` falls in: where a restored job goes on."""
        return self.position // self.batches_per_epoch

    @property
    def masses(self) -> dict[str, np.ndarray]:
        """The latest published masses by objective name, and the objectives' shares of a
        batch under :data:`~morec_rec.plugin.sampling.sampler.BATCH`."""
        return {k: v.copy() for k, v in self._masses.items()}

    @property
    def base(self) -> dict[str, float] | None:
        """The validation metrics of the first :meth:`validate` (the reference of
        validation control), or None before it."""
        return None if self._base is None else dict(self._base)

    def set_epoch(self, epoch: int) -> None:
        """The loader's next iteration yields the batches of ``epoch`` from
        :attr:`position` on: all of a new epoch, the rest of the one a restored job
        stopped in."""
        if not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise MorecError(f"set_epoch: epoch {epoch!r} must be an int >= 0")
        start = self.position - epoch * self.batches_per_epoch
        self.loader.set_epoch(epoch, min(max(start, 0), self.batches_per_epoch))

    def loss(self, model: nn.Module) -> MoRecLoss | BaselineLoss:
        """The loss hook of ``model``: TrainPipelineSparseDist's ``custom_model_fwd``, or
        the plain loop's ``loss, output = hook(batch)``. Under ``training`` control with a
        ``relative`` target it first measures the objectives' losses under ``model`` (a
        collective, see :meth:`calibrate`)."""
        self._check_place()
        _check_model("loss", model)
        if self.rule is not None:
            assert self._terms is not None
            if self._hook is None or self._hook.model is not model:
                self._hook = self._continued(BaselineLoss(
                    model, self.rule, self.names, self.examples, self._terms, self._losses,
                    self.representation))
            return self._hook
        if self.coordinator is None:
            self._base_losses = self.calibrate(model)
            self.coordinator = Coordinator.from_config(self.config, self.names,
                                                       self._base_losses)
        if self._hook is None or self._hook.model is not model:
            self._hook = self._continued(MoRecLoss(
                model, self.coordinator, self.examples, self._losses, weigh=not self._sampling,
                control_per_step=self.config.control == "training"))
        return self._hook

    def _check_place(self) -> None:
        """MorecError unless this process holds the place in the process group that it held
        when this MoRec was made: made before ``init_process_group``, every rank's loader
        would yield the same batches."""
        rank, world_size = place()
        if (rank, world_size) != (self.rank, self.world_size):
            raise MorecError(f"MoRec was made as rank {self.rank} of {self.world_size} and is "
                             f"used as rank {rank} of {world_size}: make it after "
                             "torch.distributed.init_process_group")

    def _continued(self, hook: Hook) -> Hook:
        """``hook``, going on after the batches trained before it: by the hook before it (a
        new hook is made for another model object, as a job that wraps or re-shards its
        model asks), or before the state this MoRec was restored from."""
        hook.trained = (self._hook.trained if self._hook is not None
                        else self._position - 1 if self._position else None)
        return hook

    def calibrate(self, model: nn.Module) -> dict[str, float]:
        """Each objective's mean loss under ``model``, without gradient, in its current
        mode, over ``calibration_batches`` batches of a stream seeded apart from
        training's, drawn from the initial masses; averaged over ranks (a collective)."""
        sampler = WeightedStreamSampler(
            self.dataset, self.objectives,
            dataclasses.replace(self.sampler_config, seed=self.sampler_config.seed + 1),
            rank=self.rank, world_size=self.world_size, masses=self._initial,
            columns=self.loader.sampler.carried)
        num_batches = min(self.config.calibration_batches, sampler.batches_per_epoch())
        if num_batches < 1:
            raise MorecError(f"{self.dataset.root}: too few training rows for one batch of "
                             f"{sampler.batch_size} per rank")
        losses = ObjectiveLosses(self.names)
        segmenting = Segmenting(self.collate)
        with torch.no_grad():
            for _, sampled in zip(range(num_batches), sampler):
                batch = segmenting(sampled).to(self.device)
                loss, output = model_output(model, batch.batch)
                per_example = self.examples.losses(batch.batch, loss, output,
                                                   len(batch.segment))
                losses.add(per_example, self.examples.expand(batch.segment, per_example))
        return dict(zip(self.names, losses.reduce().tolist()))

    def objective_losses(self) -> dict[str, float | None]:
        """Each objective's mean training loss over every rank since the last call (None
        for one that drew no row; MorecError where one was NaN or infinite): a collective
        that reads the device once, for the job's log interval."""
        return {name: None if np.isnan(v) else float(v)
                for name, v in zip(self.names, self._losses.reduce())}

    def validate(self, model: nn.Module) -> dict[str, Any]:
        """One validation round (a collective): measures ``model`` (in eval mode without
        gradient; its mode is restored) on the validation users (all, or the fixed sample
        of ``MoRecConfig.validation_users``), steps the controllers under ``validation``
        control, and publishes the objectives' new masses (and shares of a batch) to
        apply from the first batch no loader worker has drawn. The first round's metrics
        are the reference (:attr:`base`). Give a TorchRec pipeline's model as
        ``pipeline.detach()`` returns it, then ``pipeline.attach(model,
        sparse_dist=False)``. Warns (once) of a round that comes before the masses of the
        round before it apply: fewer batches between two rounds than the loader's
        :attr:`~morec_rec.plugin.loader.SamplerLoader.lookahead` and the pipeline's.

        Returns the round's record: ``users`` (the validation users measured),
        ``metrics`` (None without a scorer), ``measures`` (the controlled values),
        ``group_loss`` (the signal), ``coefficients`` (each held objective's β), ``q``, and
        the ``version`` (the job's count of versions so far, restores included),
        ``effective_from`` and ``masses`` published (absent if none).
        """
        self._check_place()
        _check_model("validate", model)
        if self.coordinator is None:
            raise MorecError("validate() needs the coordinator that loss(model) makes: "
                             "call loss() first")
        metrics, signal = self._measure(model)
        base = self._base
        if base is None:
            base = {} if metrics is None else metrics.as_dict()
        measures: dict[str, float] = {}
        if self.config.control == "validation":
            assert metrics is not None  # a scorer is required for it
            # Raises for a base no measure can be relative to: it is not kept then.
            measures = relative_measures(self.coordinator.targets, base, metrics.as_dict(),
                                         metrics.k)
            self.coordinator.observe(measures)
        self._base = base
        record: dict[str, Any] = {
            "users": len(self._valid_rows),
            "metrics": None if metrics is None else metrics.as_dict(), "measures": measures,
            "group_loss": {k: v.tolist() for k, v in signal.group_loss.items()},
            "coefficients": self.coordinator.coefficients,
            "q": dict(zip(self.names, self.coordinator.q.tolist()))}
        return {**record, **self._publish(signal)}

    def _measure(self, model: nn.Module) -> tuple[RankingMetrics | None, ValidationSignal]:
        # Each module's own mode is restored: a job may keep some in eval mode (a frozen
        # BatchNorm) while it trains the rest.
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                metrics = (None if self.scorer is None else
                           evaluate(self.scorer, self._task, k=K, chunk_users=self.chunk_users))
                losses = group_losses(model, self._valid_rows, self.validation_collate,
                                      loss_groups(self.dataset.manifest),
                                      examples=self.examples,
                                      columns=self.loader.sampler.carried, device=self.device)
        finally:
            # Through train(), in tree order: modules may override it (TorchRec's sharded
            # ones set their lookups' modes, which are not submodules).
            model.train(modes[0][1])
            for module, training in modes[1:]:
                if module.training != training:
                    module.train(training)
        if metrics is None:
            return None, ValidationSignal(group_loss=losses, exposure={})
        return metrics, validation_signal(losses, metrics)

    def _publish(self, signal: ValidationSignal) -> dict[str, Any]:
        """Rank 0's new masses, published on every rank from past the drawn batches."""
        updated = {o.name: o.update(self._masses[o.name], signal)
                   for o in self.objectives if o.num_groups > 1}
        if self._sampling:
            shares = _shares(self.coordinator)
            if not np.array_equal(shares, self._masses[BATCH]):
                updated[BATCH] = shares
        if not updated:
            return {}
        self._warn_if_unseen()
        # Versions apply in order: never before the one published last.
        effective_from = max(_max_over_ranks(self.loader.undrawn),
                             self._journal[-1].effective_from if self._journal else 0)
        masses = self._append(publish_and_sync(self.store, updated, effective_from))
        return {"version": masses.version + self._renumbered, "effective_from": effective_from,
                "masses": {k: v.tolist() for k, v in masses.values.items()}}

    def _warn_if_unseen(self) -> None:
        """Warns, once, of a round that comes before the masses of the round before it
        apply: it measures training that none of them drew, so the controllers and the
        updates act on the round before last."""
        last = self._journal[-1] if self._journal else None
        if (last is None or last.effective_from <= self.position or self._warned_unseen
                or self.rank != 0):
            return
        self._warned_unseen = True
        logger.warning(
            "validation round at batch %d: the masses published by the round before apply "
            "from batch %d, not trained yet, so this round measures none of them; validate "
            "at intervals longer than the loader's lookahead (%d batches) plus the batches "
            "the pipeline holds, or pass a smaller batches_per_request",
            self.position, last.effective_from, self.loader.lookahead)

    def _append(self, version: int) -> Masses:
        self.loader.sampler.announce(version)
        masses = self.store.read(version)
        self._journal.append(masses)
        self._masses.update(masses.values)
        return masses

    def state_dict(self) -> dict[str, Any]:
        """Everything MoRec needs to go on exactly where the hook last trained (JSON-
        serialisable, the same on every rank): the position, the versions published
        (those in force there merged into one) and their count, the controllers, the
        reference (and the number of validation users it is of), and what the position's
        batches depend on: the world size, the loader workers, the objectives and the
        sampler's settings."""
        position = self.position
        applied = [m for m in self._journal if m.effective_from <= position]
        merged: dict[str, Any] = {}
        for masses in applied:
            merged.update({k: v.tolist() for k, v in masses.values.items()})
        journal = ([{"effective_from": applied[-1].effective_from, "values": merged}]
                   if applied else [])
        journal += [{"effective_from": m.effective_from,
                     "values": {k: v.tolist() for k, v in m.values.items()}}
                    for m in self._journal if m.effective_from > position]
        return {"format": STATE_FORMAT, "position": position, "journal": journal,
                "published": (self._journal[-1].version if self._journal else 0)
                + self._renumbered,
                "world_size": self.world_size, "num_workers": self.loader.num_workers,
                "data": self._data, "method": self._method, "objectives": self.names,
                "sampler": json.loads(json.dumps(dataclasses.asdict(self.sampler_config))),
                "validation_users": self.config.validation_users,
                "coordinator": None if self.coordinator is None
                else self.coordinator.state_dict(),
                "rule": self.rule.state_dict() if hasattr(self.rule, "state_dict") else None,
                "base": self._base, "base_losses": self._base_losses}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict` into a MoRec made with the same settings, before
        :meth:`loss` and before it publishes anything (a collective: the versions are
        republished into this MoRec's own namespace of the store, so a fresh store loses
        none). MorecError, before anything is restored, for a state this MoRec cannot go
        on from."""
        # Under training control loss() measures the objectives' losses under the model
        # it is given: after a resume those of the resumed model, not the base's.
        if self._journal or self._hook is not None:
            raise MorecError("load_state_dict() must come before loss(), training and "
                             "validation")
        journal = self._check_state(state)
        self._base, self._base_losses = state["base"], state["base_losses"]
        if self.coordinator is None and self._base_losses is not None:
            self.coordinator = Coordinator.from_config(self.config, self.names,
                                                       self._base_losses)
        if state["coordinator"] is not None:
            if self.coordinator is None:
                raise MorecError("MoRec state holds controllers but no base losses")
            self.coordinator.load_state_dict(state["coordinator"])
        if state.get("rule") is not None and hasattr(self.rule, "load_state_dict"):
            self.rule.load_state_dict(state["rule"])
        for values, effective_from in journal:
            self._append(publish_and_sync(self.store, values, effective_from))
        self._renumbered = state.get("published", len(journal)) - len(journal)
        self._position = state["position"]

    def _check_state(self, state: Mapping[str, Any]) -> list[tuple[dict[str, np.ndarray], int]]:
        """MorecError unless ``state`` is a :meth:`state_dict` this MoRec can go on from:
        one of the same data, world size, loader workers, coordination, objectives, sampler
        settings and validation users. Returns its journal: (masses, effective_from)."""
        if not isinstance(state, Mapping):
            raise MorecError(f"MoRec state: got {type(state).__name__}, expected the mapping "
                             "that state_dict() gives")
        if state.get("format") != STATE_FORMAT:
            raise MorecError(f"MoRec state of format {state.get('format')!r}, "
                             f"expected {STATE_FORMAT}")
        missing = sorted({"position", "journal", "coordinator", "base", "base_losses"}
                         - set(state))
        if missing:
            raise MorecError(f"MoRec state lacks {', '.join(missing)}: not what state_dict() "
                             "gives")
        if not isinstance(state["journal"], list):
            raise MorecError(f"MoRec state: journal {state['journal']!r:.100} is not a list")
        if not isinstance(state["position"], int) or state["position"] < 0:
            raise MorecError(f"MoRec state: position {state['position']!r} is not an int >= 0")
        # The position's batches, and where its epochs start, depend on both; a state
        # that does not record them (an older format 1) is taken as matching.
        saved = (state.get("world_size", self.world_size),
                 state.get("num_workers", self.loader.num_workers))
        if saved != (self.world_size, self.loader.num_workers):
            raise MorecError(f"MoRec state saved on {saved[0]} rank(s) with {saved[1]} loader "
                             f"worker(s) each, restored on {self.world_size} with "
                             f"{self.loader.num_workers}: a resume needs the same")
        # So do the data, how the objectives weigh, the objectives and the sampler's
        # settings; and the reference, and every round's measures against it, are of the
        # validation users (a state without them: as above).
        sampler = json.loads(json.dumps(dataclasses.asdict(self.sampler_config)))
        for key, now in (("data", self._data), ("method", self._method),
                         ("objectives", self.names),
                         ("validation_users", self.config.validation_users)):
            if state.get(key, now) != now:
                raise MorecError(f"MoRec state saved with {key} = {state[key]!r}, restored "
                                 f"with {now!r}: a resume needs the same")
        for key, value in state.get("sampler", sampler).items():
            if sampler.get(key) != value:
                raise MorecError(f"MoRec state saved with sampler {key} = {value!r}, restored "
                                 f"with {sampler.get(key)!r}: a resume needs the same")
        sizes = {o.name: o.num_groups for o in self.objectives} | {BATCH: len(self.objectives)}
        journal = []
        for entry in state["journal"]:
            if not (isinstance(entry, Mapping) and isinstance(entry.get("values"), Mapping)
                    and isinstance(entry.get("effective_from"), int)):
                raise MorecError(f"MoRec state: journal entry {entry!r:.100} is not "
                                 "{'effective_from': int, 'values': {name: masses}}")
            unknown = sorted(set(entry["values"]) - set(sizes))
            if unknown:
                raise MorecError(f"MoRec state: masses of {', '.join(unknown)}, which are not "
                                 f"among this MoRec's {', '.join(sizes)}")
            values = {k: np.asarray(v, dtype=np.float64) for k, v in entry["values"].items()}
            for name, masses in values.items():
                check_masses(name, masses, sizes[name])
            journal.append((values, int(entry["effective_from"])))
        return journal


def _objectives(dataset: PreparedDataset, config: SamplerConfig,
                given: Sequence[Objective | str] | None) -> list[Objective]:
    """The objectives in order: instances as given, names built for ``dataset``; each
    checked against the columns of the training data."""
    if isinstance(given, (str, Objective)):
        raise MorecError(f"objectives: {given!r} is one objective; give a list of them")
    given = list(config.objectives if given is None else given)
    if not given:
        raise MorecError("objectives: none given; list at least one (e.g. ['accuracy'])")
    for entry in given:
        if not isinstance(entry, (str, Objective)):
            raise MorecError(f"objectives: {entry!r} ({type(entry).__name__}) is neither a "
                             "built-in objective's name nor an Objective")
    names = [o for o in given if isinstance(o, str)]
    built = iter(build_objectives(names, dataset.manifest, step=config.step,
                                  floor=config.floor, rule=config.update_rule,
                                  fairness_signal=config.fairness_signal))
    objectives = [next(built) if isinstance(o, str) else o for o in given]
    for objective in objectives:
        undeclared = [a for a in ("name", "num_groups", "columns") if not hasattr(objective, a)]
        if undeclared:
            raise MorecError(f"objective {type(objective).__name__}: an Objective declares "
                             f"{', '.join(undeclared)} (class attributes, as the built-ins do)")
        if not isinstance(objective.name, str) or objective.name == BATCH:
            raise MorecError(f"objective name {objective.name!r}: a name is a str other than "
                             f"{BATCH!r} (which holds the objectives' shares of a batch)")
        count = objective.num_groups
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 1:
            raise MorecError(f"objective {objective.name!r}: num_groups = {count!r} must be "
                             "an int >= 1")
    seen = [o.name for o in objectives]
    for i, name in enumerate(seen):
        if name in seen[:i]:
            raise MorecError(f"objective {name!r} is listed twice")
    schema = pq.read_schema(dataset.train_files[0])
    for objective in objectives:
        missing = sorted(set(objective.columns) - set(schema.names))
        if missing:
            raise MorecError(f"{dataset.root}: objective {objective.name!r} reads column(s) "
                             f"{', '.join(missing)}, which the data lack")
        nested = [c for c in objective.columns if pa.types.is_nested(schema.field(c).type)]
        if nested:
            raise MorecError(f"objective {objective.name!r} reads {', '.join(nested)}, a list "
                             "column: objectives read one value per row")
    return objectives


def _weighed_by_rule(config: MoRecConfig) -> bool:
    """Whether the hook is a BaselineLoss: a baseline coordinator, or MoRec without its
    data sampler."""
    return config.coordinator != "morec" or config.coefficients == "loss_forms"


def _loss_forms(config: MoRecConfig) -> bool:
    """Whether batches are drawn uniformly and the hook weighs the objectives' loss forms
    (not MoRec's sub-batches): MoRec without its data sampler, or a baseline except under
    ``loss`` coefficients."""
    return config.coefficients == "loss_forms" or (config.coordinator != "morec"
                                                  and config.coefficients != "loss")


def _check_loss_forms(dataset: PreparedDataset, names: Sequence[str]) -> None:
    """MorecError for an objective without a loss form, or one whose loss form is 0 on
    every batch of ``dataset``: fairness where its items make one group."""
    check_loss_objectives(names)
    groups = len(dataset.manifest["groups"]["fairness"]["names"])
    if "fairness" in names and groups < 2:
        raise MorecError(f"{dataset.root}: the items make {groups} fairness group, so the "
                         "fairness loss form is 0, without gradient, on every batch: leave "
                         "fairness out of the objectives")


def _without_controllers(config: MoRecConfig) -> MoRecConfig:
    """A baseline coordinator's settings: ``hold`` is MoRec's controllers' alone."""
    return dataclasses.replace(config, hold={})


def _needs_scorer(config: MoRecConfig, objectives: Sequence[Objective],
                  sampler: SamplerConfig) -> str | None:
    """What needs the validation ranking pass, if anything."""
    names = [o.name for o in objectives]
    if config.control == "validation":
        return "validation control"
    if "alignment" in names:
        return "objective 'alignment' (its top-K exposure)"
    if "fairness" in names and sampler.fairness_signal == "hit":
        return "fairness by hit (the per-group Hit)"
    return None


def _shares(coordinator: Coordinator | None) -> np.ndarray:
    """The objectives' shares of a batch: the coefficients q, normalised."""
    assert coordinator is not None
    q = coordinator.q
    return q / q.sum()


def _generation() -> str:
    """A name no earlier MoRec used in the store: drawn on rank 0, the same on every rank."""
    name = [uuid.uuid4().hex]
    if is_distributed():
        dist.broadcast_object_list(name, src=0)
    return name[0]


def _check_model(method: str, model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise MorecError(f"{method}(): got a {type(model).__name__}, expected the job's model "
                         "(an nn.Module)")


def _max_over_ranks(value: int) -> int:
    return int(all_reduce(torch.tensor([value]), op=dist.ReduceOp.MAX))
