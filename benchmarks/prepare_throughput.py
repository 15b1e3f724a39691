"""Throughput and peak memory of synthetic generation, and of generation + preparation.

    python benchmarks/prepare_throughput.py --out FILE.json [--profile xbox] [--seed 0]

Each phase runs in a fresh child process (this script with ``--phase``) that reports its own
wall time and peak resident set size, so that one phase's memory does not hide another's.
Times exclude interpreter start-up and imports; rows/s is raw rows generated per second of
the phase. The JSON written to ``--out`` holds the counts, the phases and the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("generate", "generate+prepare")


def run_phase(phase: str, profile: str, seed: int) -> dict[str, Any]:
    """Runs one phase in this process and returns its counts, seconds and peak RSS."""
    from morec_rec.config import PrepareConfig
    from morec_rec.data.prepare import prepare
    from morec_rec.data.synth import PROFILES, generate

    start = time.perf_counter()
    raw = generate(PROFILES[profile], seed)
    result: dict[str, Any] = {"rows_generated": raw.interactions.num_rows}
    if phase == "generate+prepare":
        with tempfile.TemporaryDirectory() as tmp:
            manifest = prepare(raw, Path(tmp) / "dataset", PrepareConfig(seed=seed))
            seconds = time.perf_counter() - start  # not the removal of the output
        result["interactions_after_filtering"] = manifest["num_interactions"]
        result["users_after_filtering"] = manifest["num_users"]
        result["items_after_filtering"] = manifest["num_items"]
    else:
        seconds = time.perf_counter() - start
    result["seconds"] = round(seconds, 3)
    result["rows_per_second"] = round(result["rows_generated"] / seconds)
    # Linux reports ru_maxrss in KiB.
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def measure(phase: str, profile: str, seed: int) -> dict[str, Any]:
    """Runs ``phase`` in a fresh child process and returns what it reports."""
    command = [sys.executable, __file__, "--phase", phase, "--profile", profile,
               "--seed", str(seed)]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"phase {phase!r} failed (exit {child.returncode}):\n{child.stderr}")
    return json.loads(child.stdout.splitlines()[-1])


def environment() -> dict[str, Any]:
    import numpy
    import pyarrow

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
    }


def report(profile: str, seed: int) -> dict[str, Any]:
    phases = {phase: measure(phase, profile, seed) for phase in PHASES}
    prepared = phases["generate+prepare"]
    return {
        "profile": profile,
        "seed": seed,
        "rows_generated": phases["generate"]["rows_generated"],
        "users_after_filtering": prepared.pop("users_after_filtering"),
        "items_after_filtering": prepared.pop("items_after_filtering"),
        "interactions_after_filtering": prepared.pop("interactions_after_filtering"),
        "phases": {
            name: {k: v for k, v in result.items() if k != "rows_generated"}
            for name, result in phases.items()
        },
        "environment": environment(),
    }


def summary(result: dict[str, Any]) -> str:
    kept = result["interactions_after_filtering"]
    lines = [
        f"profile {result['profile']} seed {result['seed']}: "
        f"{result['rows_generated']:,} rows generated; after filtering "
        f"{result['users_after_filtering']:,} users, {result['items_after_filtering']:,} items, "
        f"{sum(kept.values()):,} interactions (train {kept['train']:,})"
    ]
    for name, phase in result["phases"].items():
        lines.append(f"  {name:<17} {phase['seconds']:8.2f} s  "
                     f"{phase['rows_per_second']:>12,} rows/s  "
                     f"peak RSS {phase['peak_rss_mb']:,.0f} MB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON file to write (required)")
    parser.add_argument("--profile", default="xbox")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.profile, args.seed)))
        return
    if args.out is None:
        parser.error("--out is required")
    result = report(args.profile, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))


if __name__ == "__main__":
    main()
