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
from pathlib import Path
from typing import Any

from records import metric_row, morec_rec, record_tables

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


def _variant(args: argparse.Namespace, index: int, name: str, flags: str) -> dict[str, Any]:
    out = args.runs / str(index)
    if not (out / "results.json").is_file():
        morec_rec("run", "--data", str(args.data), "--base", str(args.base), "--out", str(out),
             *flags.split())
        print(f"ran {name}: {out}", flush=True)
    results = json.loads((out / "results.json").read_text())
    paired = json.loads(morec_rec("evaluate", "--run", str(out / "morec"), "--against",
                             str(args.base), "--json", "--resamples", str(args.resamples)))
    low, high = paired["interval"]["min_hit@10"]
    return metric_row(name, results["morec"], flags=f"`{flags}`" if flags else "(defaults)",
                      min_hit_diff=paired["difference"]["min_hit@10"],
                      min_hit_ci={"low": low, "high": high, "decimals": 4},
                      imp={"pct": 100 * results["imp"]},
                      valid="yes" if results["valid"] else "no")


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
    rows.insert(0, metric_row("base", base, flags=""))
    record_tables(args.experiment, {args.table: {"title": args.title, "columns": COLUMNS,
                                                 "rows": rows}}, Path(__file__).name)

if __name__ == "__main__":
    main()
