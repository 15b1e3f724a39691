"""Bad input through the real command line: one line ``morec-rec: error: ...`` naming the
file, field or value, exit status 2, and nothing half-written left behind; and checkpoints
that a kill at any point of a save leaves readable and resumable."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli
from torch.distributed.checkpoint.api import CheckpointException

from morec_rec.config import MoRecConfig, SamplerConfig, TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.data.sources.tables import to_seconds
from morec_rec.errors import MorecError
from morec_rec.jobs import checkpoint, cli, distributed
from morec_rec.jobs.cli import _keep_job_settings
from morec_rec.jobs.continued import MoRecProgress
from morec_rec.jobs.run import Run, hold

#: Small and fast training settings (the tiny profile has 3,220 training rows).
TRAIN = ("--max-epochs", "1", "--batch-size", "256", "--num-workers", "0",
         "--embedding-dim", "8")
#: A MoRec job continuing a base trained with TRAIN.
JOB = ("--epochs", "1", "--num-workers", "0", "--embedding-dim", "8", "--sub-batch-size", "64")

INTERACTIONS = "user,item,timestamp\n" + "".join(
    f"u{u},i{i},{10 * u + i}\n" for u in range(6) for i in range(5)
)
ITEMS = "item,price,category\n" + "".join(f"i{i},{i}.5,c{i % 2}\n" for i in range(5))


def fails(done: subprocess.CompletedProcess, *names: str) -> str:
    """Asserts exit status 2 and one line ``morec-rec: error: ...`` holding ``names``."""
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("morec-rec: error: "), done.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch MF run on ``tiny`` (do not change it: copy it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    done = run_cli("train", "--data", str(tiny), "--out", str(out), *TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A generic source of 6 users and 5 items."""
    (tmp_path / "inter.csv").write_text(INTERACTIONS)
    (tmp_path / "items.csv").write_text(ITEMS)
    return tmp_path / "inter.csv", tmp_path / "items.csv"


def prepare(inter: Path, items: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("prepare", "--source", "generic", "--input", str(inter), "--meta",
                   str(items), "--out", str(out), "--k-core", "3", "--popularity-groups", "5",
                   *extra)


def copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", symlinks=True))


# 1. Corrupt checkpoints.

DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated shard": lambda c: (c / "__0_0.distcp").write_bytes(
        (c / "__0_0.distcp").read_bytes()[:1000]),
    "garbage metadata": lambda c: (c / ".metadata").write_text("garbage"),
    "no metadata": lambda c: (c / ".metadata").unlink(),
}


@pytest.mark.parametrize(("command", "damage"), [
    *(("evaluate", damage) for damage in DAMAGES), ("resume", "garbage metadata")])
def test_corrupt_checkpoint(run: Path, tmp_path: Path, command: str, damage: str) -> None:
    copied = copy(run, tmp_path)
    name = "best" if command == "evaluate" else "last"
    DAMAGES[damage](copied / "checkpoints" / name)
    args = (("evaluate", "--run", str(copied)) if command == "evaluate" else
            ("train", "--resume", "--out", str(copied), "--max-epochs", "2"))
    fails(run_cli(*args), str(copied / "checkpoints" / name), "checkpoint")


# 2. A save killed at any point.

def build_state(path: Path, state: dict[str, str], sources: dict[str, Path]) -> None:
    """Lays out ``state`` ({suffix: "v1" | "v2" | "v2-"}) beside ``path``: a saved checkpoint,
    or ("-") one whose ``meta.json`` is missing (not committed, or half removed)."""
    for suffix, version in state.items():
        target = path.with_name(path.name + suffix)
        shutil.copytree(sources[version.rstrip("-")], target)
        if version.endswith("-"):
            (target / checkpoint.META).unlink()


@pytest.mark.parametrize("state", [
    {".old": "v1", ".partial": "v1"},  # killed between the renames
    {"": "v1", ".old": "v1-"},  # killed while removing .old ("Directory not empty" before)
])
def test_resume_after_a_kill_during_a_save(run: Path, tmp_path: Path,
                                           state: dict[str, str]) -> None:
    copied = copy(run, tmp_path)
    last = copied / "checkpoints" / "last"
    shutil.move(last, tmp_path / "saved")
    build_state(last, state, {"v1": tmp_path / "saved"})
    done = run_cli("train", "--resume", "--out", str(copied), "--max-epochs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained mf: 2 epoch(s)" in done.stdout  # the first from the checkpoint
    assert sorted(p.name for p in last.parent.iterdir()) == ["best", "last"]


def test_evaluate_after_a_kill_during_a_save(run: Path, tmp_path: Path) -> None:
    copied = copy(run, tmp_path)
    best = copied / "checkpoints" / "best"
    shutil.move(best, tmp_path / "saved")
    build_state(best, {".old": "v1", ".partial": "v1-"}, {"v1": tmp_path / "saved"})
    done = run_cli("evaluate", "--run", str(copied))
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    assert "mf on test" in done.stdout


@pytest.fixture
def group() -> Iterator[None]:
    """A process group of one in this process (``checkpoint.save`` is a collective)."""
    distributed.init()
    yield
    distributed.shutdown()


def save_version(path: Path, version: int) -> None:
    """Saves a model whose weights are all ``version``, with meta ``{"v": version}``."""
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, version)
    checkpoint.save(path, model, torch.optim.SGD(model.parameters(), lr=0.1), {"v": version})


