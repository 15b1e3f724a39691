"""The experiment records under experiments/: every committed table is what its JSON gives."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "experiments"
RECORDS = sorted(p.parent for p in ROOT.glob("*/results.json"))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_changes_nothing(tmp_path):
    copy = tmp_path / "experiments"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = _snapshot(copy)
    done = subprocess.run([sys.executable, str(copy / "tables.py"), "--root", str(copy)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = _snapshot(copy)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"generated files out of date: {changed} (run `make tables`)"


def test_records_are_complete():
    names = {p.name for p in RECORDS}
    assert {"tafeng-base", "tafeng-mf-morec", "tafeng-sasrec-morec", "control-quantity",
            "coefficients", "bootstrap"} <= names
    for record in RECORDS:
        readme = (record / "README.md").read_text(encoding="utf-8")
        assert "## Commands" in readme and "```bash" in readme, record
        assert (record / "config.toml").is_file(), record
        results = json.loads((record / "results.json").read_text(encoding="utf-8"))
        assert len(results["code_version"]) >= 7, record
        assert results["source"].startswith(("transcribed from README at ", "run at ")), record
        assert results["tables"], record
        for name, table in results["tables"].items():
            assert table["code_version"] and table["rows"], (record, name)
            assert f"<!-- table:{name}:start -->" in readme, (record, name)
            assert (record / "tables" / f"{name}.md").is_file(), (record, name)


def test_tables_py_reproduces_numbers():
    sys.path.insert(0, str(ROOT))
    try:
        import tables
    finally:
        sys.path.remove(str(ROOT))
    row = {"seed": 1, "imp": {"pct": 0.76, "defined_terms_only": True},
           "valid": {"valid": False, "test_hit_vs_base_pct": 96.3},
           "c": {"measure": 0.9897, "target": 0.99, "deviation_pct": -0.0}}
    table = {"columns": [{"key": "seed", "label": "seed", "format": "g"},
                         {"key": "imp", "label": "Imp", "format": "imp2"},
                         {"key": "valid", "label": "valid", "format": "valid"},
                         {"key": "c", "label": "controlled", "format": "controlled"}],
             "rows": [row]}
    assert tables.render_table(table).splitlines()[2] == (
        "| 1 | +0.76%\\* | **no** (96.3%) | 0.9897 vs 0.99 (\u22120.0%) |")


def test_frontier_keeps_the_non_dominated_solutions():
    sys.path.insert(0, str(ROOT))
    try:
        from frontier import frontier
    finally:
        sys.path.remove(str(ROOT))
    # Hit (y) higher is better; rHit (x) higher is better, then Pop-KL (x) lower is better.
    points = [(1.0, 0.5), (2.0, 0.4), (1.5, 0.3), (0.5, 0.6)]
    assert frontier(points, x_larger=True) == [(0.5, 0.6), (1.0, 0.5), (2.0, 0.4)]
    assert frontier([(0.2, 0.5), (0.3, 0.6), (0.25, 0.4)], x_larger=False) == [
        (0.2, 0.5), (0.3, 0.6)]


def test_run_cache_reuses_a_run_only_with_its_flags_and_base(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    try:
        import records
    finally:
        sys.path.remove(str(ROOT))
    (tmp_path / "exp").mkdir()
    monkeypatch.setattr(records, "ROOT", tmp_path)
    ran, base_hit, morec_hit = [], [0.5], [0.6]

    def job_results(out: Path, *flags: str) -> dict:  # a run: writes its results.json
        ran.append(out.name)
        out.mkdir(parents=True, exist_ok=True)
        results = {"base": {"hit@10": base_hit[0]}, "morec": {"hit@10": morec_hit[0]}}
        (out / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr(records, "job_results", job_results)
    out = tmp_path / "runs" / "a"
    first = records.RunCache("exp", {"hit@10": 0.5}).results("s0/a", out, "--x")
    assert ran == ["a"] and (tmp_path / "exp" / "runs.json").is_file()
    shutil.rmtree(tmp_path / "runs")  # a new session: the folder is gone, the record kept
    assert records.RunCache("exp", {"hit@10": 0.5}).results("s0/a", out, "--x") == first
    assert ran == ["a"]
    records.RunCache("exp", {"hit@10": 0.5}).results("s0/a", out, "--y")  # other flags
    shutil.rmtree(tmp_path / "runs")
    base_hit[0] = 0.4
    records.RunCache("exp", {"hit@10": 0.4}).results("s0/a", out, "--y")  # another base
    assert ran == ["a", "a", "a"]
    shutil.rmtree(tmp_path / "runs")
    morec_hit[0] = 0.7  # the folder is needed and the rerun differs from the entry
    with pytest.raises(SystemExit, match="did not reproduce"):
        records.RunCache("exp", {"hit@10": 0.4}).results("s0/a", out, "--y", folder=True)
