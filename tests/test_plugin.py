"""The MoRec object in one process, with a plain PyTorch model: its settings, a job's own
objective and rows through every call, any epoch length and number of workers, and its
state: a restored MoRec (a new store namespace, as after a restart) yields the batches
and masses of one that never stopped, also where the save came while batches were drawn
ahead of training and an update was published but not yet in force."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from morec_rec import (
    ExampleLayout,
    HoldTarget,
    MoRec,
    MoRecConfig,
    MorecError,
    Objective,
    SamplerConfig,
    SegmentedBatch,
)
from morec_rec.data.format import PreparedDataset
from morec_rec.plugin.sampling.sampler import BATCH
from morec_rec.plugin.validation import sample_users


class Cheap(Objective):
    """A job's own objective: rows ∝ 1 / (1 + price)."""

    name, num_groups, columns = "cheap", 1, ("price",)

    def initial_masses(self) -> np.ndarray:
        return np.ones(1)

    def weights(self, rows: dict) -> np.ndarray:
        return 1 / (1 + rows["price"])


class MF(nn.Module):
    """Returns a mean BCE loss and detached logits, as TorchRec's models do."""

    def __init__(self, num_users: int, num_items: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.user, self.item = nn.Embedding(num_users, 8), nn.Embedding(num_items, 8)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = (self.user(batch["user"]) * self.item(batch["item"])).sum(-1)
        return F.binary_cross_entropy_with_logits(logits, batch["label"]), logits.detach()


class Collate:
    """Each row a positive, then every row's negative (item + 1): BLOCKED examples."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def __call__(self, rows) -> dict:
        n = len(rows)
        return {"user": rows.user_id.repeat(2),
                "item": torch.cat([rows.item_id, (rows.item_id + 1) % self.num_items]),
                "label": torch.cat([torch.ones(n), torch.zeros(n)])}


def rows(batch: dict, logits: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, batch["label"], reduction="none")


@pytest.fixture(scope="module")
def manifest(tiny: Path) -> dict:
    return json.loads((tiny / "manifest.json").read_text())


def make(tiny: Path, manifest: dict, model: MF, **kwargs) -> MoRec:
    options = {"objectives": ["accuracy", "revenue", "fairness", "alignment", Cheap()],
               "sampler": SamplerConfig(sub_batch_size=40),
               "config": MoRecConfig(preference=(0.25,) * 4, beta_max=2.0, ki=5.0),
               "layout": ExampleLayout.BLOCKED, **kwargs}
    return MoRec(tiny, Collate(manifest["num_items"]), rows=rows,
                 scorer=lambda users: model.user(torch.as_tensor(users.user_id))
                 @ model.item.weight.T, **options)


def ahead(batches: Iterable[SegmentedBatch], depth: int = 2) -> Iterator[SegmentedBatch]:
    """``batches``, each yielded once ``depth`` more are drawn (a pipeline's look-ahead)."""
    held: deque[SegmentedBatch] = deque()
    for batch in batches:
        held.append(batch)
        if len(held) > depth:
            yield held.popleft()
    yield from held


def train(morec: MoRec, model: MF, epochs: range, *, validate_every: int,
          stop: int | None = None) -> list[SegmentedBatch]:
    """Trains ``epochs`` with the hook, drawing two batches ahead as TorchRec's pipeline
    does, validating after batches whose index + 1 is a multiple of ``validate_every``;
    stops after ``stop`` steps. Returns the batches trained on."""
    hook, optimizer = morec.loss(model), torch.optim.SGD(model.parameters(), lr=0.1)
    trained: list[SegmentedBatch] = []
    for epoch in epochs:
        morec.set_epoch(epoch)
        for batch in ahead(morec.loader):
            loss, _ = hook(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trained.append(batch)
            if len(trained) == stop:
                return trained
            if (batch.index + 1) % validate_every == 0:
                morec.validate(model)
    return trained


def same_batches(a: list[SegmentedBatch], b: list[SegmentedBatch]) -> None:
    assert [x.index for x in a] == [y.index for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x.segment, y.segment)
        for key in ("user", "item"):
            assert torch.equal(x.batch[key], y.batch[key]), (x.index, key)


def test_a_jobs_objective_and_rows_go_through_every_call(tiny: Path, manifest: dict) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    # Training control with an auto target: loss() calibrates through rows and collate.
    morec = make(tiny, manifest, model, config=MoRecConfig(
        preference=(0.25,) * 4, control="training", coefficients="loss",
        hold={"accuracy": HoldTarget(relative=1.1), "cheap": HoldTarget(relative=1.0)},
        calibration_batches=2))
    hook = morec.loss(model)
    targets = hook.coordinator.targets
    assert set(targets) == {"accuracy", "cheap"} and all(t > 0 for t in targets.values())
    morec.set_epoch(0)
    batch = next(iter(morec.loader))
    assert batch.segment.tolist() == [o for o in range(5) for _ in range(40)]
    with pytest.raises(MorecError, match="no gradient here"):  # rows from detached logits
        hook(batch)
    sampling = make(tiny, manifest, model)
    hook = sampling.loss(model)
    sampling.set_epoch(0)
    batch = next(iter(sampling.loader))
    loss, logits = hook(batch)
    assert logits.shape == (400,)  # the model's own output: 2 examples per row
    losses = sampling.objective_losses()
    assert set(losses) == {"accuracy", "revenue", "fairness", "alignment", "cheap"}
    assert all(v is not None and v > 0 for v in losses.values())
    record = sampling.validate(model)
    assert set(record["q"]) == set(losses) and record["measures"] == {"accuracy": 1.0}
    # β left its starting value: the shares of a batch go out with the masses.
    assert set(record["masses"]) == {"fairness", "alignment", BATCH}
    state = json.loads(json.dumps(sampling.state_dict()))
    assert state["journal"][0]["values"].keys() == {"fairness", "alignment", BATCH}
    restored = make(tiny, manifest, model)
    restored.load_state_dict(state)
    assert restored.base == sampling.base
    np.testing.assert_array_equal(restored.masses["fairness"], sampling.masses["fairness"])


def test_a_diverged_model_is_reported_not_measured(tiny: Path, manifest: dict) -> None:
    # Every reading stops at NaN instead of handing it to the controllers as a number:
    # a NaN loss is not an objective without rows, a NaN score not a ranking.
    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model)
    hook = morec.loss(model)
    morec.set_epoch(0)
    with torch.no_grad():
        model.user.weight[:5] = torch.nan
    hook(next(iter(morec.loader)))
    with pytest.raises(MorecError, match=r"training loss since the last read: \w+ nan"):
        morec.objective_losses()
    with pytest.raises(MorecError, match=r"scorer: NaN scores for 5 of 259 users \(user ids "
                                         r"0, 1, 2, 3, 4\)"):
        morec.validate(model)
    assert morec.store.latest_version() == 0  # nothing published


def test_settings_that_need_a_scorer_say_so(tiny: Path, manifest: dict) -> None:
    with pytest.raises(MorecError, match="validation control needs the job's scorer"):
        MoRec(tiny, Collate(manifest["num_items"]), rows=rows)
    with pytest.raises(MorecError, match="objective 'alignment' .its top-K exposure. needs"):
        MoRec(tiny, Collate(manifest["num_items"]), rows=rows, config=MoRecConfig(
            control="training", coefficients="loss", hold={"accuracy": HoldTarget(value=1.0)}))


class Named(Cheap):
    """Cheap under another name or group count."""

    def __init__(self, name: object = "cheap", num_groups: object = 1) -> None:
        self.name, self.num_groups = name, num_groups  # type: ignore[assignment]


class Undeclared(Objective):
    """An objective that forgot its class attributes but one."""

    num_groups = 1

    def initial_masses(self) -> np.ndarray:
        return np.ones(1)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"objectives": "accuracy"}, "objectives: 'accuracy' is one objective; give a list"),
    ({"objectives": []}, "objectives: none given; list at least one"),
    ({"objectives": ["accuracy", 3]}, "objectives: 3 (int) is neither a built-in objective's"),
    ({"objectives": ["accuracy", Named("batch")]}, "objective name 'batch': a name is a str "
                                                   "other than 'batch'"),
    ({"objectives": ["accuracy", Named(num_groups="2")]}, "objective 'cheap': num_groups = '2' "
                                                          "must be an int >= 1"),
    ({"objectives": ["accuracy", Named(num_groups=0)]}, "objective 'cheap': num_groups = 0"),
    ({"layout": "sideways"}, "layout = 'sideways' is not an ExampleLayout nor one's value "
                             "('rows', 'blocked', 'interleaved')"),
    ({"chunk_users": 0}, "chunk_users = 0 must be an int >= 1"),
    ({"num_workers": -1}, "loader: num_workers = -1 must be an int >= 0"),
    ({"columns": "price"}, "sampler: columns 'price' is one name; give a list of them"),
    ({"objectives": ["accuracy", Undeclared()]}, "objective Undeclared: an Objective declares "
                                                 "name, columns (class attributes"),
    ({"representation": 3}, "representation = 3 is not a function"),
])
def test_arguments_that_cannot_work_are_refused_at_construction(
        tiny: Path, manifest: dict, arguments: dict, message: str) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    with pytest.raises(MorecError, match="^" + re.escape(message)):
        make(tiny, manifest, model, **arguments)