def read_version(path: Path) -> int:
    """The version of the checkpoint at ``path``; fails unless its shards hold the same."""
    model = torch.nn.Linear(3, 2)
    meta = checkpoint.load(path, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    assert torch.all(model.weight == meta["v"]), "meta.json and shards of different saves"
    return meta["v"]


@pytest.mark.parametrize(("state", "expected"), [
    ({"": "v1", ".partial": "v2-"}, 1),  # killed while DCP writes
    ({"": "v1", ".partial": "v2"}, 2),  # killed after the commit, before the renames
    ({".old": "v1", ".partial": "v2"}, 2),  # killed between the renames
    ({".old": "v1", ".partial": "v2-"}, 1),  # a save after that, killed before its commit
    ({"": "v2", ".old": "v1-"}, 2),  # killed while removing .old
    ({"": "v2", ".old": "v1", ".partial": "v2-"}, 2),  # all three
    ({".partial": "v2"}, 2),  # the first save, killed before its rename
])
def test_interrupted_states_read_back_complete(tmp_path: Path, group: None,
                                               state: dict[str, str], expected: int) -> None:
    sources = {"v1": tmp_path / "v1", "v2": tmp_path / "v2"}
    save_version(sources["v1"], 1)
    save_version(sources["v2"], 2)
    path = tmp_path / "ckpt" / "last"
    path.parent.mkdir()
    build_state(path, state, sources)
    assert checkpoint.read_meta(path) == {"v": expected}
    assert read_version(path) == expected
    checkpoint.recover(path)
    assert [p.name for p in path.parent.iterdir()] == ["last"]
    assert read_version(path) == expected
    build_state(path, {k: v for k, v in state.items() if k}, sources)  # leftovers again
    save_version(path, 3)
    assert read_version(path) == 3
    assert [p.name for p in path.parent.iterdir()] == ["last"]


def test_no_committed_save_is_no_checkpoint(tmp_path: Path, group: None) -> None:
    save_version(tmp_path / "v2", 2)
    path = tmp_path / "last"
    build_state(path, {".partial": "v2-"}, {"v2": tmp_path / "v2"})
    with pytest.raises(MorecError, match="not a checkpoint"):
        checkpoint.read_meta(path)


class Killed(BaseException):
    """A simulated SIGKILL: the operation it replaces and everything after it never run."""


def test_a_kill_anywhere_in_a_save_leaves_a_complete_checkpoint(
        tmp_path: Path, group: None, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last"
    versions = []
    for kill_at in itertools.count():
        save_version(path, 1)
        count = itertools.count()

        def operation(real: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                if next(count) == kill_at:
                    if real is shutil.rmtree and (Path(args[0]) / checkpoint.META).exists():
                        (Path(args[0]) / checkpoint.META).unlink()  # killed half-way
                    raise Killed
                return real(*args, **kwargs)
            return run

        with monkeypatch.context() as patch:  # every rename, replace and removal
            patch.setattr(Path, "rename", operation(Path.rename))
            patch.setattr(checkpoint.os, "replace", operation(checkpoint.os.replace))
            patch.setattr(checkpoint.shutil, "rmtree", operation(shutil.rmtree))
            try:
                save_version(path, 2)
                finished = True
            except (Killed, CheckpointException):  # DCP wraps what its steps raise
                finished = False
        versions.append(read_version(path))
        save_version(path, 3)  # the next save completes the interrupted one
        assert read_version(path) == 3
        assert [p.name for p in tmp_path.iterdir()] == ["last"]
        if finished:
            break
    assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2, versions
    assert len(versions) >= 6  # the test reached every step of the save


# 3. A truncated train shard.

@pytest.mark.parametrize("command", ["train", "run"])
def test_truncated_train_shard(tiny: Path, tmp_path: Path, command: str) -> None:
    data = Path(shutil.copytree(tiny, tmp_path / "data"))
    shard = data / "train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fails(run_cli(command, "--data", str(data), "--out", str(tmp_path / "out"), *TRAIN),
          str(shard), "corrupt Parquet file")
    assert not (tmp_path / "out").exists()


# 4. A manifest edited by hand.

def edit_manifest(tiny: Path, tmp_path: Path, **fields: Any) -> Path:
    """A copy of ``tiny`` whose manifest has ``fields`` changed."""
    data = Path(shutil.copytree(tiny, tmp_path / "data"))
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, **fields}))
    return data


