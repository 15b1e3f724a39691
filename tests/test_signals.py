"""Validation signals: per-group mean validation losses, the rows' batches, the signal.

A fake model whose per-row loss is item_id / 100 makes every group's mean a plain numpy
mean over valid.parquet; one with two examples per row (item_id / 100 and user_id / 1000,
laid out blocked or interleaved) checks that each example counts in its row's groups; a
real MF model checks that the result does not depend on the chunking's spread over ranks
(2 ranks under torchrun against one process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from conftest import run_torchrun
from sampling_data import make_dataset
from torch import nn

from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.jobs.collate import Collator, TrainBatch
from morec_rec.jobs.models import ModelOutput, build_model, per_row_loss
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.plugin.eval.metrics import RankingMetrics
from morec_rec.plugin.hook import Examples
from morec_rec.plugin.sampling.objectives import ValidationSignal
from morec_rec.plugin.segments import ExampleLayout
from morec_rec.plugin.validation import group_losses, loss_groups, rows_batch, validation_signal

MF_FEATURES = ("user_id", "item_id", "neg_item_id")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("signals") / "data")


class ItemLoss(nn.Module):
    """A fake model: each row's loss is its item id / 100 (negatives ignored); its own
    loss is their mean (a backbone's: ``rows=per_row_loss``) or, with ``vector``, the
    per-row losses themselves (found with the default ``Examples()``)."""

    def __init__(self, *, vector: bool = False) -> None:
        super().__init__()
        self.vector = vector
        self.batches: list[TrainBatch] = []

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, ModelOutput]:
        self.batches.append(batch)
        per_row = batch.features["item_id"].values().to(torch.float64) / 100
        return per_row if self.vector else per_row.mean(), ModelOutput(per_row)


class TwoExamples(nn.Module):
    """A fake model with two examples per row, item_id / 100 and user_id / 1000, laid out
    as ``layout`` says: all rows' first examples then all second ones (BLOCKED), or each
    row's two together (INTERLEAVED)."""

    def __init__(self, layout: ExampleLayout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, ModelOutput]:
        features = batch.features
        pair = torch.stack([features["item_id"].values().to(torch.float64) / 100,
                            features["user_id"].values().to(torch.float64) / 1000])
        examples = (pair if self.layout is ExampleLayout.BLOCKED else pair.T).reshape(-1)
        return examples.mean(), ModelOutput(examples)


def collator(dataset: PreparedDataset) -> Collator:
    return Collator(MF_FEATURES, NegativeSampler(dataset.items()["train_count"].to_numpy()),
                    10, seed=0)


def numpy_means(rows, column: str, groups: int, *, users: bool = False) -> np.ndarray:
    """Per-group means of item_id / 100 over ``rows``; with ``users``, of both that and
    user_id / 1000 (two examples a row)."""
    loss = rows["item_id"].to_numpy() / 100
    group = rows[column].to_numpy()
    if users:
        loss = np.concatenate([loss, rows["user_id"].to_numpy() / 1000])
        group = np.concatenate([group, group])
    return np.array([loss[group == g].mean() if (group == g).any() else np.nan
                     for g in range(groups)])


def test_loss_groups_of_the_manifest(dataset: PreparedDataset) -> None:
    assert loss_groups(dataset.manifest) == {"fairness_group": 5, "popularity_group": 10}


@pytest.mark.parametrize(("chunk_rows", "vector"), [(7, False), (4096, False), (7, True)])
def test_group_losses_are_per_group_means(dataset: PreparedDataset, chunk_rows: int,
                                          vector: bool) -> None:
    rows = dataset.split("valid")
    assert rows.num_rows == 240
    model = ItemLoss(vector=vector)
    examples = Examples() if vector else Examples(rows=per_row_loss)
    with torch.no_grad():
        losses = group_losses(model, rows, collator(dataset), loss_groups(dataset.manifest),
                              examples=examples, chunk_rows=chunk_rows)

    assert set(losses) == {"fairness_group", "popularity_group"}
    for column, groups in loss_groups(dataset.manifest).items():
        assert losses[column].dtype == np.float64 and losses[column].shape == (groups,)
        np.testing.assert_allclose(losses[column], numpy_means(rows, column, groups),
                                   rtol=1e-12)
    # 240 rows: 34 chunks of 7 and one of 2, or a single chunk; each batch number c.
    sizes = [b.features.stride() for b in model.batches]
    assert sizes == ([7] * 34 + [2] if chunk_rows == 7 else [240])
    items = torch.cat([b.features["item_id"].values() for b in model.batches])
    assert items.tolist() == rows["item_id"].to_pylist()  # every row once, in order


@pytest.mark.parametrize("layout", [ExampleLayout.BLOCKED, ExampleLayout.INTERLEAVED],
                         ids=lambda layout: layout.value)
def test_several_examples_per_row_count_in_their_rows_groups(dataset: PreparedDataset,
                                                             layout: ExampleLayout) -> None:
    rows = dataset.split("valid")
    with torch.no_grad():
        losses = group_losses(TwoExamples(layout), rows, collator(dataset),
                              loss_groups(dataset.manifest),
                              examples=Examples(per_row_loss, layout), chunk_rows=7)
    for column, groups in loss_groups(dataset.manifest).items():
        expected = numpy_means(rows, column, groups, users=True)
        np.testing.assert_allclose(losses[column], expected, rtol=1e-12)
        # Not the means of the item examples alone: the user examples counted.
        assert not np.allclose(losses[column], numpy_means(rows, column, groups), rtol=1e-3)
    # The other layout's reading of the same examples puts them in other rows' groups.
    other = (ExampleLayout.INTERLEAVED if layout is ExampleLayout.BLOCKED
             else ExampleLayout.BLOCKED)
    with torch.no_grad():
        wrong = group_losses(TwoExamples(layout), rows, collator(dataset),
                             loss_groups(dataset.manifest),
                             examples=Examples(per_row_loss, other), chunk_rows=7)
    assert not np.allclose(wrong["fairness_group"],
                           numpy_means(rows, "fairness_group", 5, users=True), rtol=1e-6)


def test_per_example_losses_must_fit_the_rows(dataset: PreparedDataset) -> None:
    rows = dataset.split("valid")
    with torch.no_grad(), pytest.raises(MorecError, match="give the examples' layout"):
        group_losses(TwoExamples(ExampleLayout.BLOCKED), rows, collator(dataset),
                     loss_groups(dataset.manifest), examples=Examples(per_row_loss),
                     chunk_rows=7)


def test_small_chunks_give_the_one_chunk_result(dataset: PreparedDataset) -> None:
    rows = dataset.split("valid")
    with torch.no_grad():
        small, whole = (group_losses(ItemLoss(), rows, collator(dataset),
                                     loss_groups(dataset.manifest),
                                     examples=Examples(per_row_loss), chunk_rows=n)
                        for n in (7, rows.num_rows))
    for column in whole:
        np.testing.assert_allclose(small[column], whole[column], rtol=1e-12)


def test_a_group_without_rows_is_nan(dataset: PreparedDataset) -> None:
    rows = dataset.split("valid")
    rows = rows.filter(pc.not_equal(rows["fairness_group"], 2))
    with torch.no_grad():
        losses = group_losses(ItemLoss(), rows, collator(dataset),
                              loss_groups(dataset.manifest), examples=Examples(per_row_loss),
                              chunk_rows=16)
    fairness = losses["fairness_group"]
    assert np.isnan(fairness[2]) and np.isfinite(np.delete(fairness, 2)).all()
    np.testing.assert_allclose(fairness, numpy_means(rows, "fairness_group", 5), rtol=1e-12)


def test_a_nan_or_infinite_loss_is_refused(dataset: PreparedDataset) -> None:
    rows = dataset.split("valid")
    first = rows["item_id"][0].as_py()
    group = rows["fairness_group"][0].as_py()
    for value in (np.nan, np.inf):

        class Diverged(ItemLoss):
            """ItemLoss, ``value`` for the first validation row's item."""

            def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, ModelOutput]:
                loss, output = super().forward(batch)
                items = batch.features["item_id"].values()
                return loss, ModelOutput(torch.where(items == first, value, output.per_row_loss))

        with torch.no_grad(), pytest.raises(MorecError, match=(
                rf"validation loss: fairness_group {group} {value}, popularity_group \d+ "
                rf"{value}: the model's parameters or outputs hold NaN or inf")):
            group_losses(Diverged(), rows, collator(dataset), loss_groups(dataset.manifest),
                         examples=Examples(per_row_loss), chunk_rows=16)


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
    examples = Examples(per_row_loss)
    with torch.no_grad():
        one, again, other = (group_losses(scaled_mf(dataset), dataset.split("valid"),
                                          collator(dataset), loss_groups(dataset.manifest),
                                          examples=examples, chunk_rows=n)
                             for n in (50, 50, 40))
    for column, values in one.items():
        np.testing.assert_array_equal(values, again[column])  # negatives seeded: repeatable
        assert np.ptp(values) > 0.05  # losses that differ, so a mismatch would show
        # Sums of the same chunks, added in another order.
        np.testing.assert_allclose(ranks[0][column], values, rtol=1e-12)
        assert not np.allclose(other[column], values, rtol=1e-6)  # other chunks: other negatives
