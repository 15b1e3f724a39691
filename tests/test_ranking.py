"""Full-ranking evaluation: exclusions, ties, chunking, and the task read from a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_torchrun
from sampling_data import make_dataset

from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.plugin.eval.ranking import (
    PopularityScorer,
    RankingTask,
    evaluate,
    load_task,
    rank_users,
    top_k,
)
from morec_rec.plugin.validation import sample_users


def _task(exclude: list[list[int]], held_out: list[int], num_items: int = 6) -> RankingTask:
    lengths = [len(e) for e in exclude]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return RankingTask(
        user_id=np.arange(len(held_out), dtype=np.int64),
        held_out=np.array(held_out, dtype=np.int64),
        history_offsets=np.zeros(len(held_out) + 1, dtype=np.int64),
        history_values=np.zeros(0, dtype=np.int64),
        exclude_offsets=offsets,
        exclude_items=np.array([i for e in exclude for i in e], dtype=np.int64),
        price=np.arange(num_items, dtype=np.float64) + 1,
        fairness_group=np.arange(num_items) % 2,
        num_fairness_groups=2,
        popularity_group=np.arange(num_items) % 3,
        num_popularity_groups=3,
        q=np.array([0.2, 0.3, 0.5]),
    )


def test_top_k_breaks_ties_by_item_id() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert top_k(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert top_k(scores, 4).tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]


def test_popular_excludes_seen_items() -> None:
    # Popularity order of items: 5, 4, 3, 2, 1, 0. User 0 saw 5 and 3: top 2 = [4, 2].
    # User 1 saw nothing: [5, 4]. Held out: 2 (hit), 3 (miss).
    task = _task(exclude=[[5, 3], []], held_out=[2, 3])
    metrics = evaluate(PopularityScorer(np.arange(6)), task, k=2)
    assert metrics.hit == pytest.approx(0.5)
    assert metrics.rhit == pytest.approx(3.0 / 2)  # price of item 2 is 3, one of two users


def test_scores_of_another_shape_or_type_are_refused() -> None:
    task = _task(exclude=[[], []], held_out=[2, 3])
    with pytest.raises(MorecError, match=r"scorer: scores of shape \(2, 5\) for 2 users, "
                                         r"expected \(users, 6\)"):
        evaluate(lambda users: torch.zeros(len(users), 5), task, k=2)
    with pytest.raises(MorecError, match=r"scorer: returned ndarray, expected a float tensor "
                                         r"\(users, 6\)"):
        evaluate(lambda users: np.zeros((len(users), 6)), task, k=2)
    with pytest.raises(MorecError, match=r"scorer: returned a torch.int64 tensor, expected a "
                                         r"float tensor \(users, 6\)"):
        evaluate(lambda users: torch.zeros(len(users), 6, dtype=torch.int64), task, k=2)


def test_scores_that_view_a_parameter_are_ranked_without_writing_into_it() -> None:
    # Each user's seen items are masked in the scores: never in the tensor a view shares
    # (here every user's row is the one row of item biases), nor in a parameter.
    task = _task(exclude=[[5, 3], []], held_out=[2, 3])
    bias = torch.nn.Parameter(torch.arange(6, dtype=torch.float32))
    expected = evaluate(PopularityScorer(np.arange(6)), task, k=2)
    for scorer in (lambda users: bias.detach().expand(len(users), -1),
                   lambda users: bias.expand(len(users), -1)):
        assert evaluate(scorer, task, k=2).as_dict() == expected.as_dict()
        assert bias.tolist() == list(range(6))


def test_a_scorers_own_minus_inf_ranks_above_the_excluded_items() -> None:
    # A scorer that masks items with -inf (here 0-3) ties them with the seen items the
    # ranking masks so (0, 1): those must still never be shown. Top 3: 4, 5, then 2,
    # the held-out item, not 0.
    task = _task(exclude=[[0, 1]], held_out=[2])

    def scorer(users: RankingTask) -> torch.Tensor:
        return torch.tensor([[-torch.inf] * 4 + [1.0, 1.0]]).repeat(len(users), 1)

    assert evaluate(scorer, task, k=3).hit == 1.0


def test_nan_scores_are_refused_where_they_could_rank() -> None:
    # User 1's NaN is on an item it saw (excluded), user 2's on one it could be shown;
    # the chunk of users 0-1 ranks, the one with user 2 is refused.
    task = _task(exclude=[[], [4], []], held_out=[2, 3, 1])

    def scorer(users: RankingTask) -> torch.Tensor:
        scores = torch.arange(6, dtype=torch.float32).repeat(len(users), 1)
        scores[torch.from_numpy(users.user_id) > 0, 4] = torch.nan
        return scores

    assert evaluate(scorer, task.rows(0, 2), k=2).hit == 0.5  # user 1: [5, 3], held out 3
    # Ties in the top k + 1 take the stable sort, which ranks NaN first too.
    tied = lambda users: torch.where(scorer(users).isnan(), torch.nan, 1.0)  # noqa: E731
    for chunk_users in (1, 3):
        for scores in (scorer, tied):
            with pytest.raises(MorecError, match=r"scorer: NaN scores for 1 of \d users "
                                                 r"\(user ids 2\): the model's parameters"):
                evaluate(scores, task, k=2, chunk_users=chunk_users)


def test_ranks_evaluate_as_one_process_and_refuse_nan_scores_together(tmp_path: Path) -> None:
    # Two ranks give one process's metrics, whether each holds the whole task or its own
    # share, and where a rank has no user (it pads the scorer's collective). The last
    # user's scores are NaN on the last rank only: every rank raises (none is left waiting
    # in the next collective), and names the users it has.
    dataset = make_dataset(tmp_path / "d")
    run_torchrun("tests/dist/eval_job.py", "--data", str(dataset.root), "--out", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    task = load_task(dataset, "valid")
    scorer = PopularityScorer(dataset.items()["train_count"].to_numpy())
    whole = evaluate(scorer, task)
    alone = {"whole": whole, "share": whole, "first_user": evaluate(scorer, task.rows(0, 1))}
    assert alone["first_user"].users == 1
    for rank in ranks:
        assert rank["metrics"].keys() == alone.keys()
        for name, metrics in alone.items():
            assert rank["metrics"][name] == pytest.approx(metrics.as_dict(), rel=1e-12)
    assert [rank["errors"]["nan"] for rank in ranks] == [
        f"scorer: NaN scores for 1 of {len(task)} users ({named}): the model's parameters or "
        "outputs hold NaN; training diverged?"
        for named in ("on other ranks", f"user ids {task.user_id[-1]}")]
    assert [rank["errors"]["other_share"] for rank in ranks] == [
        f"ranking task: loaded for rank {1 - r} of 2, evaluated on rank {r} of 2: load each "
        "rank's own share (load_task(..., rank=, world_size=)) or the whole task"
        for r in range(2)]


def test_a_ranks_share_is_its_consecutive_users_of_the_task(tmp_path: Path) -> None:
    # ⌈U/W⌉ users a rank in task order; the shares together are the whole task, and a
    # share is evaluated on its own rank only.
    assert [rank_users(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert [rank_users(2, r, 4) for r in range(4)] == [slice(0, 1), slice(1, 2), slice(2, 2),
                                                      slice(2, 2)]
    dataset = make_dataset(tmp_path / "d")
    whole = load_task(dataset, "test")
    shares = [load_task(dataset, "test", rank=r, world_size=3) for r in range(3)]
    assert [share.share for share in shares] == [(0, 3), (1, 3), (2, 3)]
    for name in ("user_id", "held_out", "exclude_items", "history_values"):
        np.testing.assert_array_equal(
            np.concatenate([getattr(share, name) for share in shares]), getattr(whole, name))
    bounds = [rank_users(len(whole), r, 3).stop for r in range(2)]
    for part, share in zip(np.split(np.arange(len(whole)), bounds), shares):
        np.testing.assert_array_equal(np.diff(share.exclude_offsets),
                                      np.diff(whole.exclude_offsets)[part])
    with pytest.raises(MorecError, match="loaded for rank 1 of 3, evaluated on rank 0 of 1"):
        evaluate(PopularityScorer(np.arange(whole.num_items)), shares[1])
    with pytest.raises(MorecError, match="rank 3 is outside world size 3"):
        load_task(dataset, "test", rank=3, world_size=3)


@pytest.mark.parametrize("chunk_users", [1, 2, 5])
def test_chunking_does_not_change_metrics(tmp_path: Path, chunk_users: int) -> None:
    dataset = make_dataset(tmp_path / "d")
    task = load_task(dataset, "test")
    scorer = PopularityScorer(dataset.items()["train_count"].to_numpy())
    whole = evaluate(scorer, task, chunk_users=len(task))
    part = evaluate(scorer, task, chunk_users=chunk_users)
    assert whole.as_dict() == part.as_dict()


def test_test_task_excludes_train_and_valid_items(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "d")
    valid, test = load_task(dataset, "valid"), load_task(dataset, "test")
    train = dataset.split("train")
    user = 7
    trained = set(train.filter(train["user_id"].to_numpy() == user)["item_id"].to_pylist())
    valid_excluded = set(
        valid.exclude_items[valid.exclude_offsets[user]:valid.exclude_offsets[user + 1]])
    test_excluded = set(
        test.exclude_items[test.exclude_offsets[user]:test.exclude_offsets[user + 1]])
    assert valid_excluded == trained
    assert test_excluded == trained | {int(valid.held_out[user])}
    assert len(test) == dataset.manifest["num_users"]
    histories = dataset.split("test")["history"].to_pylist()[:3]
    np.testing.assert_array_equal(np.diff(test.history_offsets)[:3], [len(h) for h in histories])


@pytest.mark.parametrize("split", ["valid", "test"])
def test_a_task_of_some_users_is_the_whole_tasks_rows_of_them(tmp_path: Path,
                                                               split: str) -> None:
    # Only the sampled users' training (and, for test, validation) rows are kept as the
    # files are read; what each user excludes, holds out and has seen stays as it was.
    dataset = make_dataset(tmp_path / "d")
    whole = load_task(dataset, split)
    some = load_task(dataset, split, sample_users(dataset.split(split), 5, seed=3))
    assert len(some) == 5 and len(whole) == dataset.manifest["num_users"]
    for row, user in enumerate(some.user_id):
        mine, theirs = some.rows(row, row + 1), whole.rows(int(user), int(user) + 1)
        assert mine.user_id.tolist() == theirs.user_id.tolist() == [user]
        for name in ("held_out", "exclude_offsets", "exclude_items", "history_offsets",
                     "history_values"):
            np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name))
    assert some.exclude_items.size < whole.exclude_items.size


def test_split_must_be_held_out(tmp_path: Path) -> None:
    with pytest.raises(MorecError, match="'valid' or 'test'"):
        load_task(PreparedDataset.open(make_dataset(tmp_path / "d").root), "train")