def test_a_layout_may_be_named_and_an_epoch_must_be_an_int(tiny: Path, manifest: dict) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model, layout="blocked")
    assert morec.examples.layout is ExampleLayout.BLOCKED
    with pytest.raises(MorecError, match=r"set_epoch: epoch 0.5 must be an int >= 0"):
        morec.set_epoch(0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_batch_no_stream_holds_is_refused(tiny: Path, manifest: dict, num_workers: int) -> None:
    # tiny's 3,220 training rows: 1,610 a stream with two workers.
    streams = max(num_workers, 1)
    rows = sum(shard["rows"] for shard in manifest["shards"]) // streams
    too_many = rows // 5 + 1
    model = MF(manifest["num_users"], manifest["num_items"])
    with pytest.raises(MorecError, match=(
            rf"sub_batch_size = {too_many} × 5 objective\(s\): {5 * too_many:,} rows a batch "
            rf"exceed the {rows:,} training rows of each of "
            rf"{streams} stream\(s\) .*: no step would run")):
        make(tiny, manifest, model, sampler=SamplerConfig(sub_batch_size=too_many),
             num_workers=num_workers)
    fits = make(tiny, manifest, model, sampler=SamplerConfig(sub_batch_size=too_many - 1),
                num_workers=num_workers)
    assert fits.batches_per_epoch == streams
    # MoRec without its sampler draws the whole batch from accuracy's: named as given.
    too_many = rows // 4 + 1
    with pytest.raises(MorecError, match=rf"sub_batch_size = {too_many} × 4 objective\(s\): "):
        make(tiny, manifest, model, objectives=["accuracy", "revenue", "fairness", "alignment"],
             sampler=SamplerConfig(sub_batch_size=too_many),
             config=MoRecConfig(coefficients="loss_forms"), num_workers=num_workers)


@pytest.mark.parametrize("num_workers, batches_per_request", [(0, 1), (2, 1), (2, 3)])
def test_short_epochs_and_more_updates_than_batches(tiny: Path, manifest: dict,
                                                   num_workers: int,
                                                   batches_per_request: int) -> None:
    # 2 batches an epoch per worker stream, fewer than the 4 (or 16, 3 a request) a loader
    # with 2 workers may hold ahead; a validation round after every step, 3 epochs.
    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model, sampler=SamplerConfig(sub_batch_size=300),
                 num_workers=num_workers, batches_per_request=batches_per_request)
    trained = train(morec, model, range(3), validate_every=1)
    assert [b.index for b in trained] == list(range(3 * morec.batches_per_epoch))
    journal = morec.state_dict()["journal"]
    assert morec.store.latest_version() == len(trained)
    # Every version applied from the batch its record named: batches carry the shares of
    # the masses in force, which follow the published ones.
    assert len(journal) <= 1 + morec.loader.lookahead


