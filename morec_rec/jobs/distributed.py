"""The process group: torchrun's when launched by it, else a one-process group, same code."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import os

import torch
import torch.distributed as dist

from morec_rec.errors import MorecError
from morec_rec.plugin.workers import die_with_parent

logger = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


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

    Under torchrun the group comes from its environment (``RANK``, ``WORLD_SIZE``, ...),
    and the rank ends with torchrun's agent, however that ends; a plain ``python``
    process gets a group of one (over a HashStore), so the sharded code path is the same
    on a laptop and in a job.
    """
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            _check_restart()
            if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's agent is the parent
                die_with_parent()
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Environment(dist.get_rank(), dist.get_world_size(), device)


def share_cpus() -> int:
    """Sets this trainer's intra-op threads to the CPUs its rank may use (its share of the
    affinity mask where several ranks share a machine), unless ``OMP_NUM_THREADS`` is set
    (torchrun sets 1 per rank by default); returns the threads in use.

    The loader's workers share those CPUs: a worker wakes once for several batches
    (``TrainConfig.batches_per_request``) and spends a fraction of a step's CPU on them,
    less than a thread of its own would take from the trainer
    (``benchmarks/table_size.py``: ``project_one_thread``).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)  # no affinity masks on macOS
        torch.set_num_threads(max(usable // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1))
    return torch.get_num_threads()


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Has glibc's malloc keep freed buffers for reuse instead of returning them to the OS.

    A training step frees and reallocates buffers of a few MB (a batch's lookups, their
    gradients). glibc's defaults map such buffers afresh or trim them off the heap, so
    every step faults their pages in again, hundreds of pages a step. After this call,
    allocations below ``mmap_threshold`` bytes come from the heap, which keeps up to
    ``trim_threshold`` bytes free at its top; it is inherited by forked loader workers.

    A no-op where the C library is not glibc, and where ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` is set (the user's choice stands). Returns whether both
    settings were applied.
    """
    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & os.environ.keys():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # mallopt returns 1 on success. Setting either turns off glibc's dynamic adjustment
    # of both (mallopt(3)), so the two are set together.
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                   and mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not applied:
        logger.warning("mallopt refused the heap thresholds; freed memory is returned "
                       "to the OS as glibc's defaults have it")
    return applied


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job's workers; 0
    for a first attempt and outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _check_restart() -> None:
    """Refuses a torchrun restart whose process group would meet on the agent's TCPStore,
    which keeps the failed attempt's keys: the group's connections then go to the dead
    ranks' addresses and time out (torch 2.13; pytorch/pytorch#135712). A c10d
    rendezvous without that sharing gives every attempt a store of its own."""
    if restart_count() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise MorecError(
            "torchrun restarted the job on its agent's store, where the process group "
            "cannot reconnect: launch restartable jobs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "and --standalone (one machine) or --rdzv-backend c10d")


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
