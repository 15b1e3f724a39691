"""Weight-store job under torchrun: DataLoader workers on every rank read what rank 0 publishes.

Run by ``tests/test_store.py``::

    python -m torch.distributed.run --nproc_per_node=2 --master-port=PORT \\
        tests/dist/store_job.py --out DIR

Each rank iterates a DataLoader (2 workers) over :class:`Probe`; every worker connects to
torchrun's store through ``StoreSpec.from_env()`` and reads the masses once per step.
Version 1 is published before the workers start; version 2 once every worker of every
rank has read step 0 (a barrier). A gate (a counter per rank, in the same store under
another prefix) holds a worker's read of step 1 until its rank has synced version 2, so
prefetching cannot read early: step 0 must see version 1, step 1 version 2. Each rank
writes ``rank<r>.json``: its synced versions and every worker's reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from morec_rec.errors import MorecError
from morec_rec.jobs import distributed
from morec_rec.plugin.sampling.store import StoreSpec, WeightStore, publish_and_sync

#: (values, effective_from) that rank 0 publishes as versions 1 and 2.
PUBLISHED = [
    ({"accuracy": np.array([0.1, 0.2, 0.7]), "revenue": np.array([1 / 3, 1 / 3, 1 / 3])}, 0),
    ({"accuracy": np.array([0.3, 0.3, 0.4]), "revenue": np.array([0.5, 0.25, 0.25])}, 8),
]
TIMEOUT_S = 10.0


def gate_key(rank: int) -> str:
    return f"gate/{rank}"


def gate_store() -> dist.Store:
    """The job's own keys: the store of ``from_env`` under a prefix of its own."""
    return dataclasses.replace(StoreSpec.from_env(TIMEOUT_S), prefix="store_job").connect()


class Probe(IterableDataset):
    """Yields one record per step: what this worker read from the weight store."""

    def __init__(self, rank: int, steps: int) -> None:
        self.rank = rank
        self.steps = steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        weights = WeightStore.connect(StoreSpec.from_env(TIMEOUT_S))
        gate = gate_store()
        for step in range(self.steps):
            wait_for_gate(gate, gate_key(self.rank), step)
            masses = weights.read()
            yield {
                "rank": self.rank,
                "worker": get_worker_info().id,
                "pid": os.getpid(),
                "step": step,
                "version": masses.version,
                "effective_from": masses.effective_from,
                "values": {name: array.tolist() for name, array in masses.values.items()},
                "history": [m.version for m in weights.history()],
            }


def wait_for_gate(gate: dist.Store, key: str, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while gate.add(key, 0) < step:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {key} never reached {step}")
        time.sleep(0.01)


def refused_publish(weights: WeightStore) -> str:
    """The error that every rank raises when rank 0 cannot publish (NaN masses)."""
    try:
        publish_and_sync(weights, {"accuracy": np.array([0.5, np.nan])}, effective_from=8)
    except MorecError as error:
        return str(error)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = StoreSpec.from_env(TIMEOUT_S)
    weights = WeightStore.connect(spec)
    gate = gate_store()
    synced = [publish_and_sync(weights, *PUBLISHED[0])]
    records = []
    workers = DataLoader(Probe(rank, steps=2), batch_size=None, num_workers=2)
    for record in workers:
        records.append(record)
        if len(records) == 2:  # step 0 read by both workers: publish mid-iteration
            dist.barrier()  # ... once every rank's workers have read step 0
            synced.append(publish_and_sync(weights, *PUBLISHED[1]))
            gate.add(gate_key(rank), 1)
    result = {"rank": rank, "pid": os.getpid(), "spec": dataclasses.asdict(spec),
              "synced": synced, "records": records, "refused": refused_publish(weights)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