@pytest.mark.parametrize(("validate_every", "warned"), [(1, True), (8, False)])
def test_a_round_before_the_last_rounds_masses_apply_is_reported(
        tiny: Path, manifest: dict, caplog: pytest.LogCaptureFixture, validate_every: int,
        warned: bool) -> None:
    # 16 batches an epoch. A round publishes from 2 batches past the one trained (those
    # the pipeline holds): a round after every batch comes before the last one's apply.
    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model)
    with caplog.at_level(logging.WARNING, logger="morec_rec.plugin.morec"):
        train(morec, model, range(1), validate_every=validate_every)
    messages = [r.getMessage() for r in caplog.records if r.name == "morec_rec.plugin.morec"]
    assert messages == ([
        "validation round at batch 2: the masses published by the round before apply from "
        "batch 3, not trained yet, so this round measures none of them; validate at "
        "intervals longer than the loader's lookahead (0 batches) plus the batches the "
        "pipeline holds, or pass a smaller batches_per_request"] if warned else [])


def hit_by_hand(model: MF, dataset: PreparedDataset, users: np.ndarray) -> float:
    """Hit@10 of ``model`` over ``users``' validation items, each user's training items
    excluded, ties to the lower item id: the metric computed without MoRec's evaluation."""
    train = pa.concat_tables(pq.read_table(f, columns=["user_id", "item_id"])
                             for f in dataset.train_files)
    valid = dataset.split("valid").to_pydict()
    held = dict(zip(valid["user_id"], valid["item_id"]))
    seen: dict[int, set[int]] = {}
    for user, item in zip(train["user_id"].to_pylist(), train["item_id"].to_pylist()):
        seen.setdefault(user, set()).add(item)
    with torch.no_grad():
        scores = (model.user.weight @ model.item.weight.T).numpy()
    hits = 0
    for user in users.tolist():
        ranked = sorted((i for i in range(scores.shape[1]) if i not in seen[user]),
                        key=lambda i: (-scores[user, i], i))
        hits += held[user] in ranked[:10]
    return hits / len(users)


