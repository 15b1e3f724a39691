"""Training a backbone with TorchRec: DMP-sharded tables, TrainPipelineSparseDist, early stop.

One code path for one process and for ``torchrun --nproc_per_node=N``: the tables are
sharded by TorchRec's planner over the process group (of one, without torchrun), each
rank reads its own stream of the training rows, and validation ranks all items for each
validation user, or for a fixed sample of them (``validation_users``; users split across
ranks). Training stops when validation Hit@10 has not improved for ``patience``
validations ("pretrain to convergence"). Checkpoints are taken every
``checkpoint_every`` steps and at the end of every epoch (``last``) and at every new best
validation (``best``); a resumed run continues from ``last``, at the batch after the
last one trained (a batch's rows and negatives derive from its index).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from morec_rec.collectives import all_reduce
from morec_rec.config import SamplerConfig, TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import checkpoint, distributed
from morec_rec.jobs.collate import Collator, TrainBatch
from morec_rec.jobs.loop import Progress, fit
from morec_rec.jobs.models import build_model, num_negatives
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.jobs.models.scorer import ModelScorer
from morec_rec.jobs.run import Run
from morec_rec.jobs.sharding import shard
from morec_rec.plugin.eval.ranking import evaluate, load_task
from morec_rec.plugin.hook import check_finite
from morec_rec.plugin.loader import SamplerLoader
from morec_rec.plugin.sampling.objectives import Accuracy
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler
from morec_rec.plugin.validation import sample_users


@dataclasses.dataclass
class PretrainingProgress(Progress):
    """Where pretraining stands; saved in every checkpoint's metadata."""

    #: Sum of the current epoch's per-step mean losses so far, as of its last step record.
    epoch_loss_sum: float = 0.0
    best_hit: float = -1.0
    stale: int = 0  # validations since the best


#: The settings of a ``TrainConfig`` that make its model and its checkpoints' layout.
MODEL_SETTINGS = ("model", "embedding_dim", "table_optimizer")


