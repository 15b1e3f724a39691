"""The versioned weight store: round trips, versions, torn reads, reachability, and torchrun."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import pickle
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch.distributed as dist
from conftest import ROOT, free_port, run_torchrun
from torch.utils.data import DataLoader, IterableDataset

from morec_rec.errors import MorecError
from morec_rec.plugin.sampling.store import Masses, StoreSpec, WeightStore, publish_and_sync

STORE_JOB = ROOT / "tests" / "dist" / "store_job.py"

# Floats whose shortest repr is long: a lossy encoding would change them.
EXACT = {
    "accuracy": np.array([1 / 3, 2 / 3 - 1e-17, np.nextafter(0.0, 1.0)]),
    "revenue": np.array([0.1, 0.2, 0.7]),
}


@pytest.fixture(params=["hash", "tcp"])
def spec(request: pytest.FixtureRequest, tmp_path: Path,
         tcp_store: Callable[..., StoreSpec]) -> StoreSpec:
    if request.param == "hash":  # the registry is per process: one prefix per test
        return StoreSpec(kind="hash", prefix=f"test/{tmp_path.name}", timeout_s=5)
    return tcp_store()


def test_round_trip_is_exact(spec: StoreSpec) -> None:
    writer, reader = WeightStore.connect(spec), WeightStore.connect(spec)
    assert writer.publish(EXACT, effective_from=3) == 1
    second = {name: v[::-1].copy() for name, v in EXACT.items()}
    assert writer.publish(second, effective_from=3) == 2

    assert reader.latest_version() == 2
    latest, first = reader.read(), reader.read(1)
    assert (latest.version, latest.effective_from, first.version) == (2, 3, 1)
    for name in EXACT:
        assert first.values[name].dtype == np.float64
        assert first.values[name].tobytes() == EXACT[name].tobytes()
        assert latest.values[name].tobytes() == second[name].tobytes()
    assert [m.version for m in reader.history()] == [1, 2]
    assert list(reader.history()[0].values) == ["accuracy", "revenue"]


def test_nothing_published_does_not_block(spec: StoreSpec) -> None:
    weights = WeightStore.connect(spec)
    start = time.monotonic()
    assert weights.latest_version() == 0
    assert weights.read() == Masses(version=0, effective_from=0, values={})
    assert weights.history() == []
    assert time.monotonic() - start < 1  # a blocking get would wait the 5 s timeout


def test_polling_does_not_write() -> None:
    # Loaders poll before every batch: a poll must not touch the store's keys.
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5))
    spec = StoreSpec(kind="tcp", host="127.0.0.1", port=server.port, timeout_s=5)
    writer, reader = WeightStore.connect(spec), WeightStore.connect(spec)
    for published in (False, True):
        if published:
            writer.publish(EXACT, effective_from=0)
        keys = server.num_keys()
        for _ in range(100):
            reader.latest_version()
            reader.read()
        assert server.num_keys() == keys


def test_read_of_unpublished_version(spec: StoreSpec) -> None:
    weights = WeightStore.connect(spec)
    weights.publish(EXACT, effective_from=0)
    with pytest.raises(MorecError, match="version 2 is not published"):
        weights.read(2)


def test_effective_from_never_goes_back(spec: StoreSpec) -> None:
    weights = WeightStore.connect(spec)
    weights.publish(EXACT, effective_from=10)
    with pytest.raises(MorecError, match="before batch 10"):
        weights.publish(EXACT, effective_from=9)
    with pytest.raises(MorecError, match="batch index >= 0"):
        weights.publish(EXACT, effective_from=-1)
    assert weights.latest_version() == 1


def test_payloads_are_write_once(spec: StoreSpec) -> None:
    # A payload left at version 1 (by a racing writer, or a crash before the pointer moved).
    spec.connect().set("masses/1", b"{}")
    weights = WeightStore.connect(spec)
    with pytest.raises(MorecError, match="version 1 was already written"):
        weights.publish(EXACT, effective_from=0)
    assert spec.connect().get("masses/1") == b"{}"


@pytest.mark.parametrize(("masses", "problem"), [
    (np.array([0.5, np.nan]), "'fairness'.*non-finite mass nan at group 1"),
    (np.array([np.inf, 1.0]), "'fairness'.*non-finite mass inf at group 0"),
    (np.array([0.5, -0.1, 0.6]), "'fairness'.*negative mass -0.1 at group 1"),
    (np.ones((2, 2)) / 4, r"'fairness'.*1-D vector, got shape \(2, 2\)"),
    (np.float64(1.0), r"'fairness'.*1-D vector, got shape \(\)"),
    (np.array([]), "'fairness'.*empty vector"),
    (np.zeros(3), "'fairness'.*sum to 0"),
    (np.array(["a", "b"]), "'fairness'.*expected real numbers"),
    ([[1.0], [1.0, 2.0]], "'fairness'.*not a numeric vector"),
])
def test_bad_masses_are_refused(spec: StoreSpec, masses: object, problem: str) -> None:
    weights = WeightStore.connect(spec)
    with pytest.raises(MorecError, match=problem):
        weights.publish({"accuracy": EXACT["accuracy"], "fairness": masses}, effective_from=0)
    assert weights.latest_version() == 0


def test_nothing_to_publish(spec: StoreSpec) -> None:
    with pytest.raises(MorecError, match="no group masses"):
        WeightStore.connect(spec).publish({}, effective_from=0)


def test_read_masses_are_immutable(spec: StoreSpec) -> None:
    weights = WeightStore.connect(spec)
    weights.publish(EXACT, effective_from=0)
    with pytest.raises(ValueError, match="read-only"):
        weights.read().values["accuracy"][0] = 1.0


def _publish_versions(spec: StoreSpec, count: int) -> None:
    """Writer of the torn-read test: version v carries v in every array and 10·v as batch."""
    weights = WeightStore.connect(spec)
    for v in range(1, count + 1):
        weights.publish({"a": np.array([v, 1.0, 2.0]), "b": np.full(5, float(v))},
                        effective_from=10 * v)


def _assert_consistent(masses: Masses) -> None:
    v = masses.version
    assert masses.effective_from == 10 * v
    assert masses.values["a"].tolist() == [v, 1.0, 2.0]
    assert masses.values["b"].tolist() == [v] * 5


def test_reader_never_sees_a_torn_write(tcp_store: Callable[..., StoreSpec]) -> None:
    count = 300
    spec = tcp_store(timeout_s=10)
    writer = mp.get_context("spawn").Process(target=_publish_versions, args=(spec, count))
    writer.start()
    store, seen = spec.connect(), [0]
    deadline = time.monotonic() + 60
    while seen[-1] < count:
        assert time.monotonic() < deadline, f"saw versions up to {seen[-1]}"
        masses = WeightStore(store).read()  # a new reader each time: nothing cached
        assert masses.version >= seen[-1]
        if masses.version > seen[-1]:
            _assert_consistent(masses)
            seen.append(masses.version)
    writer.join(10)
    assert writer.exitcode == 0
    assert len(seen) > 10  # the reader ran while the writer was publishing
    history = WeightStore.connect(spec).history()
    assert [m.version for m in history] == list(range(1, count + 1))
    for masses in history:
        _assert_consistent(masses)


def test_tcp_round_trip() -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5))
    spec = StoreSpec(kind="tcp", host="127.0.0.1", port=server.port, timeout_s=5)
    assert WeightStore.connect(spec).publish(EXACT, effective_from=0) == 1
    read = WeightStore.connect(spec).history()[0].values
    assert all(read[name].tobytes() == EXACT[name].tobytes() for name in EXACT)
    assert not server.check(["version"])  # our keys live under the prefix only


def test_unreachable_tcp_store_fails_within_timeout() -> None:
    port = free_port()
    spec = StoreSpec(kind="tcp", host="127.0.0.1", port=port, timeout_s=2)
    start = time.monotonic()
    with pytest.raises(MorecError, match=rf"tcp://127.0.0.1:{port} not reachable within 2 s"):
        WeightStore.connect(spec)
    elapsed = time.monotonic() - start
    assert 2 <= elapsed < 2.5  # keeps trying (rank 0 may be starting), then gives up


def _connect(spec: StoreSpec | None, errors: mp.Queue) -> None:
    """Child process: connects with ``spec`` (or ``from_env()``), reports the error if any."""
    try:
        WeightStore.connect(spec or StoreSpec.from_env())
        errors.put("")
    except MorecError as error:
        errors.put(str(error))


@pytest.mark.parametrize(("context", "own_spec"), [
    ("spawn", False),  # the parent's spec, pickled: caught by the spec's owner pid
    ("fork", True),  # a spec made in the child: caught by the registry copied by fork
])
def test_hash_store_from_another_process(monkeypatch: pytest.MonkeyPatch, context: str,
                                         own_spec: bool) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    spec = StoreSpec.from_env()
    WeightStore.connect(spec).publish(EXACT, effective_from=0)
    ctx = mp.get_context(context)
    errors = ctx.Queue()
    child = ctx.Process(target=_connect, args=(None if own_spec else spec, errors))
    child.start()
    assert "use a 'tcp' store" in errors.get(timeout=30)
    child.join(10)


class _Connects(IterableDataset):
    """Connects to the store of ``from_env()`` where it is iterated; yields the version."""

    def __iter__(self) -> Iterator[int]:
        yield WeightStore.connect(StoreSpec.from_env()).latest_version()


def test_hash_store_in_loader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    weights = WeightStore.connect(StoreSpec.from_env())
    weights.publish(EXACT, effective_from=weights.read().effective_from)
    version = weights.latest_version()
    assert list(DataLoader(_Connects(), batch_size=None)) == [version]  # num_workers=0
    # spawn: the worker has no registry entry and its own spec; only being a worker tells.
    workers = DataLoader(_Connects(), batch_size=None, num_workers=1,
                         multiprocessing_context="spawn")
    with pytest.raises(MorecError, match="use a 'tcp' store"):
        list(workers)


def test_weight_store_cannot_cross_a_fork(tcp_store: Callable[..., StoreSpec]) -> None:
    weights = WeightStore.connect(tcp_store())
    child = mp.get_context("fork").Process(target=weights.latest_version)
    child.start()
    child.join(10)
    assert child.exitcode == 1


def test_spec_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    spec = StoreSpec.from_env(timeout_s=4)
    assert (spec.kind, spec.host, spec.port, spec.prefix, spec.timeout_s) == (
        "tcp", "10.0.0.7", 29500, "morec/attempt_2", 4)
    assert pickle.loads(pickle.dumps(spec)) == spec
    monkeypatch.delenv("MASTER_ADDR")
    assert StoreSpec.from_env().kind == "hash"


@pytest.mark.parametrize(("fields", "problem"), [
    ({"kind": "redis"}, "kind 'redis'"),
    ({"kind": "tcp", "host": "h"}, "needs a host and a port"),
    ({"kind": "hash", "timeout_s": 0}, "timeout must be positive"),
])
def test_bad_spec(fields: dict, problem: str) -> None:
    with pytest.raises(MorecError, match=problem):
        StoreSpec(**fields)


def test_publish_and_sync_without_process_group(spec: StoreSpec) -> None:
    weights = WeightStore.connect(spec)
    assert publish_and_sync(weights, EXACT, effective_from=0) == 1
    assert weights.latest_version() == 1


def _load_store_job():
    module_spec = importlib.util.spec_from_file_location("store_job", STORE_JOB)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_loader_workers_under_torchrun_see_every_version(tmp_path: Path) -> None:
    run_torchrun("tests/dist/store_job.py", "--out", str(tmp_path), timeout=60)
    published = _load_store_job().PUBLISHED
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["spec"]["kind"] == "tcp"
        assert result["spec"]["prefix"] == "morec/attempt_0"
        assert result["synced"] == [1, 2]  # every rank returns rank 0's versions
        assert "'accuracy': non-finite mass nan" in result["refused"]  # every rank raises
        records = result["records"]
        assert sorted((r["worker"], r["step"]) for r in records) == [
            (0, 0), (0, 1), (1, 0), (1, 1)]
        assert len({r["pid"] for r in records} | {result["pid"]}) == 3  # worker processes
        for record in records:
            values, effective_from = published[record["step"]]
            assert record["version"] == record["step"] + 1
            assert record["effective_from"] == effective_from
            assert record["values"] == {name: v.tolist() for name, v in values.items()}
            assert record["history"] == list(range(1, record["version"] + 1))
    assert ranks[1]["refused"].startswith("rank 0 failed to publish group masses")
