"""The real Ta-Feng file from ../shared, prepared end to end through the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TAFENG

from morec_rec.data.format import PreparedDataset
from morec_rec.jobs.cli import main

pytestmark = [
    pytest.mark.tafeng,
    pytest.mark.skipif(not TAFENG.is_file(), reason=f"{TAFENG} is not beside the checkout"),
]


def test_prepare_tafeng(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tafeng"
    assert main(["prepare", "--source", "tafeng", "--input", str(TAFENG), "--out", str(out)]) == 0
    assert "26,039 users, 15,483 items, 709,356 interactions" in capsys.readouterr().out
    dataset = PreparedDataset.open(out)
    m = dataset.manifest
    assert (m["num_users"], m["num_items"]) == (26_039, 15_483)
    assert m["num_interactions"] == {"train": 657_278, "valid": 26_039, "test": 26_039}
    assert m["source"]["rows_read"] == 817_741
    assert m["source"]["distinct_pairs"] == m["filtering"]["raw_interactions"] == 743_228
    assert m["filtering"]["k_core"] == {  # the README's figures
        "k": 5, "iterations": 3, "interactions_removed": 33_872, "users_removed": 6_227,
        "items_removed": 8_329,
    }
    assert m["source"]["files"][0]["sha256"] == (
        "8a1c1dd5bb62e029e4148e326c86ab8c2c7d6d1bb51048db845d3f6157aeb5a9"
    )
    fairness = m["groups"]["fairness"]
    for split in ("valid", "test"):  # every group measurable: >= 2% of held-out items
        assert min(fairness[f"{split}_rows"]) >= 0.02 * 26_039
    assert sum(fairness["num_items"]) == 15_483
    assert len(fairness["names"]) == 11 and fairness["names"][-1] == "other"
    assert len(fairness["folded_categories"]) == 15
    assert m["groups"]["popularity"]["num_items"] == [1549, 1548, 1548, 1549, 1548,
                                                      1548, 1549, 1548, 1548, 1548]
    assert np.isclose(sum(m["groups"]["popularity"]["q"]), 1.0)
    # Every Ta-Feng row has a price and a subclass: nothing imputed.
    assert m["filtering"]["items_missing_price"] == m["filtering"]["items_missing_category"] == 0
    test = dataset.split("test")
    assert len(set(test["user_id"].to_pylist())) == 26_039
