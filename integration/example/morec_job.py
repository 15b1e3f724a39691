"""``plain_job.py`` turned into a MoRec job: the same model, batch type and pipeline.

    torchrun --nproc_per_node=2 integration/example/morec_job.py --data DIR --epochs 1

What changed (``diff plain_job.py morec_job.py``): MoRec's loader replaces the job's own
(it draws the rows; the job's ``make_batch`` still makes the batches), MoRec's loss hook
goes into the pipeline, and every ``--update-every`` steps a validation round ranks the
validation users with the job's scorer and updates the objectives' coefficients and
sampling weights. Four built-in objectives and one of the job's own (``Cheap``).
"""

import argparse
import dataclasses
import gc
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.streamable import Pipelineable

from morec_rec import ExampleLayout, MoRec, MoRecConfig, Objective, SamplerConfig

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


class Cheap(Objective):
    """This job's own objective: rows drawn in proportion to 1 / (1 + the item's price)."""

    name, num_groups, columns = "cheap", 1, ("price",)

    def initial_masses(self) -> np.ndarray:
        return np.ones(1)

    def weights(self, rows: dict) -> np.ndarray:
        return 1 / (1 + rows["price"])


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
    parser.add_argument("--update-every", type=int, default=100)
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

    def scores(users):  # every item's score for a chunk of validation users
        u, items = torch.as_tensor(users.user_id), torch.arange(manifest["num_items"])
        b = max(len(u), len(items))  # one KJT: users and items side by side
        lengths = torch.cat([torch.arange(b) < len(u), torch.arange(b) < len(items)]).int()
        pooled = model.module.embeddings(
            KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.cat([u, items]), lengths))
        return (model.module.user_tower(pooled["user"][: len(u)])
                @ model.module.item_tower(pooled["item"][: len(items)]).T)

    morec = MoRec(
        args.data, lambda rows: make_batch(rows.user_id, rows.item_id, manifest["num_items"],
                                           seed=rows.batch_index),
        rows=lambda batch, logits: F.binary_cross_entropy_with_logits(
            logits, batch.labels, reduction="none"),
        layout=ExampleLayout.BLOCKED, scorer=scores,
        objectives=["accuracy", "revenue", "fairness", "alignment", Cheap()],
        sampler=SamplerConfig(sub_batch_size=args.batch_size // 5),
        config=MoRecConfig(preference=(0.25,) * 4, beta_max=2.0), num_workers=1)
    pipeline = TrainPipelineSparseDist(model, optimizer, device,
                                       custom_model_fwd=morec.loss(model))
    step = 0
    for epoch in range(args.epochs):
        morec.set_epoch(epoch)
        batches = iter(morec.loader)
        while True:
            try:
                logits = pipeline.progress(batches)
            except StopIteration:
                break
            step += 1
            if rank == 0 and step % 20 == 0:
                print(json.dumps({"epoch": epoch, "step": step,
                                  "mean_logit": logits.mean().item()}), flush=True)
            if step % args.update_every == 0:
                record = morec.validate(pipeline.detach())
                pipeline.attach(model, sparse_dist=False)  # keep the held batch's input dist
                if rank == 0:
                    print(json.dumps({"step": step, **record}), flush=True)
    gc.collect()  # the sharded model's reference cycle holds the group: free it first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
