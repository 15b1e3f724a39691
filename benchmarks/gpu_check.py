"""The MoRec job on one CUDA device: training samples/s and evaluation users/s, as JSON.

    python benchmarks/gpu_check.py --out gpu_check.json [--profile demo] [--device cuda]

Runs what a machine without TorchRec can run: the plain PyTorch path (the example job's
``nn.Embedding`` matrix factorisation, ``integration/example/torch_morec_job.py``) with
MoRec's loader, loss hook and validation round on the device, all four objectives,
validation control. Where ``torchrec`` imports, it says so in the JSON; the TorchRec path
is not run here. One epoch of a synthetic profile (prepared into a temporary folder),
timed after a warm-up; then one validation round over every validation user.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integration" / "example"))

from torch_morec_job import MF, make_batch  # noqa: E402

from morec_rec import MoRec, MoRecConfig, SamplerConfig  # noqa: E402
from morec_rec.jobs.cli import main as cli  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = Path(tempfile.mkdtemp()) / "data"
    assert cli(["synth", "--profile", args.profile, "--seed", "0", "--out", str(data)]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    torch.manual_seed(0)
    model = MF(manifest["num_users"], manifest["num_items"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def scores(users):
        user = model.user(torch.as_tensor(users.user_id, device=device))
        return user @ model.item.weight.T

    morec = MoRec(data, lambda rows: make_batch(rows.user_id, rows.item_id,
                                                manifest["num_items"], seed=rows.batch_index),
                  rows=lambda batch, margin: torch.nn.functional.softplus(-margin),
                  scorer=scores, sampler=SamplerConfig(sub_batch_size=args.batch_size // 4),
                  config=MoRecConfig(), num_workers=1, device=device, chunk_users=4096)
    hook = morec.loss(model)
    morec.validate(model)  # the reference pass
    morec.set_epoch(0)
    steps, started = 0, None
    for batch in morec.loader:
        loss, _ = hook(batch.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps == 5:  # warm-up done
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - started
    timed_rows = (steps - 5) * morec.loader.sampler.batch_size
    started = time.perf_counter()
    record = morec.validate(model)
    validate_s = time.perf_counter() - started
    users = len(morec.dataset.split("valid"))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "torchrec_importable": importlib.util.find_spec("torchrec") is not None,
        "path": "plain PyTorch (nn.Embedding MF) with MoRec's loader, hook and validation",
        "profile": args.profile, "batch_size": morec.loader.sampler.batch_size,
        "steps": steps, "train_samples_per_s": timed_rows / train_s,
        "validation_users_per_s": users / validate_s, "validation_s": validate_s,
        "objective_losses": morec.objective_losses(), "last_validation": record["metrics"],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
