"""A plain TorchRec training job: TorchRec's own DLRM and batch, pointwise BCE.

    torchrun --nproc_per_node=2 integration/example/dlrm_plain_job.py --data DIR --epochs 1

``torchrec.models.dlrm.DLRM`` over two sparse features (user, item) and two dense ones
(log1p of the item's price, log1p of the user's history length), trained by TorchRec's
``DLRMTrain`` (mean BCE; it returns ``(loss, (loss, logits, labels))``) on
``torchrec.datasets.utils.Batch`` es. Each interaction is a positive example followed by
one uniformly drawn negative item (interleaved: row 0's positive, row 0's negative, row
1's positive, ...). It reads the ``train/`` Parquet shards and ``items.parquet`` of a
prepared dataset directly, and nothing of morec_rec. ``dlrm_morec_job.py`` beside it is
the same job turned into a MoRec job.
"""

import argparse
import gc
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

FEATURES = ["user", "item"]


def features(users: torch.Tensor, items: torch.Tensor, history_lengths: torch.Tensor,
             price: torch.Tensor) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """DLRM's inputs for (user, item) pairs: dense (E, 2) and one id per sparse feature."""
    dense = torch.stack([price[items].log1p(), history_lengths.float().log1p()], dim=1)
    ids = torch.cat([users, items]).long()
    return dense, KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=ids, lengths=torch.ones(len(ids), dtype=torch.int32))


def make_batch(users: torch.Tensor, items: torch.Tensor, history_lengths: torch.Tensor,
               price: torch.Tensor, seed: int) -> Batch:
    """2B examples from B (user, item) rows: each row's positive, then its negative."""
    negatives = torch.from_numpy(np.random.default_rng(seed).integers(0, len(price), len(users)))
    dense, sparse = features(users.repeat_interleave(2), torch.stack([items, negatives], 1).ravel(),
                             history_lengths.repeat_interleave(2), price)
    return Batch(dense, sparse, torch.tensor([1.0, 0.0]).repeat(len(users)))


def item_prices(data: Path) -> torch.Tensor:
    """float32 (num_items,): each item's price, by item id."""
    items = pq.read_table(data / "items.parquet", columns=["item_id", "price"])
    price = np.zeros(items.num_rows, dtype=np.float32)
    price[items["item_id"].to_numpy()] = items["price"].to_numpy()
    return torch.from_numpy(price)


class Interactions(IterableDataset):
    """One epoch of batches: this rank's share of the shuffled training rows (every rank
    the same number of batches, as the sharded model's collectives need)."""

    def __init__(self, data: Path, batch_size: int, rank: int, world_size: int) -> None:
        self.train, self.price = data / "train", item_prices(data)
        self.batch_size, self.rank, self.world_size, self.epoch = batch_size, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        table = pq.read_table(self.train, columns=["user_id", "item_id", "history"])
        order = np.random.default_rng(self.epoch).permutation(table.num_rows)
        order = order[: len(order) - len(order) % self.world_size][self.rank::self.world_size]
        users = torch.from_numpy(table["user_id"].to_numpy()[order])
        items = torch.from_numpy(table["item_id"].to_numpy()[order])
        lengths = np.diff(table["history"].combine_chunks().offsets.to_numpy())
        lengths = torch.from_numpy(lengths[order])
        for n, start in enumerate(range(0, len(order) - self.batch_size + 1, self.batch_size)):
            rows = slice(start, start + self.batch_size)
            yield make_batch(users[rows], items[rows], lengths[rows], self.price, seed=n)


def dlrm(num_users: int, num_items: int, dim: int = 16) -> DLRMTrain:
    tables = [EmbeddingBagConfig(name=f"{name}_table", embedding_dim=dim, num_embeddings=num,
                                 feature_names=[name])
              for name, num in zip(FEATURES, (num_users, num_items))]
    return DLRMTrain(DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables,
                                                        device=torch.device("meta")),
        dense_in_features=2, dense_arch_layer_sizes=[32, dim], over_arch_layer_sizes=[32, 1]))


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
    model = dlrm(manifest["num_users"], manifest["num_items"])
    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(),
                                {"lr": 0.05})
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
                loss, logits, _ = pipeline.progress(batches)
            except StopIteration:
                break
            step += 1
            if rank == 0 and step % 20 == 0:
                print(json.dumps({"epoch": epoch, "step": step, "loss": loss.item(),
                                  "mean_logit": logits.mean().item()}), flush=True)
    gc.collect()  # the sharded model's reference cycle holds the group: free it first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
