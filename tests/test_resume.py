"""Killed anywhere, resumed with ``--resume``: the same batches and the same results.

A MoRec job on the tiny profile kills itself with SIGKILL (``tests/dist/killed_job.py``)
mid-step, between an update's publication and the batch it applies from, and between a
checkpoint's renames; resumed in a new process (a new weight store), its log (every
step record's losses, every validation pass, every mass update) and its test results
are those of a run that never stopped. Loader workers die with a killed trainer. Under
``torchrun --max-restarts 1`` the restarted attempt resumes by itself, and the job on two
launchers of one rank each (as on two machines) is the job on one launcher of two.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TRAIN, descendants, free_port, pretrained, run_cli, run_torchrun

from morec_rec.errors import MorecError
from morec_rec.jobs import distributed
from morec_rec.jobs.cli import _is_restart

# 25 batches an epoch; a validation pass (and a mass update) every 8 steps, a checkpoint
# right after it: the update applies from batches that the checkpoint has not trained.
MOREC = [*TRAIN, "--sub-batch-size", "32", "--epochs", "2", "--updates-per-epoch", "3",
         "--ki", "5", "--checkpoint-every", "8"]
KILLED = -signal.SIGKILL
#: Compared between runs: everything but the times (rates, a validation's seconds).
IGNORED = ("samples_per_s", "seconds")
#: The environment of every job these tests start: the repository importable.
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def torchrun(*launch: str, script: str, args: list[str]) -> list[str]:
    """The command line of torchrun with the options ``launch``, running ``script`` (a
    path in the repository) with ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(ROOT / script), *args]


@pytest.fixture(scope="module")
def base(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrained(tiny, tmp_path_factory.mktemp("base") / "run", max_epochs=3)


@pytest.fixture(scope="module")
def uninterrupted(tiny: Path, base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "job"
    done = run_cli("run", "--data", str(tiny), "--base", str(base), "--out", str(out), *MOREC)
    assert done.returncode == 0, done.stderr
    return out


def killed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "killed_job.py"),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=ENV)


def assert_same_run(resumed: Path, whole: Path) -> None:
    logs = [[{k: v for k, v in json.loads(line).items() if k not in IGNORED}
             for line in (out / "morec" / "log.jsonl").read_text().splitlines()]
            for out in (resumed, whole)]
    assert logs[0] == logs[1]
    results = [json.loads((out / "results.json").read_text()) for out in (resumed, whole)]
    for key in ("base", "morec", "imp", "valid", "selected", "control"):
        assert results[0][key] == results[1][key], key


def assert_killed_at_step_20_resumes(args: list[str], tmp_path: Path) -> None:
    """Runs the job of ``args`` whole, and killed at step 20 (past the checkpoint at 16,
    mid-epoch) then resumed; asserts the two are the same run."""
    whole, out = tmp_path / "whole", tmp_path / "job"
    done = run_cli("run", *args, "--out", str(whole))
    assert done.returncode == 0, done.stderr
    done = killed("--at-step", "20", "--", "run", *args, "--out", str(out))
    assert done.returncode == KILLED, done.stderr[-2000:]
    done = run_cli("run", "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr
    assert_same_run(out, whole)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [
    ["--at-step", "9"],  # after the pass at step 8 published, before its batch trains
    ["--at-step", str(np.random.default_rng(11).integers(1, 50))],  # anywhere
    ["--between-renames", "3"],  # the save at step 24: no ``last``, only ``last.old``
], ids=["pending-update", "random-step", "between-renames"])
def test_a_killed_job_resumes_as_if_uninterrupted(tiny: Path, base: Path, uninterrupted: Path,
                                                  tmp_path: Path, kill: list[str]) -> None:
    out = tmp_path / "job"
    done = killed(*kill, "--", "run", "--data", str(tiny), "--base", str(base), "--out",
                  str(out), *MOREC)
    assert done.returncode == KILLED, done.stderr[-2000:]
    assert not (out / "results.json").exists()
    done = run_cli("run", "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [
    # The controller's target is relative to the base's losses, measured before continued
    # training: the resumed job restores them rather than measuring the resumed model.
    ["--control", "training", "--coefficients", "loss"],
    # No sampler: the controlled coefficients weigh the loss forms.
    ["--coefficients", "loss_forms"],
    # A baseline coordinator whose rule keeps state (EPO's preference-ray solution).
    ["--coordinator", "epo", "--coefficients", "loss"],
], ids=["training-control", "loss-forms", "epo"])
def test_a_killed_job_of_each_coordination_resumes_as_if_uninterrupted(
        tiny: Path, base: Path, tmp_path: Path, mode: list[str]) -> None:
    assert_killed_at_step_20_resumes(["--data", str(tiny), "--base", str(base), *MOREC, *mode],
                                     tmp_path)


