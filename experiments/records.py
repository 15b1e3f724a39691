"""What the experiment drivers share: running ``morec-rec``, keeping finished runs,
writing tables into a record, and reading them back for the figures.

A record is ``experiments/<name>/results.json`` (see ``tables.py`` for its tables); a
record whose runs take longer than one machine session also keeps ``runs.json``
(:class:`RunCache`).
"""

from __future__ import annotations

import fcntl
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from morec_rec.jobs.job import JOB, RESULTS

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


class RunCache:
    """Finished runs' ``results.json``, kept in the record (``experiments/<name>/runs.json``)
    so that a later session, on a fresh machine, reuses them rather than rerunning them.

    An entry is reused only for the same flags and the same base: the base's test metrics
    that the run recorded must equal ``base_metrics``, those of the base at hand. A base
    retrained from the same seed reproduces them exactly where training is deterministic
    (one process, the same threads, the same kind of machine); anywhere else no entry
    matches and every run is rerun. A run whose folder is needed (``folder=True``: a
    paired bootstrap reads its checkpoint) is rerun if only its entry is here, and must
    reproduce the entry's test metrics.
    """

    def __init__(self, experiment: str, base_metrics: Mapping[str, float]) -> None:
        self.path = ROOT / experiment / "runs.json"
        self.base_metrics = base_metrics
        self.entries: dict[str, Any] = (json.loads(self.path.read_text())
                                        if self.path.is_file() else {})

    def results(self, key: str, out: Path, *flags: str, folder: bool = False
                ) -> dict[str, Any]:
        """The results of run ``key`` (``morec-rec run --out OUT FLAGS``): its folder's if
        it has them, else its matching entry's (unless ``folder``), else run (or resumed)."""
        entry = self.entries.get(key)
        matches = (entry is not None and entry["flags"] == list(flags)
                   and same_metrics(entry["results"]["base"], self.base_metrics))
        if matches and not folder and not (out / RESULTS).is_file() and not (out / JOB).is_file():
            return entry["results"]
        results = job_results(out, *flags)
        if matches and not all(same_metrics(entry["results"][name], results[name])
                               for name in ("base", "morec", "continued") if name in results):
            raise SystemExit(f"{out} did not reproduce the test metrics {self.path} holds for "
                             f"{key}: is training deterministic on this machine?")
        self.entries[key] = {"flags": list(flags), "results": results}
        self._save(key)
        return results

    def _save(self, key: str) -> None:
        """Writes entry ``key`` into the file, keeping what other drivers wrote meanwhile."""
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = json.loads(self.path.read_text()) if self.path.is_file() else {}
            entries[key] = self.entries[key]
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
            partial.replace(self.path)


def same_metrics(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Equal metrics, up to float round-off in their sums."""
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9) for k in a)


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
    record = (json.loads(path.read_text()) if path.is_file() else
              {"experiment": experiment, "question": _question(experiment), "tables": {}})
    version = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT).stdout.strip()
    for table in tables.values():
        table["code_version"] = version
    record["tables"].update(tables)
    record["code_version"] = version
    record["source"] = f"run at {version}: python experiments/{script} " + shlex.join(
        sys.argv[1:])
    path.write_text(json.dumps(record, indent=1) + "\n")


def _question(experiment: str) -> str:
    """The question a record's README asks: its first paragraph after the title."""
    paragraphs = (ROOT / experiment / "README.md").read_text().split("\n\n")
    return " ".join(paragraphs[1].split())


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
