"""MoRec's ablation (the paper's Fig. 4): its data sampler, and its coordinator, replaced.

    python experiments/ablation.py --experiment demo-ablation --data runs/demo/data \\
        --base runs/demo/base --runs runs/demo-ablation [--seed 0]

Two two-objective scenarios, accuracy with revenue and accuracy with fairness (each
``morec-rec run --objectives accuracy,<o> --preference 1``). In each, every method of
:data:`METHODS` continues the base once per solution: λ of :data:`SCALES`, the weight of
the objective beside accuracy, or, for MGDA, which takes none, a seed of the continuation
(``seed + 100·i``). The methods: MoRec; MoRec with the paper's loss coefficients; MoRec
without its data sampler (the objectives' loss forms on uniform batches, weighted by
MoRec's controlled coefficients); and MoRec with each baseline as its coordinator (the
baseline's weights over MoRec's sub-batches' mean losses). Every solution's test metrics,
Imp over the base and validity go into table ``<scenario>`` of
``experiments/<experiment>/results.json``; ``python experiments/frontier.py --table
<scenario> --x rhit`` (or ``--x min_hit``) plots them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from records import (
    imp_cell,
    job_results,
    metric_columns,
    metric_row,
    record_tables,
    solution_seed,
    valid_cell,
)

#: The objective beside accuracy in each scenario (also the scenario's table name).
OBJECTIVES = ("revenue", "fairness")
#: Method -> its flags of ``morec-rec run``.
METHODS = {
    "MoRec": [],
    "MoRec, loss coefficients": ["--coefficients", "loss"],
    "MoRec w/o DS": ["--coefficients", "loss_forms"],
    "MoRec-OC-static": ["--coordinator", "static", "--coefficients", "loss"],
    "MoRec-OC-MGDA": ["--coordinator", "mgda", "--coefficients", "loss"],
    "MoRec-OC-PE-MTL": ["--coordinator", "pe-mtl", "--coefficients", "loss"],
    "MoRec-OC-EPO": ["--coordinator", "epo", "--coefficients", "loss"],
}
#: Methods that take no weight: their solutions differ by seed.
WEIGHT_FREE = ("MoRec-OC-MGDA",)
#: λ: the weight of the objective beside accuracy (accuracy's is 1, or MoRec's β).
SCALES = (0.25, 1.0, 4.0)
COLUMNS = [
    {"key": "row", "label": "method", "format": "text"},
    {"key": "solution", "label": "λ or seed", "format": "text"},
    *metric_columns(),
    {"key": "imp", "label": "Imp vs base", "format": "imp2"},
    {"key": "valid", "label": "valid on test", "format": "text"},
]


def _solution(args: argparse.Namespace, objective: str, method: str,
              index: int) -> tuple[dict[str, Any], dict[str, float]]:
    """The test row of one solution (run if not there yet), and the base's metrics."""
    slug = method.lower().replace(", ", "-").replace(" ", "-").replace("/", "")
    out = args.runs / objective / f"{slug}-{index}"
    if method in WEIGHT_FREE:
        seed = solution_seed(args.seed, index)
        choice, label = ["--seed", str(seed)], f"seed {seed}"
    else:
        choice = ["--seed", str(args.seed), "--scale", str(SCALES[index])]
        label = f"λ {SCALES[index]:g}"
    results = job_results(out, "--data", str(args.data), "--base", str(args.base),
                          "--objectives", f"accuracy,{objective}", "--preference", "1", *choice,
                          *METHODS[method])
    return metric_row(method, results["morec"], solution=label, imp=imp_cell(results),
                      valid=valid_cell(results)), results["base"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tables = {}
    for objective in OBJECTIVES:
        rows, base = [], {}
        for method in METHODS:
            for index in range(len(SCALES)):
                row, base = _solution(args, objective, method, index)
                rows.append(row)
        tables[objective] = {
            "title": f"Accuracy and {objective}: every solution of every method on test",
            "columns": COLUMNS, "rows": [metric_row("base", base, solution=""), *rows]}
    record_tables(args.experiment, tables, Path(__file__).name)


if __name__ == "__main__":
    main()
