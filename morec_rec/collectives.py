"""Collectives on host values, on whatever device the process group's backend needs."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def place() -> tuple[int, int]:
    """This process's rank and world size (0 and 1 without a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(values: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
               ) -> torch.Tensor:
    """``values`` reduced over every rank, on the host (returned as a new CPU tensor;
    NCCL reduces a CUDA copy). Without a process group, a CPU copy of ``values``."""
    if not is_distributed():
        return values.detach().cpu().clone()
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    reduced = values.detach().to(device, copy=True)
    dist.all_reduce(reduced, op=op)
    return reduced.cpu()
