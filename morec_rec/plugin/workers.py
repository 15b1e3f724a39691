"""Loader worker processes: they die with their trainer, and a batch leaves one in one write.

A ``DataLoader``'s workers send their batches to the trainer through one pipe (its result
queue). On Linux a pipe holds 64 KiB unless asked for more, so a batch pickled by value
(up to :data:`~morec_rec.plugin.segments.BY_VALUE_MAX_BYTES`) larger than that crosses
in several writes, the worker waking to write each part once the trainer has read the one
before: the trainer's receive then waits on the worker being scheduled, a round trip per
64 KiB. :class:`WorkerLoader` sizes that pipe to hold :data:`RESULT_PIPE_BYTES`, so that
the trainer reads a whole batch the worker wrote ahead (``benchmarks/batch_transfer.py``
measures both).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Any, Iterator

from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

#: The bytes a worker's result pipe is asked to hold: Linux's default limit for an
#: unprivileged process (``/proc/sys/fs/pipe-max-size``), a by-value batch's size limit.
RESULT_PIPE_BYTES = 1 << 20

_PR_SET_PDEATHSIG = 1


def die_with_parent(worker_id: int | None = None) -> None:
    """Has Linux kill this process when its parent dies, even by SIGKILL: a loader
    worker's init (``worker_id`` unused; a worker blocked writing a batch into its pipe
    would live on otherwise), and a torchrun rank's start (ranks would train on without
    their launcher, into the run a relaunch resumes)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the trainer died before the request took effect
        os._exit(1)


def resize_pipe(fd: int, size: int) -> int:
    """Asks Linux to make the pipe ``fd`` hold ``size`` bytes; returns the bytes it holds
    after: as before where the kernel refuses (a size above the limit, or the user's
    pipes over their total) or on another platform (then 0)."""
    if not sys.platform.startswith("linux"):
        return 0
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError as e:
        held = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        logger.debug("pipe kept at %d bytes, not %d: %s", held, size, e)
        return held


class WorkerLoader(DataLoader):
    """A ``DataLoader`` whose workers' result pipe holds :data:`RESULT_PIPE_BYTES`.

    Takes ``DataLoader``'s arguments. The pipe is the multi-process iterator's result
    queue's (torch's ``_worker_result_queue``, a ``multiprocessing.Queue``); only it is
    resized, as the workers' index queues carry a few bytes a batch and every byte a pipe
    may hold counts against the user's total (``/proc/sys/fs/pipe-user-pages-soft``).
    """

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        # Neither attribute is public: where a torch or Python release renames one, the
        # pipe keeps its size (tests/test_workers.py notices).
        queue = getattr(iterator, "_worker_result_queue", None)  # None without workers
        reader = getattr(queue, "_reader", None)
        if reader is not None:
            resize_pipe(reader.fileno(), RESULT_PIPE_BYTES)
        return iterator
