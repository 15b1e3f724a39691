"""The MoRec job end to end on the tiny synthetic profile: one process and torchrun.

A base is pretrained once per module; each test continues it (``--base``), so the tests
differ only in what they check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN, pretrained, run_cli, run_torchrun

from morec_rec.config import MoRecConfig, SamplerConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.jobs.checkpoint import read_meta
from morec_rec.jobs.continued import MoRecProgress, select
from morec_rec.plugin.eval.metrics import RankingMetrics
from morec_rec.plugin.morec import check_settings
from morec_rec.plugin.sampling.objectives import OneGroup

MOREC = [*TRAIN, "--sub-batch-size", "32", "--epochs", "2", "--updates-per-epoch", "3",
         "--ki", "5"]
METRICS = {"hit@10", "rhit@10", "pop_kl@10", "min_hit@10"}


@pytest.fixture(scope="module")
def base(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrained(tiny, tmp_path_factory.mktemp("base") / "run", max_epochs=4)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_writes_results_logs_and_plots(tiny: Path, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    done = run_cli("run", "--data", str(tiny), "--base", str(base), "--out", str(out),
                   "--continued", *MOREC)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    for row in ("base", "morec", "continued"):
        assert set(results[row]) == METRICS
    assert isinstance(results["valid"], bool) and isinstance(results["imp"], float)
    assert results["valid"] == (results["morec"]["hit@10"] >= 0.97 * results["base"]["hit@10"])
    # An existing base is not timed; the stages run here are.
    assert set(results["wall_s"]) == {"morec", "continued", "test"}
    assert all(seconds > 0 for seconds in results["wall_s"].values())
    assert {p.name for p in out.glob("*.png")} == {"controller.png", "masses.png", "metrics.png"}

    # The base row is the base run's own test evaluation.
    evaluated = run_cli("evaluate", "--run", str(base), "--split", "test", "--json")
    assert {k: json.loads(evaluated.stdout)[k] for k in METRICS} == results["base"]
    # The paired comparison's per-user evaluation gives the same metrics as evaluate (up to
    # the order in which prices are summed).
    morec = json.loads(run_cli("evaluate", "--run", str(out / "morec"), "--json").stdout)
    done = run_cli("evaluate", "--run", str(out / "morec"), "--against", str(base),
                   "--resamples", "50", "--json")
    assert done.returncode == 0, done.stderr
    compared = json.loads(done.stdout)
    assert compared["b"] == pytest.approx(results["base"], rel=1e-12)
    assert compared["a"] == pytest.approx({k: morec[k] for k in METRICS}, rel=1e-12)
    for key, (low, high) in compared["interval"].items():
        assert low <= high
    missing = run_cli("evaluate", "--data", str(tiny), "--against", str(base))
    assert missing.returncode != 0 and "name the first with --run" in missing.stderr

    log = _log(out / "morec")
    steps = [r for r in log if r["kind"] == "step"]
    updates = [r for r in log if r["kind"] == "update"]
    evals = [r for r in log if r["kind"] == "eval"]
    # One pass on the base, then updates_per_epoch passes an epoch, each followed by a
    # mass update that applies after the batches already in flight (none before training).
    assert len(evals) == 1 + 2 * 3 and evals[0]["step"] == 0 and evals[0]["imp"] == 0
    assert all(e["seconds"] > 0 for e in evals)  # each pass's wall time
    assert [u["version"] for u in updates] == list(range(len(evals) + 1))
    assert updates[1]["effective_from"] == 0
    assert all(u["effective_from"] > 0 for u in updates[2:])
    for update in updates:
        for masses in update["masses"].values():
            assert sum(masses) == pytest.approx(1) and min(masses) >= 1e-3 - 1e-12
    assert all(set(s["objective_loss"]) == {"accuracy", "revenue", "fairness", "alignment"}
               and set(s["coefficient"]) == {"accuracy"} for s in steps)

    # Validation control (the default): each pass measures Hit@10 against the base's (the
    # first pass) as 2 − hit / base hit, and steps the controller once; the controller's
    # state travels with the checkpoint.
    base_hit = evals[0]["hit@10"]
    for record in evals:
        assert record["controlled"]["accuracy"] == pytest.approx(2 - record["hit@10"] / base_hit,
                                                                 rel=1e-12)
    meta = read_meta(out / "morec" / "checkpoints" / "last")
    coordinator = meta["morec"]["coordinator"]
    assert coordinator["controllers"]["accuracy"]["steps"] == len(evals)
    assert coordinator["targets"] == {"accuracy": pytest.approx(1.01)}  # auto*1.01
    # Sampling coefficients (the default): the last published shares of a batch are q / Σq
    # with q = (β, λ·p) = (β, 0.4, 0.3, 0.3), λ = 1.
    beta = coordinator["controllers"]["accuracy"]["beta"]
    shares = [u["masses"]["batch"] for u in updates if "batch" in u["masses"]]
    assert shares[-1] == pytest.approx(np.array([beta, 0.4, 0.3, 0.3]) / (beta + 1.0))
    # β moves only at passes: a step record's controlled value is a mean of passes' measures.
    for record in steps:
        seen = [e["controlled"]["accuracy"] for e in evals if e["step"] < record["step"]]
        assert min(seen) - 1e-12 <= record["controlled"]["accuracy"] <= max(seen) + 1e-12
    assert set(results["control"]) == {"accuracy"}
    selected = read_meta(out / "morec" / "checkpoints" / "best")["progress"]
    assert selected["best"] == results["selected"]["morec"]
    # Plain continued training has the accuracy objective alone and no controller.
    continued = _log(out / "continued")
    assert all(set(s["objective_loss"]) == {"accuracy"} and s["coefficient"] == {}
               for s in continued if s["kind"] == "step")


@pytest.mark.slow
def test_training_control(tiny: Path, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    done = run_cli("run", "--data", str(tiny), "--base", str(base), "--out", str(out), *MOREC,
                   "--control", "training", "--coefficients", "loss",
                   "--hold", "accuracy.relative=1.1", "--ki", "0.1")
    assert done.returncode == 0, done.stderr
    log = _log(out / "morec")
    # The target is 1.1 times the base's calibrated accuracy loss.
    calibrated = next(r for r in log if r["kind"] == "targets")
    assert calibrated["target"]["accuracy"] == pytest.approx(
        1.1 * calibrated["base_loss"]["accuracy"], rel=1e-12)
    # The controller steps with every batch, on its accuracy loss: a step record's
    # controlled value is the mean accuracy loss of its steps.
    meta = read_meta(out / "morec" / "checkpoints" / "last")
    assert (meta["morec"]["coordinator"]["controllers"]["accuracy"]["steps"]
            == meta["progress"]["step"])
    for record in (r for r in log if r["kind"] == "step"):
        # The controller sees each step's float32 sums, the record float64 ones.
        assert record["controlled"]["accuracy"] == pytest.approx(
            record["objective_loss"]["accuracy"], rel=1e-6)
    assert all(r["controlled"] == {} for r in log if r["kind"] == "eval")


@pytest.mark.slow
def test_two_ranks(tiny: Path, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    run_torchrun("integration/run.py", "--data", str(tiny), "--base", str(base), "--out",
                 str(out), *MOREC, timeout=300)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and set(results["morec"]) == METRICS
    record = json.loads((out / "morec" / "run.json").read_text())
    assert record["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("coordinator", ["static", "mgda", "pe-mtl", "epo"])
def test_baseline_coordinators_run_as_a_choice_of_the_same_job(
        tiny: Path, base: Path, tmp_path: Path, coordinator: str, ranks: int) -> None:
    out = tmp_path / "job"
    args = ["--data", str(tiny), "--base", str(base), "--out", str(out), *MOREC,
            "--coordinator", coordinator]
    if ranks == 1:
        done = run_cli("run", *args)
        assert done.returncode == 0, done.stderr
        title = {"static": "Static weights", "mgda": "MGDA", "pe-mtl": "PE-MTL", "epo": "EPO"}
        assert f"{title[coordinator]} against the base on test" in done.stdout
    else:
        run_torchrun("integration/run.py", *args, timeout=300)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == ranks and set(results["morec"]) == METRICS
    assert results["settings"]["morec"]["coordinator"] == coordinator
    steps = [r for r in _log(out / "morec") if r["kind"] == "step"]
    # Every step logs the weights of the four objectives' losses: non-negative; static's
    # the fixed w / Σ w (p = 0.4, 0.3, 0.3 with λ = 1 over accuracy's 1).
    weights = np.array([list(r["weights"].values()) for r in steps])
    assert list(steps[0]["weights"]) == ["accuracy", "revenue", "fairness", "alignment"]
    assert (weights >= 0).all() and np.isfinite(weights).all()
    if coordinator == "static":
        np.testing.assert_allclose(weights, [[0.5, 0.2, 0.15, 0.15]] * len(steps))
    # No controller: the default hold is MoRec's alone.
    assert all(r["coefficient"] == {} for r in steps)


@pytest.mark.slow
def test_morec_without_its_data_sampler_weighs_the_loss_forms_by_its_controllers(
        tiny: Path, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    done = run_cli("run", "--data", str(tiny), "--base", str(base), "--out", str(out), *MOREC,
                   "--coefficients", "loss_forms")
    assert done.returncode == 0, done.stderr
    log = _log(out / "morec")
    steps = [r for r in log if r["kind"] == "step"]
    # The weights are q: accuracy's β, moved by its controller at validation passes, and
    # λ·p for the others; no masses to publish (the batches are uniform).
    betas = {r["coefficient"]["accuracy"] for r in steps}
    assert len(betas) > 1
    for record in steps:
        weights = record["weights"]
        assert 0.1 <= weights["accuracy"] <= 10
        assert [weights[k] for k in ("revenue", "fairness", "alignment")] == \
            pytest.approx([0.4, 0.3, 0.3])
    assert [r["masses"] for r in log if r["kind"] == "update"] == [{}]


@pytest.mark.slow
def test_a_baseline_as_morecs_coordinator_keeps_the_sampler(tiny: Path, base: Path,
                                                            tmp_path: Path) -> None:
    # Under loss coefficients MGDA weighs the means of MoRec's equal sub-batches, whose
    # objectives' masses still move at validation passes.
    out = tmp_path / "job"
    done = run_cli("run", "--data", str(tiny), "--base", str(base), "--out", str(out), *MOREC,
                   "--coordinator", "mgda", "--coefficients", "loss")
    assert done.returncode == 0, done.stderr
    log = _log(out / "morec")
    steps = [r for r in log if r["kind"] == "step"]
    weights = np.array([list(r["weights"].values()) for r in steps])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    assert all(r["coefficient"] == {} for r in steps)
    updates = [r["masses"] for r in log if r["kind"] == "update"]
    assert set(updates[0]) == {"fairness", "alignment"} and len(updates) > 1
    assert updates[-1]["fairness"] != updates[0]["fairness"]


@pytest.mark.slow
def test_a_gradient_baseline_trains_sasrec_under_two_ranks(tiny: Path, tmp_path: Path) -> None:
    # SASRec's encoder is data-parallel (DDP): the objectives' gradients with respect to its
    # output are taken before the one backward pass that DDP reduces.
    sasrec = ["--model", "sasrec", "--num-workers", "0", "--embedding-dim", "16"]
    base = tmp_path / "base"
    done = run_cli("train", "--data", str(tiny), "--out", str(base), *sasrec,
                   "--batch-size", "128", "--max-epochs", "1")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "job"
    run_torchrun("integration/run.py", "--data", str(tiny), "--base", str(base), "--out",
                 str(out), *sasrec, "--sub-batch-size", "32", "--epochs", "1",
                 "--updates-per-epoch", "2", "--coordinator", "mgda", timeout=300)
    steps = [r for r in _log(out / "morec") if r["kind"] == "step"]
    weights = np.array([list(r["weights"].values()) for r in steps])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)  # MGDA's weights are on the simplex
    assert json.loads((out / "results.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_an_interrupted_job_resumes_as_if_uninterrupted(tiny: Path, base: Path,
                                                         tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["--data", str(tiny), "--base", str(base), *MOREC]
    for args in ([*common, "--out", str(whole)],
                 [*common, "--out", str(parts), "--epochs", "1"],  # stopped after epoch 1
                 ["--out", str(parts), "--resume", "--epochs", "2"]):
        done = run_cli("run", *args)
        assert done.returncode == 0, done.stderr
    # Model, optimizer, masses, controller and progress came back from the checkpoint, and
    # the stream went on as it would have: the same steps, losses, β, passes and masses.
    # (Times differ, and the resumed run's weight store numbers its publications anew.)
    logs = [[{k: v for k, v in r.items() if k not in ("samples_per_s", "seconds", "version")}
             for r in _log(p / "morec")] for p in (parts, whole)]
    assert logs[0] == logs[1]
    whole_meta, parts_meta = (read_meta(p / "morec" / "checkpoints" / "last")
                              for p in (whole, parts))
    assert parts_meta == whole_meta
    for key in ("base", "morec", "imp", "valid", "selected", "control"):
        assert (json.loads((parts / "results.json").read_text())[key]
                == json.loads((whole / "results.json").read_text())[key]), key


def metrics(hit: float, rhit: float, pop_kl: float) -> RankingMetrics:
    empty = np.zeros(0)
    return RankingMetrics(hit=hit, rhit=rhit, pop_kl=pop_kl, min_hit=0.1, group_hit=empty,
                          group_users=empty, exposure=empty, k=10, users=1000)


@pytest.mark.parametrize(("select_hit", "selected"), [(0.97, [0, 2]), (0.99, [0, 3])])
def test_selection_takes_the_best_imp_among_passes_with_enough_hit(
        select_hit: float, selected: list[int]) -> None:
    passes = [metrics(0.100, 4.0, 0.50),   # the base: Imp 0
              metrics(0.097, 4.0, 0.50),   # 97% of its Hit, nothing gained: Imp −0.75%
              metrics(0.098, 4.4, 0.40),   # 98%: Imp (−2% + 10% + 20% + 0) / 4 = 7%
              metrics(0.099, 4.2, 0.45)]   # 99%: Imp (−1% + 5% + 10% + 0) / 4 = 3.5%
    progress = MoRecProgress()
    chosen = []
    for step, m in enumerate(passes):
        progress.step = step
        record = select(progress, m.as_dict(), select_hit)
        assert record["valid"]  # SPEC's validity (97%) whatever the selection asks
        if record["selected"]:
            chosen.append(step)
    assert chosen == selected
    assert progress.best["imp"] == pytest.approx({2: 0.07, 3: 0.035}[selected[-1]])


def test_resume_needs_a_job(tmp_path: Path) -> None:
    done = run_cli("run", "--out", str(tmp_path), "--resume")
    assert done.returncode == 2 and "no job.json: not the output of a job" in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--preference", "0.5,0.5"], "preference (0.5, 0.5) has 2 entries for 3 objectives"),
    (["--preference", "1.2,-0.1,-0.1"], "config: preference = (1.2, -0.1, -0.1) is out of range"),
    (["--hold", "accuracy.relative=0"], "config: hold.accuracy: hold target {relative = 0.0} "
                                        "is out of range"),
    (["--hold", "accuracy.value=-0.3"], "config: hold.accuracy: hold target {value = -0.3}"),
    (["--hold", "accuracy.factor=2"], "config: hold.accuracy = {'factor': 2} is not a table of "
                                      "relative, value"),
    (["--hold", "accuracy=auto*1.01"], "argument --hold: 'accuracy=auto*1.01' is not "
                                       "KEY.FIELD=NUMBER"),
    (["--hold", "novelty.relative=1"], "hold: 'novelty' is not among the objectives"),
    (["--control", "sometimes"], "config: control = 'sometimes' is out of range"),
    (["--coefficients", "weights"], "config: coefficients = 'weights' is out of range"),
    (["--fairness-signal", "ndcg"], "config: fairness_signal = 'ndcg' is out of range"),
    (["--control", "training"],
     "config: coefficients = 'sampling' is out of range (expected loss under control = training)"),
    (["--objectives", "accuracy,novelty", "--preference", "1"], "unknown objective 'novelty'"),
    (["--coordinator", "pcgrad"], "config: coordinator = 'pcgrad' is out of range"),
    (["--coordinator", "epo", "--preference", "1,0,0"],
     "config: preference = (1.0, 0.0, 0.0) is out of range (expected entries > 0 under "
     "coordinator epo)"),
])
def test_bad_settings_fail_before_training(tiny: Path, tmp_path: Path, args: list[str],
                                           message: str) -> None:
    out = tmp_path / "job"
    done = run_cli("run", "--data", str(tiny), "--out", str(out), *TRAIN, *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (out / "base").exists()  # refused before pretraining


def test_objective_needing_a_missing_column(tiny: Path) -> None:
    class ByAge(OneGroup):
        name = "by_age"
        columns = ("user_age",)

        def weights(self, rows: dict[str, np.ndarray]) -> np.ndarray:
            return rows["user_age"]

    with pytest.raises(MorecError, match="objective 'by_age' reads column.s. user_age"):
        check_settings(PreparedDataset.open(tiny), SamplerConfig(), MoRecConfig(),
                       ["accuracy", ByAge()])


@pytest.mark.parametrize("coordinator", ["mgda", "epo"])
def test_a_loss_form_that_is_0_on_every_batch_is_refused(tiny: Path, tmp_path: Path,
                                                          coordinator: str) -> None:
    # Items of one category: no fairness group splits a batch, so fairness's loss form is
    # 0 without gradient; MGDA's min-norm point would be 0 (no training), EPO would stop.
    for path in tiny.iterdir():
        (tmp_path / path.name).symlink_to(path)
    manifest = json.loads((tiny / "manifest.json").read_text())
    manifest["groups"]["fairness"]["names"] = ["other"]
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MorecError, match="1 fairness group, so the fairness loss form is 0"):
        check_settings(PreparedDataset.open(tmp_path), SamplerConfig(),
                       MoRecConfig(coordinator=coordinator))
    check_settings(PreparedDataset.open(tmp_path), SamplerConfig(),  # MoRec draws it: fine
                   MoRecConfig())


def test_finished_job_is_not_overwritten(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    (out / "morec").mkdir(parents=True)
    done = run_cli("run", "--data", str(tiny), "--out", str(out), *TRAIN)
    assert done.returncode == 2 and "holds morec of an earlier job; pass --resume" in done.stderr
