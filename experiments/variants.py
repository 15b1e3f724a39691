"""Named settings of ``morec-rec run`` from one base: runs them and records their test rows.

    python experiments/variants.py --experiment demo-fairness --data runs/demo/data \\
        --base runs/demo/base --runs runs/demo-fairness --table demo \\
        --variant 'default=' --variant 'fairness only=--objectives accuracy,fairness --preference 1'

Each ``--variant NAME=FLAGS`` is one ``morec-rec run --data D --base B --out RUNS/<i>
FLAGS`` (runs already finished are read, not rerun). Its test metrics, Imp over the base,
validity and, by a paired bootstrap over the test users against the base (``morec-rec
evaluate --against``), the change of min-Hit@10 with its 95% interval, go into table
``--table`` of ``experiments/<experiment>/results.json`` (replaced if there).
``python experiments/tables.py`` then renders it into the experiment's README.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
COLUMNS = [
    {"key": "row", "label": "row", "format": "text"},
    {"key": "flags", "label": "flags", "format": "text"},
    {"key": "hit", "label": "test Hit@10", "format": "f4"},
    {"key": "rhit", "label": "rHit@10", "format": "f3"},
    {"key": "pop_kl", "label": "Pop-KL@10", "format": "f4"},
    {"key": "min_hit", "label": "min-Hit@10", "format": "f4"},
    {"key": "min_hit_diff", "label": "min-Hit − base's", "format": "sf4"},
    {"key": "min_hit_ci", "label": "95% interval", "format": "ci"},
    {"key": "imp", "label": "Imp vs base", "format": "imp2"},
    {"key": "valid", "label": "valid", "format": "text"},
]


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "morec_rec.jobs.cli", *args],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"morec-rec {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _variant(args: argparse.Namespace, index: int, name: str, flags: str) -> dict[str, Any]:
    out = args.runs / str(index)
    if not (out / "results.json").is_file():
        _cli("run", "--data", str(args.data), "--base", str(args.base), "--out", str(out),
             *flags.split())
        print(f"ran {name}: {out}", flush=True)
    results = json.loads((out / "results.json").read_text())
    paired = json.loads(_cli("evaluate", "--run", str(out / "morec"), "--against",
                             str(args.base), "--json", "--resamples", str(args.resamples)))
    low, high = paired["interval"]["min_hit@10"]
    metrics = results["morec"]
    return {"row": name, "flags": f"`{flags}`" if flags else "(defaults)",
            "hit": metrics["hit@10"], "rhit": metrics["rhit@10"],
            "pop_kl": metrics["pop_kl@10"], "min_hit": metrics["min_hit@10"],
            "min_hit_diff": paired["difference"]["min_hit@10"],
            "min_hit_ci": {"low": low, "high": high, "decimals": 4},
            "imp": {"pct": 100 * results["imp"]}, "valid": "yes" if results["valid"] else "no"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--title", default="Each setting's MoRec run on test, from one base")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS")
    args = parser.parse_args()
    rows = []
    for index, variant in enumerate(args.variant):
        name, _, flags = variant.partition("=")
        rows.append(_variant(args, index, name, flags.strip()))
    base = json.loads((args.runs / "0" / "results.json").read_text())["base"]
    rows.insert(0, {"row": "base", "flags": "", "hit": base["hit@10"], "rhit": base["rhit@10"],
                    "pop_kl": base["pop_kl@10"], "min_hit": base["min_hit@10"]})
    path = ROOT / args.experiment / "results.json"
    record = json.loads(path.read_text())
    version = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT).stdout.strip()
    record["tables"][args.table] = {"title": args.title, "code_version": version,
                                    "columns": COLUMNS, "rows": rows}
    record["code_version"] = version
    record["source"] = (f"run at {version}: python experiments/{Path(__file__).name} "
                        + shlex.join(sys.argv[1:]))
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
