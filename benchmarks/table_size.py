"""MF-BPR training samples/s against table size: this project over plain PyTorch loops.

    python benchmarks/table_size.py --out benchmarks/results/table_size.json [--steps 100] \
        [--ids spread | first]

At each table size (users + items; the demo profile, Ta-Feng, the paper's Xbox, ten
times Xbox), in one process on CPU, batch 1,024, 10 negatives, embedding dimension 64:

- **project**: ``morec-rec train``'s step with the default ``TrainConfig`` (table
  optimizer ``adam``): the synthetic ``demo`` log through its loader (one worker),
  sampler and collate, into ``TrainPipelineSparseDist`` over the DMP-wrapped backbone,
  whose tables have the size named (the log's ids mapped into them, below), with the
  intra-op threads ``morec-rec train`` sets (``distributed.share_cpus``: a thread a core,
  the loader's worker sharing them), and again with one thread fewer, a core left to the
  worker (``project_one_thread``);
- **plain loops**: two ``nn.Embedding`` tables of that size, the same BPR loss, no data
  loading at all (an upper bound of the model step), trained by ``torch.optim.Adam``,
  ``Adam(fused=True)`` and ``SparseAdam`` (sparse gradients), with torch's default
  threads (one a core). Their ids are drawn uniformly from the log's id ranges.

Both sides then map each id through a fixed random injection into the whole table
(``--ids spread``, the default): a batch's rows are spread over the tables as a log of
that many users and items would spread them, with the cache misses that brings.
``--ids first`` keeps the log's ids, the first rows of every table, so that only the
tables' size varies.

The process keeps freed memory as ``morec-rec train`` does
(``distributed.keep_freed_memory``), for the plain loops as for the project. Each rate
is the median of ``--repeats`` timings of ``--steps`` steps after warm-up, all timed in
turn within each repeat; ``ratio`` is the project's over the best plain loop's,
``one_thread_over_project`` the project's at one thread fewer over its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from synthetic import synth  # the script beside this one

from morec_rec.config import TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.jobs import distributed
from morec_rec.jobs.collate import Collator, TrainBatch, features_kjt
from morec_rec.jobs.models import build_model
from morec_rec.jobs.sharding import shard
from morec_rec.jobs.train import training_loader
from morec_rec.plugin.loader import SamplerLoader
from morec_rec.plugin.sampling.sampled import SampledBatch

#: users, items of each size: the demo profile, Ta-Feng after its 5-core, Xbox, 10× Xbox.
SIZES = {"demo": (10_000, 2_000), "tafeng": (26_000, 15_000), "xbox": (154_000, 5_000),
         "10x_xbox": (1_540_000, 52_000)}
BATCH, NEGATIVES, DIM, WARMUP = 1024, 10, 64, 10
PLAIN = ("adam", "fused_adam", "sparse_adam")
ONE_THREAD = "project_one_thread"


class Timed(NamedTuple):
    """A step function and the intra-op threads it runs with."""

    step: Callable[[], object]
    threads: int


def interleaved(steps_of: dict[str, Timed], steps: int, repeats: int) -> dict[str, float]:
    """Median samples/s of each step function over ``repeats`` rounds; each round times
    ``steps`` calls of every function in turn (after ``WARMUP`` calls of each), so that a
    drift of the machine's speed weighs on all of them alike."""
    for timed in steps_of.values():
        torch.set_num_threads(timed.threads)
        for _ in range(WARMUP):
            timed.step()
    rates: dict[str, list[float]] = {name: [] for name in steps_of}
    for _ in range(repeats):
        for name, timed in steps_of.items():
            torch.set_num_threads(timed.threads)
            start = time.perf_counter()
            for _ in range(steps):
                timed.step()
            rates[name].append(steps * BATCH / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


class IdMap(NamedTuple):
    """Where each of the log's user and item ids lands in tables of a given size: int64
    (log users,) and (log items,), injective."""

    users: torch.Tensor
    items: torch.Tensor

    @classmethod
    def make(cls, id_range: tuple[int, int], tables: tuple[int, int], spread: bool) -> IdMap:
        generator = torch.Generator().manual_seed(0)
        return cls(*(torch.randperm(rows, generator=generator)[:ids] if spread
                     else torch.arange(ids) for ids, rows in zip(id_range, tables)))


class MappedCollate:
    """The job's collate, with every id of its batches' features mapped by an IdMap."""

    def __init__(self, collate: Collator, ids: IdMap) -> None:
        self.collate = collate
        self.tables = {"user_id": ids.users, "item_id": ids.items, "neg_item_id": ids.items}

    def __call__(self, sampled: SampledBatch) -> TrainBatch:
        features = self.collate(sampled).features
        return TrainBatch(features_kjt(features.keys(), {
            key: (self.tables[key].index_select(0, jagged.values()), jagged.lengths())
            for key, jagged in features.to_dict().items()}))


def project_step(dataset: PreparedDataset, users: int, items: int, ids: IdMap,
                 env: distributed.Environment) -> Timed:
    config = TrainConfig(model="mf", num_workers=1)
    threads = distributed.share_cpus()
    torch.manual_seed(0)
    model = build_model("mf", users, items, 0, embedding_dim=DIM)
    model, optimizer = shard(model, env.device, lr=config.lr,
                             table_optimizer=EmbOptimType(config.table_optimizer))
    job = training_loader(dataset, config, env, model.module.feature_names)  # never iterated
    loader = SamplerLoader(job.sampler, MappedCollate(job.collate, ids),
                           num_workers=config.num_workers,
                           batches_per_request=config.batches_per_request)
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
    state = {"epoch": 0, "batches": iter(loader)}
    return Timed(lambda: _progress(pipeline, state, loader), threads)


def _progress(pipeline: TrainPipelineSparseDist, state: dict, loader: SamplerLoader) -> None:
    """One pipeline step; a new epoch of the loader when the last one ends."""
    try:
        pipeline.progress(state["batches"])
    except StopIteration:
        state["epoch"] += 1
        loader.set_epoch(state["epoch"])
        state["batches"] = iter(loader)
        pipeline.progress(state["batches"])


def plain_step(users: int, items: int, optimizer: str, ids: IdMap, threads: int) -> Timed:
    """A plain loop's step over tables of ``users`` and ``items`` rows, its user and item
    ids drawn uniformly from the log's and mapped by ``ids``."""
    torch.manual_seed(0)
    sparse = optimizer == "sparse_adam"
    user = nn.Embedding(users, DIM, sparse=sparse)
    item = nn.Embedding(items, DIM, sparse=sparse)
    params = [user.weight, item.weight]
    opt = {"adam": lambda: torch.optim.Adam(params, lr=1e-3),
           "fused_adam": lambda: torch.optim.Adam(params, lr=1e-3, fused=True),
           "sparse_adam": lambda: torch.optim.SparseAdam(params, lr=1e-3)}[optimizer]()

    def draw(table: torch.Tensor, size: int) -> torch.Tensor:
        # index_select: advanced indexing would cost this side ~0.7% of a step more.
        return table.index_select(0, torch.randint(len(table), (size,)))

    def step() -> None:
        u = user(draw(ids.users, BATCH))
        positive = (u * item(draw(ids.items, BATCH))).sum(-1)
        negatives = item(draw(ids.items, BATCH * NEGATIVES)).unflatten(0, (BATCH, NEGATIVES))
        negative = (negatives * u.unsqueeze(1)).sum(-1)
        loss = F.softplus(negative - positive.unsqueeze(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return Timed(step, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ids", choices=("spread", "first"), default="spread",
                        help="spread the log's ids over the tables, or keep them in the "
                             "first rows")
    args = parser.parse_args()
    env = distributed.init()
    default_threads = torch.get_num_threads()  # torch's default
    heap_kept = distributed.keep_freed_memory()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = synth("demo", Path(tmp))
        dataset = PreparedDataset.open(data)
        id_range = (dataset.manifest["num_users"], dataset.manifest["num_items"])
        for size in args.sizes:
            users, items = SIZES[size]
            ids = IdMap.make(id_range, (users, items), spread=args.ids == "spread")
            steps_of = {name: plain_step(users, items, name, ids, default_threads)
                        for name in PLAIN}
            steps_of["project"] = project_step(dataset, users, items, ids, env)
            project_threads = steps_of["project"].threads
            steps_of[ONE_THREAD] = project_step(dataset, users, items, ids, env)._replace(
                threads=max(project_threads - 1, 1))
            plain = interleaved(steps_of, args.steps, args.repeats)
            project, one_thread = plain.pop("project"), plain.pop(ONE_THREAD)
            del steps_of  # the tables, the pipeline and the loader's worker: a sharded
            gc.collect()  # model is a reference cycle, freed by the collector only
            best = max(plain, key=plain.get)
            row = {"size": size, "users": users, "items": items,
                   "project_samples_per_s": project, "project_threads": project_threads,
                   "plain_samples_per_s": plain, "best_plain": best,
                   "ratio": project / plain[best],
                   "project_one_thread_samples_per_s": one_thread,
                   "one_thread_over_project": one_thread / project}
            results.append(row)
            print(f"{size:9} project {project:9,.0f}/s  " + "  ".join(
                f"{k} {v:9,.0f}/s" for k, v in plain.items()) + f"  ratio {row['ratio']:.2f}"
                f"  project a thread fewer {one_thread:9,.0f}/s",
                flush=True)
    demo = next((r for r in results if r["size"] == "demo"), None)
    xbox = next((r for r in results if r["size"] == "xbox"), None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "results": results,
        "xbox_over_demo": (xbox["project_samples_per_s"] / demo["project_samples_per_s"]
                           if demo and xbox else None),
        "ids": args.ids, "steps": args.steps, "repeats": args.repeats, "warmup_steps": WARMUP,
        "batch_size": BATCH, "negatives": NEGATIVES, "embedding_dim": DIM,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "plain_threads": default_threads,
                        "heap_kept": heap_kept,
                        "device": str(env.device)},
    }, indent=2) + "\n")
    distributed.shutdown()


if __name__ == "__main__":
    main()