def test_manifest_num_items_must_match_the_items(tiny: Path, tmp_path: Path) -> None:
    assert pq.read_metadata(tiny / "items.parquet").num_rows == 138
    data = edit_manifest(tiny, tmp_path, num_items=100)  # below the largest item id
    fails(run_cli("train", "--data", str(data), "--out", str(tmp_path / "out"), *TRAIN),
          str(data / "manifest.json"), "num_items = 100", "items.parquet (138 rows)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_items": 200}, "num_items = 200 does not match"),
    ({"num_users": "many"}, "field 'num_users' = 'many' is not a count"),
    ({"shards": [{"path": "train/part-00000.parquet", "rows": 1}]},
     "shards[0].rows = 1 does not match"),
])
def test_manifest_counts_are_checked(tiny: Path, tmp_path: Path, fields: dict[str, Any],
                                     message: str) -> None:
    data = edit_manifest(tiny, tmp_path, **fields)
    with pytest.raises(MorecError, match=re.escape(f"{data / 'manifest.json'}: {message}")):
        PreparedDataset.open(data)


@pytest.mark.parametrize(("file", "column", "value"), [
    ("train/part-00000.parquet", "item_id", 138), ("train/part-00000.parquet", "user_id", -1),
    ("valid.parquet", "history", 138), ("test.parquet", "user_id", 259)])
