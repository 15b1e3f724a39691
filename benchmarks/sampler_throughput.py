"""Sampler throughput against a plain Parquet scan, and its peak memory at two sizes.

    python benchmarks/sampler_throughput.py --out results/sampler.json [--data DIR]

Without ``--data`` it generates the ``xbox`` synthetic profile (seed 0) into a temporary
directory. In one run, on the same files, for the columns each backbone's batches carry
(``mf``: the ids; ``sasrec``: the ids and the history), it measures:

* ``scan_rows_per_s``: ``pyarrow.parquet`` reading every row group of ``train/`` (the
  columns the sampler reads there, ``read``: the ids, those carried and those the
  objectives read, less the item attributes it looks up by item id, ``looked_up``), the
  floor any Parquet-based loader pays;
* ``shuffle_rows_per_s``: that scan shuffled as the sampler shuffles, a window of
  ``window_batches`` batches at a time, the window's columns gathered in its shuffled order
  (fixed-width ones stacked as int64, lists taken in Arrow) and cut into batches, nothing
  else: the CPU any loader pays that shuffles the rows it streams. It shuffles in the
  reading thread, after each read; the sampler reads the next window in a thread of its
  own meanwhile, so its rate in rows/s may be the higher;
* ``sampler_rows_per_s``: one epoch of the weighted streaming sampler with the four
  objectives (rows yielded per second, in one process, no DataLoader workers);
* ``uniform_sampler_rows_per_s``: the same with accuracy alone (the base jobs' sampler:
  windows read, shuffled and cut into batches, no draws), what streaming in batches costs
  before any objective draws;
* ``*_cpu_ms_per_batch``: the process's CPU time (all its threads) per batch of rows,
  for the scan and for each sampler: what a loader worker spends on them;
* ``sampler_over_uniform_sampler``: what the objectives' draws leave of the base's rate.

Scan and samplers are timed in turn ``--repeats`` times; the medians are reported. Then
``peak_rss_mb``: peak resident memory of a process that runs the sampler (``sasrec``
columns) over the dataset (``1x``) and over a dataset listing every training shard ten
times (``10x``, the same files linked, so ten times the rows: about 57M at xbox); each in
a fresh process, whose rows/s over that epoch are recorded too (``memory_runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from synthetic import synth  # the script beside this one

from morec_rec.config import SamplerConfig
from morec_rec.data.format import MANIFEST, PreparedDataset
from morec_rec.jobs.collate import sampler_columns
from morec_rec.jobs.models.mf import MatrixFactorization
from morec_rec.jobs.models.sasrec import SASRec
from morec_rec.plugin.sampling.objectives import build_objectives
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler

OBJECTIVES = ("accuracy", "revenue", "fairness", "alignment")
BATCH_SIZE = SamplerConfig().sub_batch_size * len(OBJECTIVES)
#: The optional columns each backbone's collate asks the sampler for.
CARRIED = {"mf": list(sampler_columns(MatrixFactorization.feature_names)),
           "sasrec": list(sampler_columns(SASRec.feature_names))}
#: What is timed, each in turn: the scan, the scan shuffled, the four objectives' sampler,
#: accuracy's alone.
SIDES = ("scan", "shuffle", "sampler", "uniform_sampler")


def row_groups(dataset: PreparedDataset, columns: list[str]) -> Iterator[pa.Table]:
    """``columns`` of every row group of the training shards, in order."""
    for path in dataset.train_files:
        file = pq.ParquetFile(path)
        for index in range(file.num_row_groups):
            yield file.read_row_group(index, columns=columns)


def scan(dataset: PreparedDataset, columns: list[str]) -> int:
    return sum(table.num_rows for table in row_groups(dataset, columns))


def shuffle(dataset: PreparedDataset, columns: list[str]) -> int:
    """The scan's rows shuffled a sampler's window at a time and cut into batches."""
    window_rows = SamplerConfig().window_batches * BATCH_SIZE
    generator = torch.Generator().manual_seed(0)
    rows, pending, buffered = 0, [], 0
    for table in row_groups(dataset, columns):
        pending.append(table)
        buffered += table.num_rows
        if buffered >= window_rows:
            table = pa.concat_tables(pending)
            full = buffered // window_rows * window_rows
            for begin in range(0, full, window_rows):
                rows += shuffled_batches(table.slice(begin, window_rows), generator)
            pending, buffered = [table.slice(full)], buffered - full
    if buffered:
        rows += shuffled_batches(pa.concat_tables(pending), generator)
    return rows


def shuffled_batches(window: pa.Table, generator: torch.Generator) -> int:
    """Gathers ``window``'s columns in a random order, cut into batches; its rows."""
    order = torch.randperm(window.num_rows, generator=generator).numpy()
    flat = [name for name in window.column_names if name != "history"]
    stacked = np.stack([window[name].to_numpy() for name in flat], dtype=np.int64)
    batches = torch.from_numpy(np.take(stacked, order, axis=1)).split(BATCH_SIZE, dim=1)
    if "history" in window.column_names:
        window["history"].combine_chunks().take(order)
    return sum(batch.shape[1] for batch in batches)


