"""Validation signals: per-group mean validation losses, the rows' batches, the signal.

A fake model whose per-row loss is item_id / 100 makes every group's mean a plain numpy
mean over valid.parquet; a real MF model checks that the result does not depend on the
chunking's spread over ranks (2 ranks under torchrun against one process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from torch import nn

from conftest import run_torchrun
from morec_rec.data.format import PreparedDataset
from morec_rec.eval.metrics import RankingMetrics
from morec_rec.eval.signals import group_losses, loss_groups, rows_batch, validation_signal
from morec_rec.models import ModelOutput, build_model
from morec_rec.models.negatives import NegativeSampler
from morec_rec.pipeline.batch import Collator, TrainBatch
from morec_rec.sampling.objectives import ValidationSignal
from sampling_data import make_dataset

MF_FEATURES = ("user_id", "item_id", "neg_item_id")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("signals") / "data")


class ItemLoss(nn.Module):
    """A fake model: each row's loss is its item id / 100 (negatives ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[TrainBatch] = []

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, ModelOutput]:
        self.batches.append(batch)
        per_row = batch.features["item_id"].values().to(torch.float64) / 100
        return per_row.mean(), ModelOutput(per_row, batch.objective)


def collator(dataset: PreparedDataset) -> Collator:
    return Collator(MF_FEATURES, NegativeSampler(dataset.items()["train_count"].to_numpy()),
                    10, seed=0)


def numpy_means(rows, column: str, groups: int) -> np.ndarray:
    loss = rows["item_id"].to_numpy() / 100
    group = rows[column].to_numpy()
    return np.array([loss[group == g].mean() if (group == g).any() else np.nan
                     for g in range(groups)])


def test_loss_groups_of_the_manifest(dataset: PreparedDataset) -> None:
    assert loss_groups(dataset.manifest) == {"fairness_group": 5, "popularity_group": 10}


@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_group_losses_are_per_group_means(dataset: PreparedDataset, chunk_rows: int) -> None:
    rows = dataset.split("valid")
    assert rows.num_rows == 240
    model = ItemLoss()
    with torch.no_grad():
        losses = group_losses(model, rows, collator(dataset), loss_groups(dataset.manifest),
                              chunk_rows=chunk_rows)

    assert set(losses) == {"fairness_group", "popularity_group"}
    for column, groups in loss_groups(dataset.manifest).items():
        assert losses[column].dtype == np.float64 and losses[column].shape == (groups,)
        np.testing.assert_allclose(losses[column], numpy_means(rows, column, groups),
                                   rtol=1e-12)
    # 240 rows: 34 chunks of 7 and one of 2, or a single chunk; each batch number c.
    sizes = [len(b.objective) for b in model.batches]
    assert sizes == ([7] * 34 + [2] if chunk_rows == 7 else [240])
    items = torch.cat([b.features["item_id"].values() for b in model.batches])
    assert items.tolist() == rows["item_id"].to_pylist()  # every row once, in order


def test_small_chunks_give_the_one_chunk_result(dataset: PreparedDataset) -> None:
    rows = dataset.split("valid")
    with torch.no_grad():
        small, whole = (group_losses(ItemLoss(), rows, collator(dataset),
                                     loss_groups(dataset.manifest), chunk_rows=n)
                        for n in (7, rows.num_rows))
    for column in whole:
        np.testing.assert_allclose(small[column], whole[column], rtol=1e-12)


def test_a_group_without_rows_is_nan(dataset: PreparedDataset) -> None:
    rows = dataset.split("valid")
    rows = rows.filter(pc.not_equal(rows["fairness_group"], 2))
    with torch.no_grad():
        losses = group_losses(ItemLoss(), rows, collator(dataset),
                              loss_groups(dataset.manifest), chunk_rows=16)
    fairness = losses["fairness_group"]
    assert np.isnan(fairness[2]) and np.isfinite(np.delete(fairness, 2)).all()
    np.testing.assert_allclose(fairness, numpy_means(rows, "fairness_group", 5), rtol=1e-12)


