"""RowWiseAdam, the CPU tables' Adam: only the rows a batch touches move, by Adam's rule,
with L2 weight decay on those rows, and under two ranks the mean of the ranks' rows; and
the replicated tables' collection, which looks each table up once."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_torchrun
from dist import row_gather_job
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from morec_rec.jobs import row_wise_adam
from morec_rec.jobs.row_wise_adam import RowWiseAdam, sum_rows
from morec_rec.jobs.sharding import ReplicatedEmbeddingCollection

LR, WD = 0.1, 0.5


@pytest.fixture(params=["touched rows", "whole table", "by the share touched"])
def update(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs a test with each of RowWiseAdam's updates at every step (the touched rows
    gathered and written back; the whole table in place and the others put back, its
    gradient summed over the whole table from the second step on), and as it chooses."""
    if request.param != "by the share touched":
        monkeypatch.setattr(row_wise_adam, "DENSE_FRACTION",
                            float("inf") if request.param == "touched rows" else 0.0)


def _step(table: nn.Embedding, optimizer: torch.optim.Optimizer, ids: list[int],
          scale: float = 1.0) -> None:
    optimizer.zero_grad()
    (table(torch.tensor(ids)).sum() * scale).backward()  # d/dw of a row's sum: 1 per use
    optimizer.step()


def test_sum_rows_adds_each_ids_values_in_order_of_first_appearance() -> None:
    ids = torch.tensor([3, 1, 3, 0, 1, 3])
    values = torch.tensor([[1.0], [10.0], [100.0], [1000.0], [20.0], [200.0]])
    scratch = torch.full((6,), 99)  # stale entries from another step must not matter
    rows, sums = sum_rows(ids, values, scratch)
    assert rows.tolist() == [3, 1, 0]
    assert sums.tolist() == [[301.0], [30.0], [1000.0]]
    assert scratch[[2, 4, 5]].tolist() == [99, 99, 99]  # untouched rows are never written


def test_sum_table_counts_and_adds_each_rows_values_in_order() -> None:
    ids = torch.tensor([3, 1, 3, 0, 1, 3])
    values = torch.tensor([[1.0], [10.0], [100.0], [1000.0], [20.0], [200.0]])
    counts, sums = row_wise_adam.sum_table(ids, values, 5)
    assert counts.tolist() == [1, 2, 0, 3, 0]
    assert sums.tolist() == [[1000.0], [30.0], [0.0], [301.0], [0.0]]


def test_sum_rows_equals_coalesce() -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(500, (5000,), generator=generator)
    values = torch.randn(5000, 8, generator=generator)
    rows, sums = sum_rows(ids, values, torch.empty(1000, dtype=torch.long))
    expected = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (1000, 8)).coalesce()
    order = rows.argsort()
    assert torch.equal(rows[order], expected.indices()[0])
    torch.testing.assert_close(sums[order], expected.values(), rtol=0, atol=1e-5)


def test_only_touched_rows_move_and_keep_their_own_moments(update: None) -> None:
    torch.manual_seed(0)
    table = nn.Embedding(4, 3, sparse=True)
    start = table.weight.detach().clone()
    optimizer = RowWiseAdam(table.parameters(), lr=LR)
    _step(table, optimizer, [1, 3, 3])
    # Adam's first step moves each coordinate by lr·m̂/(√v̂ + ε) = lr·g/(|g| + ε) ≈ lr·sign(g).
    moved = start.clone()
    moved[[1, 3]] -= LR
    torch.testing.assert_close(table.weight.detach(), moved, rtol=0, atol=1e-6)
    _step(table, optimizer, [1])
    # Row 3 has no gradient at the second step: it stays, where dense Adam's momentum
    # would have moved it again.
    moved[1] -= LR
    torch.testing.assert_close(table.weight.detach(), moved, rtol=0, atol=1e-6)

    dense = nn.Embedding.from_pretrained(start.clone(), freeze=False)
    adam = torch.optim.Adam(dense.parameters(), lr=LR)
    _step(dense, adam, [1, 3, 3])
    _step(dense, adam, [1])
    assert not torch.allclose(dense.weight[3], table.weight[3])


def test_steps_equal_torch_sparse_adam_on_the_same_gradients(update: None) -> None:
    # Repeated and absent rows, empty steps, and rows that come back after a pause. As
    # RowWiseAdam chooses (3/4 of the 6 rows touched or more), each step's gradient is
    # summed by row or over the table (after such a step), then the update is by row or
    # over the table (on such a step): rows → rows, rows → none, rows → rows, rows →
    # table, table → rows, rows → table, table → table, table → none, rows → rows twice.
    batches = [[0, 2, 2, 5], [], [1, 2], [0, 1, 2, 3, 4, 4], [2, 2], [0, 1, 2, 3, 4, 5, 5],
               [5, 4, 3, 2, 1], [], [5, 5, 5, 0], [3]]
    torch.manual_seed(0)
    ours = nn.Embedding(6, 4, sparse=True)
    reference = nn.Embedding.from_pretrained(ours.weight.detach().clone(), freeze=False,
                                             sparse=True)
    opt_ours = RowWiseAdam(ours.parameters(), lr=LR)
    opt_reference = torch.optim.SparseAdam(reference.parameters(), lr=LR)
    weights = torch.randn(8, 4)
    for ids in batches:
        for table, optimizer in ((ours, opt_ours), (reference, opt_reference)):
            optimizer.zero_grad()
            used = torch.tensor(ids, dtype=torch.long)
            (table(used) * weights[:len(ids)]).sum().backward()
            optimizer.step()
        torch.testing.assert_close(ours.weight, reference.weight, rtol=1e-6, atol=1e-7)
    state, expected = opt_ours.state[ours.weight], opt_reference.state[reference.weight]
    assert state["step"] == expected["step"] == len(batches)
    for moment in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[moment], expected[moment], rtol=1e-6, atol=1e-7)


