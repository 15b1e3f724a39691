"""Full-ranking evaluation: every user's top K over all items, chunked and distributed.

For each user of the validation or test split, every item is scored; the user's training
items (and, for test, the validation item) are excluded; the top K (ties broken by the
lower item id) are compared with the held-out item. Users are scored in chunks of
``chunk_users`` so memory stays at one (chunk × items) score matrix; under
``torch.distributed`` each rank scores its share of the users (a contiguous slice, see
:func:`rank_users`), and the metrics' additive sums are all-reduced, so any number of
ranks gives the same numbers. A rank may load only its share (``load_task(..., rank=,
world_size=)``): what it holds then grows with its users' training rows, not the whole log's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from morec_rec.collectives import all_reduce, place
from morec_rec.data.format import PreparedDataset, read_parquet
from morec_rec.errors import MorecError
from morec_rec.plugin.eval.metrics import RankingMetrics, RankingMetricSums, user_rows

K = 10


@dataclasses.dataclass(frozen=True)
class RankingTask:
    """The users of a split, what each must not be recommended, and the item attributes.

    Attributes:
        user_id, held_out: int64 (U,), one row per user (in user order).
        history_offsets, history_values: the users' histories, jagged: int64 (U+1,), (H,).
        exclude_offsets, exclude_items: the items excluded per user, jagged, the same way.
        price, fairness_group, popularity_group: per item id, shape (num_items,).
        q: float64 (num_popularity_groups,), the training share of each popularity group.
        share: ``(rank, world_size)`` whose users these are: rank r's share of the task's
            users (:func:`rank_users`); ``(0, 1)``, the whole task, serves any rank.
    """

    user_id: np.ndarray
    held_out: np.ndarray
    history_offsets: np.ndarray
    history_values: np.ndarray
    exclude_offsets: np.ndarray
    exclude_items: np.ndarray
    price: np.ndarray
    fairness_group: np.ndarray
    num_fairness_groups: int
    popularity_group: np.ndarray
    num_popularity_groups: int
    q: np.ndarray
    share: tuple[int, int] = (0, 1)

    @property
    def num_items(self) -> int:
        return len(self.price)

    def __len__(self) -> int:
        return len(self.user_id)

    def rows(self, begin: int, end: int) -> "RankingTask":
        """Users ``begin`` to ``end`` (clipped); item attributes are shared, not copied."""
        end = min(end, len(self))
        begin = min(begin, end)
        history, history_offsets = _jagged_slice(self.history_offsets, begin, end)
        exclude, exclude_offsets = _jagged_slice(self.exclude_offsets, begin, end)
        return dataclasses.replace(
            self,
            user_id=self.user_id[begin:end],
            held_out=self.held_out[begin:end],
            history_offsets=history_offsets,
            history_values=self.history_values[history],
            exclude_offsets=exclude_offsets,
            exclude_items=self.exclude_items[exclude],
        )


def _jagged_slice(offsets: np.ndarray, begin: int, end: int) -> tuple[slice, np.ndarray]:
    return slice(offsets[begin], offsets[end]), offsets[begin : end + 1] - offsets[begin]


def rank_users(num_users: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s share of ``num_users`` users in task order: ``⌈U/W⌉`` consecutive
    users a rank, the last ranks' shares shorter or empty."""
    per_rank = -(-num_users // world_size)
    return slice(min(rank * per_rank, num_users), min((rank + 1) * per_rank, num_users))


def load_task(dataset: PreparedDataset, split: str, held: pa.Table | None = None, *,
              rank: int = 0, world_size: int = 1) -> RankingTask:
    """The ranking task of ``split`` (``valid`` or ``test``) of a prepared dataset: its
    users, or those of ``held``, rows of the split (one a user; default: all of them);
    with ``world_size`` > 1, rank ``rank``'s share of those users (:func:`rank_users`)."""
    if split not in ("valid", "test"):
        raise MorecError(f"evaluation split must be 'valid' or 'test', got {split!r}")
    if not 0 <= rank < world_size:
        raise MorecError(f"ranking task: rank {rank} is outside world size {world_size}")
    if held is None:
        held = dataset.split(split)
    share = rank_users(held.num_rows, rank, world_size)
    held = held.slice(share.start, share.stop - share.start)
    user_id = held["user_id"].to_numpy().astype(np.int64)
    history = held["history"].combine_chunks()

    # What each user has seen: training items, and the validation item when ranking for
    # test. Rows of users outside the task are dropped as a file is read; the rest, in
    # the order of their users in the task (stable: file order within a user), are the
    # exclusion lists end to end.
    place = np.full(dataset.manifest["num_users"], -1, dtype=np.int64)
    place[user_id] = np.arange(len(user_id))
    seen = ([*dataset.train_files, dataset.root / "valid.parquet"] if split == "test"
            else dataset.train_files)
    places, seen_items = [], []
    for path in seen:
        table = read_parquet(path, ["user_id", "item_id"])
        row_place = place[table["user_id"].to_numpy()]
        kept = row_place >= 0
        places.append(row_place[kept])
        seen_items.append(table["item_id"].to_numpy()[kept])
    row_place = np.concatenate(places)
    exclude_offsets = np.zeros(len(user_id) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_place, minlength=len(user_id)), out=exclude_offsets[1:])
    exclude_items = np.concatenate(seen_items)[np.argsort(row_place, kind="stable")]

    items = dataset.item_columns(["price", "fairness_group", "popularity_group"])
    groups = dataset.manifest["groups"]
    return RankingTask(
        user_id=user_id,
        held_out=held["item_id"].to_numpy().astype(np.int64),
        history_offsets=history.offsets.to_numpy().astype(np.int64),
        history_values=history.values.to_numpy().astype(np.int64),
        exclude_offsets=exclude_offsets,
        exclude_items=exclude_items.astype(np.int64),
        price=items["price"],
        fairness_group=items["fairness_group"].astype(np.int64),
        num_fairness_groups=len(groups["fairness"]["names"]),
        popularity_group=items["popularity_group"].astype(np.int64),
        num_popularity_groups=len(groups["popularity"]["q"]),
        q=np.asarray(groups["popularity"]["q"], dtype=np.float64),
        share=(rank, world_size),
    )