def test_rows_batch_round_trip(dataset: PreparedDataset) -> None:
    rows = dataset.split("valid").slice(13, 20)  # a slice: its lists do not start at 0
    batch = rows_batch(rows, batch_index=9)
    expected = rows.to_pylist()
    assert batch.user_id.tolist() == [r["user_id"] for r in expected]
    assert batch.item_id.tolist() == [r["item_id"] for r in expected]
    assert batch.price.tolist() == [r["price"] for r in expected]
    assert batch.fairness_group.tolist() == [r["fairness_group"] for r in expected]
    assert batch.popularity_group.tolist() == [r["popularity_group"] for r in expected]
    histories = torch.split(batch.history_values, batch.history_lengths.tolist())
    assert [h.tolist() for h in histories] == [r["history"] for r in expected]
    assert any(r["history"] for r in expected)
    assert batch.objective.tolist() == [0] * 20 and batch.starved.tolist() == [0]
    assert (batch.batch_index, batch.epoch, batch.masses_version) == (9, 0, 0)
    for tensor in (batch.user_id, batch.item_id, batch.history_values, batch.history_lengths):
        assert tensor.dtype == torch.int64


def test_validation_signal_keys() -> None:
    group_loss = {"fairness_group": np.array([0.1, np.nan]), "popularity_group": np.ones(3)}
    exposure = np.array([0.2, 0.3, 0.5])
    metrics = RankingMetrics(hit=0.1, rhit=1.0, pop_kl=0.2, min_hit=0.0,
                             group_hit=np.array([0.1, np.nan]), group_users=np.array([3, 0]),
                             exposure=exposure, k=10, users=3)
    signal = validation_signal(group_loss, metrics)
    assert isinstance(signal, ValidationSignal)
    assert signal.group_loss is group_loss
    assert list(signal.exposure) == ["popularity_group"]
    np.testing.assert_array_equal(signal.exposure["popularity_group"], exposure)
    assert list(signal.group_hit) == ["fairness_group"]
    np.testing.assert_array_equal(signal.group_hit["fairness_group"], [0.1, np.nan])


def scaled_mf(dataset: PreparedDataset) -> nn.Module:
    """MF (seed 0, D = 8) with its tables scaled ×10, so that losses differ row to row."""
    manifest = dataset.manifest
    torch.manual_seed(0)
    model = build_model("mf", manifest["num_users"], manifest["num_items"],
                        manifest["history_length"], embedding_dim=8)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(10)
    return model.eval()


@pytest.mark.slow
def test_group_losses_do_not_depend_on_the_number_of_ranks(dataset: PreparedDataset,
                                                           tmp_path: Path) -> None:
    # 240 rows in chunks of 50: 5 chunks, rank 1 scores 2 and joins a third call empty.
    run_torchrun("tests/dist/hook_job.py", "--out", str(tmp_path), "--data", str(dataset.root),
                 nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["signals"] for r in (0, 1)]
    assert ranks[0] == ranks[1]
    with torch.no_grad():
        one = group_losses(scaled_mf(dataset), dataset.split("valid"), collator(dataset),
                           loss_groups(dataset.manifest), chunk_rows=50)
        again = group_losses(scaled_mf(dataset), dataset.split("valid"), collator(dataset),
                             loss_groups(dataset.manifest), chunk_rows=50)
        other = group_losses(scaled_mf(dataset), dataset.split("valid"), collator(dataset),
                             loss_groups(dataset.manifest), chunk_rows=40)
    for column, values in one.items():
        np.testing.assert_array_equal(values, again[column])  # negatives seeded: repeatable
        assert np.ptp(values) > 0.05  # losses that differ, so a mismatch would show
        # Sums of the same chunks, added in another order.
        np.testing.assert_allclose(ranks[0][column], values, rtol=1e-12)
        assert not np.allclose(other[column], values, rtol=1e-6)  # other chunks: other negatives
