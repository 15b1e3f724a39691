"""The MoRec job on one CUDA device, per synthetic profile, as JSON.

    python benchmarks/gpu_check.py --out gpu_check.json [--profiles demo xbox] \\
        [--device cuda] [--batch-size 4096] [--num-workers 2] [--max-steps N]

Runs what a machine without TorchRec can run: the plain PyTorch path (the example job's
``nn.Embedding`` matrix factorisation, ``integration/example/torch_morec_job.py``, Adam)
with MoRec's loader, loss hook and validation rounds on the device, all four objectives,
validation control. Where ``torchrec`` imports, it says so in the JSON; the TorchRec path
is not run here. For each profile (generated with seed 0 into a temporary folder):

- **plain**: the same model, optimizer and batch size on random ids drawn on the device,
  no loader and no hook: the step's upper bound;
- **morec**: one epoch of MoRec (``--rounds`` validation rounds after the reference one,
  spread over the epoch), its training samples/s (validation time excluded, after 5
  warm-up steps) over the plain rate, and the validation rounds' users/s;
- **loader**: MoRec's loader drained for the next epoch with no training: the rate the
  loader workers (CPU) can feed;
- **test**: full-ranking evaluation of every test user, users/s and the metrics, and the
  same model's metrics evaluated on the CPU (``test_on_cpu``), which should agree;
- peak device memory and this process's peak resident memory;
- with ``--trace``, 50 more steps' profiler table, beside ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integration" / "example"))

from torch_morec_job import MF, make_batch  # noqa: E402

from morec_rec import MoRec, MoRecConfig, SamplerConfig  # noqa: E402
from morec_rec.jobs.cli import main as cli  # noqa: E402
from morec_rec.plugin.eval.ranking import evaluate, load_task  # noqa: E402

WARMUP = 5


class Clock:
    """Wall seconds with the device's queued work finished at each reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def plain_rate(num_users: int, num_items: int, batch_size: int, steps: int,
               device: torch.device) -> float:
    """Samples/s of the model's step on uniformly random ids, after ``WARMUP`` steps."""
    torch.manual_seed(0)
    model = MF(num_users, num_items).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    clock = Clock(device)

    def step() -> None:
        batch = {name: torch.randint(size, (batch_size,), device=device)
                 for name, size in (("user", num_users), ("item", num_items),
                                    ("negative", num_items))}
        loss, _ = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP):
        step()
    started = clock()
    for _ in range(steps):
        step()
    return steps * batch_size / (clock() - started)


