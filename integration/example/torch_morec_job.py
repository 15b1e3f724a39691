"""``torch_plain_job.py`` turned into a MoRec job: the same model, dict batches and loop.

    torchrun --nproc_per_node=2 integration/example/torch_morec_job.py --data DIR --epochs 1

What changed (``diff torch_plain_job.py torch_morec_job.py``): MoRec's loader replaces the
job's own (it draws the rows; the job's ``make_batch`` still makes the dicts), the loss
hook ``hook = morec.loss(model)`` is called in place of the model (``loss, margin =
hook(batch)``), and every ``--update-every`` steps a validation round ranks the validation
users with the job's scorer (user embeddings times every item's) and updates the
objectives' coefficients and sampling weights; the plugin decides from which batch each
update applies. The model returns a mean loss, so ``rows=`` computes each row's BPR loss
from its margin. Four built-in objectives and one of the job's own (``Niche``). Nothing
here, MoRec included, imports TorchRec: the job says so at its end.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from morec_rec import MoRec, MoRecConfig, Objective, SamplerConfig


def make_batch(users: torch.Tensor, items: torch.Tensor, num_items: int,
               seed: int) -> dict[str, torch.Tensor]:
    """B (user, item, negative) triples from B (user, item) rows."""
    negatives = torch.from_numpy(np.random.default_rng(seed).integers(0, num_items, len(users)))
    return {"user": users.long(), "item": items.long(), "negative": negatives}


class Niche(Objective):
    """This job's own objective: rows drawn in proportion to 1 / (1 + the item's popularity
    group), group 0 holding the least popular items."""

    name, num_groups, columns = "niche", 1, ("popularity_group",)

    def initial_masses(self) -> np.ndarray:
        return np.ones(1)

    def weights(self, rows: dict) -> np.ndarray:
        return 1 / (1 + rows["popularity_group"].astype(np.float64))


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
    parser.add_argument("--update-every", type=int, default=100)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)

    manifest = json.loads((args.data / "manifest.json").read_text())
    model = DistributedDataParallel(MF(manifest["num_users"], manifest["num_items"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    morec = MoRec(
        args.data, lambda rows: make_batch(rows.user_id, rows.item_id, manifest["num_items"],
                                           seed=rows.batch_index),
        rows=lambda batch, margin: -F.logsigmoid(margin),
        scorer=lambda users: (model.module.user(torch.as_tensor(users.user_id))
                              @ model.module.item.weight.T),
        objectives=["accuracy", "revenue", "fairness", "alignment", Niche()],
        sampler=SamplerConfig(sub_batch_size=args.batch_size // 5),
        config=MoRecConfig(preference=(0.25,) * 4, beta_max=2.0), num_workers=1)
    hook = morec.loss(model)
    step = 0
    for epoch in range(args.epochs):
        morec.set_epoch(epoch)
        batches = iter(morec.loader)
        for batch in batches:
            loss, margin = hook(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if rank == 0 and step % 20 == 0:
                print(json.dumps({"epoch": epoch, "step": step, "loss": loss.item(),
                                  "mean_margin": margin.mean().item()}), flush=True)
            if step % args.update_every == 0:
                record = morec.validate(model)
                if rank == 0:
                    print(json.dumps({"step": step, **record}), flush=True)
    if rank == 0:
        print(json.dumps({"torchrec_loaded": "torchrec" in sys.modules}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
