"""The command line: success summaries, and one-line errors with exit status 2 on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from morec_rec.jobs.cli import _job_configs, _parser, main

INTERACTIONS = "user,item,timestamp\n" + "".join(
    f"u{u},i{i},{10 * u + i}\n" for u in range(6) for i in range(5)
)
ITEMS = "item,price,category\n" + "".join(f"i{i},{i}.5,c{i % 2}\n" for i in range(5))


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "inter.csv").write_text(INTERACTIONS)
    (tmp_path / "items.csv").write_text(ITEMS)
    return tmp_path / "inter.csv", tmp_path / "items.csv"


def _prepare(inter: Path, items: Path, out: Path, *extra: str) -> int:
    """``prepare`` of the generic source, with as many popularity groups as its 5 items."""
    return main(["prepare", "--source", "generic", "--input", str(inter), "--meta", str(items),
                 "--out", str(out), "--popularity-groups", "5", *extra])


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_prepare_generic(files: tuple[Path, Path], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _prepare(*files, tmp_path / "out", "--k-core", "3") == 0
    out = capsys.readouterr().out
    assert "6 users, 5 items, 30 interactions (train 18, valid 6, test 6)" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["parameters"]["k_core"] == 3
    assert manifest["source"]["name"] == "generic"


def test_config_file_and_flag_override(files: tuple[Path, Path], tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[prepare]\nk_core = 4\nhistory_length = 2\n[source]\ndelimiter = ','\n")
    assert _prepare(*files, tmp_path / "out", "--config", str(config), "--k-core", "3") == 0
    parameters = json.loads((tmp_path / "out" / "manifest.json").read_text())["parameters"]
    assert (parameters["k_core"], parameters["history_length"]) == (3, 2)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i, m: i.unlink(), "inter.csv: no such file"),
        (lambda i, m: m.unlink(), "items.csv: no such file"),
        (lambda i, m: i.write_text("user,item\nu,i\n"), "inter.csv: missing column(s) 'timestamp'"),
        (lambda i, m: m.write_text("item,price,category\ni1,cheap,c\n"),
         "items.csv: column 'price' has a non-numeric value 'cheap' in row 0"),
        (lambda i, m: m.write_text("item,price,category\ni1,2,c\ni2,-1,c\n"),
         "items.csv: column 'price' has a negative value -1"),
        (lambda i, m: i.write_text(INTERACTIONS + "u9,i1,-3\n"),
         "inter.csv: column 'timestamp' has a negative value -3"),
        (lambda i, m: i.write_text(INTERACTIONS + "u9,i1,yesterday\n"),
         "inter.csv: column 'timestamp' is not a time"),
        (lambda i, m: i.write_text("user,item,timestamp\nu,i,1\n"),
         "inter.csv: no interactions left after filtering"),
    ],
)
def test_bad_input(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   edit, message: str) -> None:
    edit(*files)
    assert _prepare(*files, tmp_path / "out", "--k-core", "3") == 2
    assert message in _error(capsys)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_corrupt_parquet(files: tuple[Path, Path], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "inter.parquet"
    corrupt.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    assert _prepare(corrupt, files[1], tmp_path / "out") == 2
    assert "inter.parquet: not a readable Parquet file" in _error(capsys)


def test_mistyped_parquet_column(files: tuple[Path, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.table({"user": ["u"], "item": ["i1"], "timestamp": [True]}), inter)
    assert _prepare(inter, files[1], tmp_path / "out") == 2
    assert "inter.parquet: column 'timestamp' has type bool, expected numbers" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_policy_error_names_the_catalogue(files: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    files[1].write_text(ITEMS.replace("i1,1.5,", "i1,,"))
    assert _prepare(*files, tmp_path / "out", "--k-core", "3", "--missing", "error") == 2
    assert "items.csv: item catalogue: 1 item(s) without a price" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_touched(files: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert _prepare(*files, tmp_path / "out") == 2
    assert "out: output exists and is not an empty directory" in _error(capsys)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k-core", "1"], "config: k_core = 1 is out of range"),
        (["--missing", "drop"], "config: missing = 'drop' is out of range"),
        (["--popularity-rule", "x"], "config: popularity_rule = 'x' is out of range"),
    ],
)
def test_bad_config_values(files: tuple[Path, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str], args: list[str],
                           message: str) -> None:
    assert _prepare(*files, tmp_path / "out", *args) == 2
    assert message in _error(capsys)


def test_flags_are_spelled_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "job"), "--epoch", "2"])
    assert exited.value.code == 2
    assert _error(capsys).strip() == ("morec-rec run: error: unrecognized arguments: --epoch 2 "
                                      "(see morec-rec run --help)")  # the command's flags


def test_a_job_takes_its_seed_and_validation_users_from_train(tmp_path: Path) -> None:
    # One flag each sets every stage: pretraining and MoRec validate the same users.
    args = _parser().parse_args(["run", "--data", str(tmp_path), "--out", str(tmp_path / "j"),
                                 "--seed", "3", "--validation-users", "40"])
    train, sampler, morec = _job_configs(args)
    assert (train.seed, sampler.seed) == (3, 3)
    assert (train.validation_users, morec.validation_users) == (40, 40)
    config = tmp_path / "c.toml"
    config.write_text("[train]\nseed = 4\nvalidation_users = 50\n")
    train, sampler, morec = _job_configs(_parser().parse_args(
        ["run", "--data", str(tmp_path), "--out", str(tmp_path / "j"), "--config", str(config)]))
    assert (sampler.seed, morec.validation_users) == (4, 50)


@pytest.mark.parametrize(("table", "key"), [("morec", "validation_users"), ("sampler", "seed")])
def test_a_jobs_shared_setting_in_its_stage_table_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, key: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[{table}]\n{key} = 7\n")
    assert main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "j"),
                 "--config", str(config)]) == 2
    assert (f"{config}: [{table}] {key}: a job takes it from [train] for every stage; set it "
            f"there") in _error(capsys)
    assert not (tmp_path / "j").exists()


def test_a_job_is_not_a_run_to_evaluate(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "morec").mkdir()
    (tmp_path / "job.json").write_text("{}")
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert f"a job, not a run: evaluate one of its runs ({tmp_path / 'morec'})" in _error(capsys)


def test_comparison_flags_need_a_comparison(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run", str(tmp_path), "--seed", "3", "--imp-over", "hit"]) == 2
    assert "--seed, --imp-over: for a comparison of two runs (--against)" in _error(capsys)
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", "--run", str(tmp_path), "--against", str(tmp_path),
              "--resamples", "0"])
    assert exited.value.code == 2
    assert "argument --resamples: '0': expected an int >= 1" in _error(capsys)


def test_unknown_config_key(files: tuple[Path, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[prepare]\nk_cor = 3\n")
    assert _prepare(*files, tmp_path / "out", "--config", str(config)) == 2
    assert "unknown key(s) k_cor for PrepareConfig" in _error(capsys)


def test_demo_runs_the_job_and_reruns(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "run")]) == 0
    first = capsys.readouterr().out
    assert "9,086 users, 2,000 items, 221,394 interactions" in first
    assert "MoRec against the base on test" in first
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["base"]) == set(results["morec"]) == {
        "hit@10", "rhit@10", "pop_kl@10", "min_hit@10"}
    assert {"imp", "valid"} <= set(results)
    written = (tmp_path / "run" / "results.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(tmp_path / "run")]) == 0  # shows the finished job
    notice, again = capsys.readouterr().out.split("\n", 1)
    assert notice == f"the finished demo in {tmp_path / 'run'} (remove it to run the demo again):"
    assert first.endswith(again) and "prepared" not in again  # the data is reused
    assert (tmp_path / "run" / "results.json").stat().st_mtime_ns == written  # not rerun
    assert main(["demo", "--out", str(tmp_path / "run"), "--seed", "1"]) == 2
    assert "holds other data than the demo's" in _error(capsys)
    assert main(["demo", "--out", str(tmp_path / "run"), "--lr", "0.01"]) == 2
    assert "job.json: started with lr = 0.001, not 0.01" in _error(capsys)
    # Killed during MoRec training, a demo run again goes on where it stopped.
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "killed_job.py"),
                             "--at-step", "5", "--", "demo", "--out", str(tmp_path / "killed")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main(["demo", "--out", str(tmp_path / "killed")]) == 0
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    for key in ("base", "morec", "imp", "valid", "control"):
        assert resumed[key] == results[key], key
    # Asked for more, a finished demo goes on.
    assert main(["demo", "--out", str(tmp_path / "killed"), "--epochs", "3"]) == 0
    assert json.loads((tmp_path / "killed" / "job.json").read_text())["morec"]["epochs"] == 3
    record = json.loads((tmp_path / "killed" / "morec" / "run.json").read_text())
    assert record["morec"]["epochs"] == 3
