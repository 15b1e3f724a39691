"""Shared fixtures: small raw datasets built by hand, and paths to the shared real data."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist

from morec_rec.data.raw import RawData
from morec_rec.jobs.cli import main
from morec_rec.plugin.sampling.store import StoreSpec

# One intra-op thread, here and in the jobs tests start: tests run beside torchrun jobs and
# loader workers on 2 cores.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TAFENG = SHARED / "data" / "ta-feng" / "ta_feng.csv.zip"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic ``tiny`` profile, prepared (seed 0), once per test module."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    assert main(["synth", "--profile", "tiny", "--seed", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture
def tcp_store() -> Iterator[Callable[..., StoreSpec]]:
    """A TCPStore hosted on a free local port for the test; yields a factory of specs to
    it, ``tcp_store(prefix="morec", timeout_s=30)``, one namespace per prefix (a client
    connecting once took over 5 s in a CI run)."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))

    def spec(prefix: str = "morec", timeout_s: float = 30) -> StoreSpec:
        return StoreSpec(kind="tcp", host="127.0.0.1", port=server.port, prefix=prefix,
                         timeout_s=timeout_s)

    yield spec  # the server lives as long as the factory that refers to it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 120) -> str:
    """Runs ``script`` (relative to the repository) under torchrun with ``nproc`` CPU ranks.

    Fails the test on a non-zero exit; returns what the ranks printed to stdout. Past
    ``timeout`` every process of the job prints its Python stacks into the failure
    (faulthandler, on a SIGABRT sent to each): where it hung. Then none is left running.
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master-port={free_port()}", str(ROOT / script), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own: signal the processes one by
        # one, the agent stopped first so that it does not end the others at the first.
        os.kill(job.pid, signal.SIGSTOP)
        processes = descendants(job.pid)
        for pid in reversed(processes):  # the loader workers, then the ranks
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
                time.sleep(0.5)  # one at a time: their stacks do not interleave
        for pid in (*processes, job.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, stderr = job.communicate()
        pytest.fail(f"{script} under torchrun ran past {timeout:g} s; its processes' "
                    f"stacks:\n{stderr[-12000:]}")
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (Linux ``/proc``), parents before their children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(0), [])
        found += below
        queue += below
    return found


def chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper tail of the chi-square statistic with len - 1 degrees of freedom."""
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(statistic / 2)))


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``morec-rec ARGS`` in a fresh process (no process group leaks into the tests)."""
    return subprocess.run([sys.executable, "-m", "morec_rec.jobs.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def raw_data(rows: list[tuple[str, str, int]], items: dict[str, tuple[float | None, str | None]],
             ratings: list[float] | None = None) -> RawData:
    """RawData from (user, item, timestamp) rows and {item: (price, category)}."""
    users, item_ids, times = zip(*rows)
    return RawData(
        pa.table({
            "user": list(users),
            "item": list(item_ids),
            "timestamp": list(times),
            "rating": pa.array(ratings if ratings is not None else [None] * len(rows),
                               pa.float64()),
        }),
        pa.table({
            "item": list(items),
            "price": pa.array([p for p, _ in items.values()], pa.float64()),
            "category": pa.array([c for _, c in items.values()], pa.string()),
        }),
        {"name": "test"},
    )


@pytest.fixture
def cascade() -> RawData:
    """Interactions whose 3-core takes two rounds of removals (see test_prepare)."""
    rows = [
        ("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3),
        ("u2", "a", 1), ("u2", "b", 2), ("u2", "c", 3),
        ("u3", "a", 5), ("u3", "b", 5), ("u3", "c", 5), ("u3", "d", 6),
        ("u4", "a", 1), ("u4", "d", 2),
        ("u5", "e", 1), ("u5", "f", 2), ("u5", "a", 3),
        ("u6", "e", 1), ("u6", "f", 2), ("u6", "b", 3),
        ("u7", "e", 1), ("u7", "g", 2),
    ]
    items = {i: (10.0 * (n + 1), "cat-x" if i in "ab" else "cat-y")
             for n, i in enumerate("abcdefg")}
    return raw_data(rows, items)


#: The reference MF settings of the job tests: small, one process, no loader worker.
TRAIN = ["--model", "mf", "--num-workers", "0", "--embedding-dim", "16"]


def pretrained(data: Path, out: Path, max_epochs: int, model: str = "mf") -> Path:
    """A base run of ``model`` on ``data`` (batches of 128) in ``out``, pretrained by the
    CLI."""
    done = run_cli("train", "--data", str(data), "--out", str(out), *TRAIN, "--model", model,
                   "--batch-size", "128", "--max-epochs", str(max_epochs))
    assert done.returncode == 0, done.stderr
    return out