#: Scores every item for a chunk of users: float (len(users), num_items), on any device,
#: a tensor that evaluation may overwrite: a new one each call (evaluation copies a view
#: or one that requires grad first, but cannot tell one the scorer keeps). A collective
#: call under ``torch.distributed`` for a scorer backed by a sharded model (every rank
#: calls it the same number of times).
Scorer = Callable[[RankingTask], torch.Tensor]


class PopularityScorer:
    """The most-popular baseline: every user gets the items by training count."""

    def __init__(self, train_count: np.ndarray) -> None:
        self._scores = torch.tensor(train_count, dtype=torch.float32)

    def __call__(self, users: RankingTask) -> torch.Tensor:
        return self._scores.expand(len(users), -1).clone()


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int64 (C, k) item ids by descending score, equal scores by ascending item id (NaN
    above every number, as torch orders it)."""
    k = min(k, scores.shape[1])
    values, items = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)
    # Rows with equal adjacent scores in their top k+1 take the exact, stable order.
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1)
    if tied.any():
        order = torch.sort(scores[tied], dim=1, descending=True, stable=True).indices
        items[tied] = order[:, : items.shape[1]]
    return items[:, :k]


def evaluate(scorer: Scorer, task: RankingTask, *, k: int = K,
             chunk_users: int = 1024) -> RankingMetrics:
    """Metrics of ``scorer`` on ``task``; under ``torch.distributed`` every rank must call it,
    each with the whole task or with its own share (``load_task(..., rank=, world_size=)``).

    Raises MorecError on every rank, together, if any rank's users have NaN scores.
    """
    sums = RankingMetricSums.from_topk(np.zeros((0, k), dtype=np.int64),
                                       np.zeros(0, dtype=np.int64), *_item_groups(task))
    undefined = [np.zeros(0, dtype=np.int64)]
    for users, top, nan in _top_lists(scorer, task, k, chunk_users):
        undefined.append(users.user_id[nan])
        sums = sums + RankingMetricSums.from_topk(top, users.held_out, *_item_groups(task))
    ids = np.concatenate(undefined)
    # The count of undefined users travels with the sums, so that every rank decides alike.
    flat = all_reduce(torch.from_numpy(np.append(sums.to_array(), len(ids)))).numpy()
    sums = RankingMetricSums.from_array(flat[:-1], k=k,
                                        num_fairness_groups=task.num_fairness_groups)
    _refuse_undefined(int(flat[-1]), sums.users, ids)
    return sums.finalize(task.q)


def evaluate_users(scorer: Scorer, task: RankingTask, *, k: int = K,
                   chunk_users: int = 1024) -> np.ndarray:
    """float64 (U, D): every user's :func:`~morec_rec.plugin.eval.metrics.user_rows`, in task order,
    for paired comparisons (:mod:`morec_rec.jobs.bootstrap`). One process: U·D floats."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise MorecError("per-user evaluation runs in one process, not under torchrun")
    rows = [np.zeros((0, 3 + 2 * task.num_fairness_groups + task.num_popularity_groups))]
    undefined = [np.zeros(0, dtype=np.int64)]
    for users, top, nan in _top_lists(scorer, task, k, chunk_users):
        undefined.append(users.user_id[nan])
        rows.append(user_rows(top, users.held_out, *_item_groups(task)))
    ids = np.concatenate(undefined)
    _refuse_undefined(len(ids), len(task), ids)
    return np.concatenate(rows)