def train_step(hook: Any, optimizer: torch.optim.Optimizer, batch: Any,
               device: torch.device) -> None:
    """One step of the job's loop: the batch to the device, the hook's loss, Adam."""
    loss, _ = hook(batch.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def morec_epoch(data: Path, manifest: dict[str, Any], args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    """One epoch of MoRec, then the loader alone for the next, then the test split."""
    torch.manual_seed(0)
    model = MF(manifest["num_users"], manifest["num_items"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def scores(users):  # on the model's device, wherever that is
        items = model.item.weight
        return model.user(torch.as_tensor(users.user_id, device=items.device)) @ items.T

    morec = MoRec(data, lambda rows: make_batch(rows.user_id, rows.item_id,
                                                manifest["num_items"], seed=rows.batch_index),
                  rows=lambda batch, margin: torch.nn.functional.softplus(-margin),
                  scorer=scores, sampler=SamplerConfig(sub_batch_size=args.batch_size // 4),
                  config=MoRecConfig(), num_workers=args.num_workers,
                  pin_memory=args.pin_memory, device=device, chunk_users=args.chunk_users)
    clock = Clock(device)
    hook = morec.loss(model)
    validation_s: list[float] = []

    def validate() -> dict[str, Any]:
        started = clock()
        record = morec.validate(model)
        validation_s.append(clock() - started)
        return record

    reference = validate()
    morec.set_epoch(0)
    steps = min(morec.loader.batches_per_epoch, args.max_steps or sys.maxsize)
    if steps <= WARMUP:
        raise SystemExit(f"{data.name}: {steps} steps an epoch at batch size "
                         f"{args.batch_size}; the timing needs more than {WARMUP}")
    train_s, step, started = 0.0, 0, None
    for step, batch in enumerate(morec.loader, start=1):
        train_step(hook, optimizer, batch, device)
        if step == WARMUP:
            started = clock()
        if step * args.rounds // steps > (step - 1) * args.rounds // steps:  # evenly spread
            if started is not None:
                train_s += clock() - started
            record = validate()
            started = clock()
        if step == steps:
            break
    batch_size = morec.loader.sampler.batch_size
    rows_per_s = (step - WARMUP) * batch_size / train_s

    morec.set_epoch(1)
    started, drained = time.perf_counter(), 0
    for drained, _ in enumerate(morec.loader, start=1):
        if drained == steps:
            break
    loader_rows_per_s = drained * batch_size / (time.perf_counter() - started)

    if args.trace:
        trace(morec, hook, optimizer, device,
              args.out.with_suffix(f".{data.name}.trace.txt"))
    task = load_task(morec.dataset, "test")
    model.eval()
    with torch.no_grad():
        started = clock()
        test = evaluate(scores, task, chunk_users=args.chunk_users)
        test_s = clock() - started
        model.cpu()
        test_on_cpu = evaluate(scores, task, chunk_users=args.chunk_users)
    return {
        "batch_size": batch_size, "steps": step, "batches_per_epoch":
        morec.loader.batches_per_epoch, "train_samples_per_s": rows_per_s,
        "validation_rounds": len(validation_s),
        "validation_users_per_s": len(morec.dataset.split("valid")) * len(validation_s)
        / sum(validation_s),
        "loader_rows_per_s": loader_rows_per_s,
        "test_users": len(task), "test_users_per_s": len(task) / test_s,
        "objective_losses": morec.objective_losses(),
        "validation": {"reference": reference["metrics"], "last": record["metrics"],
                       "last_coefficients": record["coefficients"]},
        "test": test.as_dict(), "test_on_cpu": test_on_cpu.as_dict(),
    }


def trace(morec: MoRec, hook: Any, optimizer: torch.optim.Optimizer, device: torch.device,
          out: Path, steps: int = 50) -> None:
    """``steps`` training steps of the next epoch under ``torch.profiler``: the operators'
    table, by self CPU time, written to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    morec.set_epoch(2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for step, batch in enumerate(morec.loader, start=1):
            train_step(hook, optimizer, batch, device)
            if step == steps:
                break
        Clock(device)()
    out.write_text(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


def check_profile(profile: str, args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp()) / profile
    started = time.perf_counter()
    if cli(["synth", "--profile", profile, "--seed", "0", "--out", str(data)]) != 0:
        raise SystemExit(f"synth --profile {profile} failed")
    synth_s = time.perf_counter() - started
    manifest = json.loads((data / "manifest.json").read_text())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plain = plain_rate(manifest["num_users"], manifest["num_items"], args.batch_size,
                       args.plain_steps, device)
    morec = morec_epoch(data, manifest, args, device)
    return {
        "profile": profile, "users": manifest["num_users"], "items": manifest["num_items"],
        "synth_and_prepare_s": synth_s, "plain_samples_per_s": plain,
        "morec_over_plain": morec["train_samples_per_s"] / plain, "morec": morec,
        "peak_device_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                           if device.type == "cuda" else None),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profiles", nargs="+", default=["demo", "xbox"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="the loader pins its batches (MoRec's pin_memory=)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="validation rounds in the epoch, after the reference one")
    parser.add_argument("--chunk-users", type=int, default=4096)
    parser.add_argument("--plain-steps", type=int, default=200)
    parser.add_argument("--trace", action="store_true",
                        help="also write 50 steps' profiler table (OUT.PROFILE.trace.txt)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop the epoch after this many steps (a quick check)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    environment = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "torchrec_importable": importlib.util.find_spec("torchrec") is not None,
        "path": "plain PyTorch (nn.Embedding MF, Adam) with MoRec's loader, hook and "
                "validation", "batch_size": args.batch_size, "num_workers": args.num_workers,
        "pin_memory": args.pin_memory,
        "max_steps": args.max_steps}
    results: list[dict[str, Any]] = []
    for profile in args.profiles:
        results.append(check_profile(profile, args, device))
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # Written as each profile ends, so a run stopped at its time limit keeps the rest.
        args.out.write_text(json.dumps({**environment, "peak_rss_mb": peak_rss_mb,
                                        "results": results}, indent=2) + "\n")
        print(json.dumps(results[-1], indent=2), flush=True)

if __name__ == "__main__":
    main()