def test_validation_measures_a_fixed_sample_of_users(tiny: Path, manifest: dict) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    dataset = PreparedDataset.open(tiny)
    everyone = dataset.split("valid")["user_id"].to_numpy()
    size = len(everyone) // 3
    samples = [sample_users(dataset.split("valid"), size, seed)["user_id"].to_numpy()
               for seed in (0, 0, 1)]
    # The same users for the same seed, others for another; distinct, in user order.
    np.testing.assert_array_equal(samples[0], samples[1])
    assert not np.array_equal(samples[0], samples[2])
    for users in samples:
        assert len(users) == size and np.all(np.diff(users) > 0)
        assert np.isin(users, everyone).all()
    # A round measures its sampler seed's sample.
    for seed in (0, 1):
        morec = make(tiny, manifest, model, sampler=SamplerConfig(sub_batch_size=40, seed=seed),
                     config=MoRecConfig(preference=(0.25,) * 4, validation_users=size))
        morec.loss(model)
        record = morec.validate(model)
        assert record["users"] == size
        assert record["metrics"]["hit@10"] == pytest.approx(
            hit_by_hand(model, dataset, samples[2 * seed]))
    # 0, or at least the number of validation users, measures them all.
    for size in (0, len(everyone), len(everyone) + 1):
        morec = make(tiny, manifest, model, config=MoRecConfig(
            preference=(0.25,) * 4, validation_users=size))
        morec.loss(model)
        record = morec.validate(model)
        assert record["users"] == len(everyone)
        assert record["metrics"]["hit@10"] == pytest.approx(hit_by_hand(model, dataset, everyone))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_morec_goes_on_as_if_uninterrupted(tiny: Path, manifest: dict,
                                                      num_workers: int) -> None:
    def fresh() -> tuple[MoRec, MF]:
        model = MF(manifest["num_users"], manifest["num_items"])
        return make(tiny, manifest, model, num_workers=num_workers), model

    morec, model = fresh()
    whole = train(morec, model, range(2), validate_every=4)
    assert len(whole) == 2 * morec.batches_per_epoch
    final = {k: v.copy() for k, v in morec.masses.items()}

    # Stopped at step 9: the loader has drawn batches beyond it (the look-ahead), and the
    # round after step 8 published masses that apply past the batches then drawn.
    stopped, model = fresh()
    head = train(stopped, model, range(2), validate_every=4, stop=9)
    state = json.loads(json.dumps(stopped.state_dict()))
    assert state["position"] == 9 and state["journal"][-1]["effective_from"] > 8
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    restored, model = fresh()  # a new store namespace: nothing of the old one is read
    model.load_state_dict(weights)
    restored.load_state_dict(state)
    assert restored.epoch == 0 and restored.position == 9
    tail = train(restored, model, range(restored.epoch, 2), validate_every=4)
    same_batches(whole, head + tail)
    for name in (*final, BATCH):
        np.testing.assert_allclose(restored.masses[name], final[name], rtol=0, atol=1e-12)
    # The restored job numbers its versions on from the saved state's, as its log shows.
    assert restored.state_dict()["published"] == morec.state_dict()["published"] > 2


