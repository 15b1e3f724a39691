"""The Xbox-scale job end to end under torchrun, each stage's wall time and peak memory.

    python benchmarks/xbox_job.py --out benchmarks/results/xbox_job.json \\
        [--work DIR] [--nproc 2] [--pretrain-epochs 10] [--sasrec-seconds 240]
        [--profile xbox] [--checkpoint-every 1000] [--kill-after-steps 200]

Each stage is a command run in its own process tree, as a user runs it; the training
stages under ``torchrun --standalone --nproc_per_node NPROC``:

1. ``synth``: the ``--profile`` (seed 0) written as raw Parquet, an interaction file and
   an item table;
2. ``prepare``: ``morec-rec prepare --source generic`` of those files;
3. ``pretrain``: ``morec-rec train`` (MF-BPR, the defaults, at most ``--pretrain-epochs``);
4. ``job``: ``morec-rec run --base ... --continued``: MoRec and accuracy-only continued
   training from the base, then test evaluation of the three (``results.json`` gives each
   part's wall time);
5. ``restart``: MoRec from the same base again, launched with ``--max-restarts 1``; once it
   has saved its first checkpoint (every ``--checkpoint-every`` steps) and logged
   ``--kill-after-steps`` more steps, rank 0 is SIGKILLed. The restarted attempt resumes
   from that checkpoint; its test metrics are compared with the job's MoRec row;
6. ``sasrec``: ``morec-rec train --model sasrec`` for ``--sasrec-seconds``, then stopped;
   the rate its log reports after the first 20% of its steps, and the hours an epoch takes
   at that rate.

For every stage: wall seconds, the peak resident memory of its largest process (``wait4``),
and the peak proportional set size of the whole tree (ranks, loader workers, launcher),
sampled once a second. The job's total is the sum of stages 1-4.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from morec_rec.jobs.run import versions

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "morec_rec.jobs.cli"]
#: A restartable launch in torch 2.13 (README: restarts).
LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
SYNTH = (
    "import sys, pyarrow.parquet as pq\n"
    "from pathlib import Path\n"
    "from morec_rec.data.synth import PROFILES, generate\n"
    "raw = generate(PROFILES[sys.argv[3]], int(sys.argv[2]))\n"
    "out = Path(sys.argv[1]); out.mkdir(parents=True)\n"
    "pq.write_table(raw.interactions, out / 'interactions.parquet')\n"
    "pq.write_table(raw.items, out / 'items.parquet')\n"
)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (a snapshot; processes may end meanwhile)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            queue += [int(c) for c in
                      Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except OSError:
            pass
    return found


def tree_pss_mb(pid: int) -> float:
    """The proportional set size of ``pid``'s tree, in MiB (shared pages counted once)."""
    total_kb = 0
    for process in descendants(pid):
        try:
            rollup = Path(f"/proc/{process}/smaps_rollup").read_text()
        except OSError:
            continue
        total_kb += next(int(line.split()[1]) for line in rollup.splitlines()
                         if line.startswith("Pss:"))
    return total_kb / 1024


def measure(name: str, argv: list[str], log: Path,
            during: Callable[[subprocess.Popen], None] | None = None) -> dict[str, Any]:
    """Runs ``argv`` (output to ``log``), calling ``during`` on it, and returns its wall
    seconds, return code and memory; raises if it failed (unless ``during`` stopped it)."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
    peak_pss = 0.0
    start = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, **LAUNCH_ENV})
        finished = threading.Event()

        def sample() -> None:
            nonlocal peak_pss
            while not finished.wait(1.0):
                peak_pss = max(peak_pss, tree_pss_mb(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if during is not None:
            during(process)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = returncode = os.waitstatus_to_exitcode(status)
        finished.set()
        sampler.join()
    seconds = time.perf_counter() - start
    if returncode != 0 and during is None:
        raise RuntimeError(f"{name} failed (rc {returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    print(f"  {seconds:,.0f} s, rc {returncode}", flush=True)
    shown = ("SYNTH" if arg == SYNTH else str(arg) for arg in argv[1:])
    return {"command": " ".join(shown), "wall_s": seconds,
            "returncode": returncode, "peak_rss_mb_largest_process": usage.ru_maxrss / 1024,
            "peak_pss_mb_tree": peak_pss}


def torchrun(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
            "-m", "morec_rec.jobs.cli", *args]


def last_step(log: Path) -> int:
    """The step of the last complete step record in a run's ``log.jsonl`` (0 if none)."""
    step = 0
    if log.exists():
        for line in log.read_text().splitlines():
            if line.endswith("}") and '"kind": "step"' in line:
                step = json.loads(line)["step"]
    return step


def kill_rank_zero_after_checkpoint(run: Path, steps: int, record: dict[str, Any]) -> Callable:
    """A ``during`` for :func:`measure`: SIGKILLs rank 0 of a torchrun launch once ``run``
    has saved a checkpoint and logged ``steps`` more steps; notes where in ``record``."""
    meta = run / "checkpoints" / "last" / "meta.json"

    def during(process: subprocess.Popen) -> None:
        while True:
            if process.poll() is not None:
                raise RuntimeError("the launch ended before the kill")
            try:
                saved = json.loads(meta.read_text())["progress"]["step"]
            except (OSError, ValueError, KeyError):
                saved = 0
            if saved > 0 and last_step(run / "log.jsonl") >= saved + steps:
                break
            time.sleep(0.5)
        record.update(checkpoint_step=saved, killed_after_step=last_step(run / "log.jsonl"))
        os.kill(rank_zero(process.pid), signal.SIGKILL)

    return during


