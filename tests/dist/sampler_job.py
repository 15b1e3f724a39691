"""Sampler job under torchrun: streams across ranks and loader workers, and a mid-stream publish.

Run by ``tests/test_sampler_distributed.py``::

    python -m torch.distributed.run --nproc_per_node=2 --master-port=PORT \\
        tests/dist/sampler_job.py --data DIR --out DIR

Each rank (gloo) runs two DataLoaders with 2 workers each over the same prepared dataset:

1. ``uniform``: one epoch of the accuracy objective; records every row it yields.
2. ``weighted``: the fairness objective, starting with all mass on group 0. After
   ``PUBLISH_AFTER`` batches, rank 0 publishes all mass on the last group, effective from
   a batch index no worker can have reached yet; every rank syncs.
3. ``resumed``: a new weighted loader over the same store that starts the epoch at
   position ``RESUME_AT`` (before the version applies): its workers replay the version
   published in 2 and must yield what 2 yielded from that position on.

Each rank writes ``rank<r>.json`` with what its loaders yielded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader

from morec_rec.config import SamplerConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import distributed
from morec_rec.plugin.sampling.sampled import SampledBatch
from morec_rec.plugin.sampling.objectives import build_objectives
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler
from morec_rec.plugin.sampling.store import StoreSpec, WeightStore, publish_and_sync

NUM_WORKERS, PREFETCH = 2, 2
PUBLISH_AFTER = 6
RESUME_AT = 7  # mid-window (4 batches a window per worker) and on worker 1's turn


def loader(dataset: PreparedDataset, names: tuple[str, ...], masses: dict | None,
           store: StoreSpec | None, start: int = 0) -> DataLoader:
    sampler = WeightedStreamSampler(
        dataset, build_objectives(names, dataset.manifest),
        SamplerConfig(objectives=names, sub_batch_size=32, window_batches=4),
        rank=dist.get_rank(), world_size=dist.get_world_size(), store=store, masses=masses,
    )
    sampler.set_epoch(0, start)
    if store is not None:
        sampler.announce(WeightStore.connect(store).latest_version())
    return DataLoader(sampler, batch_size=None, num_workers=NUM_WORKERS,
                      prefetch_factor=PREFETCH)


def record(batch: SampledBatch) -> dict:
    """What a weighted batch holds: its index, masses version, rows and their groups."""
    return {"batch_index": batch.batch_index, "version": batch.masses_version,
            "rows": list(zip(batch.user_id.tolist(), batch.item_id.tolist())),
            "groups": batch.fairness_group.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dataset = PreparedDataset.open(args.data)
    groups = len(dataset.manifest["groups"]["fairness"]["names"])

    uniform = [
        {"batch_index": b.batch_index, "rows": list(zip(b.user_id.tolist(), b.item_id.tolist()))}
        for b in loader(dataset, ("accuracy",), None, None)
    ]

    spec = StoreSpec.from_env()
    store = WeightStore.connect(spec)
    first = np.eye(groups)[0]
    weighted, effective_from = [], None
    weighted_loader = loader(dataset, ("fairness",), {"fairness": first}, spec)
    for count, batch in enumerate(weighted_loader, 1):
        weighted.append(record(batch))
        if count == PUBLISH_AFTER:
            # Batches already produced or in flight: at most NUM_WORKERS * PREFETCH ahead.
            effective_from = count + NUM_WORKERS * PREFETCH
            weighted_loader.dataset.announce(
                publish_and_sync(store, {"fairness": np.eye(groups)[-1]}, effective_from))
    resumed = [record(batch) for batch in loader(dataset, ("fairness",), {"fairness": first},
                                                 spec, start=RESUME_AT)]
    (args.out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "groups": groups, "effective_from": effective_from,
        "resume_at": RESUME_AT, "uniform": uniform, "weighted": weighted, "resumed": resumed,
    }))
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
