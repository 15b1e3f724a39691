"""The worked examples (integration/example/): three plain training jobs, each beside the
same job turned into a MoRec job under validation control by a small diff.

* ``plain_job.py`` / ``morec_job.py``: TorchRec, a two-tower model and its own batch type,
  examples laid out blocked (every positive, then every negative);
* ``dlrm_plain_job.py`` / ``dlrm_morec_job.py``: TorchRec's own ``DLRM`` / ``DLRMTrain``
  and ``Batch``, examples interleaved (each row's positive, then its negative);
* ``torch_plain_job.py`` / ``torch_morec_job.py``: plain PyTorch under DDP, no TorchRec,
  dict batches, one BPR example per row.

Every MoRec job runs under torchrun with 2 ranks on the tiny synthetic profile, with the
four built-in objectives and one of its own; every plain job runs briefly on one rank.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from conftest import ROOT, run_torchrun

from morec_rec.config import TrainConfig

EXAMPLE = ROOT / "integration" / "example"


class Pair(NamedTuple):
    plain: str  # the plain job
    morec: str  # the same job turned into a MoRec job
    own: str  # the name of the MoRec job's own objective


PAIRS = [Pair("plain_job.py", "morec_job.py", "cheap"),
         Pair("dlrm_plain_job.py", "dlrm_morec_job.py", "recent"),
         Pair("torch_plain_job.py", "torch_morec_job.py", "niche")]
each_pair = pytest.mark.parametrize("pair", PAIRS, ids=["two_tower", "dlrm", "torch"])
BUILT_IN = ["accuracy", "revenue", "fairness", "alignment"]

# 3,220 training rows over 2 ranks: 1,610 a rank; batches of 5 objectives x 10 rows give
# 32 batches a rank and epoch, 64 steps in 2 epochs, a validation round every 8.
BATCH_SIZE, UPDATE_EVERY, EPOCHS, STEPS = 50, 8, 2, 64
#: How far past the last trained batch an update may first apply: the batches the
#: pipeline has taken from the loader ahead of training (at most 2) and those the
#: loader's one worker may have drawn (its 2 requests ahead and the one in hand, of
#: the default batches a request, less the one yielded).
LOOKAHEAD = 2 + 3 * TrainConfig.batches_per_request - 1


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def code_lines(script: str) -> list[str]:
    """The script's lines after its docstring."""
    lines = (EXAMPLE / script).read_text().splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("import")):]


def definitions(script: str) -> dict[str, str]:
    """The source of each top-level class and function of the script, by name."""
    source = (EXAMPLE / script).read_text()
    return {node.name: ast.get_source_segment(source, node)
            for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@each_pair
def test_each_morec_job_is_a_small_diff_of_its_plain_one(pair: Pair) -> None:
    plain, morec = pair.plain, pair.morec
    added = [line for line in difflib.unified_diff(code_lines(plain), code_lines(morec),
                                                   lineterm="")
             if line.startswith("+") and not line.startswith("+++") and line.strip("+ ")]
    assert len(added) <= 40, "\n".join(added)
    # The model, the batch and its making stay as they were: every definition the MoRec
    # job keeps but ``main`` (the training loop) is the plain job's, character for character.
    before, after = definitions(plain), definitions(morec)
    kept = sorted(set(before) & set(after) - {"main"})
    assert kept, "the MoRec job keeps none of the plain job's definitions"
    for name in kept:
        assert after[name] == before[name], f"{morec} changes {name}"


def test_the_plain_pytorch_pair_imports_no_torchrec() -> None:
    for script in ("torch_plain_job.py", "torch_morec_job.py"):
        imports = [line for line in code_lines(script) if line.startswith(("import", "from"))]
        assert not any("torchrec" in line for line in imports), script


@each_pair
def test_each_plain_job_trains_on_one_rank(tiny: Path, pair: Pair) -> None:
    out = run_torchrun(f"integration/example/{pair.plain}", "--data", str(tiny), "--epochs", "1",
                       "--batch-size", str(BATCH_SIZE), nproc=1)
    logged = records(out)
    # 3,220 rows on one rank: 64 batches of 50, a record every 20 steps.
    assert [r["step"] for r in logged] == [20, 40, 60]
    for record in logged:
        assert all(math.isfinite(v) for v in record.values())
        assert record.get("loss", 1.0) > 0


@each_pair
def test_each_morec_job_controls_and_updates_the_objectives_on_two_ranks(tiny: Path,
                                                                         pair: Pair) -> None:
    out = run_torchrun(f"integration/example/{pair.morec}", "--data", str(tiny),
                       "--epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE),
                       "--update-every", str(UPDATE_EVERY), nproc=2)
    logged = records(out)
    rounds = [r for r in logged if "q" in r]
    assert [r["step"] for r in rounds] == list(range(UPDATE_EVERY, STEPS + 1, UPDATE_EVERY))
    # Every round publishes (fairness and alignment move each time), in version order,
    # to apply from a batch not yet trained, never before the version published last.
    assert [r.get("version") for r in rounds] == list(range(1, len(rounds) + 1))
    starts = [r["effective_from"] for r in rounds]
    assert starts == sorted(starts)
    for record in rounds:
        assert record["step"] <= record["effective_from"] <= record["step"] + LOOKAHEAD

    for record in rounds:
        assert list(record["q"]) == BUILT_IN + [pair.own]
        q = np.array(list(record["q"].values()))
        assert q.min() / q.max() >= 0.1, record["q"]
        assert 0.1 <= record["coefficients"]["accuracy"] <= 2.0
        assert list(record["measures"]) == ["accuracy"]
        assert math.isfinite(record["measures"]["accuracy"])
        metrics = record["metrics"]
        assert {"hit@10", "rhit@10", "pop_kl@10", "min_hit@10"} <= set(metrics)
        assert 0 <= metrics["min_hit@10"] <= metrics["hit@10"] <= 1
        assert metrics["pop_kl@10"] >= 0
        for name in ("fairness", "alignment"):
            assert sum(record["masses"][name]) == pytest.approx(1.0)
        if "batch" in record["masses"]:  # the objectives' shares of a batch: q, normalised
            assert record["masses"]["batch"] == pytest.approx(list(q / q.sum()))
    assert rounds[0]["measures"]["accuracy"] == pytest.approx(1.0)  # the base
    for name in ("fairness", "alignment"):
        first, last = (np.array(r["masses"][name]) for r in (rounds[0], rounds[-1]))
        assert not np.allclose(first, last), name

    training = [r for r in logged if "q" not in r and "step" in r]
    assert training and all(math.isfinite(v) for r in training for v in r.values())
    if pair.morec == "torch_morec_job.py":  # nothing in it, MoRec included, loaded TorchRec
        assert {"torchrec_loaded": False} in logged
