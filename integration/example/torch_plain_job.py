"""A plain PyTorch training job, no TorchRec: matrix factorisation, BPR, DDP over gloo.

    torchrun --nproc_per_node=2 integration/example/torch_plain_job.py --data DIR --epochs 1

``nn.Embedding`` tables of users and items, a score that is their dot product, and BPR
with one uniformly drawn negative item per interaction. The model returns the mean loss
and each row's margin (the positive's score minus the negative's: the logit of "the
positive ranks above the negative"). Batches are plain dicts of tensors, the loop the
ordinary ``loss, out = model(batch); loss.backward(); optimizer.step()`` under
``DistributedDataParallel``. It reads the ``train/`` Parquet shards of a prepared dataset
directly, and nothing of morec_rec. ``torch_morec_job.py`` beside it is the same job
turned into a MoRec job.
"""

import argparse
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset


def make_batch(users: torch.Tensor, items: torch.Tensor, num_items: int,
               seed: int) -> dict[str, torch.Tensor]:
    """B (user, item, negative) triples from B (user, item) rows."""
    negatives = torch.from_numpy(np.random.default_rng(seed).integers(0, num_items, len(users)))
    return {"user": users.long(), "item": items.long(), "negative": negatives}


class Interactions(IterableDataset):
    """One epoch of batches: this rank's share of the shuffled training rows (every rank
    the same number of batches, as DDP needs)."""

    def __init__(self, data: Path, batch_size: int, rank: int, world_size: int) -> None:
        self.train = data / "train"
        self.num_items = json.loads((data / "manifest.json").read_text())["num_items"]
        self.batch_size, self.rank, self.world_size, self.epoch = batch_size, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        table = pq.read_table(self.train, columns=["user_id", "item_id"])
        order = np.random.default_rng(self.epoch).permutation(table.num_rows)
        order = order[: len(order) - len(order) % self.world_size][self.rank::self.world_size]
        users = torch.from_numpy(table["user_id"].to_numpy()[order])
        items = torch.from_numpy(table["item_id"].to_numpy()[order])
        for n, start in enumerate(range(0, len(order) - self.batch_size + 1, self.batch_size)):
            rows = slice(start, start + self.batch_size)
            yield make_batch(users[rows], items[rows], self.num_items, seed=n)


class MF(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int = 32) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(num_users, dim), nn.Embedding(num_items, dim)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        user = self.user(batch["user"])
        margin = (user * (self.item(batch["item"]) - self.item(batch["negative"]))).sum(-1)
        return -F.logsigmoid(margin).mean(), margin.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    manifest = json.loads((args.data / "manifest.json").read_text())
    model = DistributedDataParallel(MF(manifest["num_users"], manifest["num_items"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    data = Interactions(args.data, args.batch_size, rank, world_size)
    loader = DataLoader(data, batch_size=None, num_workers=1)
    step = 0
    for epoch in range(args.epochs):
        data.set_epoch(epoch)
        batches = iter(loader)
        for batch in batches:
            loss, margin = model(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if rank == 0 and step % 20 == 0:
                print(json.dumps({"epoch": epoch, "step": step, "loss": loss.item(),
                                  "mean_margin": margin.mean().item()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
