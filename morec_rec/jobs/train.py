"""Training a backbone with TorchRec: DMP-sharded tables, TrainPipelineSparseDist, early stop.

One code path for one process and for ``torchrun --nproc_per_node=N``: the tables are
sharded by TorchRec's planner over the process group (of one, without torchrun), each
rank reads its own stream of the training rows, and validation ranks all items for each
validation user (users split across ranks). Training stops when validation Hit@10 has
not improved for ``patience`` validations ("pretrain to convergence"). Checkpoints are
taken every ``checkpoint_every`` steps and at the end of every epoch (``last``) and at
every new best validation (``best``); a resumed run continues from ``last``, at the batch
after the last one trained (a batch's rows and negatives derive from its index).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch.utils.data import DataLoader
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from morec_rec.config import SamplerConfig, TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import checkpoint, distributed
from morec_rec.jobs.collate import Collator, TrainBatch
from morec_rec.jobs.models import build_model, num_negatives
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.jobs.models.scorer import ModelScorer
from morec_rec.jobs.run import Run
from morec_rec.jobs.sharding import shard
from morec_rec.plugin.eval.ranking import evaluate, load_task
from morec_rec.plugin.loader import die_with_parent
from morec_rec.plugin.sampling.objectives import Accuracy
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler

#: Steps between two "step" records of the log.
LOG_EVERY = 10


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in every checkpoint's metadata."""

    epoch: int = 0  # epochs completed
    step: int = 0
    #: Sum of the current epoch's per-step losses so far (its mean is the epoch's loss).
    epoch_loss_sum: float = 0.0
    best_hit: float = -1.0
    best_step: int = -1
    stale: int = 0  # validations since the best
    #: Mean training loss of the epoch of the best validation, up to it: the converged
    #: training loss, from which MoRec's controller takes its default expected loss.
    best_train_loss: float | None = None


def model_identity(config: TrainConfig, dataset: PreparedDataset) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this model."""
    manifest = dataset.manifest
    return {"model": config.model, "embedding_dim": config.embedding_dim,
            "table_optimizer": config.table_optimizer,
            "num_users": manifest["num_users"], "num_items": manifest["num_items"]}


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
                    feature_names: Sequence[str]) -> tuple[WeightedStreamSampler, DataLoader]:
    """The accuracy-only sampler of this rank and a loader of ``TrainBatch`` es over it."""
    sampler = WeightedStreamSampler(
        dataset, [Accuracy()],
        SamplerConfig(objectives=("accuracy",), sub_batch_size=config.batch_size,
                      seed=config.seed),
        rank=env.rank, world_size=env.world_size,
    )
    collate = Collator(
        feature_names,
        NegativeSampler(dataset.items()["train_count"].to_numpy(), config.negative_beta),
        num_negatives(config.model), seed=config.seed, rank=env.rank,
    )
    return sampler, DataLoader(sampler, batch_size=None, num_workers=config.num_workers,
                               collate_fn=collate,
                               worker_init_fn=die_with_parent if config.num_workers else None)


def train(dataset: PreparedDataset, config: TrainConfig, run: Run, *,
          resume: bool = False) -> Progress:
    """Trains until early stop or ``max_epochs``; returns the final progress."""
    env = distributed.init()
    model, optimizer = build_sharded(config, dataset, env)
    identity = model_identity(config, dataset)
    progress = Progress()
    if resume and checkpoint.resolve(run.last):
        meta = checkpoint.load(run.last, model, optimizer, identity)
        progress = Progress(**meta["progress"])
        run.truncate_log(progress.step)  # records after the checkpoint go
    else:
        run.truncate_log(None)  # a new run, or one stopped before its first checkpoint
    sampler, loader = training_loader(dataset, config, env, model.module.feature_names)
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
    task = load_task(dataset, "valid")
    batches = sampler.batches_per_epoch(config.num_workers)

    def save(path: Any) -> None:
        checkpoint.save(path, model, optimizer,
                        {**identity, "progress": dataclasses.asdict(progress)})

    def validate() -> None:
        pipeline.detach()
        model.eval()
        with torch.no_grad():
            metrics = evaluate(ModelScorer(model.module, env.device), task,
                               chunk_users=config.eval_chunk_users)
        model.train()
        better = metrics.hit > progress.best_hit
        if better:
            done = progress.step - progress.epoch * batches
            progress.best_hit, progress.best_step, progress.stale = metrics.hit, progress.step, 0
            progress.best_train_loss = progress.epoch_loss_sum / done if done else None
            save(run.best)
        else:
            progress.stale += 1
        run.log({"kind": "eval", "split": "valid", "epoch": progress.epoch,
                 "step": progress.step, **metrics.as_dict(), "best": better})

    while progress.epoch < config.max_epochs and progress.stale < config.patience:
        done = progress.step - progress.epoch * batches
        sampler.set_epoch(progress.epoch, done)
        _train_epoch(pipeline, iter(loader), progress, run, config, batches, done,
                     validate, lambda: save(run.last), env)
        epoch_loss = progress.epoch_loss_sum / batches if batches else None
        if not config.eval_every or progress.step % config.eval_every:
            validate()
        progress.epoch += 1
        progress.epoch_loss_sum = 0.0
        run.log({"kind": "epoch", "epoch": progress.epoch, "step": progress.step,
                 "train_loss": epoch_loss})
        save(run.last)
    return progress


def _train_epoch(pipeline: TrainPipelineSparseDist, batches_iter: Iterator[TrainBatch],
                 progress: Progress, run: Run, config: TrainConfig, total: int, done: int,
                 validate: Callable[[], None], save: Callable[[], None],
                 env: distributed.Environment) -> None:
    """The rest of an epoch from its step ``done`` on: pipeline steps, the epoch's loss
    summed into ``progress``, validations and checkpoints at their intervals. A "step"
    record every ``LOG_EVERY`` steps and at every checkpoint covers the steps since the
    last one, so a resumed run logs what an uninterrupted one does."""
    losses: list[float] = []
    unlogged: list[float] = []
    started = time.perf_counter()
    # Rank 0 shows a bar when writing to a terminal (tqdm's disable=None); others never.
    bar = tqdm(total=total, initial=done, desc=f"epoch {progress.epoch}", unit="batch",
               leave=False, disable=None if env.is_main else True)
    while True:
        try:
            output = pipeline.progress(batches_iter)  # the model's ModelOutput
        except StopIteration:
            break
        progress.step += 1
        losses.append(float(output.per_row_loss.detach().mean()))
        unlogged.append(losses[-1])
        progress.epoch_loss_sum += losses[-1]
        rate = len(losses) * config.batch_size * env.world_size / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_per_s=f"{rate:,.0f}")
        bar.update()
        checkpoint = config.checkpoint_every and progress.step % config.checkpoint_every == 0
        if progress.step % LOG_EVERY == 0 or checkpoint:
            run.log({"kind": "step", "epoch": progress.epoch, "step": progress.step,
                     "loss": float(np.mean(unlogged)), "samples_per_s": rate})
            unlogged = []
        if config.eval_every and progress.step % config.eval_every == 0:
            validate()
        if checkpoint:
            save()
    bar.close()
