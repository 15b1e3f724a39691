"""``plain_job.py`` turned into a MoRec job: the same model, batch type and pipeline.

    torchrun --nproc_per_node=2 integration/example/morec_job.py --data DIR --epochs 1

What changed (``diff plain_job.py morec_job.py``): the batch carries the rows' segment ids,
MoRec's loader replaces the job's own, MoRec's loss hook goes into the pipeline, and every
``--update-every`` steps a validation pass updates the sampling weights. Accuracy is held
at the model's starting training loss; revenue and fairness share the rest (README, "MoRec in your
own TorchRec job").
"""

import argparse
import dataclasses
import gc
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.streamable import Pipelineable

from morec_rec.config import MoRecConfig, SamplerConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.pipeline.plugin import MoRec

FEATURES = ["user", "item", "negative"]


@dataclasses.dataclass
class Batch(Pipelineable):
    sparse: KeyedJaggedTensor  # one id per row for each of FEATURES
    objective: torch.Tensor  # (B,) each row's segment id: the objective that drew it

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(self.sparse.to(device, non_blocking=non_blocking),
                     self.objective.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        self.objective.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(self.sparse.pin_memory(), self.objective.pin_memory())


def make_batch(users: torch.Tensor, items: torch.Tensor, num_items: int, seed: int,
               objective: torch.Tensor) -> Batch:
    """A batch of (user, item) rows, each with one uniformly drawn negative item."""
    negatives = torch.from_numpy(np.random.default_rng(seed).integers(0, num_items, len(users)))
    ids = torch.cat([users, items, negatives]).long()
    return Batch(KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=ids, lengths=torch.ones(len(ids), dtype=torch.int32)), objective)


class Output(NamedTuple):
    per_row_loss: torch.Tensor  # (B,) each row's BPR loss; the loss is their mean


class TwoTower(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int = 64) -> None:
        super().__init__()
        self.embeddings = EmbeddingBagCollection(device=torch.device("meta"), tables=[
            EmbeddingBagConfig(name="user_table", embedding_dim=dim, num_embeddings=num_users,
                               feature_names=["user"]),
            EmbeddingBagConfig(name="item_table", embedding_dim=dim, num_embeddings=num_items,
                               feature_names=["item", "negative"]),
        ])
        self.user_tower, self.item_tower = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Output]:
        pooled = self.embeddings(batch.sparse)
        user = self.user_tower(pooled["user"])
        positive = (user * self.item_tower(pooled["item"])).sum(-1)
        negative = (user * self.item_tower(pooled["negative"])).sum(-1)
        per_row = nn.functional.softplus(negative - positive)
        return per_row.mean(), Output(per_row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
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

    morec = MoRec(PreparedDataset.open(args.data),
                  SamplerConfig(objectives=("accuracy", "revenue", "fairness"),
                                sub_batch_size=args.batch_size // 3),
                  # No base to compare with and no ranking pass: the controller holds the
                  # training loss, stepped every batch (gains for that: README, "MoRec").
                  MoRecConfig(preference=(0.5, 0.5), control="training", coefficients="loss",
                              ki=0.1, beta_min=0.0, beta_max=2.0),
                  rank=rank, world_size=world_size, num_workers=1)

    def collate(sampled):  # MoRec's SampledBatch -> this job's Batch
        return make_batch(sampled.user_id, sampled.item_id, manifest["num_items"],
                          seed=sampled.batch_index, objective=sampled.objective)

    def rows(batch, output):  # where the hook finds per-row losses and segment ids
        return output.per_row_loss, batch.objective

    loader = morec.loader(collate)
    hook = morec.loss(model, morec.calibrate(model, collate, device, rows=rows), rows=rows)
    pipeline = TrainPipelineSparseDist(model, optimizer, device, custom_model_fwd=hook)
    step = 0
    for epoch in range(args.epochs):
        morec.set_epoch(epoch)
        batches = iter(loader)
        while True:
            try:
                output = pipeline.progress(batches)
            except StopIteration:
                break
            step += 1
            if rank == 0 and step % 50 == 0:
                print(json.dumps({"epoch": epoch, "step": step,
                                  "objective_loss": output.objective_loss.tolist(),
                                  "coefficients": output.coefficients.tolist()}), flush=True)
            if step % args.update_every == 0:
                pipeline.detach()
                update = morec.update(morec.validation_signal(model, collate, device), step)
                if rank == 0:
                    print(json.dumps({"step": step, **update}), flush=True)
    gc.collect()  # the sharded model's reference cycle holds the group: free it first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
