"""The run figures: which PNGs a log yields, written whole, and how bad logs fail."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import BinaryIO

import matplotlib
import pytest
from matplotlib.figure import Figure

from morec_rec.errors import MorecError
from morec_rec.jobs import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = {
    "base": {"hit@10": 0.0162, "rhit@10": 1.234, "pop_kl@10": 0.81, "min_hit@10": 0.004},
    "continued": {"hit@10": 0.0165, "rhit@10": 1.301, "pop_kl@10": 0.77, "min_hit@10": 0.005},
    "morec": {"hit@10": 0.0160, "rhit@10": 1.52, "pop_kl@10": 0.42, "min_hit@10": 0.007},
}


def masses(groups: int, tilt: float) -> list[float]:
    weights = [math.exp(tilt * g) for g in range(groups)]
    return [w / sum(weights) for w in weights]


def morec_log() -> list[dict]:
    records: list[dict] = [
        {"kind": "update", "step": 0, "version": 0, "effective_from": 0,
         "masses": {"fairness": masses(11, 0.0), "alignment": masses(10, 0.0)}},
    ]
    for step in range(10, 210, 10):
        loss = 0.5 + 0.3 / step
        records.append({
            "kind": "step", "epoch": step // 100, "step": step, "loss": loss + 0.1,
            "samples_per_s": 5000.0,
            "objective_loss": {"accuracy": loss, "fairness": 0.9, "alignment": 0.7},
            "coefficient": {"accuracy": 1.0 + step / 100}, "target": {"accuracy": 0.5},
            "controlled": {"accuracy": loss},
        })
        if step % 50 == 0:
            records.append({"kind": "update", "step": step, "version": step // 50,
                            "effective_from": step + 2,
                            "masses": {"fairness": masses(11, step / 100),
                                       "alignment": masses(10, -step / 400)}})
        if step % 100 == 0:
            records.append({"kind": "eval", "split": "valid", "epoch": step // 100 - 1,
                            "step": step, **ROWS["morec"], "best": True})
    records.append({"kind": "epoch", "epoch": 2, "step": 200, "train_loss": 0.6})
    records.append({"kind": "something_new", "payload": [1, 2, 3]})
    return records


def base_log() -> list[dict]:
    return [{"kind": "step", "epoch": 0, "step": s, "loss": 1 / s, "samples_per_s": 9000.0}
            for s in range(10, 60, 10)]


def write_log(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) > 5000, (path, len(data))


def test_morec_run_writes_three_figures(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", morec_log())
    out = tmp_path / "figures" / "run"  # created, parents included

    written = plots.plot_run(log, out, ROWS)

    assert written == [out / "controller.png", out / "masses.png", out / "metrics.png"]
    for path in written:
        assert_png(path)
    assert sorted(p.name for p in out.iterdir()) == ["controller.png", "masses.png",
                                                     "metrics.png"]


def test_base_run_has_no_controller_or_masses(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", base_log())

    assert plots.plot_run(log, tmp_path / "none") == []
    assert list((tmp_path / "none").iterdir()) == []
    written = plots.plot_run(log, tmp_path / "rows", ROWS)
    assert written == [tmp_path / "rows" / "metrics.png"]
    assert_png(written[0])
    assert [p.name for p in (tmp_path / "rows").iterdir()] == ["metrics.png"]


def test_rewriting_replaces_figures_and_leaves_no_partial_files(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", morec_log())
    first = {p: p.read_bytes() for p in plots.plot_run(log, tmp_path, ROWS)}

    second = plots.plot_run(log, tmp_path, {"a": ROWS["base"], "b": ROWS["morec"]})

    assert list(first) == second
    assert first[tmp_path / "metrics.png"] != (tmp_path / "metrics.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["controller.png", "log.jsonl",
                                                          "masses.png", "metrics.png"]


def test_crash_while_saving_leaves_the_old_file_and_no_partial_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = plots.plot_comparison(ROWS, tmp_path / "metrics.png")
    before = path.read_bytes()

    def crash(self: Figure, f: BinaryIO, **kwargs: object) -> None:
        f.write(PNG_SIGNATURE)  # a start that looks like a PNG, then the crash
        raise RuntimeError("crashed while saving")

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        plots.plot_comparison({"base": ROWS["base"]}, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_comparison_uses_only_metrics_common_to_every_row(tmp_path: Path) -> None:
    rows = {"base": {"hit@10": 0.02, "ndcg@10": 0.1}, "morec": {"hit@10": 0.03, "pop_kl@10": 1.0}}
    assert_png(plots.plot_comparison(rows, tmp_path / "m.png"))
    with pytest.raises(ValueError, match="no metric"):
        plots.plot_comparison({}, tmp_path / "empty.png")


def test_resumed_run_keeps_the_records_logged_last() -> None:
    first = [{"kind": "step", "step": s, "v": "old"} for s in (10, 20, 30)]
    resumed = [{"kind": "step", "step": s, "v": "new"} for s in (20, 30, 40)]
    series = plots._series([*first, {"kind": "eval", "step": 30}, *resumed], "step")
    assert [(r["step"], r["v"]) for r in series] == [(10, "old"), (20, "new"), (30, "new"),
                                                     (40, "new")]


def test_read_log_names_the_malformed_line(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", base_log())
    with open(log, "a") as f:
        f.write('{"kind": "step", "step": 60, "lo\n')  # a line cut short by a crash

    with pytest.raises(MorecError, match=rf"log\.jsonl, line {len(base_log()) + 1}: not JSON"):
        plots.read_log(log)
    with pytest.raises(MorecError, match="line 6"):
        plots.plot_run(log, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_log_rejects_non_objects_and_missing_files(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "step", "step": 10}\n\n[1, 2]\n')
    with pytest.raises(MorecError, match="line 3: not a JSON object"):
        plots.read_log(log)
    with pytest.raises(MorecError, match="no such log file"):
        plots.read_log(tmp_path / "absent.jsonl")


def test_many_calls_register_no_figures(tmp_path: Path) -> None:
    matplotlib.use("Agg")
    from matplotlib import pyplot

    log = write_log(tmp_path / "log.jsonl", morec_log())
    for _ in range(3):
        plots.plot_run(log, tmp_path, ROWS)
    assert pyplot.get_fignums() == []
