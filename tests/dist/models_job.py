"""Both backbones under DMP and TrainPipelineSparseDist, under torchrun (gloo, CPU).

Run by ``tests/test_models.py``::

    python -m torch.distributed.run --nproc_per_node=N --master-port=PORT \\
        tests/dist/models_job.py --data DIR --out DIR

For each backbone and each table setup of :func:`morec_rec.jobs.sharding.shard`
(Adam: tables replicated; fused row-wise Adagrad: tables sharded), each rank trains
``STEPS`` pipeline steps on its own stream of the dataset (sampler + Collator), then
scores the first ``USERS`` validation users against all items through ``model.module``,
directly (``user_vectors @ item_vectors.T``) and through the callable ``ModelScorer``.
Each rank writes ``rank<r>.json``: per setup, the losses, whether the tables were sharded
and their input distribution pipelined, and both scores.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch.utils.data import DataLoader
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardedModule

from morec_rec.config import SamplerConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.plugin.eval.ranking import RankingTask, load_task
from morec_rec.jobs.models import build_model, num_negatives
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.jobs.models.scorer import ModelScorer
from morec_rec.jobs import distributed
from morec_rec.jobs.collate import Collator, TrainBatch, features_kjt
from morec_rec.jobs.sharding import shard
from morec_rec.plugin.sampling.objectives import Accuracy
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler

STEPS = 30
BATCH = 128  # rows per step over all ranks
#: Table optimizers, and learning rates by backbone, high to show progress within STEPS.
SETUPS = {
    "adam": (EmbOptimType.ADAM, {"mf": 5e-2, "sasrec": 1e-2}),
    "rowwise_adagrad": (EmbOptimType.EXACT_ROWWISE_ADAGRAD, {"mf": 1e-1, "sasrec": 2e-2}),
}
USERS = 8


def run(name: str, table_optimizer: EmbOptimType, lr: dict[str, float],
        dataset: PreparedDataset, users: RankingTask) -> dict:
    manifest = dataset.manifest
    torch.manual_seed(0)  # the same initial model on every rank
    model = build_model(name, manifest["num_users"], manifest["num_items"],
                        manifest["history_length"], embedding_dim=16)
    dmp, optimizer = shard(model, torch.device("cpu"), lr=lr[name],
                           table_optimizer=table_optimizer)
    config = SamplerConfig(objectives=("accuracy",),
                           sub_batch_size=BATCH // dist.get_world_size())
    sampler = WeightedStreamSampler(dataset, [Accuracy()], config, rank=dist.get_rank(),
                                    world_size=dist.get_world_size())
    collate = Collator(dmp.module.feature_names,
                       NegativeSampler(dataset.items()["train_count"].to_numpy()),
                       num_negatives(name), seed=0, rank=dist.get_rank())
    loader = DataLoader(sampler, batch_size=None, num_workers=0, collate_fn=collate)
    batches = endless(sampler, loader)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))
    losses = [pipeline.progress(batches).per_row_loss.mean().item() for _ in range(STEPS)]

    pipeline.detach()
    dmp.eval()
    items = torch.arange(manifest["num_items"])
    ones = torch.ones(len(users), dtype=torch.int32)
    given = {"user_id": (torch.from_numpy(users.user_id), ones),
             "history": (torch.from_numpy(users.history_values),
                         torch.from_numpy(np.diff(users.history_offsets)))}
    names = dmp.module.feature_names
    with torch.no_grad():  # each call a collective once the tables are sharded
        item_vectors = dmp.module.item_vectors(
            features_kjt(names, {"item_id": (items, torch.ones_like(items, dtype=torch.int32))}))
        user_vectors = dmp.module.user_vectors(
            features_kjt(names, {k: v for k, v in given.items() if k in names}))
        scorer = ModelScorer(dmp.module)(users)
    return {
        "losses": losses,
        "sharded": isinstance(dmp.module.embeddings, ShardedModule),
        "pipelined": getattr(dmp.module.embeddings, "is_pipelined", False),
        "scores": (user_vectors @ item_vectors.T).tolist(),
        "scorer": scorer.tolist(),
    }


def endless(sampler: WeightedStreamSampler, loader: DataLoader) -> Iterator[TrainBatch]:
    """The loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as torchrun sets for several ranks; tiny tensors need no more
    dist.init_process_group("gloo")
    dataset = PreparedDataset.open(args.data)
    users = load_task(dataset, "valid").rows(0, USERS)
    results = {f"{name}/{setup}": run(name, *SETUPS[setup], dataset, users)
               for name in ("mf", "sasrec") for setup in SETUPS}
    (args.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
