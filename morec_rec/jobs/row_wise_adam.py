"""Adam over the rows a batch touches, for embedding tables replicated on every rank.

On CPU, FBGEMM has no fused Adam, so the tables stay unsharded (see ``sharding``). Their
lookups give sparse gradients (``nn.Embedding(sparse=True)``), kept out of DDP: DDP's
reducer over sparse gradients corrupts the heap on CPU (torch 2.13, gloo; a plain
DDP + ``SparseAdam`` loop crashes too). :class:`RowWiseAdam` averages them over the ranks
itself, by all-gathering the touched rows, and updates only those rows: the semantics of
FBGEMM's fused Adam, at a per-step cost that does not grow with the tables.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.optim.keyed import KeyedOptimizerWrapper

from morec_rec.collectives import is_distributed


#: The share of a table's rows a step must touch for :class:`RowWiseAdam` to update the
#: table in place in one pass rather than gather and write back the touched rows (the
#: two cost the same near 0.7 on CPU, torch 2.13, one or two threads), and to sum the
#: next step's gradient over the whole table.
DENSE_FRACTION = 0.75


def sum_rows(ids: torch.Tensor, values: torch.Tensor,
             scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids of a row gradient and each one's summed rows, on CPU.

    Args:
        ids: int64 (n,), row ids, repeats allowed.
        values: (n, D), the gradient rows of ``ids``.
        scratch: int64 (table rows,), overwritten at ``ids``; its other entries are
            neither read nor written, so one buffer serves every step of a table.

    Returns:
        ``rows`` int64 (m,), the distinct ids in order of first appearance, and ``sums``
        (m, D), ``sums[k]`` the sum of the values of ``rows[k]`` in order: ``coalesce``'s
        result up to the rows' order and float rounding, at O(n·D) whatever the table's
        size.
    """
    positions = torch.arange(ids.numel())
    # Each id's first position: where it is its own representative, it starts a row.
    scratch.scatter_reduce_(0, ids, positions, "amin", include_self=False)
    first = scratch.index_select(0, ids)
    starts = first == positions
    rows = ids[starts]
    slot = starts.cumsum(0).sub_(1).index_select(0, first)  # each value's row in the output
    return rows, sum_table(slot, values, rows.numel())[1]


