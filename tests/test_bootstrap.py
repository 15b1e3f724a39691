"""Per-user metric rows and the paired bootstrap over users."""

from __future__ import annotations

import json

import numpy as np
import pytest

from morec_rec.jobs.bootstrap import PairedBootstrap, paired_bootstrap
from morec_rec.jobs.cli import format_comparison
from morec_rec.plugin.eval.metrics import METRICS, RankingMetricSums, improvement, user_rows

# Six items: price i + 1, fairness group i mod 2, popularity group i mod 3.
PRICE = np.arange(6, dtype=np.float64) + 1
FAIRNESS, POPULARITY = np.arange(6) % 2, np.arange(6) % 3
Q = np.array([0.2, 0.3, 0.5])


def rows_of(top_k: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    return user_rows(top_k, held_out, PRICE, FAIRNESS, 2, POPULARITY, 3)


def test_user_rows_by_hand_and_their_sum_is_the_sums() -> None:
    top_k = np.array([[2, 4], [0, 1]])
    held_out = np.array([2, 5])  # user 0 hits item 2 (price 3, group 0); user 1 misses
    rows = rows_of(top_k, held_out)
    # users, hits, price_hits, group_users (2), group_hits (2), exposure (3)
    np.testing.assert_array_equal(rows, [[1, 1, 3, 1, 0, 1, 0, 0, 1, 1],
                                         [1, 0, 0, 0, 1, 0, 0, 1, 1, 0]])
    sums = RankingMetricSums.from_topk(top_k, held_out, PRICE, FAIRNESS, 2, POPULARITY, 3)
    np.testing.assert_array_equal(rows.sum(axis=0), sums.to_array())


def _pair(users: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B's top-2 lists over ``users`` users, and their held-out items: B hits about 10%."""
    rng = np.random.default_rng(seed)
    held_out = rng.integers(0, 6, users)
    top_k = np.stack([(held_out + 3) % 6, (held_out + 1) % 6], axis=1)  # misses
    hit = rng.random(users) < 0.1
    top_k[hit, 0] = held_out[hit]
    return top_k, held_out, hit


def test_a_model_against_itself_differs_by_nothing() -> None:
    top_k, held_out, _ = _pair(500)
    rows = rows_of(top_k, held_out)
    result = paired_bootstrap(rows, rows.copy(), Q, k=2, num_fairness_groups=2, resamples=200)
    assert all(d == 0 for d in result.difference.values())
    assert all(interval == (0.0, 0.0) for interval in result.interval.values())
    assert all(share == 0 for share in result.ahead.values())
    assert result.imp == 0 and result.imp_positive == 0 and result.imp_interval == (0.0, 0.0)


def test_a_model_that_hits_more_users_leads_in_every_resample() -> None:
    top_k, held_out, hit = _pair(2000)
    better = top_k.copy()
    # A also hits a fifth of B's misses, with an item of the same popularity group as the
    # one it replaces (held-out + 3), so exposure, and Pop-KL, are unchanged.
    extra = ~hit & (np.random.default_rng(1).random(len(hit)) < 0.2)
    better[extra, 0] = held_out[extra]
    result = paired_bootstrap(rows_of(better, held_out), rows_of(top_k, held_out), Q, k=2,
                              num_fairness_groups=2, resamples=300)
    assert result.difference["hit@2"] == pytest.approx(extra.mean())
    assert result.interval["hit@2"][0] > 0 and result.interval["rhit@2"][0] > 0
    assert result.interval["pop_kl@2"] == (0.0, 0.0)
    assert result.ahead["hit@2"] == 1.0 and result.ahead["pop_kl@2"] == 0.0
    assert result.imp > 0 and result.imp_positive == 1.0


def test_imp_over_chosen_terms_leaves_the_others_out() -> None:
    # A hits more users than B (Hit up) with the same exposure (Pop-KL equal): over Pop-KL
    # alone A's Imp is 0 in every resample, over Hit and Pop-KL it is half of Hit's gain.
    top_k, held_out, hit = _pair(2000)
    better = top_k.copy()
    extra = ~hit & (np.random.default_rng(1).random(len(hit)) < 0.2)
    better[extra, 0] = held_out[extra]
    a, b = rows_of(better, held_out), rows_of(top_k, held_out)
    flat = paired_bootstrap(a, b, Q, k=2, num_fairness_groups=2, resamples=100,
                            imp_terms=("pop_kl",))
    assert flat.imp == 0 and flat.imp_positive == 0 and flat.imp_terms == ("pop_kl",)
    both = paired_bootstrap(a, b, Q, k=2, num_fairness_groups=2, resamples=100,
                            imp_terms=("hit", "pop_kl"))
    gain = both.difference["hit@2"] / both.b["hit@2"]
    assert both.imp == pytest.approx(gain / 2) and both.imp_positive == 1.0


def test_an_undefined_imp_term_is_named() -> None:
    metrics = {"hit@10": 0.2, "rhit@10": 2.0, "pop_kl@10": 0.3}
    result = PairedBootstrap(
        a={**metrics, "min_hit@10": 0.1}, b={**metrics, "min_hit@10": 0.0},
        difference={**dict.fromkeys(metrics, 0.0), "min_hit@10": 0.1},
        interval=dict.fromkeys([*metrics, "min_hit@10"], (0.0, 0.0)),
        ahead=dict.fromkeys([*metrics, "min_hit@10"], 0.0), imp=0.0,
        imp_undefined=("min_hit@10",), imp_unresolved={}, imp_interval=(0.0, 0.0),
        imp_positive=0.0, imp_terms=METRICS, imp_over=("hit", "rhit", "pop_kl"), resamples=10,
        level=0.95, seed=0)
    assert format_comparison("A", "B", "test", 5, result, as_json=False).splitlines()[-1] == (
        "  Imp of A over B (over hit, rhit, pop_kl; B's min_hit@10 = 0) +0.00% "
        "[+0.00%, +0.00%]; > 0 in 0.0% of the resamples")
    assert json.loads(format_comparison("A", "B", "test", 5, result, as_json=True))[
        "imp_undefined"] == ["min_hit@10"]


def test_a_term_some_resamples_leave_undefined_is_left_out_of_every_one() -> None:
    # B hits fairness group 1 for one user of 300: its min-Hit is defined on the users as
    # evaluated, and 0 in the resamples that miss that user, (1 − 1/300)^300 ≈ 36.7% of
    # them. Imp and its resamples are then over the three other terms, all of them.
    top_k, held_out, _ = _pair(300)
    group_1 = np.flatnonzero(held_out % 2 == 1)
    top_k[group_1, 0] = (held_out[group_1] + 3) % 6  # B misses group 1 ...
    top_k[group_1[0], 0] = held_out[group_1[0]]  # ... but for one user
    better = top_k.copy()
    better[:, 0] = held_out  # A hits every user
    result = paired_bootstrap(rows_of(better, held_out), rows_of(top_k, held_out), Q, k=2,
                              num_fairness_groups=2, resamples=1000)
    assert result.imp_undefined == () and list(result.imp_unresolved) == ["min_hit@2"]
    assert result.imp_over == ("hit", "rhit", "pop_kl")
    assert result.imp_unresolved["min_hit@2"] == pytest.approx(1000 * (1 - 1 / 300) ** 300,
                                                               abs=4 * 15.2)  # 4 sd
    three = improvement(result.b, result.a, ("hit", "rhit", "pop_kl")).imp
    assert result.imp == pytest.approx(three)
    line = format_comparison("A", "B", "test", 300, result, as_json=False).splitlines()[-1]
    assert line.startswith(f"  Imp of A over B (over hit, rhit, pop_kl; B's min_hit@2 = 0 in "
                           f"{result.imp_unresolved['min_hit@2']:,} of the resamples) "
                           f"{100 * three:+.2f}% [")


def test_an_imp_without_a_defined_term_has_no_interval() -> None:
    # B's min-Hit is 0 in every resample (one group never hit): Imp over it alone is
    # undefined, and so are its interval and share, in the table and as JSON null.
    top_k, held_out, hit = _pair(300)
    top_k[held_out % 2 == 1, 0] = (held_out[held_out % 2 == 1] + 3) % 6  # group 1 missed
    rows = rows_of(top_k, held_out)
    result = paired_bootstrap(rows, rows.copy(), Q, k=2, num_fairness_groups=2, resamples=50,
                              imp_terms=("min_hit",))
    assert result.imp is None and result.imp_interval is None and result.imp_positive is None
    assert result.imp_over == ()
    assert format_comparison("A", "B", "test", 300, result, as_json=False).splitlines()[-1] == (
        "  Imp of A over B (B's min_hit@2 = 0) undefined")
    record = json.loads(format_comparison("A", "B", "test", 300, result, as_json=True))
    assert record["imp"] is None and record["imp_interval"] is None and record["imp_over"] == []


def test_one_user_more_is_within_noise() -> None:
    top_k, held_out, hit = _pair(2000)
    better = top_k.copy()
    flipped = int(np.flatnonzero(~hit)[0])
    better[flipped, 0] = held_out[flipped]
    result = paired_bootstrap(rows_of(better, held_out), rows_of(top_k, held_out), Q, k=2,
                              num_fairness_groups=2, resamples=1000, seed=3)
    # A leads exactly in the resamples that draw the flipped user: 1 − (1 − 1/U)^U ≈ 63.2%
    # of them (binomial sd 1.5 points over 1,000 resamples; bound at 4 sd). In the other
    # 36.8% the two are equal, so the interval's lower end is 0.
    assert result.imp_positive == pytest.approx(1 - (1 - 1 / 2000) ** 2000, abs=0.06)
    assert result.ahead["hit@2"] == result.imp_positive  # Hit is the only term that moves
    assert result.interval["hit@2"][0] == 0.0 and result.interval["hit@2"][1] > 0


def test_resampling_is_seeded() -> None:
    top_k, held_out, _ = _pair(300)
    a, b = rows_of(top_k, held_out), rows_of(np.roll(top_k, 1, axis=1), held_out)
    first = paired_bootstrap(a, b, Q, k=2, num_fairness_groups=2, resamples=120, seed=7)
    again = paired_bootstrap(a, b, Q, k=2, num_fairness_groups=2, resamples=120, seed=7)
    assert first == again


def test_rows_of_other_users_are_refused() -> None:
    top_k, held_out, _ = _pair(100)
    rows = rows_of(top_k, held_out)
    with pytest.raises(ValueError, match="same .U, D. shape"):
        paired_bootstrap(rows, rows[:50], Q, k=2, num_fairness_groups=2)
    with pytest.raises(ValueError, match="not evaluated on the same users"):
        paired_bootstrap(rows, rows_of(top_k, (held_out + 1) % 6), Q, k=2,
                         num_fairness_groups=2)