def model_identity(config: TrainConfig, dataset: PreparedDataset) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this model (SASRec's position table
    is as long as the data's histories)."""
    manifest = dataset.manifest
    return {**{name: getattr(config, name) for name in MODEL_SETTINGS},
            "num_users": manifest["num_users"], "num_items": manifest["num_items"],
            **({"history_length": manifest["history_length"]} if config.model == "sasrec"
               else {})}


def build_sharded(config: TrainConfig, dataset: PreparedDataset, env: distributed.Environment,
                  ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The sharded model and its optimizer (fused for the tables, Adam for the rest)."""
    torch.manual_seed(config.seed)
    manifest = dataset.manifest
    model = build_model(config.model, manifest["num_users"], manifest["num_items"],
                        manifest["history_length"], embedding_dim=config.embedding_dim,
                        dropout=config.dropout)
    return shard(model, env.device, lr=config.lr, weight_decay=config.weight_decay,
                 table_optimizer=EmbOptimType(config.table_optimizer))


def training_loader(dataset: PreparedDataset, config: TrainConfig, env: distributed.Environment,
                    feature_names: Sequence[str]) -> SamplerLoader[TrainBatch]:
    """A loader of ``TrainBatch`` es over this rank's accuracy-only sampler."""
    collate = Collator(
        feature_names,
        NegativeSampler(dataset.item_columns(["train_count"])["train_count"], config.negative_beta),
        num_negatives(config.model), seed=config.seed, rank=env.rank,
    )
    sampler = WeightedStreamSampler(
        dataset, [Accuracy()],
        SamplerConfig(objectives=("accuracy",), sub_batch_size=config.batch_size,
                      seed=config.seed),
        rank=env.rank, world_size=env.world_size, columns=collate.columns,
    )
    return SamplerLoader(sampler, collate, num_workers=config.num_workers,
                         batches_per_request=config.batches_per_request)


def train(dataset: PreparedDataset, config: TrainConfig, run: Run, *,
          resume: bool = False) -> PretrainingProgress:
    """Trains until early stop or ``max_epochs``; returns the final progress."""
    env = distributed.init()
    distributed.share_cpus()
    distributed.keep_freed_memory()
    model, optimizer = build_sharded(config, dataset, env)
    identity = model_identity(config, dataset)
    progress = PretrainingProgress()
    if resume and checkpoint.resolve(run.last):
        meta = checkpoint.load(run.last, model, optimizer, identity, ("progress",))
        progress = PretrainingProgress.restore(meta["progress"], run.last)
        run.truncate_log(progress.step)  # records after the checkpoint go
    else:
        run.truncate_log(None)  # a new run, or one stopped before its first checkpoint
    loader = training_loader(dataset, config, env, model.module.feature_names)
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
    stage = _Pretraining(model, optimizer, identity, dataset, loader, progress, config, run,
                         env)
    fit(pipeline, stage, run, env, config.checkpoint_every, config.seed)
    return progress


class _Pretraining:
    """Pretraining as a :class:`~morec_rec.jobs.loop.Stage`: the accuracy-only loader,
    validation Hit@10 for early stopping and the ``best`` checkpoint, an "epoch" record
    with the epoch's mean training loss."""

    name = "epoch"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 identity: dict[str, Any], dataset: PreparedDataset,
                 loader: SamplerLoader[TrainBatch], progress: PretrainingProgress,
                 config: TrainConfig, run: Run, env: distributed.Environment) -> None:
        self.model, self.optimizer, self.identity = model, optimizer, identity
        self.loader = loader
        self.progress, self.config, self.run, self.env = progress, config, run, env
        self.batches_per_epoch = loader.batches_per_epoch
        self.samples_per_step = config.batch_size * env.world_size
        self.task = load_task(dataset, "valid", sample_users(
            dataset.split("valid"), config.validation_users, config.seed),
            rank=env.rank, world_size=env.world_size)
        self.unlogged: list[torch.Tensor] = []  # per-step mean losses, on the device

    def finished(self) -> bool:
        return (self.progress.epoch >= self.config.max_epochs
                or self.progress.stale >= self.config.patience)

    def epoch_batches(self) -> Iterator[TrainBatch]:
        done = self.progress.step - self.progress.epoch * self.batches_per_epoch
        self.loader.set_epoch(self.progress.epoch, done)
        return iter(self.loader)

    def step(self, output: Any) -> dict[str, str]:
        self.unlogged.append(output.per_row_loss.detach().mean())
        return {}

    def record(self) -> dict[str, Any]:
        # The ranks' mean per step (equal batches): every rank sees a NaN together.
        losses = (all_reduce(torch.stack(self.unlogged)) / self.env.world_size).tolist()
        self.unlogged = []
        steps = range(self.progress.step - len(losses) + 1, self.progress.step + 1)
        check_finite([f"step {step}" for step in steps], np.array(losses), "training loss")
        self.progress.epoch_loss_sum += sum(losses)
        return {"loss": float(np.mean(losses))}

    def validation_due(self, done: int) -> bool:
        return bool(self.config.eval_every) and self.progress.step % self.config.eval_every == 0

    def validate(self, model: torch.nn.Module) -> None:
        started = time.perf_counter()
        model.eval()
        with torch.no_grad():
            metrics = evaluate(ModelScorer(model.module, self.env.device), self.task,
                               chunk_users=self.config.eval_chunk_users)
        model.train()
        progress = self.progress
        better = metrics.hit > progress.best_hit
        if better:
            progress.best_hit, progress.best_step, progress.stale = metrics.hit, progress.step, 0
            self._save(self.run.best)
        else:
            progress.stale += 1
        self.run.log({"kind": "eval", "split": "valid", "epoch": progress.epoch,
                      "step": progress.step, "users": metrics.users, **metrics.as_dict(),
                      "best": better,
                      "seconds": round(time.perf_counter() - started, 3)})

    def end_epoch(self) -> None:
        progress = self.progress
        self.run.log({"kind": "epoch", "epoch": progress.epoch, "step": progress.step,
                      "train_loss": progress.epoch_loss_sum / self.batches_per_epoch})
        progress.epoch_loss_sum = 0.0

    def save(self) -> None:
        self._save(self.run.last)

    def _save(self, path: Any) -> None:
        checkpoint.save(path, self.model, self.optimizer,
                        {**self.identity, "progress": dataclasses.asdict(self.progress)})
