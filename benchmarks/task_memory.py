"""What a rank holds for full-ranking evaluation: the whole task against its own share.

    python benchmarks/task_memory.py --out benchmarks/results/task_memory.json \\
        [--data DIR] [--worlds 1 2 4] [--repeats 2]

Without ``--data`` it generates the ``xbox`` synthetic profile (seed 0) into a temporary
directory. For each world size W of ``--worlds``, a ``torchrun --nproc_per_node=W`` job
(gloo) has every rank build the test split's ranking task (the split read beforehand, as
the jobs read it once): the whole task (``whole``, what every rank held before shares), and
the rank's share (``share``: ``load_task(..., rank=, world_size=)``). Each rank records its
users, the bytes of the task's per-user arrays (``held_mb``: ids, histories, exclusion
lists), the seconds the build took and its peak resident memory above the process's
before the build (``peak_over_base_mb``: the kernel's high-water mark, reset first). The
two are run in turn ``--repeats`` times; ``per_node`` sums the ranks' medians, what one
machine running all W ranks holds.
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
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from synthetic import synth  # the script beside this one

MODES = ("whole", "share")
MEASURES = ("held_mb", "seconds", "peak_over_base_mb")


def memory_status(field: str) -> float:
    """``field`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def rank_main(data: Path, mode: str, out: Path) -> None:
    """One rank of a job: builds the test task (``mode``) and writes its measures."""
    import torch.distributed as dist

    from morec_rec.data.format import PreparedDataset
    from morec_rec.plugin.eval.ranking import load_task

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dataset = PreparedDataset.open(data)
    held = dataset.split("test")
    share = {"rank": rank, "world_size": world_size} if mode == "share" else {}
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    base, started = memory_status("VmRSS"), time.perf_counter()
    task = load_task(dataset, "test", held, **share)
    seconds = time.perf_counter() - started
    arrays = (task.user_id, task.held_out, task.history_offsets, task.history_values,
              task.exclude_offsets, task.exclude_items)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "users": len(task), "held_mb": sum(a.nbytes for a in arrays) / 2**20,
        "seconds": seconds, "peak_over_base_mb": memory_status("VmHWM") - base}))
    dist.destroy_process_group()


def job(data: Path, mode: str, world_size: int, out: Path) -> list[dict[str, float]]:
    """Each rank's measures from one ``torchrun`` job of ``world_size`` ranks."""
    out.mkdir(parents=True)
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={world_size}", __file__, "--rank-of", str(data), mode,
                    str(out)], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: synth xbox)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank-of", nargs=3, metavar=("DATA", "MODE", "OUT"),
                        help=argparse.SUPPRESS)  # a rank of the jobs this script starts
    args = parser.parse_args()
    if args.rank_of:
        data, mode, out = args.rank_of
        rank_main(Path(data), mode, Path(out))
        return
    if args.out is None:
        parser.error("--out is required")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synth("xbox", Path(tmp))
        runs: dict[str, dict[str, list[list[dict[str, float]]]]] = {
            str(w): {mode: [] for mode in MODES} for w in args.worlds}
        for repeat in range(args.repeats):
            for world_size in args.worlds:
                for mode in MODES:
                    runs[str(world_size)][mode].append(
                        job(data, mode, world_size, Path(tmp) / f"{repeat}-{world_size}-{mode}"))
    worlds = {}
    for world_size, by_mode in runs.items():
        worlds[world_size] = {}
        for mode, repeats in by_mode.items():
            ranks = [{"users": repeats[0][r]["users"],
                      **{m: statistics.median(run[r][m] for run in repeats) for m in MEASURES}}
                     for r in range(int(world_size))]
            worlds[world_size][mode] = {
                "ranks": ranks,
                "per_node": {m: sum(rank[m] for rank in ranks) for m in ("held_mb",
                                                                          "peak_over_base_mb")},
                "runs": repeats}
    result = {
        "dataset": str(args.data or "synth xbox, seed 0"),
        "split": "test",
        "worlds": worlds,
        "environment": {"python": platform.python_version(), "numpy": np.__version__,
                        "pyarrow": pa.__version__, "torch": torch.__version__,
                        "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for world_size, by_mode in worlds.items():
        print(f"{world_size} rank(s): " + "; ".join(
            f"{mode} {m['ranks'][0]['held_mb']:.0f} MB held, peak "
            f"{max(r['peak_over_base_mb'] for r in m['ranks']):.0f} MB a rank, "
            f"{m['per_node']['peak_over_base_mb']:.0f} MB a node"
            for mode, m in by_mode.items()))


if __name__ == "__main__":
    main()
