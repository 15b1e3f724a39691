"""The training job end to end on the tiny synthetic profile: one process and torchrun.

The 2-rank job trains, checkpoints, resumes and evaluates; its evaluation of the best
checkpoint must equal a 1-process evaluation of the same checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from conftest import run_cli, run_torchrun

from morec_rec.jobs.cli import main

TRAIN = ["--model", "mf", "--batch-size", "128", "--num-workers", "0", "--embedding-dim", "16"]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _evaluate_json(*args: str) -> dict:
    done = run_cli("evaluate", *args, "--json")
    assert done.returncode == 0, done.stderr
    return _last_json(done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("table_optimizer", ["adam", "exact_row_wise_adagrad"])
def test_two_ranks_train_resume_and_evaluate(tiny: Path, tmp_path: Path,
                                             table_optimizer: str) -> None:
    # adam: tables replicated on CPU (FBGEMM has no CPU Adam); row-wise Adagrad: tables
    # sharded row-wise over the 2 ranks, so the 1-process evaluation reshards them, and
    # the validations inside an epoch use them between two steps of the pipeline.
    run = tmp_path / "run"
    run_torchrun("integration/train.py", "--data", str(tiny), "--out", str(run),
                 *TRAIN, "--max-epochs", "2", "--patience", "10", "--eval-every", "5",
                 "--table-optimizer", table_optimizer)
    assert [r["epoch"] for r in _log(run) if r["kind"] == "epoch"] == [1, 2]
    steps = [r["step"] for r in _log(run) if r["kind"] == "epoch"]

    run_torchrun("integration/train.py", "--out", str(run), "--resume", "--max-epochs", "3")
    epochs = [r for r in _log(run) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]  # continued, not restarted
    assert epochs[2]["step"] - steps[1] == steps[1] - steps[0]
    # Its batches and epochs depend on the world size: one process may not resume it.
    done = run_cli("train", "--out", str(run), "--resume", "--max-epochs", "4")
    assert done.returncode == 2 and "started on 2 rank(s), not 1" in done.stderr

    two_ranks = _last_json(run_torchrun("integration/evaluate.py", str(run), "--split", "test",
                                        "--json"))
    one_process = _evaluate_json("--run", str(run), "--split", "test")
    # Counts add exactly; the price-weighted sum of rHit only up to float summation order.
    numbers = {k: v for k, v in one_process.items() if isinstance(v, float)}
    assert {k: two_ranks[k] for k in numbers} == pytest.approx(numbers, rel=1e-12, abs=0)
    assert {k: v for k, v in two_ranks.items() if k not in numbers} == {
        k: v for k, v in one_process.items() if k not in numbers}
    assert set(one_process) >= {"hit@10", "rhit@10", "pop_kl@10", "min_hit@10"}


@pytest.mark.slow
@pytest.mark.parametrize(("model", "table_optimizer"), [
    ("mf", "adam"), ("mf", "exact_row_wise_adagrad"), ("sasrec", "adam")])
def test_resumed_training_equals_uninterrupted_training(tiny: Path, tmp_path: Path, model: str,
                                                        table_optimizer: str) -> None:
    # The model and the optimizer's state (Adam's moments and step, or the fused Adagrad's
    # sums) come back from the checkpoint, and SASRec's dropout draws what it would have
    # drawn: losses and the model after it are those of a run that never stopped, and the
    # log drops what was logged after the checkpoint.
    args = [*TRAIN, "--model", model, "--patience", "10", "--table-optimizer", table_optimizer]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for command in (["--data", str(tiny), "--out", str(whole), "--max-epochs", "2"],
                    ["--data", str(tiny), "--out", str(parts), "--max-epochs", "1"],
                    ["--out", str(parts), "--resume", "--max-epochs", "2"]):
        done = run_cli("train", *args, *command)
        assert done.returncode == 0, done.stderr
        if command[-1] == "1":  # as if stopped during epoch 2: a record past the checkpoint
            with open(parts / "log.jsonl", "a") as log:
                log.write(json.dumps({"kind": "step", "step": 10**6, "loss": 0.0}) + "\n")
    losses = [[(r["step"], r["loss"]) for r in _log(run) if r["kind"] == "step"]
              for run in (whole, parts)]
    assert losses[0] == losses[1]
    assert (_evaluate_json("--run", str(parts), "--split", "test")
            == _evaluate_json("--run", str(whole), "--split", "test"))


def test_validations_rank_a_fixed_sample_of_the_users(tiny: Path, tmp_path: Path) -> None:
    # Every validation ranks the same 40 users of tiny's 259; the hit rates are over them.
    runs = {users: tmp_path / str(users) for users in (0, 40)}
    for users, run in runs.items():
        done = run_cli("train", "--data", str(tiny), "--out", str(run), *TRAIN, "--max-epochs",
                       "2", "--patience", "10", "--validation-users", str(users))
        assert done.returncode == 0, done.stderr
    evals = {users: [r for r in _log(run) if r["kind"] == "eval"] for users, run in runs.items()}
    assert [r["users"] for r in evals[0]] == [259, 259]
    assert [r["users"] for r in evals[40]] == [40, 40]
    for record in evals[40]:
        assert record["hit@10"] * 40 == pytest.approx(round(record["hit@10"] * 40), abs=1e-9)
    # The sample changes what is measured, never what is trained.
    assert ([r["loss"] for r in _log(runs[0]) if r["kind"] == "step"]
            == [r["loss"] for r in _log(runs[40]) if r["kind"] == "step"])


def test_popular_baseline(tiny: Path) -> None:
    result = _evaluate_json("--data", str(tiny), "--model", "popular", "--split", "test")
    assert result["model"] == "popular" and 0 < result["hit@10"] < 1
    assert result["users"] == 259


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_not_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d").mkdir()
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r")]) == 2
    assert "not a prepared dataset" in _error(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--lr", "-1"], "config: lr = -1.0 is out of range"),
    (["--model", "gru"], "config: model = 'gru' is out of range"),
])
def test_bad_train_config(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          args: list[str], message: str) -> None:
    assert main(["train", "--data", str(tiny), "--out", str(tmp_path / "r"), *args]) == 2
    assert message in _error(capsys)


def test_unknown_config_key(tiny: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.toml").write_text("[train]\nlearning_rate = 0.1\n")
    assert main(["train", "--data", str(tiny), "--out", str(tmp_path / "r"),
                 "--config", str(tmp_path / "c.toml")]) == 2
    assert "unknown key(s) learning_rate for TrainConfig" in _error(capsys)


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = run_cli("train", "--data", str(tiny), "--out", str(run), *TRAIN, "--max-epochs", "1")
    assert done.returncode == 0, done.stderr
    record = json.loads((run / "run.json").read_text())
    record["config"]["model"] = "sasrec"
    (run / "run.json").write_text(json.dumps(record))
    before = sorted(p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*"))
    done = run_cli("evaluate", "--run", str(run), "--split", "test")
    assert done.returncode == 2
    assert "checkpoint of another model: model 'mf' (expected 'sasrec')" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert sorted(p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")) == before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.parametrize("environment, applied", [({}, True),
                                                  ({"MALLOC_TRIM_THRESHOLD_": "0"}, False)])
def test_keep_freed_memory_applies_unless_the_environment_chose(
        environment: dict[str, str], applied: bool) -> None:
    # In a child process: the settings are the process's for the rest of its life.
    code = ("from morec_rec.jobs.distributed import keep_freed_memory; "
            "print(keep_freed_memory())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env | environment, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == str(applied)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity masks")
@pytest.mark.parametrize("environment, threads", [
    ({}, lambda cpus: cpus),  # loader workers share the trainer's CPUs
    ({"LOCAL_WORLD_SIZE": "2"}, lambda cpus: max(cpus // 2, 1)),
    ({"OMP_NUM_THREADS": "1"}, lambda cpus: 1),  # as torchrun sets it
])
def test_share_cpus_gives_the_trainer_its_ranks_share(environment: dict[str, str],
                                                      threads: Callable[[int], int]) -> None:
    code = ("import os, torch; from morec_rec.jobs.distributed import share_cpus; "
            "print(share_cpus(), torch.get_num_threads(), len(os.sched_getaffinity(0)))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env | environment, check=True,
                         capture_output=True, text=True).stdout.split()
    returned, in_use, cpus = map(int, out)
    assert returned == in_use == threads(cpus)


def test_a_diverged_model_stops_the_job(tiny: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Adam moves each row by about lr: scores of 1e30-long vectors overflow to inf, and
    # the BPR loss of inf - inf is NaN from the second step.
    assert main(["train", "--data", str(tiny), "--out", str(tmp_path / "r"), *TRAIN,
                 "--lr", "1e30", "--max-epochs", "1"]) == 2
    assert "training loss: step 2 nan, step 3 nan, " in _error(capsys)
