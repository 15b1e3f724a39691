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
from typing import Any

import torch
import torch.distributed as dist
from torchrec.optim.keyed import KeyedOptimizerWrapper

from morec_rec.collectives import is_distributed


def all_gather_rows(grad: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks of a sparse row gradient, coalesced.

    Args:
        grad: this rank's sparse COO gradient of a ``(rows, dim)`` table, sparse in its
            first dimension (as ``nn.Embedding(sparse=True)`` gives); every rank passes
            one of the same shape, in the same order of calls.

    Returns:
        The sum over ranks divided by the world size (DDP's average), holding the union
        of the ranks' touched rows. Without a process group of more than one rank,
        ``grad`` coalesced.
    """
    grad = grad.coalesce()
    if not is_distributed():
        return grad
    world = dist.get_world_size()
    ids, rows = grad.indices()[0], grad.values()
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([ids.numel()]))
    longest = max(int(c) for c in counts)
    # all_gather needs equal sizes: pad to the longest, and trim each rank's part after.
    padded_ids = ids.new_zeros(longest)
    padded_ids[:ids.numel()] = ids
    padded_rows = rows.new_zeros((longest, *rows.shape[1:]))
    padded_rows[:ids.numel()] = rows
    all_ids = [torch.empty_like(padded_ids) for _ in range(world)]
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    dist.all_gather(all_ids, padded_ids)
    dist.all_gather(all_rows, padded_rows)
    ids = torch.cat([part[:int(n)] for part, n in zip(all_ids, counts)])
    rows = torch.cat([part[:int(n)] for part, n in zip(all_rows, counts)])
    return torch.sparse_coo_tensor(ids.unsqueeze(0), rows / world, grad.shape,
                                   check_invariants=False).coalesce()


class RowWiseAdam(torch.optim.SparseAdam):
    """torch's ``SparseAdam`` over replicated tables' sparse gradients, averaged over the
    ranks first (:func:`all_gather_rows`), with L2 weight decay added to the touched
    rows' gradients, as FBGEMM's fused Adam in its L2 mode does. Rows that a step's
    batches (on every rank) do not touch keep their weights and moments.

    The update and the state (``step``, ``exp_avg``, ``exp_avg_sq`` per table) are
    ``SparseAdam``'s, computed on the touched rows with index ops rather than through
    sparse tensor arithmetic, which costs several times more on CPU.

    ``step`` is a collective when a process group of more than one rank is initialised:
    every rank calls it at the same steps.
    """

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr)
        self.weight_decay = weight_decay

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = all_gather_rows(param.grad)
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                rows, values = grad.indices()[0], grad.values()
                if not rows.numel():
                    continue
                if self.weight_decay:
                    values = values + self.weight_decay * param[rows]
                exp_avg = state["exp_avg"][rows].lerp_(values, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(
                    values, values, value=1 - beta2)
                state["exp_avg"][rows] = exp_avg
                state["exp_avg_sq"][rows] = exp_avg_sq
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                param.index_add_(0, rows, exp_avg.div_(exp_avg_sq.sqrt_().add_(group["eps"])),
                                 alpha=-step_size)
        return loss


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
