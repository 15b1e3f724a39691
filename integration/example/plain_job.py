"""A plain TorchRec training job: a two-tower retrieval model, pointwise BCE.

    torchrun --nproc_per_node=2 integration/example/plain_job.py --data DIR --epochs 1

Its own model, batch type, loader and pipeline, and nothing of morec_rec: it reads the
``train/`` Parquet shards of a prepared dataset directly. Each interaction is a positive
example and gets one uniformly drawn negative item; the model returns the mean loss and
its logits, as TorchRec's own models do. ``morec_job.py`` beside it is the same job
turned into a MoRec job.
"""

import argparse
import dataclasses
import gc
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.streamable import Pipelineable

FEATURES = ["user", "item"]


@dataclasses.dataclass
class Batch(Pipelineable):
    sparse: KeyedJaggedTensor  # one user and one item id per example
    labels: torch.Tensor  # (E,) 1.0 for an interaction, 0.0 for a sampled negative

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(self.sparse.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(self.sparse.pin_memory(), self.labels.pin_memory())


def make_batch(users: torch.Tensor, items: torch.Tensor, num_items: int, seed: int) -> Batch:
    """2B examples from B (user, item) rows: every positive, then every row's negative."""
    negatives = torch.from_numpy(np.random.default_rng(seed).integers(0, num_items, len(users)))
    ids = torch.cat([users, users, items, negatives]).long()
    labels = torch.cat([torch.ones(len(users)), torch.zeros(len(users))])
    return Batch(KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=ids, lengths=torch.ones(len(ids), dtype=torch.int32)), labels)


class Interactions(IterableDataset):
    """One epoch of batches: this rank's share of the shuffled training rows."""

    def __init__(self, data: Path, batch_size: int, rank: int, world_size: int) -> None:
        self.train = data / "train"
        self.num_items = json.loads((data / "manifest.json").read_text())["num_items"]
        self.batch_size, self.rank, self.world_size, self.epoch = batch_size, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        table = pq.read_table(self.train, columns=["user_id", "item_id"])
        order = np.random.default_rng(self.epoch).permutation(table.num_rows)
        order = order[: len(order) - len(order) % self.world_size][self.rank::self.world_size]
        users = torch.from_numpy(table["user_id"].to_numpy()[order])
        items = torch.from_numpy(table["item_id"].to_numpy()[order])
        for n, start in enumerate(range(0, len(order) - self.batch_size + 1, self.batch_size)):
            rows = slice(start, start + self.batch_size)
            yield make_batch(users[rows], items[rows], self.num_items, seed=n)


class TwoTower(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int = 64) -> None:
        super().__init__()
        self.embeddings = EmbeddingBagCollection(device=torch.device("meta"), tables=[
            EmbeddingBagConfig(name="user_table", embedding_dim=dim, num_embeddings=num_users,
                               feature_names=["user"]),
            EmbeddingBagConfig(name="item_table", embedding_dim=dim, num_embeddings=num_items,
                               feature_names=["item"]),
        ])
        self.user_tower, self.item_tower = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.embeddings(batch.sparse)
        logits = (self.user_tower(pooled["user"]) * self.item_tower(pooled["item"])).sum(-1)
        return F.binary_cross_entropy_with_logits(logits, batch.labels), logits.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size, device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    torch.manual_seed(0)

    manifest = json.loads((args.data / "manifest.json").read_text())
    model = TwoTower(manifest["num_users"], manifest["num_items"])
    apply_optimizer_in_backward(RowWiseAdagrad, model.embeddings.parameters(), {"lr": 0.05})
    model = DistributedModelParallel(model, device=device)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=1e-3))
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])

    data = Interactions(args.data, args.batch_size, rank, world_size)
    loader = DataLoader(data, batch_size=None, num_workers=1)
    pipeline = TrainPipelineSparseDist(model, optimizer, device)
    step = 0
    for epoch in range(args.epochs):
        data.set_epoch(epoch)
        batches = iter(loader)
        while True:
            try:
                logits = pipeline.progress(batches)
            except StopIteration:
                break
            step += 1
            if rank == 0 and step % 20 == 0:
                print(json.dumps({"epoch": epoch, "step": step,
                                  "mean_logit": logits.mean().item()}), flush=True)
    gc.collect()  # the sharded model's reference cycle holds the group: free it first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