def test_a_hook_for_another_model_object_goes_on_where_the_last_one_stopped(
        tiny: Path, manifest: dict) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model)
    trained = train(morec, model, range(1), validate_every=100, stop=5)
    remade = MF(manifest["num_users"], manifest["num_items"])  # as a job that re-shards
    remade.load_state_dict(model.state_dict())
    hook = morec.loss(remade)
    assert morec.position == 5 and morec.state_dict()["position"] == 5
    with pytest.raises(MorecError, match="batch 3 comes after batch 4 was trained"):
        hook(trained[-2])


def test_a_second_pass_on_a_batch_is_neither_measured_nor_trained_again(
        tiny: Path, manifest: dict) -> None:
    # SAM: a pass, the weights perturbed, a second pass on the same batch.
    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model)
    hook = morec.loss(model)
    morec.set_epoch(0)
    batch = next(iter(morec.loader))
    hook(batch)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.user.weight.add_(1.0)
    hook(batch)
    assert morec.position == 1
    model.load_state_dict(original)
    per_example = rows(batch.batch, model(batch.batch)[1]).detach().double()
    segment = morec.examples.expand(batch.segment, per_example)
    expected = [per_example[segment == o].mean().item() for o in range(len(morec.names))]
    assert list(morec.objective_losses().values()) == pytest.approx(expected, rel=1e-12)


def test_a_restored_morec_refuses_the_batches_it_trained_before(tiny: Path,
                                                                manifest: dict) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    stopped = make(tiny, manifest, model)
    train(stopped, model, range(1), validate_every=100, stop=9)
    restored = make(tiny, manifest, model)
    restored.load_state_dict(stopped.state_dict())
    hook = restored.loss(model)
    with pytest.raises(MorecError, match=r"batch 0 comes after batch 8 was trained: call "
                                         r"morec.set_epoch\(epoch\)"):
        hook(next(iter(restored.loader)))  # no set_epoch: the epoch from its start