def sum_table(ids: torch.Tensor, values: torch.Tensor,
              num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A row gradient summed over a whole table of ``num_rows`` rows, on CPU.

    Args:
        ids: int64 (n,), row ids in ``[0, num_rows)``, repeats allowed.
        values: (n, D), the gradient rows of ``ids``.

    Returns:
        ``counts`` int64 (num_rows,), the uses of each row, and ``sums`` (num_rows, D),
        each row's values added in order (zero where it has none), at O(n·D + num_rows·D).
    """
    counts = torch.bincount(ids, minlength=num_rows)
    # The values grouped by row, each group summed by embedding_bag, whose kernel adds
    # rows several times faster than index_add_'s one add per value (torch 2.13, CPU).
    # The narrowest dtype lets numpy's stable sort use radix sort.
    order = np.argsort(ids.numpy().astype(np.min_scalar_type(max(num_rows - 1, 0))),
                       kind="stable")
    bounds = torch.zeros(num_rows + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=bounds[1:])
    return counts, F.embedding_bag(torch.from_numpy(order), values, bounds, mode="sum",
                                   include_last_offset=True)


def write_rows(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``table.index_copy_(0, rows, values)`` for CPU tensors and distinct ``rows``, through
    numpy, whose row assignment takes a third to two thirds of ``index_copy_``'s time
    (torch 2.13, CPU); autograd's version counter moves as an in-place op moves it."""
    table.detach().numpy()[rows.numpy()] = values.numpy()
    torch.autograd.graph.increment_version(table)


def all_gather_rows(rows: torch.Tensor, sums: torch.Tensor,
                    scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over the ranks of a row gradient (DDP's average).

    Args:
        rows, sums: this rank's distinct row ids and their gradient rows
            (:func:`sum_rows`); every rank calls with the same table, in the same order.
        scratch: as in :func:`sum_rows`.

    Returns:
        The union of the ranks' rows and, for each, the sum over ranks divided by the
        world size, as :func:`sum_rows` orders them. Without a process group of more than
        one rank, the arguments unchanged.
    """
    if not is_distributed():
        return rows, sums
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([rows.numel()]))
    longest = max(int(c) for c in counts)
    # all_gather needs equal sizes: pad to the longest, and trim each rank's part after.
    padded_rows = rows.new_zeros(longest)
    padded_rows[:rows.numel()] = rows
    padded_sums = sums.new_zeros((longest, *sums.shape[1:]))
    padded_sums[:rows.numel()] = sums
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    all_sums = [torch.empty_like(padded_sums) for _ in range(world)]
    dist.all_gather(all_rows, padded_rows)
    dist.all_gather(all_sums, padded_sums)
    rows, sums = sum_rows(torch.cat([part[:int(n)] for part, n in zip(all_rows, counts)]),
                          torch.cat([part[:int(n)] for part, n in zip(all_sums, counts)]),
                          scratch)
    return rows, sums.div_(world)


def all_reduce_table(counts: torch.Tensor,
                     sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sum_table`'s counts summed over the ranks and its sums averaged (DDP's
    average); every rank calls with the same table. Without a process group of more than
    one rank, the arguments unchanged."""
    if not is_distributed():
        return counts, sums
    dist.all_reduce(counts)
    dist.all_reduce(sums)
    return counts, sums.div_(dist.get_world_size())


class RowWiseAdam(torch.optim.SparseAdam):
    """torch's ``SparseAdam`` over replicated tables' sparse gradients, averaged over the
    ranks first (:func:`all_gather_rows`), with L2 weight decay added to the touched
    rows' gradients, as FBGEMM's fused Adam in its L2 mode does. Rows that a step's
    batches (on every rank) do not touch keep their weights and moments.

    The update and the state (``step``, ``exp_avg``, ``exp_avg_sq`` per table) are
    ``SparseAdam``'s, computed on the touched rows rather than through sparse tensor
    arithmetic, which costs several times more on CPU: the rows are gathered with
    ``index_select`` (advanced indexing's gather is several times slower on CPU, torch
    2.13), updated by the fused Adam kernel in one pass, and written back
    (:func:`write_rows`). Where a step touches at least :data:`DENSE_FRACTION` of a
    table's rows, the kernel runs over the whole table in place instead, and the rows it
    did not touch are written back as they were; and the step after such a step sums the
    gradient over the whole table (:func:`sum_table`, :func:`all_reduce_table`) rather
    than by distinct row. The same results, cheaper for small tables; the per-step cost
    stays bounded by the steps' rows either way.

    ``step`` is a collective when a process group of more than one rank is initialised:
    every rank calls it at the same steps.
    """

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr)
        self.weight_decay = weight_decay
        # Per table, not state (a checkpoint need not hold them): sum_rows's buffer, and
        # whether the last step touched most of its rows.
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}
        self._whole_table: dict[torch.Tensor, bool] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, row_grad, table_grad = self._average(param)
                whole_table = rows.numel() >= DENSE_FRACTION * len(param)
                self._whole_table[param] = whole_table
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                if not rows.numel():
                    continue
                tables = (param, state["exp_avg"], state["exp_avg_sq"])
                if whole_table:
                    if table_grad is None:
                        table_grad = torch.zeros_like(param).index_copy_(0, rows, row_grad)
                    self._update_table(group, state["step"], tables, rows, table_grad)
                else:
                    if row_grad is None:
                        row_grad = table_grad.index_select(0, rows)
                    self._update_rows(group, state["step"], tables, rows, row_grad)
        return loss

    def _average(self, param: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The rows of ``param`` that the step's gradients touch on any rank, int64 (m,),
        and their gradient averaged over the ranks: by row, (m, D), or, where the last
        step touched most of the table, over the whole table, (N, D); the other None."""
        ids, values = param.grad._indices()[0], param.grad._values()
        if self._whole_table.get(param, False):
            counts, table_grad = all_reduce_table(*sum_table(ids, values, len(param)))
            return counts.nonzero().squeeze(1), None, table_grad
        scratch = self._scratch.get(param)
        if scratch is None:
            scratch = self._scratch[param] = param.new_empty(len(param), dtype=torch.long)
        rows, row_grad = all_gather_rows(*sum_rows(ids, values, scratch), scratch)
        return rows, row_grad, None

    def _update_rows(self, group: dict[str, Any], step: int, tables: Sequence[torch.Tensor],
                     rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Adam on ``rows`` of ``tables`` (weights and moments), gathered and written back;
        ``grad`` (m, D) is theirs."""
        touched = [table.index_select(0, rows) for table in tables]
        self._adam(group, step, touched, grad)
        for table, updated in zip(tables, touched):
            write_rows(table, rows, updated)

    def _update_table(self, group: dict[str, Any], step: int, tables: Sequence[torch.Tensor],
                      rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Adam on ``rows`` of ``tables`` by one pass over the whole tables in place,
        ``grad`` (N, D) zero elsewhere; the other rows are then put back as they were."""
        kept = torch.ones(len(grad), dtype=torch.bool)
        kept[rows] = False
        kept = kept.nonzero().squeeze(1)
        saved = [table.index_select(0, kept) for table in tables]
        self._adam(group, step, tables, grad)
        for table, values in zip(tables, saved):
            write_rows(table, kept, values)

    def _adam(self, group: dict[str, Any], step: int, tables: Sequence[torch.Tensor],
              grad: torch.Tensor) -> None:
        """torch.optim.Adam(fused=True)'s kernel over ``tables`` (weights, exp_avg,
        exp_avg_sq) in place, in one pass. SparseAdam adds ε to √v before the bias
        correction, Adam after it: ε is scaled to match. Adam's weight decay is the L2
        term on the gradient."""
        beta1, beta2 = group["betas"]
        weights, exp_avg, exp_avg_sq = tables
        torch._fused_adam_(
            [weights], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))],
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=self.weight_decay,
            eps=group["eps"] / math.sqrt(1 - beta2**step), amsgrad=False, maximize=False)


class RowWiseKeyedOptimizer(KeyedOptimizerWrapper):
    """A ``KeyedOptimizerWrapper`` of :class:`RowWiseAdam`, whose ``init_state`` (the zero
    step that creates the lazy state before a checkpoint loads into it) gives every
    parameter a row gradient that touches no row, as ``SparseAdam`` requires."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float, weight_decay: float) -> None:
        super().__init__(params, lambda p: RowWiseAdam(p, lr=lr, weight_decay=weight_decay))

    def init_state(self, sparse_grad_parameter_names: set[str] | None = None) -> None:
        for param in self.params.values():
            param.grad = torch.sparse_coo_tensor(
                torch.empty((1, 0), dtype=torch.long), param.new_empty((0, *param.shape[1:])),
                param.shape, check_invariants=False)
        self.step()