def test_weight_decay_is_added_to_the_touched_rows_gradients(update: None) -> None:
    # Rows at -3 and +3, each used once: g = 1, and with decay g + wd·w = -0.5 and 2.5,
    # so Adam's first step (≈ lr·sign) moves row 0 up and row 1 down; row 2 is untouched
    # and keeps its value although decay would pull it.
    table = nn.Embedding.from_pretrained(torch.tensor([[-3.0], [3.0], [3.0]]), freeze=False,
                                         sparse=True)
    _step(table, RowWiseAdam(table.parameters(), lr=LR, weight_decay=WD), [0, 1])
    torch.testing.assert_close(table.weight.detach(), torch.tensor([[-3.0 + LR], [3.0 - LR],
                                                                    [3.0]]), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_average_their_touched_rows_and_stay_equal(tmp_path: Path) -> None:
    run_torchrun("tests/dist/row_gather_job.py", "--out", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Per-rank gradients: rank 0 has 2 on row 1 and 1 on row 4, rank 1 has 1 on rows 4
    # and 5; their mean is 1, 1, 0.5 on rows 1, 4, 5 and 0 elsewhere.
    mean = [[0, 0], [1, 1], [0, 0], [0, 0], [1, 1], [0.5, 0.5]]
    # Adam's first step moves a row with a positive gradient by -lr (the others stay).
    moved = [[0, 0], [-LR, -LR], [0, 0], [0, 0], [-LR, -LR], [-LR, -LR]]
    for rank in ranks:
        assert rank["gathered"] == mean
        np.testing.assert_allclose(rank["table"], moved, rtol=0, atol=1e-6)
    # The steps over both ranks' rows at once, the loss halved: the ranks' mean gradient.
    reference = nn.Embedding.from_pretrained(torch.tensor(row_gather_job.START),
                                             freeze=False, sparse=True)
    optimizer = torch.optim.SparseAdam(reference.parameters(), lr=LR)
    for ids in row_gather_job.STEPS:
        _step(reference, optimizer, ids[0] + ids[1], scale=0.5)
    for rank in ranks:
        np.testing.assert_allclose(rank["steps"], reference.weight.tolist(), rtol=1e-6)


def test_replicated_collection_looks_up_like_torchrec_once_per_table() -> None:
    def collection() -> EmbeddingCollection:
        torch.manual_seed(0)
        return EmbeddingCollection(tables=[
            EmbeddingConfig(num_embeddings=5, embedding_dim=3, name="user",
                            feature_names=["user_id"]),
            EmbeddingConfig(num_embeddings=7, embedding_dim=3, name="item",
                            feature_names=["item_id", "neg_item_id"])], need_indices=True)

    # Two rows; keys out of table order, a row with no negatives, item 2 in both item
    # features.
    features = KeyedJaggedTensor(keys=["neg_item_id", "user_id", "item_id"],
                                 values=torch.tensor([2, 6, 1, 4, 2, 3]),
                                 lengths=torch.tensor([2, 0, 1, 1, 1, 1]))
    reference, replicated = collection(), collection()
    replicated.__class__ = ReplicatedEmbeddingCollection
    lookups = {"reference": 0, "replicated": 0}
    for key, module in (("reference", reference), ("replicated", replicated)):
        for table in module.embeddings.values():
            table.sparse = True
            table.register_forward_hook(
                lambda *_, key=key: lookups.__setitem__(key, lookups[key] + 1))
    expected, got = reference(features), replicated(features)
    assert lookups == {"reference": 3, "replicated": 2}  # one a feature, one a table
    assert list(got) == list(expected)
    upstream = {name: torch.randn(jagged.values().shape) for name, jagged in expected.items()}
    for name, jagged in got.items():
        torch.testing.assert_close(jagged.values(), expected[name].values(), rtol=0, atol=0)
        assert torch.equal(jagged.lengths(), expected[name].lengths())
        assert torch.equal(jagged.weights(), expected[name].weights())
    for outputs in (expected, got):
        sum((outputs[name].values() * upstream[name]).sum() for name in outputs).backward()
    for name in ("user", "item"):
        torch.testing.assert_close(replicated.embeddings[name].weight.grad.to_dense(),
                                   reference.embeddings[name].weight.grad.to_dense())
    assert replicated.state_dict().keys() == reference.state_dict().keys()
