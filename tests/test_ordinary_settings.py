"""Ordinary settings run to the end: the defaults on the tiny profile, two loader workers,
more validation rounds an epoch than batches between them, and the README's 2-rank
command on the demo profile (all of which once failed at an epoch's end: an update
published to apply before a batch already drawn)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, run_torchrun

METRICS = {"hit@10", "rhit@10", "pop_kl@10", "min_hit@10"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    assert run_cli("synth", "--profile", "demo", "--seed", "0", "--out", str(out)).returncode == 0
    return out


@pytest.fixture(scope="module")
def demo_base(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    done = run_cli("train", "--data", str(demo), "--out", str(run), "--max-epochs", "2")
    assert done.returncode == 0, done.stderr
    return run


def finished(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert set(results["morec"]) == METRICS
    return results


@pytest.mark.slow
def test_the_tiny_profile_with_default_settings(tiny: Path, tmp_path: Path) -> None:
    done = run_cli("run", "--data", str(tiny), "--out", str(tmp_path / "job"))
    assert done.returncode == 0, done.stderr
    finished(tmp_path / "job")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--num-workers", "2"], ["--updates-per-epoch", "36"]],
                         ids=["two-workers", "36-updates"])
def test_ordinary_settings_on_demo(demo: Path, demo_base: Path, tmp_path: Path,
                                   flags: list[str]) -> None:
    out = tmp_path / "job"
    done = run_cli("run", "--data", str(demo), "--base", str(demo_base), "--out", str(out),
                   "--epochs", "1", *flags)
    assert done.returncode == 0, done.stderr
    finished(out)
    updates = [json.loads(line) for line in (out / "morec" / "log.jsonl").read_text()
               .splitlines() if '"kind": "update"' in line]
    assert [u["effective_from"] for u in updates] == sorted(u["effective_from"] for u in updates)


@pytest.mark.slow
def test_the_readme_two_rank_command_on_demo(demo: Path, tmp_path: Path) -> None:
    run_torchrun("integration/run.py", "--data", str(demo), "--out", str(tmp_path / "job"),
                 "--epochs", "1", timeout=600)
    assert finished(tmp_path / "job")["world_size"] == 2
