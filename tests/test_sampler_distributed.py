"""The sampler under torchrun with 2 CPU ranks (gloo) × 2 loader workers each: disjoint
streams, a publish that every worker applies at the same batch, and a loader resumed
mid-epoch that replays it."""

from __future__ import annotations

import json

import pytest
from conftest import run_torchrun
from sampling_data import make_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("sampler_job")
    make_dataset(root / "data")
    run_torchrun("tests/dist/sampler_job.py", "--data", str(root / "data"), "--out", str(root))
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_and_workers_cover_disjoint_rows_with_equal_batches(job: list[dict]) -> None:
    batches = [len(rank["uniform"]) for rank in job]
    assert batches[0] == batches[1] > 0
    streams = {}  # (rank, worker) -> rows
    for rank in job:
        for batch in rank["uniform"]:
            streams.setdefault((rank["rank"], batch["batch_index"] % 2), []).extend(
                map(tuple, batch["rows"]))
    assert len(streams) == 4 and len({len(rows) for rows in streams.values()}) == 1
    every = [row for rows in streams.values() for row in rows]
    assert len(set(every)) == len(every)  # no row in two streams, nor twice in one
    assert 4320 - 4 * 32 < len(every) <= 4320  # all but the streams' partial last batches


def test_publish_reaches_every_worker_of_every_rank_at_the_same_batch(job: list[dict]) -> None:
    effective_from = job[0]["effective_from"]
    assert effective_from == job[1]["effective_from"]
    last = job[0]["groups"] - 1
    for rank in job:
        seen_workers = set()
        for batch in rank["weighted"]:
            if batch["batch_index"] < effective_from:
                assert batch["version"] == 0 and set(batch["groups"]) == {0}
            else:
                assert batch["version"] == 1 and set(batch["groups"]) == {last}
                seen_workers.add(batch["batch_index"] % 2)
        assert seen_workers == {0, 1}


def test_a_loader_resumed_mid_epoch_replays_the_published_version(job: list[dict]) -> None:
    # A new loader on every rank starts at position RESUME_AT, before the version's
    # effective_from: its workers read the version from the store's history and switch at
    # the same batch, so the rest of the stream is the first pass's, row for row.
    for rank in job:
        start = rank["resume_at"]
        assert 0 < start < job[0]["effective_from"]
        assert [b["batch_index"] for b in rank["resumed"]] == \
            [b["batch_index"] for b in rank["weighted"][start:]]
        assert rank["resumed"] == rank["weighted"][start:]
        assert {b["version"] for b in rank["resumed"]} == {0, 1}