def test_validation_restores_each_modules_own_mode(tiny: Path, manifest: dict) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    model.frozen = nn.Dropout()  # a part the job keeps in eval mode while it trains
    model.frozen.eval()
    morec = make(tiny, manifest, model)
    morec.loss(model)
    morec.validate(model)
    assert model.training and not model.frozen.training


def test_a_failed_reference_round_keeps_no_reference(tiny: Path, manifest: dict) -> None:
    # A scorer that ranks each validation user's held-out item last: the reference
    # Hit@10 is 0, which no relative target can be held against.
    valid = PreparedDataset.open(tiny).split("valid")
    held_out = dict(zip(valid["user_id"].to_pylist(), valid["item_id"].to_pylist()))
    model = MF(manifest["num_users"], manifest["num_items"])
    good = [False]

    def scorer(users) -> torch.Tensor:
        scores = model.user(torch.as_tensor(users.user_id)) @ model.item.weight.T
        if not good[0]:
            scores = torch.zeros_like(scores)
            scores[range(len(scores)), [held_out[u] for u in users.user_id.tolist()]] = -1.0
        return scores

    morec = MoRec(tiny, Collate(manifest["num_items"]), rows=rows, scorer=scorer,
                  layout=ExampleLayout.BLOCKED)
    morec.loss(model)
    with pytest.raises(MorecError, match="hit@10 is 0"):
        morec.validate(model)
    assert morec.base is None
    good[0] = True
    assert morec.validate(model)["metrics"] == morec.base


def test_a_morec_made_before_the_process_group_is_refused(
        tiny: Path, manifest: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model)  # no process group: rank 0 of 1
    monkeypatch.setattr("morec_rec.plugin.morec.place", lambda: (1, 2))  # one made since
    for call in (morec.loss, morec.validate):
        with pytest.raises(MorecError, match=r"MoRec was made as rank 0 of 1 and is used as "
                                             r"rank 1 of 2: make it after torch.distributed"):
            call(model)


def test_state_must_be_loaded_before_the_hook(tiny: Path, manifest: dict) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    state = make(tiny, manifest, model).state_dict()
    for first in (MoRec.validate, MoRec.loss):
        morec = make(tiny, manifest, model)
        first(morec, model)
        with pytest.raises(MorecError, match=r"must come before loss\(\), training and valid"):
            morec.load_state_dict(state)


def test_state_must_be_loaded_with_the_same_loader_workers_and_sampler(tiny: Path,
                                                                       manifest: dict) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    state = make(tiny, manifest, model).state_dict()
    with pytest.raises(MorecError, match=r"saved on 1 rank\(s\) with 0 loader worker\(s\) "
                                         r"each, restored on 1 with 2: a resume needs the same"):
        make(tiny, manifest, model, num_workers=2).load_state_dict(state)
    # The batches depend on the objectives and the sampler's settings too.
    with pytest.raises(MorecError, match=r"saved with objectives = \['accuracy', 'revenue', "
                                         r"'fairness', 'alignment', 'cheap'\], restored with "
                                         r"\['accuracy', 'revenue', 'fairness', 'alignment'\]"):
        make(tiny, manifest, model, objectives=["accuracy", "revenue", "fairness", "alignment"],
             config=MoRecConfig(beta_max=2.0)).load_state_dict(state)
    with pytest.raises(MorecError, match="saved with sampler sub_batch_size = 40, restored "
                                         "with 32: a resume needs the same"):
        make(tiny, manifest, model, sampler=SamplerConfig(sub_batch_size=32)).load_state_dict(
            state)
    # The reference is of the validation users.
    with pytest.raises(MorecError, match="saved with validation_users = 0, restored with 50: "
                                         "a resume needs the same"):
        make(tiny, manifest, model, config=MoRecConfig(
            preference=(0.25,) * 4, beta_max=2.0, ki=5.0, validation_users=50)
             ).load_state_dict(state)
    # The controllers and masses are of the coordination, and the position of the data.
    with pytest.raises(MorecError, match=r"saved with method = \{'coordinator': 'morec', "
                                         r"'coefficients': 'sampling', 'control': 'validation'\}"
                                         r", restored with \{'coordinator': 'morec', "
                                         r"'coefficients': 'loss'"):
        make(tiny, manifest, model, config=MoRecConfig(
            preference=(0.25,) * 4, beta_max=2.0, ki=5.0, coefficients="loss")
             ).load_state_dict(state)
    with pytest.raises(MorecError, match=r"saved with data = \{'users': 1, 'items': 138, "
                                         r"'shard_rows': \[3220\]\}, restored with \{'users': "
                                         r"259"):
        make(tiny, manifest, model).load_state_dict({**state, "data": {
            "users": 1, "items": 138, "shard_rows": [3220]}})


