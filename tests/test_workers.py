"""Loader workers: the result pipe holds a whole by-value batch, and batches larger than the
default pipe cross intact."""

from __future__ import annotations

import fcntl
import os
import sys

import numpy as np
import pytest
import torch

from morec_rec.plugin.workers import RESULT_PIPE_BYTES, WorkerLoader, resize_pipe

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="pipe sizes are Linux's")


class LargeBatches(torch.utils.data.IterableDataset):
    """Three batches of 300 KB each (a 64 KiB pipe takes five writes for one)."""

    def __iter__(self):
        for i in range(3):
            yield {"ids": np.arange(i, i + 37_500, dtype=np.int64)}


def identity(batch: dict) -> dict:
    return batch


@linux_only
@pytest.mark.parametrize("persistent", [False, True])
def test_the_result_pipe_holds_a_batch_every_epoch(persistent: bool) -> None:
    loader = WorkerLoader(LargeBatches(), batch_size=None, num_workers=1,
                          collate_fn=identity, persistent_workers=persistent)
    for _ in range(2):
        iterator = iter(loader)
        pipe = iterator._worker_result_queue._reader.fileno()
        assert fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ) == RESULT_PIPE_BYTES
        received = list(iterator)
        assert [b["ids"][0] for b in received] == [0, 1, 2]
        assert all(np.array_equal(b["ids"], np.arange(i, i + 37_500))
                   for i, b in enumerate(received))


def test_without_workers_it_is_a_dataloader() -> None:
    loader = WorkerLoader(LargeBatches(), batch_size=None, collate_fn=identity)
    assert [b["ids"][-1] for b in loader] == [37_499, 37_500, 37_501]


@linux_only
def test_a_refused_resize_keeps_the_pipe() -> None:
    read, write = os.pipe()
    try:
        assert resize_pipe(read, 1 << 20) == 1 << 20
        os.write(write, bytes(100_000))
        # Shrinking below what the pipe holds is refused (EBUSY), whoever asks.
        assert resize_pipe(read, 1 << 16) == 1 << 20
        assert len(os.read(read, 200_000)) == 100_000
    finally:
        os.close(read)
        os.close(write)