def _refuse_undefined(count: int, total: int, ids: np.ndarray) -> None:
    """MorecError if ``count`` of the task's ``total`` users had NaN scores (``ids``: this
    rank's)."""
    if count:
        named = (f"user ids {', '.join(map(str, ids[:5]))}{', ...' if len(ids) > 5 else ''}"
                 if len(ids) else "on other ranks")
        raise MorecError(f"scorer: NaN scores for {count} of {total} users ({named}): the "
                         "model's parameters or outputs hold NaN; training diverged?")


def _item_groups(task: RankingTask) -> tuple[Any, ...]:
    """The item tables that ``from_topk`` and ``user_rows`` take after the held-out items."""
    return (task.price, task.fairness_group, task.num_fairness_groups, task.popularity_group,
            task.num_popularity_groups)


def _local_users(task: RankingTask) -> RankingTask:
    """This rank's users of ``task``: the task itself if it is this rank's share, its
    share of them if it is the whole task; MorecError for another rank's share."""
    rank, world = place()
    if task.share == (rank, world):
        return task
    if task.share == (0, 1):
        share = rank_users(len(task), rank, world)
        return task.rows(share.start, share.stop)
    raise MorecError(f"ranking task: loaded for rank {task.share[0]} of {task.share[1]}, "
                     f"evaluated on rank {rank} of {world}: load each rank's own share "
                     "(load_task(..., rank=, world_size=)) or the whole task")


def _placeholder(task: RankingTask) -> RankingTask:
    """One stand-in user for a scorer call whose scores are discarded: user 0, whose
    history is item 0 (a scorer may expect every user to have one), nothing excluded."""
    zero = np.zeros(1, dtype=np.int64)
    return dataclasses.replace(task, user_id=zero, held_out=zero,
                               history_offsets=np.array([0, 1]), history_values=zero,
                               exclude_offsets=np.zeros(2, dtype=np.int64),
                               exclude_items=np.zeros(0, dtype=np.int64))


def _top_lists(scorer: Scorer, task: RankingTask, k: int,
               chunk_users: int) -> Iterator[tuple[RankingTask, np.ndarray, np.ndarray]]:
    """This rank's users of ``task`` a chunk at a time, with their top-``k`` items (U, k)
    and whether their scores hold NaN at an item they could be shown (bool (U,); their
    lists mean nothing). A collective: every rank makes as many scorer calls as the rank
    with the most chunks."""
    local = _local_users(task)
    calls = int(all_reduce(torch.tensor([-(-len(local) // chunk_users)]),
                           dist.ReduceOp.MAX).item())
    for begin in range(0, calls * chunk_users, chunk_users):
        users = local.rows(begin, begin + chunk_users)
        # A rank whose users have run out still takes part in the scorer's collective.
        padding = len(users) == 0
        chunk = _placeholder(task) if padding else users
        scores = scorer(chunk)
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
            kind = (f"a {scores.dtype} tensor" if isinstance(scores, torch.Tensor)
                    else type(scores).__name__)
            raise MorecError(f"scorer: returned {kind}, expected a float tensor "
                             f"(users, {task.num_items})")
        if tuple(scores.shape) != (len(chunk), task.num_items):
            raise MorecError(f"scorer: scores of shape {tuple(scores.shape)} for {len(chunk)} "
                             f"users, expected (users, {task.num_items}): every item's score "
                             "for each user of the chunk")
        if padding:
            continue
        if scores.requires_grad or scores._is_view():
            # The exclusions are written into the scores: not into a view of another
            # tensor (a parameter's, or one row expanded to every user) nor into the graph.
            scores = scores.detach().clone()
        excluded = (torch.from_numpy(np.repeat(np.arange(len(users)),
                                               np.diff(users.exclude_offsets))).to(scores.device),
                    torch.from_numpy(users.exclude_items).to(scores.device))
        scores[excluded] = -torch.inf
        host = _ranked(scores, k)
        if host[:, -1].any():
            # A k-th score of -inf: the scorer's own -inf ties with the exclusions, and ties
            # go to the lower item id. Raised to the lowest number, they rank above them.
            scores.clamp_(min=torch.finfo(scores.dtype).min)
            scores[excluded] = -torch.inf
            host = _ranked(scores, k)
        yield users, host[:, :-2], host[:, -2].astype(bool)


def _ranked(scores: torch.Tensor, k: int) -> np.ndarray:
    """On the host, int64 (U, k + 2): each user's top-``k`` items (all, if fewer), whether
    its first score is NaN (torch ranks NaN above every number: a user with a NaN score has
    one first) and whether its last is -inf; one copy brings the flags with the lists."""
    top = top_k(scores, k)
    flags = [scores.gather(1, top[:, :1]).isnan(), scores.gather(1, top[:, -1:]).isneginf()]
    return torch.cat([top, *flags], dim=1).cpu().numpy()
