"""``dlrm_plain_job.py`` turned into a MoRec job: the same DLRM, ``Batch`` and pipeline.

    torchrun --nproc_per_node=2 integration/example/dlrm_morec_job.py --data DIR --epochs 1

What changed (``diff dlrm_plain_job.py dlrm_morec_job.py``): MoRec's loader replaces the
job's own (it draws the rows; the job's ``make_batch`` still makes TorchRec's ``Batch``
from them, interleaved), MoRec's loss hook goes into the pipeline, and every
``--update-every`` steps a validation round ranks the validation users with the job's
scorer (the DLRM run on every user × item pair of a chunk of 32 users) and updates the
objectives' coefficients and sampling weights. ``DLRMTrain`` returns a mean loss, so
``rows=`` computes each example's BCE from its logits (``output[1]``). Four built-in
objectives and one of the job's own (``Recent``).
"""

import argparse
import gc
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from morec_rec import ExampleLayout, MoRec, MoRecConfig, Objective, SamplerConfig

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


class Recent(Objective):
    """This job's own objective: rows drawn by recency (time since the window's first)."""

    name, num_groups, columns = "recent", 1, ("timestamp",)

    def initial_masses(self) -> np.ndarray:
        return np.ones(1)

    def weights(self, rows: dict) -> np.ndarray:
        return (rows["timestamp"] - rows["timestamp"].min() + 1).astype(np.float64)


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
    parser.add_argument("--update-every", type=int, default=100)
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

    price = item_prices(args.data)

    def scores(users):  # every item's score for a chunk of validation users: U × N pairs
        u, n = torch.as_tensor(users.user_id), len(price)
        lengths = torch.from_numpy(np.diff(users.history_offsets))
        dense, sparse = features(u.repeat_interleave(n), torch.arange(n).repeat(len(u)),
                                 lengths.repeat_interleave(n), price)
        return model.module.model(dense, sparse).view(len(u), n)

    morec = MoRec(
        args.data, lambda rows: make_batch(rows.user_id, rows.item_id, rows.history_lengths,
                                           price, seed=rows.batch_index),
        rows=lambda batch, output: F.binary_cross_entropy_with_logits(
            output[1], batch.labels, reduction="none"),
        layout=ExampleLayout.INTERLEAVED, scorer=scores, chunk_users=32, columns=["history"],
        objectives=["accuracy", "revenue", "fairness", "alignment", Recent()],
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
                loss, logits, _ = pipeline.progress(batches)
            except StopIteration:
                break
            step += 1
            if rank == 0 and step % 20 == 0:
                print(json.dumps({"epoch": epoch, "step": step, "loss": loss.item(),
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
