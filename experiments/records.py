"""What the experiment drivers share: running ``morec-rec``, writing tables into a record,
and reading them back for the figures.

A record is ``experiments/<name>/results.json`` (see ``tables.py`` for its tables).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from morec_rec.jobs.job import JOB

ROOT = Path(__file__).resolve().parent


def morec_rec(*args: str) -> str:
    """``morec-rec ARGS``' standard output; exits naming the command if it fails."""
    done = subprocess.run([sys.executable, "-m", "morec_rec.jobs.cli", *args],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"morec-rec {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def job_results(out: Path, *flags: str) -> dict[str, Any]:
    """``OUT/results.json`` of the job ``morec-rec run --out OUT FLAGS``: read if the job
    finished, resumed if it was interrupted (its ``job.json`` is there), else run."""
    results = out / "results.json"
    if not results.is_file():
        if (out / JOB).is_file():
            morec_rec("run", "--out", str(out), "--resume")
            print(f"resumed {out}", flush=True)
        else:
            morec_rec("run", "--out", str(out), *flags)
            print(f"ran {out}", flush=True)
    return json.loads(results.read_text())


def metric_row(name: str, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
    """A table row of the four test metrics (``hit``, ``rhit``, ``pop_kl``, ``min_hit``)."""
    return {"row": name, "hit": metrics["hit@10"], "rhit": metrics["rhit@10"],
            "pop_kl": metrics["pop_kl@10"], "min_hit": metrics["min_hit@10"], **extra}


def metric_columns(split: str = "test") -> list[dict[str, str]]:
    """The columns of :func:`metric_row`'s four metrics, Hit labelled with ``split``."""
    return [{"key": "hit", "label": f"{split} Hit@10", "format": "f4"},
            {"key": "rhit", "label": "rHit@10", "format": "f3"},
            {"key": "pop_kl", "label": "Pop-KL@10", "format": "f4"},
            {"key": "min_hit", "label": "min-Hit@10", "format": "f4"}]


#: Solution ``i`` of a method that takes no preference runs with seed ``s + SEED_STRIDE·i``
#: (``s`` the base's seed).
SEED_STRIDE = 100


def solution_seed(seed: int, index: int) -> int:
    return seed + SEED_STRIDE * index


def imp_cell(result: dict[str, Any]) -> dict[str, Any]:
    """A run's Imp over the base in percent (from a ``results.json`` or one of its
    ``*_versus_base`` entries), marked where a base metric of 0 leaves it over the
    defined terms only."""
    return {"pct": 100 * result["imp"], "defined_terms_only": bool(result["imp_undefined"])}


def valid_cell(result: dict[str, Any]) -> str:
    return "yes" if result["valid"] else "no"


def record_tables(experiment: str, tables: dict[str, Any], script: str) -> None:
    """Adds (or replaces) ``tables`` in the record, stamped with the commit they ran at and
    the command line of ``script`` (the driver's file name)."""
    path = ROOT / experiment / "results.json"
    record = json.loads(path.read_text())
    version = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT).stdout.strip()
    for table in tables.values():
        table["code_version"] = version
    record["tables"].update(tables)
    record["code_version"] = version
    record["source"] = f"run at {version}: python experiments/{script} " + shlex.join(
        sys.argv[1:])
    path.write_text(json.dumps(record, indent=1) + "\n")


def read_table(experiment: str, table: str) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """A recorded table's title (prefixed with the experiment) and its rows by ``row``
    name, in order."""
    recorded = json.loads((ROOT / experiment / "results.json").read_text())["tables"][table]
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in recorded["rows"]:
        rows.setdefault(row["row"], []).append(row)
    return f"{experiment}: {recorded['title']}", rows


def save_figure(figure: Any, title: str, path: Path) -> None:
    """Titles, lays out and writes a matplotlib figure (PNG, 110 dpi)."""
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")