def make_sampler(dataset: PreparedDataset, carried: list[str],
                 objectives: tuple[str, ...] = OBJECTIVES) -> WeightedStreamSampler:
    """A sampler of ``objectives`` whose batches hold :data:`BATCH_SIZE` rows."""
    config = SamplerConfig(objectives=objectives, sub_batch_size=BATCH_SIZE // len(objectives))
    return WeightedStreamSampler(dataset, build_objectives(objectives, dataset.manifest),
                                 config, columns=carried)


def sample(dataset: PreparedDataset, carried: list[str], epochs: int = 1,
           objectives: tuple[str, ...] = OBJECTIVES) -> int:
    sampler = make_sampler(dataset, carried, objectives)
    rows = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        rows += sum(len(batch) for batch in sampler)
    return rows


def timed(run) -> tuple[int, float, float]:
    """``run()``'s rows, wall seconds and this process's CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    rows = run()
    return rows, time.perf_counter() - start, time.process_time() - cpu


def replicate(dataset: PreparedDataset, factor: int, root: Path) -> PreparedDataset:
    """A dataset whose train/ lists each shard of ``dataset`` ``factor`` times (links)."""
    (root / "train").mkdir(parents=True)
    for name in ("items.parquet", "users.parquet", "valid.parquet", "test.parquet"):
        os.symlink(dataset.root.resolve() / name, root / name)
    manifest = dict(dataset.manifest)
    shards = []
    for copy in range(factor):
        for shard in dataset.manifest["shards"]:
            path = f"train/copy{copy}-{Path(shard['path']).name}"
            os.symlink((dataset.root / shard["path"]).resolve(), root / path)
            shards.append({**shard, "path": path})
    manifest["shards"] = shards
    (root / MANIFEST).write_text(json.dumps(manifest))
    return PreparedDataset.open(root)


def peak_rss_mb(data: Path) -> dict[str, float]:
    """Runs the sampler over ``data`` in a fresh process: its rows, rows/s, peak RSS and
    the RSS it started from (after imports).

    The peak is the kernel's high-water mark (``VmHWM``), reset once the imports are done:
    ``getrusage``'s maximum would carry the parent's over the ``exec``.
    """
    code = (
        "import json, sys\n"
        "sys.path.insert(0, 'benchmarks')  # the scripts import their neighbours\n"
        "from sampler_throughput import CARRIED, sample, timed\n"
        "from morec_rec.data.format import PreparedDataset\n"
        "def status(field):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = status('VmRSS')\n"
        "rows, seconds, _ = timed(lambda: sample(PreparedDataset.open(sys.argv[1]), "
        "CARRIED['sasrec']))\n"
        "print(json.dumps({'rows': rows, 'rows_per_s': rows / seconds, "
        "'peak_rss_mb': status('VmHWM'), 'baseline_rss_mb': base}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code, str(data)], check=True, cwd=root,
                            capture_output=True, text=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: synth xbox)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synth("xbox", Path(tmp))
        dataset = PreparedDataset.open(data)
        samplers = {backbone: make_sampler(dataset, carried)
                    for backbone, carried in CARRIED.items()}
        read = {backbone: s.columns for backbone, s in samplers.items()}
        rates: dict[str, dict[str, list[float]]] = {
            backbone: {f"{side}_{measure}": [] for side in SIDES
                       for measure in ("rows_per_s", "cpu_ms_per_batch")}
            for backbone in CARRIED}
        for _ in range(args.repeats):
            for backbone, carried in CARRIED.items():
                for side, run in (
                        ("scan", lambda: scan(dataset, read[backbone])),
                        ("shuffle", lambda: shuffle(dataset, read[backbone])),
                        ("sampler", lambda: sample(dataset, carried)),
                        ("uniform_sampler", lambda: sample(dataset, carried,
                                                           objectives=("accuracy",)))):
                    rows, seconds, cpu = timed(run)
                    rates[backbone][f"{side}_rows_per_s"].append(rows / seconds)
                    rates[backbone][f"{side}_cpu_ms_per_batch"].append(1e3 * cpu / rows
                                                                       * BATCH_SIZE)
        memory = {"1x": peak_rss_mb(data),
                  "10x": peak_rss_mb(replicate(dataset, 10, Path(tmp) / "x10").root)}
    columns = {}
    for backbone, runs in rates.items():
        medians = {k: statistics.median(v) for k, v in runs.items()}
        columns[backbone] = {
            "carried": CARRIED[backbone], "read": read[backbone],
            "looked_up": sorted(samplers[backbone].item_attributes), **medians,
            **{f"{side}_over_scan": medians[f"{side}_rows_per_s"] / medians["scan_rows_per_s"]
               for side in SIDES[1:]},
            "sampler_over_uniform_sampler": (medians["sampler_rows_per_s"]
                                             / medians["uniform_sampler_rows_per_s"]),
            "runs": runs}
    result = {
        "dataset": str(args.data or "synth xbox, seed 0"),
        "train_rows": dataset.manifest["num_interactions"]["train"],
        "objectives": list(OBJECTIVES),
        "batch_size": BATCH_SIZE,
        "columns": columns,
        "peak_rss_mb": {size: m["peak_rss_mb"] for size, m in memory.items()},
        "memory_runs": memory,
        "environment": {
            "python": platform.python_version(), "numpy": np.__version__,
            "pyarrow": pa.__version__, "torch": torch.__version__, "cpus": os.cpu_count(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for backbone, c in columns.items():
        print(f"{backbone}: scan {c['scan_rows_per_s']:,.0f} rows/s, sampler "
              f"{c['sampler_rows_per_s']:,.0f} rows/s ({c['sampler_over_scan']:.2f} of the scan), "
              f"accuracy alone {c['uniform_sampler_over_scan']:.2f}, the scan shuffled "
              f"{c['shuffle_over_scan']:.2f}; CPU per batch: scan "
              f"{c['scan_cpu_ms_per_batch']:.3f} ms, shuffled {c['shuffle_cpu_ms_per_batch']:.3f} "
              f"ms, sampler {c['sampler_cpu_ms_per_batch']:.3f} "
              f"ms, accuracy alone {c['uniform_sampler_cpu_ms_per_batch']:.3f} ms")
    print("peak RSS " + ", ".join(f"{k} {v:,.0f} MB" for k, v in result["peak_rss_mb"].items()))


if __name__ == "__main__":
    main()