@pytest.mark.slow
def test_a_killed_sasrec_job_resumes_as_if_uninterrupted(tiny: Path, tmp_path: Path) -> None:
    # SASRec's dropout draws from the trainer's default generator: the loop seeds it before
    # each step, and the loader's iteration, which starts at the resumed step, draws nothing
    # from it.
    base = pretrained(tiny, tmp_path / "base", max_epochs=1, model="sasrec")
    assert_killed_at_step_20_resumes(["--data", str(tiny), "--base", str(base), *MOREC,
                                      "--model", "sasrec", "--num-workers", "2"], tmp_path)


@pytest.fixture(scope="module")
def uninterrupted_on_two_ranks(tiny: Path, base: Path,
                               tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole2") / "job"
    run_torchrun("integration/run.py", "--data", str(tiny), "--base", str(base), "--out",
                 str(out), *MOREC, timeout=300)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill", [["--at-step", "20"], ["--between-renames", "2"]],
                         ids=["mid-epoch", "between-renames"])
def test_two_ranks_killed_resume_as_if_uninterrupted(tiny: Path, base: Path,
                                                     uninterrupted_on_two_ranks: Path,
                                                     tmp_path: Path, kill: list[str]) -> None:
    out = tmp_path / "job"
    command = torchrun("--nproc_per_node=2", f"--master-port={free_port()}",
                       script="tests/dist/killed_job.py",
                       args=[*kill, "--", "run", "--data", str(tiny), "--base", str(base),
                             *MOREC, "--out", str(out)])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert done.returncode != 0 and not (out / "results.json").exists()
    run_torchrun("integration/run.py", "--out", str(out), "--resume", timeout=300)
    assert_same_run(out, uninterrupted_on_two_ranks)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(
        tiny: Path, base: Path, uninterrupted_on_two_ranks: Path, tmp_path: Path) -> None:
    # torchrun --max-restarts 1 reruns the same command: the restarted attempt finds the
    # job's record in --out and resumes, and the fault only strikes the first attempt.
    # The launch is the one README gives for restartable jobs.
    out = tmp_path / "job"
    command = torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1",
                       script="tests/dist/killed_job.py",
                       args=["--at-step", "20", "--", "run", "--data", str(tiny), "--base",
                             str(base), *MOREC, "--out", str(out)])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(exitcode: -9) local_rank: 0" in done.stderr  # the agent saw the first attempt die
    assert_same_run(out, uninterrupted_on_two_ranks)


@pytest.mark.slow
def test_two_nodes_of_one_rank_run_the_job_of_one_node_of_two(
        tiny: Path, base: Path, uninterrupted_on_two_ranks: Path, tmp_path: Path) -> None:
    # Two launchers, as on two machines, meet at a c10d rendezvous on loopback.
    out = tmp_path / "job"
    command = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-nodes",
                       script="integration/run.py",
                       args=["--data", str(tiny), "--base", str(base), *MOREC, "--out", str(out)])
    nodes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    assert_same_run(out, uninterrupted_on_two_ranks)


def _children(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.add(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_loader_workers_die_with_a_killed_trainer(tiny: Path, base: Path,
                                                  tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "tests" / "dist" / "killed_job.py"), "--at-step",
               "30", "--", "run", "--data", str(tiny), "--base", str(base), "--out",
               str(tmp_path / "job"), *MOREC, "--num-workers", "2"]
    trainer = subprocess.Popen(command, cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    while trainer.poll() is None:  # the loader workers, seen while the trainer lives
        workers |= _children(trainer.pid)
        time.sleep(0.05)
    assert trainer.returncode == KILLED and len(workers) >= 2
    deadline = time.monotonic() + 2  # torch's own watchdog looks every 5 s, when idle
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_die_with_a_killed_torchrun() -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master-port={free_port()}", str(ROOT / "tests" / "dist" / "waiting_job.py")]
    launcher = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    ranks: list[int] = []

    def kill_all() -> None:
        for pid in ranks or descendants(launcher.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()

    stuck = threading.Timer(120, kill_all)  # a hung start: the reads below then end empty
    stuck.start()
    try:
        assert launcher.stdout is not None
        ready = [launcher.stdout.readline() for _ in range(2)]
        assert sorted(ready) == ["rank 0 ready\n", "rank 1 ready\n"]
        ranks = descendants(launcher.pid)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(ranks) == 2 and not [pid for pid in ranks if _alive(pid)]
    finally:  # nothing left running, whatever failed
        stuck.cancel()
        kill_all()


def test_a_restart_on_the_agents_shared_store_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(MorecError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed._check_restart()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    distributed._check_restart()


def test_a_restart_resumes_only_the_job_of_its_own_data(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    record = tmp_path / "job.json"
    record.write_text(json.dumps({"data": str(tmp_path / "a")}))
    assert not _is_restart(record, tmp_path / "a")  # a first attempt never resumes
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert _is_restart(record, tmp_path / "a")
    assert not _is_restart(tmp_path / "none.json", tmp_path / "a")  # killed before its record
    with pytest.raises(MorecError, match=f"{record}: torchrun restarted a job on .*a, not"):
        _is_restart(record, tmp_path / "b")
    record.write_text('{"da')  # damaged: one line naming it, no traceback
    with pytest.raises(MorecError, match=f"{record}: not JSON"):
        _is_restart(record, tmp_path / "a")
