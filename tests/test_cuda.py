"""The plugin on a CUDA device (skipped where there is none): a training step through the
loss hook never waits for the device (``torch.cuda.set_sync_debug_mode``), under both
kinds of coefficients, and ranking on the device gives the CPU's metrics.

    python -m pytest tests/test_cuda.py    # on a machine with a GPU; TorchRec not needed
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from morec_rec import MoRec, MoRecConfig, MorecError, SamplerConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.plugin.eval.ranking import evaluate, load_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


class MF(nn.Module):
    """Mean BPR loss and the margins (differentiable: loss coefficients weigh their
    losses), from dict batches of user, item and negative ids."""

    def __init__(self, num_users: int, num_items: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.user, self.item = nn.Embedding(num_users, 16), nn.Embedding(num_items, 16)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        user = self.user(batch["user"])
        margin = (user * (self.item(batch["item"]) - self.item(batch["negative"]))).sum(-1)
        return -F.logsigmoid(margin).mean(), margin

    def scores(self, users) -> torch.Tensor:
        ids = torch.as_tensor(users.user_id, device=self.item.weight.device)
        return self.user(ids) @ self.item.weight.T


class Collate:
    """Each row's user and item, and the next item as its negative."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def __call__(self, rows) -> dict:
        return {"user": rows.user_id, "item": rows.item_id,
                "negative": (rows.item_id + 1) % self.num_items}


@pytest.mark.parametrize("coefficients", ["sampling", "loss"])
def test_a_step_through_the_hook_never_waits_for_the_device(tiny: Path,
                                                            coefficients: str) -> None:
    manifest = json.loads((tiny / "manifest.json").read_text())
    model = MF(manifest["num_users"], manifest["num_items"]).to(CUDA)
    morec = MoRec(tiny, Collate(manifest["num_items"]),
                  rows=lambda batch, margin: F.softplus(-margin),
                  scorer=model.scores, sampler=SamplerConfig(sub_batch_size=32),
                  config=MoRecConfig(coefficients=coefficients), device=CUDA)
    hook = morec.loss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    morec.validate(model)
    morec.set_epoch(0)
    batches = [batch.to(CUDA, non_blocking=True) for _, batch in zip(range(4), morec.loader)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        for batch in batches:
            loss, _ = hook(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with pytest.raises(RuntimeError, match="synchroniz"):  # the trap is armed
            loss.item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    losses = morec.objective_losses()
    assert set(losses) == {"accuracy", "revenue", "fairness", "alignment"}
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    assert morec.validate(model)["metrics"]["hit@10"] >= 0


def test_ranking_on_the_device_gives_the_cpus_metrics(tiny: Path) -> None:
    dataset = PreparedDataset.open(tiny)
    model = MF(dataset.manifest["num_users"], dataset.manifest["num_items"])
    task = load_task(dataset, "test")
    with torch.no_grad():
        on_cpu = evaluate(model.scores, task, chunk_users=64).as_dict()
        on_device = evaluate(model.to(CUDA).scores, task, chunk_users=64).as_dict()
    assert on_device == on_cpu


def test_nan_scores_on_the_device_are_refused(tiny: Path) -> None:
    # The check reads each user's first-ranked score: CUDA's topk must rank NaN first too.
    dataset = PreparedDataset.open(tiny)
    model = MF(dataset.manifest["num_users"], dataset.manifest["num_items"]).to(CUDA)
    with torch.no_grad():
        model.user.weight[3] = torch.nan
        with pytest.raises(MorecError, match=r"NaN scores for 1 of \d+ users \(user ids 3\)"):
            evaluate(model.scores, load_task(dataset, "test"), chunk_users=64)