@pytest.mark.parametrize(("change", "message"), [
    (lambda state: [state], "MoRec state: got list, expected the mapping that state_dict()"),
    (lambda state: {k: v for k, v in state.items() if k != "base"},
     "MoRec state lacks base: not what state_dict() gives"),
    (lambda state: {**state, "position": -5}, "MoRec state: position -5 is not an int >= 0"),
    (lambda state: {**state, "journal": [{"values": {}}]},
     "MoRec state: journal entry {'values': {}} is not {'effective_from': int, 'values'"),
    (lambda state: {**state, "journal": 3}, "MoRec state: journal 3 is not a list"),
    (lambda state: {**state, "journal": [{"effective_from": 3, "values": {"novelty": [1.0]}}]},
     "MoRec state: masses of novelty, which are not among this MoRec's accuracy, revenue"),
    (lambda state: {**state, "journal": [{"effective_from": 3, "values": {"alignment": [1.0]}}]},
     "objective 'alignment': masses must have shape (10,), got (1,)"),
])
def test_a_state_that_is_not_a_morecs_is_refused_before_anything_is_restored(
        tiny: Path, manifest: dict, change: Callable[[dict], Any], message: str) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model)
    with pytest.raises(MorecError, match="^" + re.escape(message)):
        morec.load_state_dict(change(morec.state_dict()))
    assert morec.store.latest_version() == 0 and morec.base is None  # nothing restored


def test_a_segmented_batch_is_pipelineable_where_torchrec_comes_after_morec(tiny: Path) -> None:
    code = (
        "import sys\n"
        "from morec_rec import MoRec, SegmentedBatch\n"
        "morec = MoRec(sys.argv[1], lambda rows: rows, scorer=lambda users: None)\n"
        "assert 'torchrec' not in sys.modules\n"
        "from torchrec.streamable import Pipelineable\n"
        "morec.set_epoch(0)\n"
        "assert isinstance(next(iter(morec.loader)), Pipelineable)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tiny)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_loss_and_validate_take_the_model(tiny: Path, manifest: dict) -> None:
    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model)
    with pytest.raises(MorecError, match=r"^loss\(\): got a NoneType, expected the job's model"):
        morec.loss(None)  # type: ignore[arg-type]
    hook = morec.loss(model)
    with pytest.raises(MorecError, match=r"^validate\(\): got a MoRecLoss, expected the job's"):
        morec.validate(hook)  # type: ignore[arg-type]


def test_validation_rows_carry_the_columns_training_rows_do(tiny: Path, manifest: dict) -> None:
    # A collate that reads a column it did not ask for fails at the first round, as it
    # would at the first training batch, not only once training has started.
    seen: list[tuple[bool, bool]] = []
    collate = Collate(manifest["num_items"])

    def recording(sampled) -> dict:
        seen.append((sampled.price is None, sampled.history_values is None))
        return collate(sampled)

    model = MF(manifest["num_users"], manifest["num_items"])
    morec = make(tiny, manifest, model, columns=["price"], validation_collate=recording)
    morec.loss(model)
    morec.validate(model)
    assert seen and set(seen) == {(False, True)}
