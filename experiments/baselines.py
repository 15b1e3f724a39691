"""MoRec against continued training and the baseline coordinators: runs and records them.

    python experiments/baselines.py --experiment tafeng-mf-baselines --data data/tafeng \\
        --base runs/tafeng-mf-s0 --seed 0 --runs runs/tafeng-mf-baselines [--resamples 1000] \\
        [--resolved hit rhit pop_kl]

For one base (one seed), every coordinator (``static``, ``mgda``, ``pe-mtl``, ``epo``,
``morec``) continues the base once per preference of :data:`PREFERENCES` (its solutions),
with ``morec-rec run``; a coordinator that takes no preference (MGDA) gets as many
solutions from as many seeds of the continuation instead. The first MoRec run also trains
plain continued training (``--continued``). Runs already finished under ``--runs`` are
read, not rerun; interrupted ones are resumed; finished ones are kept in the record's
``runs.json`` (:class:`records.RunCache`), so a later session with the same base (retrained
from the same seed) goes on where this one stopped. A method's reported solution is chosen on
validation only: among the solutions whose selected pass is valid on validation, the one
with the highest validation Imp (else the highest validation Hit). Its test metrics, test
Imp over the base and test validity go into ``experiments/<experiment>/results.json`` (one
table per seed, rows added or replaced), with paired bootstraps over the test users
(``morec-rec evaluate --against``) of MoRec's solution against continued training and
against every baseline's chosen solution (the best of them on validation marked): Imp
over the four terms, and over the ``--resolved`` ones where the test set cannot resolve
them all (on Ta-Feng min-Hit is 0–3 users: a term that comes and goes with the
resample); an Imp that the resamples leave fewer terms names those it is over. ``python
experiments/tables.py`` then renders the tables into the experiment's README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from records import (
    RunCache,
    imp_cell,
    metric_columns,
    metric_row,
    morec_rec,
    record_tables,
    solution_seed,
    valid_cell,
)

from morec_rec.plugin.eval.metrics import METRICS

COORDINATORS = ("static", "mgda", "pe-mtl", "epo", "morec")
#: Coordinators that take no preference: their solutions differ by the run's seed instead
#: (:func:`records.solution_seed`).
PREFERENCE_FREE = ("mgda",)
#: p over (revenue, fairness, alignment): the default, near-uniform, each objective
#: dominant, and a milder revenue lead. Every entry > 0 (Pareto MTL and EPO need it).
PREFERENCES = ((0.4, 0.3, 0.3), (0.34, 0.33, 0.33), (0.8, 0.1, 0.1), (0.1, 0.8, 0.1),
               (0.1, 0.1, 0.8), (0.6, 0.2, 0.2))
COLUMNS = [
    {"key": "row", "label": "row", "format": "text"},
    {"key": "preference", "label": "p (rev, fair, align) or seed", "format": "text"},
    *metric_columns(),
    {"key": "imp", "label": "Imp vs base", "format": "imp2"},
    {"key": "valid", "label": "valid on test", "format": "text"},
    {"key": "solutions_valid", "label": "solutions valid on validation", "format": "text"},
]
BOOTSTRAP_COLUMNS = [
    {"key": "a", "label": "A", "format": "text"},
    {"key": "b", "label": "B", "format": "text"},
    {"key": "imp_pct", "label": "Imp of A over B", "format": "imp2"},
    {"key": "imp_ci", "label": "95% interval", "format": "ci"},
    {"key": "ahead_pct", "label": "A ahead (Imp > 0) in resamples", "format": "gpct"},
]


def bootstrap_columns(resolved: tuple[str, ...]) -> list[dict[str, str]]:
    """The bootstrap table's columns: Imp over the four terms, and again over the
    ``resolved`` ones where they are fewer."""
    if set(resolved) == set(METRICS):
        return BOOTSTRAP_COLUMNS
    over = ", ".join(resolved)
    return BOOTSTRAP_COLUMNS + [
        {"key": "resolved_imp_pct", "label": f"Imp over {over}", "format": "imp2"},
        {"key": "resolved_imp_ci", "label": "95% interval", "format": "ci"},
        {"key": "resolved_ahead_pct", "label": "A ahead in resamples", "format": "gpct"}]


def _run(args: argparse.Namespace, cache: RunCache, coordinator: str, index: int,
         folder: bool = False) -> dict[str, Any]:
    """The results.json of one solution (:meth:`records.RunCache.results`), with its folder."""
    key = f"s{args.seed}/{coordinator}-p{index}"
    if coordinator in PREFERENCE_FREE:
        choice = ["--seed", str(solution_seed(args.seed, index))]
    else:
        choice = ["--seed", str(args.seed), "--preference", ",".join(map(str, PREFERENCES[index]))]
    continued = ["--continued"] if coordinator == "morec" and index == 0 else []
    out = args.runs / key
    return {"out": out, "index": index,
            **cache.results(key, out, "--data", str(args.data), "--base", str(args.base),
                            "--coordinator", coordinator, *choice, *continued, *args.flags,
                            folder=folder)}


def _solution(coordinator: str, seed: int, index: int) -> str:
    """What solution ``index`` of ``coordinator`` varies: its preference, or its seed."""
    if coordinator in PREFERENCE_FREE:
        return f"seed {solution_seed(seed, index)}"
    return str(PREFERENCES[index])


def _choose(solutions: list[dict[str, Any]]) -> dict[str, Any]:
    """The solution chosen on validation: valid there with the best Imp, else best Hit."""
    return max(solutions, key=_validation_key)


def _bootstrap(a: Path, b: Path, resamples: int, a_name: str, b_name: str,
               resolved: tuple[str, ...]) -> dict[str, Any]:
    """MoRec's run ``a`` against ``b``: Imp over the four terms, and over ``resolved``
    (``resolved_``-prefixed keys) where those are fewer; each Imp over fewer terms than
    asked (the resamples leaving some undefined) names those it is over."""
    row = {"a": a_name, "b": b_name}
    for prefix, terms in (("", METRICS), ("resolved_", resolved)):
        if prefix and set(terms) == set(METRICS):
            break
        result = json.loads(morec_rec("evaluate", "--run", str(a), "--against", str(b),
                                      "--json", "--resamples", str(resamples),
                                      "--imp-over", ",".join(terms)))
        low, high = result["imp_interval"]
        imp = {"pct": 100 * result["imp"]}
        if len(result["imp_over"]) < len(terms):
            imp["note"] = f"over {', '.join(result['imp_over'])}"
        row.update({f"{prefix}imp_pct": imp,
                    f"{prefix}imp_ci": {"low": 100 * low, "high": 100 * high, "decimals": 2,
                                        "unit": "%"},
                    f"{prefix}ahead_pct": round(100 * result["imp_positive"], 1)})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--resolved", nargs="+", choices=METRICS, default=METRICS,
                        help="the Imp terms the test set resolves: the bootstraps report Imp "
                             "over these too (min-Hit is 0-3 users on Ta-Feng)")
    parser.add_argument("--only", nargs="+", choices=COORDINATORS,
                        help="run (or keep) only these coordinators' solutions and record no "
                             "tables: a second driver can run the others beside it")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="further morec-rec run flags, the same for every run")
    args = parser.parse_args()

    base = json.loads(morec_rec("evaluate", "--run", str(args.base), "--split", "test",
                                "--json"))
    cache = RunCache(args.experiment, {k: v for k, v in base.items()
                                       if k not in ("model", "split", "users")})
    solutions = {c: [_run(args, cache, c, i) for i in range(len(PREFERENCES))]
                 for c in args.only or COORDINATORS}
    if args.only:
        return
    first = solutions["morec"][0]
    versus = first["continued_versus_base"]
    rows = [metric_row("base", first["base"]),
            metric_row("continued", first["continued"], imp=imp_cell(versus),
                       valid=valid_cell(versus))]
    chosen = {}
    for coordinator, runs in solutions.items():
        best = chosen[coordinator] = _choose(runs)
        index = runs.index(best)
        valid = sum(r["selected"]["morec"]["valid"] for r in runs)
        rows.append(metric_row(coordinator, best["morec"],
                               preference=_solution(coordinator, args.seed, index),
                         imp=imp_cell(best), valid=valid_cell(best),
                         solutions_valid=f"{valid}/{len(runs)}"))
    baselines = [c for c in COORDINATORS if c != "morec"]
    best_baseline = max(baselines, key=lambda c: _validation_key(chosen[c]))
    # The bootstraps read the runs' checkpoints: a run kept only in runs.json is rerun.
    folders = {c: _run(args, cache, c, chosen[c]["index"], folder=True)["out"]
               for c in COORDINATORS}
    morec_run, resolved = folders["morec"] / "morec", tuple(args.resolved)
    bootstrap = [_bootstrap(morec_run, _run(args, cache, "morec", 0, folder=True)["out"]
                            / "continued", args.resamples, "MoRec", "continued", resolved)]
    bootstrap += [_bootstrap(morec_run, folders[c] / "morec", args.resamples, "MoRec",
                             c + (" (best baseline on validation)" if c == best_baseline
                                  else ""), resolved)
                  for c in baselines]
    every = rows[:2] + [metric_row(c, r["morec"], preference=_solution(c, args.seed, i),
                                   imp=imp_cell(r), valid=valid_cell(r))
                        for c, runs in solutions.items() for i, r in enumerate(runs)]
    record_tables(args.experiment, {
        f"seed{args.seed}": {"title": f"Seed {args.seed}: each method's solution chosen on "
                                      "validation", "columns": COLUMNS, "rows": rows},
        f"seed{args.seed}_bootstrap": {"title": f"Seed {args.seed}: paired bootstrap over the "
                                                "test users",
                                       "columns": bootstrap_columns(resolved), "rows": bootstrap},
        f"seed{args.seed}_solutions": {"title": f"Seed {args.seed}: every solution on test",
                                       "columns": COLUMNS[:-1], "rows": every},
    }, Path(__file__).name)


def _validation_key(solution: dict[str, Any]) -> tuple[float, float]:
    """Valid on validation first, then the validation Imp (else the validation Hit)."""
    selected = solution["selected"]["morec"]
    return ((1.0, selected["imp"] or 0.0) if selected["valid"] else (0.0, selected["hit@10"]))


if __name__ == "__main__":
    main()
