"""The worked example (integration/example/): a plain TorchRec job, and the same job with
MoRec swapped in, both run under torchrun on the tiny synthetic profile."""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_torchrun
from morec_rec.pipeline.plugin import PIPELINE_DEPTH, PREFETCH

EXAMPLE = ROOT / "integration" / "example"


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_plain_job_trains(tiny: Path) -> None:
    out = run_torchrun("integration/example/plain_job.py", "--data", str(tiny),
                       "--epochs", "3", "--batch-size", "64", nproc=1)
    losses = [r["loss"] for r in records(out)]
    assert len(losses) == 3 * (3220 // 64) // 50  # a record every 50 steps
    assert all(math.isfinite(x) and x > 0 for x in losses)


def test_morec_job_coordinates_and_updates_the_weights_on_two_ranks(tiny: Path) -> None:
    out = run_torchrun("integration/example/morec_job.py", "--data", str(tiny),
                       "--epochs", "3", "--batch-size", "66", "--update-every", "20", nproc=2)
    steps = [r for r in records(out) if "coefficients" in r]
    updates = [r for r in records(out) if "version" in r]
    # 3,220 rows, 2 ranks, batches of 3 x 22 rows: 24 batches a rank and epoch.
    assert [r["step"] for r in steps] == [50]
    assert [r["step"] for r in updates] == [20, 40, 60]
    assert [r["version"] for r in updates] == [1, 2, 3]
    lookahead = PIPELINE_DEPTH + PREFETCH * 1 + 1  # one loader worker
    assert [r["effective_from"] for r in updates] == [20 + lookahead, 40 + lookahead,
                                                      60 + lookahead]
    for record in steps:
        assert len(record["objective_loss"]) == 3
        beta, *others = record["coefficients"]
        assert others == pytest.approx([0.5, 0.5])  # λ = 1 times p = (0.5, 0.5)
        assert 0.0 <= beta <= 2.0
    fairness = [np.array(r["masses"]["fairness"]) for r in updates]
    for masses in fairness:
        assert masses.sum() == pytest.approx(1.0)
    assert not np.allclose(fairness[0], fairness[-1])  # the masses moved


def code_lines(script: str) -> list[str]:
    """The script's lines after its docstring."""
    lines = (EXAMPLE / script).read_text().splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("import")):]


def test_the_morec_job_is_a_small_diff_of_the_plain_one() -> None:
    added = [line for line in difflib.unified_diff(code_lines("plain_job.py"),
                                                   code_lines("morec_job.py"), lineterm="")
             if line.startswith("+") and not line.startswith("+++") and line.strip("+ ")]
    assert len(added) <= 40, "\n".join(added)
