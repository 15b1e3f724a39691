"""Named settings of ``morec-rec run`` from one base: runs them and records their test rows.

    python experiments/variants.py --experiment demo-fairness --data runs/demo/data \\
        --base runs/demo/base --runs runs/demo-fairness --table demo \\
        --variant 'default=' --variant 'fairness only=--objectives accuracy,fairness --preference 1'

Each ``--variant NAME=FLAGS`` is one ``morec-rec run --data D --base B --out RUNS/<i>
FLAGS`` (runs already finished are read, not rerun). Its test metrics, Imp over the base,
validity and, by a paired bootstrap over the test users against the base (``morec-rec
evaluate --against``), the change of min-Hit@10 with its 95% interval, go into table
``--table`` of ``experiments/<experiment>/results.json`` (replaced if there), with the
share of resamples in which min-Hit@10 is above the base's. With ``--timing`` each row
also gives the wall time of its MoRec stage and of that stage's validation passes (the
sum of their ``seconds`` in its log). With ``--trajectory`` the
validation metrics of every pass of every run go into table ``<table>_trajectory`` too
(``experiments/trajectory.py`` plots them). ``python experiments/tables.py`` then renders
the tables into the experiment's README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from records import (
    imp_cell,
    job_results,
    metric_columns,
    metric_row,
    morec_rec,
    record_tables,
    valid_cell,
)

COLUMNS = [
    {"key": "row", "label": "row", "format": "text"},
    {"key": "flags", "label": "flags", "format": "text"},
    *metric_columns(),
    {"key": "min_hit_diff", "label": "min-Hit − base's", "format": "sf4"},
    {"key": "min_hit_ci", "label": "95% interval", "format": "ci"},
    {"key": "min_hit_above", "label": "min-Hit above base's in resamples", "format": "gpct"},
    {"key": "imp", "label": "Imp vs base", "format": "imp2"},
    {"key": "valid", "label": "valid", "format": "text"},
]

TIMING_COLUMNS = [
    {"key": "morec_s", "label": "MoRec stage (s)", "format": "f1"},
    {"key": "validation_s", "label": "its validation passes (s)", "format": "f1"},
]


def _variant(args: argparse.Namespace, index: int, name: str, flags: str) -> dict[str, Any]:
    out = args.runs / str(index)
    results = job_results(out, "--data", str(args.data), "--base", str(args.base),
                          *flags.split())
    paired = json.loads(morec_rec("evaluate", "--run", str(out / "morec"), "--against",
                             str(args.base), "--json", "--resamples", str(args.resamples)))
    low, high = paired["interval"]["min_hit@10"]
    timing = {}
    if args.timing:
        timing = {"morec_s": results["wall_s"]["morec"],
                  "validation_s": sum(r["seconds"] for r in _evals(out))}
    return metric_row(name, results["morec"], flags=f"`{flags}`" if flags else "(defaults)",
                      min_hit_diff=paired["difference"]["min_hit@10"],
                      min_hit_ci={"low": low, "high": high, "decimals": 4},
                      min_hit_above=round(100 * paired["ahead"]["min_hit@10"], 1),
                      imp=imp_cell(results), valid=valid_cell(results), **timing)


TRAJECTORY_COLUMNS = [
    {"key": "row", "label": "row", "format": "text"},
    {"key": "step", "label": "step", "format": "text"},
    *metric_columns("valid"),
]


def _evals(out: Path) -> list[dict[str, Any]]:
    """The validation passes' records of the MoRec run under ``out``, in step order."""
    records = (json.loads(line) for line in (out / "morec" / "log.jsonl").open())
    return [r for r in records if r["kind"] == "eval" and r["split"] == "valid"]


def _trajectory(out: Path, name: str) -> list[dict[str, Any]]:
    """The validation metrics of each pass of the MoRec run under ``out``, in step order."""
    return [metric_row(name, record, step=record["step"]) for record in _evals(out)]


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
    parser.add_argument("--trajectory", action="store_true",
                        help="also record every validation pass of every run")
    parser.add_argument("--timing", action="store_true",
                        help="also record the MoRec stage's and its validation's wall time")
    args = parser.parse_args()
    rows, trajectory = [], []
    for index, variant in enumerate(args.variant):
        name, _, flags = variant.partition("=")
        rows.append(_variant(args, index, name, flags.strip()))
        if args.trajectory:
            trajectory += _trajectory(args.runs / str(index), name)
    base = json.loads((args.runs / "0" / "results.json").read_text())["base"]
    rows.insert(0, metric_row("base", base, flags=""))
    columns = COLUMNS + (TIMING_COLUMNS if args.timing else [])
    tables = {args.table: {"title": args.title, "columns": columns, "rows": rows}}
    if args.trajectory:
        tables[f"{args.table}_trajectory"] = {
            "title": "Validation metrics at each pass of each run", "columns": TRAJECTORY_COLUMNS,
            "rows": trajectory}
    record_tables(args.experiment, tables, Path(__file__).name)


if __name__ == "__main__":
    main()