def rank_zero(launcher: int) -> int:
    """The worker process with ``RANK=0`` among the launcher's children."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for child in map(int, children):
        if b"RANK=0" in Path(f"/proc/{child}/environ").read_bytes().split(b"\x00"):
            return child
    raise RuntimeError("no rank-0 worker among the launcher's children")


def code_version() -> str:
    """The checkout's commit, ``-dirty`` if tracked files have uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    changed = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if changed else "")


def stop_after(seconds: float) -> Callable[[subprocess.Popen], None]:
    """A ``during`` for :func:`measure`: SIGTERMs the launch after ``seconds``."""
    def during(process: subprocess.Popen) -> None:
        time.sleep(seconds)
        process.send_signal(signal.SIGTERM)
    return during


def steady_rate(log: Path) -> float:
    """The median samples/s of a run's step records after its first 20% of steps."""
    rates = [json.loads(line)["samples_per_s"] for line in log.read_text().splitlines()
             if line.endswith("}") and '"kind": "step"' in line]
    return float(np.median(rates[len(rates) // 5:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path,
                        help="a new directory for the data and runs (default: temporary)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--sasrec-seconds", type=float, default=240.0)
    parser.add_argument("--profile", default="xbox", help="the synthetic profile")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--kill-after-steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            parser.error(f"--work {work} is not empty")
        result = run_stages(work, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"job {result['job_wall_s'] / 60:.1f} min; MoRec Imp {result['imp']:.2%}, valid "
          f"{result['valid']}; restart equal: {result['restart']['morec_test_equal']}; "
          f"SASRec {result['sasrec']['epoch_hours']:.1f} h an epoch")


def run_stages(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    n, logs = args.nproc, work / "logs"
    raw, data, base = work / "raw", work / "data", work / "base"
    logs.mkdir()
    stages = {
        "synth": measure("synth", [sys.executable, "-c", SYNTH, str(raw), "0", args.profile],
                         logs / "synth.log"),
        "prepare": measure("prepare", [*CLI, "prepare", "--source", "generic", "--seed", "0",
                                       "--input", str(raw / "interactions.parquet"),
                                       "--meta", str(raw / "items.parquet"),
                                       "--out", str(data)], logs / "prepare.log"),
        "pretrain": measure("pretrain", torchrun(n, "train", "--data", str(data),
                                                 "--out", str(base), "--max-epochs",
                                                 str(args.pretrain_epochs)),
                            logs / "pretrain.log"),
        "job": measure("job", torchrun(n, "run", "--data", str(data), "--base", str(base),
                                       "--continued", "--out", str(work / "job")),
                       logs / "job.log"),
    }
    job = json.loads((work / "job" / "results.json").read_text())

    restart: dict[str, Any] = {}
    stages["restart"] = measure(
        "restart", torchrun(n, "run", "--data", str(data), "--base", str(base),
                            "--checkpoint-every", str(args.checkpoint_every),
                            "--out", str(work / "restart"), max_restarts=1),
        logs / "restart.log", during=kill_rank_zero_after_checkpoint(
            work / "restart" / "morec", args.kill_after_steps, restart))
    restarted = work / "restart" / "results.json"
    restart.update(
        returncode=stages["restart"]["returncode"],
        killed_workers=(logs / "restart.log").read_text().count("failed (exitcode: -9)"),
        morec_test=json.loads(restarted.read_text())["morec"] if restarted.exists() else None)
    restart["morec_test_equal"] = restart["morec_test"] == job["morec"]

    stages["sasrec"] = measure(
        "sasrec", torchrun(n, "train", "--model", "sasrec", "--data", str(data),
                           "--out", str(work / "sasrec")),
        logs / "sasrec.log", during=stop_after(args.sasrec_seconds))
    manifest = json.loads((data / "manifest.json").read_text())
    train_rows = manifest["num_interactions"]["train"]
    sasrec_rate = steady_rate(work / "sasrec" / "log.jsonl")
    base_epochs = sum('"kind": "epoch"' in line
                      for line in (base / "log.jsonl").read_text().splitlines())
    return {
        "profile": args.profile, "seed": 0, "nproc": n, "cpus": os.cpu_count(),
        "dataset": {"users": manifest["num_users"], "items": manifest["num_items"],
                    "interactions": manifest["num_interactions"]},
        "pretrain_max_epochs": args.pretrain_epochs, "pretrain_epochs": base_epochs,
        "stages": stages,
        "job_wall_s": sum(stages[s]["wall_s"] for s in ("synth", "prepare", "pretrain", "job")),
        "job_wall_s_by_part": job["wall_s"],
        "test": {name: job[name] for name in ("base", "continued", "morec")},
        "imp": job["imp"], "valid": job["valid"], "control": job["control"],
        "continued_versus_base": job["continued_versus_base"],
        "morec_versus_continued": job["morec_versus_continued"],
        "restart": restart,
        "sasrec": {"samples_per_s": sasrec_rate, "train_rows": train_rows,
                   "epoch_hours": train_rows / sasrec_rate / 3600},
        "code_version": code_version(), "environment": versions(),
    }


if __name__ == "__main__":
    main()
