"""Every benchmark still runs against the package as it is (their numbers are measured
by hand, not here): each at its smallest settings on a small synthetic profile, writing
its JSON. All but ``xbox_job.py``, the whole job at Xbox scale (its stages' commands are
the suite's own: synth, prepare, train and run under torchrun, a restart)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out),
                           *args], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_morec_overhead(tmp_path: Path) -> None:
    # Every feed shares one pipeline: each MoRec hook must get its own loader's batches.
    # (demo: tiny's epoch of 1,024-row batches is shorter than the warm-up.)
    result = run_benchmark("morec_overhead.py", tmp_path, "--profile", "demo", "--steps", "3",
                           "--pairs", "2", "--processes", "1", "--threads", "1")
    assert set(result["over_base"]) == {"morec", "morec_training_control", "morec_uniform",
                                        "base_again"}
    assert result["validation_round_s"] > 0


def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    result = run_benchmark("gpu_check.py", tmp_path, "--profiles", "tiny", "--device", "cpu",
                           "--batch-size", "64", "--num-workers", "1", "--no-pin-memory",
                           "--rounds", "1", "--plain-steps", "5", "--max-steps", "25")
    (profile,) = result["results"]
    assert profile["morec"]["validation_rounds"] == 2
    assert profile["morec"]["test"] == pytest.approx(profile["morec"]["test_on_cpu"])


@pytest.mark.parametrize("script, args", [
    ("batch_transfer.py", ["--profile", "tiny", "--batch-sizes", "64", "--repeats", "1"]),
    ("loader_cost.py", ["--profile", "tiny", "--steps", "5", "--rounds", "1", "--group", "2"]),
    ("negative_sampling.py", ["--profiles", "tiny", "--batch-size", "64", "--batches", "5",
                              "--rounds", "1"]),
    ("sampler_throughput.py", ["--repeats", "1"]),  # + --data: the tiny dataset
    ("train_throughput.py", ["--profiles", "demo", "--steps", "5", "--eval-users", "100",
                             "--repeats", "1"]),
    ("table_size.py", ["--sizes", "demo", "--steps", "5", "--repeats", "1"]),
    ("sasrec_step.py", ["--batch-size", "64", "--repeats", "1"]),
    ("prepare_throughput.py", ["--profile", "tiny"]),
    ("task_memory.py", ["--worlds", "1", "2", "--repeats", "1"]),  # + --data: tiny
])
def test_benchmark_runs(script: str, args: list[str], tiny: Path, tmp_path: Path) -> None:
    if script in ("sampler_throughput.py", "task_memory.py"):
        args = [*args, "--data", str(tiny)]
    assert run_benchmark(script, tmp_path, *args)
