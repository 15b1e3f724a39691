"""The process group: torchrun's when launched by it, else a one-process group, same code."""

from __future__ import annotations

import dataclasses
import gc
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Environment:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Environment:
    """Initialises ``torch.distributed`` once: NCCL with CUDA, gloo on CPU.

    Under torchrun the group comes from its environment (``RANK``, ``WORLD_SIZE``, ...);
    a plain ``python`` process gets a group of one (over a HashStore), so the sharded code
    path is the same on a laptop and in a job.
    """
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Environment(dist.get_rank(), dist.get_world_size(), device)


def shutdown() -> None:
    """Destroys the process group, if any (a gloo group left alive can abort at exit).

    Garbage is collected first: a sharded model is a reference cycle that holds the group,
    so without the collection the group outlives ``destroy_process_group`` and its worker
    threads run into interpreter exit. A worker that frees the last reference to a finished
    collective there decrefs Python tensors, cannot take the GIL, and the process aborts
    ("terminate called without an active exception").
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