@pytest.mark.parametrize("statistics", [True, False])
def test_ids_outside_the_manifest_counts(tiny: Path, tmp_path: Path, file: str, column: str,
                                         value: int, statistics: bool) -> None:
    data = Path(shutil.copytree(tiny, tmp_path / "data"))
    table = pq.read_table(data / file)
    if column == "history":  # the first non-empty history's last item
        history = table[column].combine_chunks()
        flat = history.values.to_numpy().copy()
        ends = history.offsets.to_numpy()[1:]
        flat[ends[history.value_lengths().to_numpy() > 0][0] - 1] = value
        values = pa.ListArray.from_arrays(history.offsets, flat, type=history.type)
    else:
        ids = table[column].to_numpy().copy()
        ids[len(ids) // 2] = value
        values = pa.array(ids, table[column].type)
    pq.write_table(table.set_column(table.schema.get_field_index(column),
                                    table.schema.field(column), values),
                   data / file, write_statistics=statistics)
    count = "num_users" if column == "user_id" else "num_items"
    with pytest.raises(MorecError, match=re.escape(
            f"{data / file}: {column} holds {value}, not an id of {count} = ")):
        PreparedDataset.open(data)


# 5. An output that cannot be written.

@pytest.mark.parametrize(("command", "place"), [
    ("prepare", "under a file"), ("prepare", "in /proc"), ("synth", "under a file"),
    ("synth", "in /proc"), ("train", "under a file"), ("run", "in /proc"), ("run", "a file")])
def test_unwritable_output(tiny: Path, files: tuple[Path, Path], tmp_path: Path,
                           command: str, place: str) -> None:
    (tmp_path / "file").write_text("")
    out = {"under a file": tmp_path / "file" / "out", "in /proc": Path("/proc/morec-out"),
           "a file": tmp_path / "file"}[place]
    if command == "prepare":
        done = prepare(*files, out)
    elif command == "synth":
        done = run_cli("synth", "--profile", "tiny", "--out", str(out))
    else:
        done = run_cli(command, "--data", str(tiny), "--out", str(out), *TRAIN)
    fails(done, str(out))
    assert out.is_file() if place == "a file" else not out.exists()


# 6. A batch larger than a loader stream.

def test_batch_larger_than_a_stream(tiny: Path, tmp_path: Path) -> None:
    fails(run_cli("train", "--data", str(tiny), "--out", str(tmp_path / "out"),
                  "--batch-size", "4096", "--max-epochs", "2"),
          "batch_size = 4096", "3,220 training rows of each of 1 stream(s)")
    fails(run_cli("run", "--data", str(tiny), "--out", str(tmp_path / "out"), "--num-workers",
                  "2", "--sub-batch-size", "500"),
          "sub_batch_size = 500 × 4 objective(s)", "1,610 training rows of each of 2 stream(s)")
    assert not (tmp_path / "out").exists()


# 7. More popularity groups than items.

def test_more_popularity_groups_than_items(files: tuple[Path, Path], tmp_path: Path) -> None:
    fails(run_cli("synth", "--profile", "tiny", "--popularity-groups", "1000", "--out",
                  str(tmp_path / "out")),
          "popularity_groups = 1000", "138 items")
    fails(prepare(*files, tmp_path / "out", "--popularity-groups", "6"),
          "popularity_groups = 6", "5 items", str(files[0]))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


# 8 and 9. Timestamps, and misleading messages.

@pytest.mark.parametrize(("rows", "names"), [
    ("u9,i1,1e17\n", ["column 'timestamp'", "1e17", "after 9999-12-31"]),
    # pyarrow's own message quoted '5', a valid time
    ("u9,i1,yesterday\nu9,i2,5\n", ["not a time in row 30: 'yesterday'"]),
])
def test_bad_timestamp(files: tuple[Path, Path], tmp_path: Path, rows: str,
                       names: list[str]) -> None:
    files[0].write_text(INTERACTIONS + rows)
    fails(prepare(*files, tmp_path / "out"), str(files[0]), *names)
    assert not (tmp_path / "out").exists()


def test_directory_as_input(files: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    fails(prepare(tmp_path / "dir", files[1], tmp_path / "out"),
          f"{tmp_path / 'dir'}: is a directory")


def test_a_pipe_as_input_is_not_called_missing(files: tuple[Path, Path], tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # as `--input <(zcat log.gz)` gives: read once only
    fails(prepare(tmp_path / "pipe", files[1], tmp_path / "out"),
          f"{tmp_path / 'pipe'}: not a regular file (a pipe or a device); give a file")


@pytest.mark.parametrize(("column", "message"), [
    (["1", "-1e20", "3"], "has a negative value -1e20 in row 1"),
    (["1", "1e20", "3"], "has a value 1e20 in row 1 after 9999-12-31"),
    (["2020-01-01", "2020-13-01", "2020-01-03"], "is not a time in row 1: '2020-13-01'"),
    (["2020-01-01", "17", "2020-01-03"], "is not a time in row 1: '17'"),
    (["2020-01-02", "2020-01-01Z"], "is not a time in row 1: '2020-01-01Z'"),
    (pa.array([None, None], pa.string()), "is empty in row 0"),
    (["2020-01-01T00:00:00Z", "2020-01-02T00:00:00"],  # a zone, then none
     "is not a time in row 1: '2020-01-02T00:00:00'"),
])
def test_to_seconds_names_the_bad_value(column: list[str], message: str) -> None:
    with pytest.raises(MorecError, match=re.escape(f"f.csv: column 't' {message}")):
        to_seconds(pa.table({"t": column}), "t", Path("f.csv"))


def test_iso_times_with_a_zone_or_a_fraction_are_seconds_since_the_epoch() -> None:
    # 2015-01-31T12:00:00 UTC is 1,422,705,600 s.
    for column, seconds in ((["2015-01-31T12:00:00Z", "2015-01-31T14:00:00+02:00"],
                             [1_422_705_600, 1_422_705_600]),
                            (["2015-01-31 12:00:00.75", "2015-01-31"],
                             [1_422_705_600, 1_422_662_400])):
        assert to_seconds(pa.table({"t": column}), "t", Path("f.csv")).to_pylist() == seconds


def test_parquet_times_drop_fractions_of_a_second() -> None:
    table = pa.table({"t": pa.array([1_500_000_000_123_456_789], pa.timestamp("ns"))})
    assert to_seconds(table, "t", Path("f.parquet")).to_pylist() == [1_500_000_000]


# 10. A job refused before it writes anything.

def test_wrong_model_for_the_base_leaves_out_untouched(tiny: Path, run: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "job"
    args = ("run", "--data", str(tiny), "--out", str(out), "--base", str(run), *JOB)
    fails(run_cli(*args, "--model", "sasrec", "--embedding-dim", "16"), str(run),
          "model = 'sasrec' (the base's: 'mf')", "embedding_dim = 16 (the base's: 8)")
    assert not out.exists()
    out.mkdir()
    fails(run_cli(*args, "--model", "foo"), "model = 'foo'")
    assert list(out.iterdir()) == []
    done = run_cli(*args)  # the retry with the base's model
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "results.json").is_file()
    # The base's model settings are the job's defaults: a SASRec base needs no --model.
    sasrec = tmp_path / "sasrec"
    done = run_cli("train", "--data", str(tiny), "--out", str(sasrec), *TRAIN,
                   "--model", "sasrec", "--dropout", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli("run", "--data", str(tiny), "--out", str(tmp_path / "on_sasrec"), "--base",
                   str(sasrec), *JOB)
    assert done.returncode == 0, done.stderr[-3000:]
    train = json.loads((tmp_path / "on_sasrec" / "job.json").read_text())["train"]
    assert (train["model"], train["dropout"]) == ("sasrec", 0.5)


@pytest.mark.parametrize(("data", "flags", "message"), [
    ("tiny", ("--embedding-dim", "2"), "model = 'sasrec' needs embedding_dim >= 3, got 2"),
    ("no_histories", (), "model = 'sasrec' needs histories: the dataset has history_length 0"),
])
def test_a_sasrec_that_cannot_learn_is_refused_before_its_run_is_made(
        tiny: Path, tmp_path: Path, data: str, flags: tuple[str, ...], message: str) -> None:
    if data == "no_histories":
        assert run_cli("synth", "--profile", "tiny", "--history-length", "0", "--out",
                       str(tmp_path / data)).returncode == 0
    path = tiny if data == "tiny" else tmp_path / data
    out = tmp_path / "run"
    fails(run_cli("train", "--data", str(path), "--out", str(out), *TRAIN, "--model", "sasrec",
                  *flags), message)
    assert not out.exists()


def test_a_job_writes_only_into_an_empty_directory(tiny: Path, run: Path,
                                                   tmp_path: Path) -> None:
    data = Path(shutil.copytree(tiny, tmp_path / "data"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    for out in (data, tmp_path / "notes", run):
        before = sorted(p.name for p in out.iterdir())
        fails(run_cli("run", "--data", str(data), "--out", str(out), *JOB), str(out),
              "output exists and is not an empty directory")
        assert sorted(p.name for p in out.iterdir()) == before


# 11. Evaluating a run that did not finish.

def test_evaluate_unfinished_run(run: Path, tmp_path: Path) -> None:
    copied = copy(run, tmp_path)
    record = json.loads((copied / "run.json").read_text())
    record["config"]["max_epochs"] = 3
    (copied / "run.json").write_text(json.dumps(record))
    done = run_cli("evaluate", "--run", str(copied))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"morec-rec: warning: {copied}: unfinished run (1 of 3 epochs): evaluating its best "
        "checkpoint so far"]
    assert "mf on test" in done.stdout
    shutil.rmtree(copied / "checkpoints" / "best")
    fails(run_cli("evaluate", "--run", str(copied)), str(copied), "nothing to evaluate")


# 12. A resume that would change what a run computes.

def test_a_resumed_run_keeps_its_settings_but_how_long_it_trains(run: Path,
                                                                 tmp_path: Path) -> None:
    copied = copy(run, tmp_path)
    record = (copied / "run.json").read_bytes()
    for flags in (("--lr", "0.01"), ("--num-workers", "1"), ("--model", "sasrec")):
        field = flags[0][2:].replace("-", "_")
        fails(run_cli("train", "--resume", "--out", str(copied), *flags),
              str(copied / "run.json"), f"started with {field} = ", "may change only")
    assert (copied / "run.json").read_bytes() == record
    with hold(copied):
        fails(run_cli("train", "--resume", "--out", str(copied), "--max-epochs", "2"),
              str(copied), "another morec-rec process is writing here")
    assert (copied / "run.json").read_bytes() == record
    done = run_cli("train", "--resume", "--out", str(copied), "--max-epochs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    # Recorded, so that a later resume goes on to the second epoch too.
    assert json.loads((copied / "run.json").read_text())["config"]["max_epochs"] == 2
    record = (copied / "run.json").read_bytes()
    # A resume trains on; it neither undoes epochs nor reads another config file.
    fails(run_cli("train", "--resume", "--out", str(copied), "--max-epochs", "1"), str(copied),
          "2 epoch(s) trained already, more than --max-epochs 1")
    (tmp_path / "job.toml").write_text("[train]\nlr = 0.5\n")
    fails(run_cli("train", "--resume", "--out", str(copied), "--config",
                  str(tmp_path / "job.toml")), "drop --data and --config")
    assert (copied / "run.json").read_bytes() == record


def test_a_resumed_job_keeps_its_settings_but_how_long_it_trains(tiny: Path, run: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "job"
    done = run_cli("run", "--data", str(tiny), "--out", str(out), "--base", str(run), *JOB)
    assert done.returncode == 0, done.stderr[-3000:]
    job = (out / "job.json").read_bytes()
    for flags, field in ((("--lr", "0.01"), "lr"),
                         (("--objectives", "accuracy,revenue", "--preference", "1"), "objectives"),
                         (("--hold", "accuracy.relative=1.02"), "hold")):
        fails(run_cli("run", "--out", str(out), "--resume", *flags), str(out / "job.json"),
              f"started with {field} = ")
    assert (out / "job.json").read_bytes() == job
    with hold(out):  # another process writing the job, e.g. the ranks of a killed torchrun
        fails(run_cli("run", "--out", str(out), "--resume", "--epochs", "2"), str(out),
              "another morec-rec process is writing here")
    assert (out / "job.json").read_bytes() == job
    done = run_cli("run", "--out", str(out), "--resume", "--epochs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    for record in (out / "job.json", out / "morec" / "run.json"):
        assert json.loads(record.read_text())["morec"]["epochs"] == 2
    job = (out / "job.json").read_bytes()
    fails(run_cli("run", "--out", str(out), "--resume", "--epochs", "1"), str(out / "morec"),
          "2 epoch(s) trained already, more than --epochs 1")
    # MoRec continued the base's best checkpoint: a base whose best moved since (trained
    # on) would make the results compare runs of two bases.
    record = out / "morec" / "run.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "base_best_step": 1}))
    fails(run_cli("run", "--out", str(out), "--resume"), str(out / "morec"),
          "best checkpoint of step 1, which is now one of step", "start a new job")
    assert (out / "job.json").read_bytes() == job


def test_a_job_whose_morec_stage_started_keeps_its_bases_training(tiny: Path, run: Path,
                                                                  tmp_path: Path) -> None:
    # As a job that pretrained its base: --max-epochs and --patience would train it on
    # and move the best checkpoint that MoRec continued.
    out = tmp_path / "job"
    (out / "morec").mkdir(parents=True)
    (out / "morec" / "run.json").write_text("{}")
    job = {"train": {**dataclasses.asdict(TrainConfig()), "patience": 2}, "base": None,
           "sampler": dataclasses.asdict(SamplerConfig()), "morec": dataclasses.asdict(
               MoRecConfig())}
    for changed in ({"patience": 3}, {"max_epochs": 60, "patience": 2}):
        with pytest.raises(MorecError, match="its MoRec stage continues the base's best "
                                             "checkpoint, so --(max-epochs|patience)"):
            _keep_job_settings(out, job, TrainConfig(**changed), SamplerConfig(), MoRecConfig())
    assert not _keep_job_settings(out, job, TrainConfig(patience=2), SamplerConfig(),
                                  MoRecConfig())


# 13. Prepare: silently wrong values, and outputs that are links.

@pytest.mark.parametrize(("items", "names"), [
    (ITEMS.replace("i1,1.5", "i1,1e400"), ["column 'price'", "non-finite value '1e400'"]),
    (ITEMS.replace("\ni", "\nj"), ["none of the 5 items of the interactions is in it",
                               "e.g. 'i0' in", "the catalogue has e.g. 'j0'"]),
])
def test_prepare_bad_catalogue(files: tuple[Path, Path], tmp_path: Path, items: str,
                               names: list[str]) -> None:
    files[1].write_text(items)
    fails(prepare(*files, tmp_path / "out"), str(files[1]), *names)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_prepare_terminated_while_writing_leaves_nothing(files: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    # SIGTERM (timeout, a scheduler) arrives while the shards are written.
    code = ("import os, signal, sys, time\n"
            "import morec_rec.data.prepare as prepare\n"
            "def write_train(*args):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(60)\n"
            "prepare._write_train = write_train\n"
            "from morec_rec.jobs.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "prepare", "--source", "generic",
                           "--input", str(files[0]), "--meta", str(files[1]), "--out",
                           str(tmp_path / "out"), "--k-core", "3", "--popularity-groups", "5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert done.stderr.splitlines() == ["morec-rec: terminated"], done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inter.csv", "items.csv"]


@pytest.mark.parametrize("target", ["empty", "nowhere"])
def test_prepare_into_a_symbolic_link(files: tuple[Path, Path], tmp_path: Path,
                                      target: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / target)
    fails(prepare(*files, tmp_path / "out"), f"{tmp_path / 'out'}: output is a symbolic link")
    assert (tmp_path / "out").is_symlink() and list((tmp_path / "empty").iterdir()) == []
    assert not list(tmp_path.glob(".out.partial-*"))


# 14. Records damaged or edited by hand, and what a kill leaves in them.

def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def without(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda record: {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda record: [1], "run.json: not a JSON object"),
    (without("config"), "run.json: no 'config'"),
    (lambda record: {**record, "config": {**record["config"], "lr": "abc"}},
     "run.json: config: lr = 'abc' is not a float"),
])
def test_a_damaged_run_record(run: Path, tmp_path: Path, edit: Callable[[Any], Any],
                              message: str) -> None:
    copied = copy(run, tmp_path)
    edit_json(copied / "run.json", edit)
    for args in (("train", "--resume", "--out", str(copied), "--max-epochs", "2"),
                 ("evaluate", "--run", str(copied))):
        fails(run_cli(*args), str(copied / message))


def test_a_checkpoint_meta_without_its_progress(run: Path, tmp_path: Path) -> None:
    copied = copy(run, tmp_path)
    meta = copied / "checkpoints" / "last" / "meta.json"
    edit_json(meta, without("progress"))
    fails(run_cli("train", "--resume", "--out", str(copied), "--max-epochs", "2"),
          f"{meta}: corrupt checkpoint metadata ('progress' missing)")
    with pytest.raises(MorecError, match="'morec' missing"):  # a continued run's is read so
        checkpoint.read_meta(copied / "checkpoints" / "best", ("progress", "morec"))


@pytest.mark.parametrize(("edit", "problem"), [
    (without("best_step"), "fields ['best_hit', 'epoch', 'epoch_loss_sum', 'stale', 'step'], "
                           "expected ['best_hit', 'best_step', 'epoch', 'epoch_loss_sum', "
                           "'stale', 'step']"),
    (lambda progress: {**progress, "step": "10"}, "step = '10'"),
    (lambda progress: {**progress, "best_hit": True}, "best_hit = True"),
])
def test_a_checkpoint_meta_with_a_damaged_progress(run: Path, tmp_path: Path,
                                                   edit: Callable[[Any], Any],
                                                   problem: str) -> None:
    copied = copy(run, tmp_path)
    last = copied / "checkpoints" / "last"
    edit_json(last / "meta.json", lambda meta: {**meta, "progress": edit(meta["progress"])})
    fails(run_cli("train", "--resume", "--out", str(copied), "--max-epochs", "2"),
          f"{copied / 'checkpoints' / 'last'}: corrupt checkpoint metadata (progress: {problem})")


def test_a_continued_runs_progress_is_checked_field_by_field(tmp_path: Path) -> None:
    saved = {**dataclasses.asdict(MoRecProgress()), "best_key": [1, 0.5], "base": {"hit": 0.3}}
    assert MoRecProgress.restore(saved, tmp_path) == MoRecProgress(**saved)
    with pytest.raises(MorecError, match=re.escape("progress: best = [1]")):
        MoRecProgress.restore({**saved, "best": [1]}, tmp_path)


def test_a_damaged_log(run: Path, tmp_path: Path, group: None) -> None:
    copied = copy(run, tmp_path)
    log = copied / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines) + lines[-1][:20])  # a write cut short by a kill
    Run(copied).truncate_log(10**9)
    assert log.read_text() == "".join(lines)  # the cut line gone, every other kept as it was
    log.write_text("".join(lines[:2]) + "garbage\n" + "".join(lines[2:]))
    with pytest.raises(MorecError, match=re.escape(f"{log}, line 3: not JSON")):
        Run(copied).truncate_log(10**9)


def job_record(tiny: Path, **train: Any) -> dict[str, Any]:
    """A job's record of the default settings on ``tiny``, ``train`` settings changed."""
    return {"train": {**dataclasses.asdict(TrainConfig()), **train},
            "sampler": dataclasses.asdict(SamplerConfig()),
            "morec": dataclasses.asdict(MoRecConfig()), "data": str(tiny), "base": None,
            "continued": False}


@pytest.mark.parametrize(("text", "message"), [
    ("", "job.json: not JSON"),
    ('{"train": {', "job.json: not JSON"),
    ("{}", "job.json: no 'train', 'sampler', 'morec', 'data', 'base', 'continued'"),
    ("bad value", "job.json: train: lr = 'abc' is not a float"),
    ("bad base", "job.json: base = 5 is not what a job records"),
])
def test_a_damaged_job_record(tiny: Path, tmp_path: Path, text: str, message: str) -> None:
    out = tmp_path / "job"
    out.mkdir()
    if text == "bad value":
        text = json.dumps(job_record(tiny, lr="abc"))
    if text == "bad base":
        text = json.dumps({**job_record(tiny), "base": 5})
    (out / "job.json").write_text(text)
    fails(run_cli("run", "--out", str(out), "--resume"), str(out / message))


def test_a_bad_value_in_a_config_file_names_the_file(tiny: Path, tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text('[train]\nlr = "abc"\n')
    for command in ("train", "run"):
        fails(run_cli(command, "--data", str(tiny), "--out", str(tmp_path / "out"),
                      "--config", str(config)),
              f"{config}: [train]: lr = 'abc' is not a float")
    config.write_text("[train]\nlr = 0.01\n")  # a bad flag is not the file's
    line = fails(run_cli("train", "--data", str(tiny), "--out", str(tmp_path / "out"),
                         "--config", str(config), "--lr", "-1"), "lr = -1.0 is out of range")
    assert str(config) not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("left", [["checkpoints/"], ["run.json.partial"],
                                  ["checkpoints/", "run.json.partial"]])
def test_a_kill_while_a_run_is_created_leaves_a_new_run(tmp_path: Path, group: None,
                                                         left: list[str]) -> None:
    root = tmp_path / "run"
    root.mkdir()
    for name in left:
        (root / name).mkdir() if name.endswith("/") else (root / name).write_text('{"con')
    created = Run.create(root, {"config": {}, "data": "d"})
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "run.json"]
    assert created.record["data"] == "d"
    (tmp_path / "other" / "checkpoints").mkdir(parents=True)
    (tmp_path / "other" / "checkpoints" / "last").mkdir()  # not what a kill in create leaves
    with pytest.raises(MorecError, match="output exists and is not an empty directory"):
        Run.create(tmp_path / "other", {"config": {}, "data": "d"})


def test_a_kill_while_loading_on_another_rank_is_no_corrupt_checkpoint(
        tmp_path: Path, group: None, monkeypatch: pytest.MonkeyPatch) -> None:
    save_version(tmp_path / "last", 1)

    def load_raising(error: BaseException) -> Callable[..., None]:
        def load(*args: Any, **kwargs: Any) -> None:
            raise error
        return load

    lost = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"
    for error in (RuntimeError(lost), torch.distributed.DistBackendError("NCCL error"),
                  CheckpointException("load", {1: (RuntimeError(lost), None)})):
        monkeypatch.setattr(checkpoint.dcp, "load", load_raising(error))
        with pytest.raises(MorecError, match=re.escape(
                f"{tmp_path / 'last'}: a rank failed while the checkpoint was loading (")
                + ".*the checkpoint may be fine"):
            read_version(tmp_path / "last")
    monkeypatch.setattr(checkpoint.dcp, "load", load_raising(
        CheckpointException("load", {0: (EOFError("Ran out of input"), None)})))
    with pytest.raises(MorecError, match=re.escape("corrupt checkpoint (EOFError: Ran out")):
        read_version(tmp_path / "last")


def test_train_resume_on_a_jobs_continued_training_names_the_command(tmp_path: Path) -> None:
    stage = tmp_path / "job" / "morec"
    stage.mkdir(parents=True)
    record = json.dumps({"config": {"max_epochs": 50}, "data": "d", "morec": {}})
    (stage / "run.json").write_text(record)
    fails(run_cli("train", "--out", str(stage), "--resume", "--max-epochs", "3"),
          f"{stage}: a job's continued training, not a pretraining: resume its job with "
          f"morec-rec run --out {tmp_path / 'job'} --resume")
    assert (stage / "run.json").read_text() == record  # untouched


def test_a_save_interrupted_or_out_of_disk_says_so(tmp_path: Path, group: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # DCP wraps what a rank raised in a CheckpointException: Ctrl-C and a full disk (torch's
    # writer reports a short write as "unexpected pos") come out as themselves.
    full = OSError(errno.ENOSPC, "No space left on device", "x.distcp")
    for failure, expected in ((KeyboardInterrupt(), KeyboardInterrupt), (full, OSError),
                              (RuntimeError("[enforce fail at inline_container.cc:672] . "
                                            "unexpected pos 704 vs 598"), MorecError)):
        def save(*args: Any, failure: BaseException = failure, **kwargs: Any) -> None:
            raise CheckpointException("save", {0: (failure, None)})

        monkeypatch.setattr(checkpoint.dcp, "save", save)
        with pytest.raises(expected) as raised:
            save_version(tmp_path / "last", 1)
        if expected is MorecError:
            assert "the checkpoint could not be written (a full disk?)" in str(raised.value)
        assert checkpoint.resolve(tmp_path / "last") is None  # nothing that looks saved


def test_a_full_disk_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    def full(args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run.json"))

    monkeypatch.setattr(cli, "_parser", lambda: SimpleNamespace(
        parse_args=lambda argv: SimpleNamespace(command=full)))
    assert cli.main([]) == 2
    assert capsys.readouterr().err == (f"morec-rec: error: {tmp_path / 'run.json'}: "
                                       "No space left on device\n")


def test_a_job_on_an_unfinished_base_and_a_kill_while_it_plots(tiny: Path, run: Path,
                                                               tmp_path: Path) -> None:
    base = copy(run, tmp_path)
    edit_json(base / "run.json",
              lambda record: {**record, "config": {**record["config"], "max_epochs": 3}})
    out = tmp_path / "job"
    out.mkdir()
    (out / "job.json.partial").write_text('{"tr')  # killed before the job's record
    done = run_cli("run", "--data", str(tiny), "--out", str(out), "--base", str(base), *JOB)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"morec-rec: warning: {base}: unfinished run (1 of 3 epochs): continuing its best " \
           "checkpoint so far" in done.stderr.splitlines()
    # The results mark a finished job: written after the plots.
    assert (out / "results.json").stat().st_mtime_ns >= (out / "metrics.png").stat().st_mtime_ns
    # Killed while plotting: no results, a plot's temporary file.
    (out / "results.json").unlink()
    (out / ".masses.png.0123abcd.partial").write_bytes(b"\x89PNG")
    done = run_cli("run", "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "results.json").is_file() and not list(out.glob("*.partial"))


def test_a_sasrec_run_on_data_reprepared_with_other_histories_is_another_model(
        tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    assert run_cli("synth", "--profile", "tiny", "--out", str(data)).returncode == 0
    done = run_cli("train", "--data", str(data), "--out", str(out), *TRAIN, "--model", "sasrec")
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(data)  # prepared again in place: SASRec's positions are as many as these
    assert run_cli("synth", "--profile", "tiny", "--history-length", "5", "--out",
                   str(data)).returncode == 0
    record = json.loads((out / "run.json").read_text())
    del record["data_fingerprint"]  # a run recorded before fingerprints: the model tells
    (out / "run.json").write_text(json.dumps(record))
    fails(run_cli("evaluate", "--run", str(out)),
          "checkpoint of another model", "history_length")


def test_data_prepared_again_in_place_is_not_taken_for_the_runs(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "run"

    def synth(*settings: str) -> None:
        shutil.rmtree(data, ignore_errors=True)
        assert run_cli("synth", "--profile", "tiny", "--out", str(data),
                       *settings).returncode == 0

    synth()
    assert run_cli("train", "--data", str(data), "--out", str(out), *TRAIN).returncode == 0
    synth("--row-group-size", "1000")  # the same users and items, other training batches
    for args in (("evaluate", "--run", str(out)),
                 ("train", "--out", str(out), "--resume", "--max-epochs", "2"),
                 ("run", "--data", str(data), "--base", str(out), "--out", str(tmp_path / "job"),
                  *JOB)):
        fails(run_cli(*args), f"{data}: prepared again since {out / 'run.json'} was written")
    synth()  # prepared again as it was: the same data
    assert run_cli("evaluate", "--run", str(out)).returncode == 0
    job = tmp_path / "job"  # a job's record, of data prepared otherwise since
    job.mkdir()
    (job / "job.json").write_text(json.dumps({
        "train": {}, "sampler": {}, "morec": {}, "data": str(data), "base": None,
        "continued": False, "data_fingerprint": "0" * 64}))
    fails(run_cli("run", "--out", str(job), "--resume"),
          f"{data}: prepared again since {job / 'job.json'} was written")


def test_a_checkpoint_lacking_an_identity_field_differs_unless_it_predates_the_field() -> None:
    expect = {"model": "sasrec", "num_users": 3, "history_length": 5}
    assert checkpoint.mismatches({"model": "sasrec"}, expect) == {"num_users": (None, 3)}
    assert checkpoint.mismatches({**expect, "history_length": 50}, expect) == {
        "history_length": (50, 5)}
