"""Ranking metrics and Imp against numbers computed by hand (arithmetic in the comments)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from morec_rec.plugin.eval.metrics import (
    POP_KL_EPSILON,
    RankingMetrics,
    RankingMetricSums,
    hits,
    improvement,
    is_valid,
    merge,
    pop_kl,
)


def ranking_metrics(top_k, held_out, price, fairness_group, num_fairness_groups,
                    popularity_group, num_popularity_groups, q) -> RankingMetrics:
    """The metrics of one pass: :meth:`RankingMetricSums.from_topk`, finalized against ``q``."""
    return RankingMetricSums.from_topk(top_k, held_out, price, fairness_group,
                                       num_fairness_groups, popularity_group,
                                       num_popularity_groups).finalize(q)

# Case A: K = 3, 5 users, 8 items, 3 fairness groups (group 2 holds no held-out item),
# 3 popularity groups. Prices are dyadic, so every float sum below is exact.
#   item:              0    1    2    3    4    5    6    7
PRICE = np.array([1.0, 2.0, 4.0, 0.5, 3.0, 8.0, 1.5, 2.5])
FAIRNESS = np.array([0, 0, 1, 1, 0, 1, 0, 1])
POPULARITY = np.array([0, 0, 0, 1, 1, 1, 2, 2])
TOP_K = np.array([[0, 1, 2],   # held 1: hit,  fairness 0, price 2.0;  popularity 0 0 0
                  [0, 3, 4],   # held 5: miss, fairness 1;             popularity 0 1 1
                  [2, 3, 6],   # held 2: hit,  fairness 1, price 4.0;  popularity 0 1 2
                  [0, 1, 4],   # held 6: miss, fairness 0;             popularity 0 0 1
                  [5, 6, 7]])  # held 7: hit,  fairness 1, price 2.5;  popularity 1 2 2
HELD_OUT = np.array([1, 5, 2, 6, 7])
Q = np.array([0.5, 0.3, 0.2])


def case_a(rows: slice = slice(None)) -> RankingMetricSums:
    return RankingMetricSums.from_topk(TOP_K[rows], HELD_OUT[rows], PRICE, FAIRNESS, 3,
                                       POPULARITY, 3)


def assert_same(a: RankingMetrics, b: RankingMetrics) -> None:
    """Every field equal, exactly (NaN equal to NaN)."""
    for field in dataclasses.fields(RankingMetrics):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name),
                                      err_msg=field.name, strict=True)


def test_hits() -> None:
    np.testing.assert_array_equal(hits(TOP_K, HELD_OUT), [True, False, True, False, True])
    with pytest.raises(ValueError, match="held_out"):
        hits(TOP_K, HELD_OUT[:4])


def test_case_a_by_hand() -> None:
    m = ranking_metrics(TOP_K, HELD_OUT, PRICE, FAIRNESS, 3, POPULARITY, 3, Q)
    assert (m.k, m.users) == (3, 5)
    assert m.hit == 3 / 5                                # users 0, 2, 4 hit
    assert m.rhit == (2.0 + 4.0 + 2.5) / 5 == 1.7        # prices of the hit held-out items
    # fairness 0: users 0 and 3 (held 1, 6), 1 hit -> 1/2;
    # fairness 1: users 1, 2, 4 (held 5, 2, 7), 2 hits -> 2/3; fairness 2: no users -> NaN
    np.testing.assert_array_equal(m.group_users, [2, 3, 0])
    np.testing.assert_array_equal(m.group_hit, [1 / 2, 2 / 3, np.nan])
    assert m.min_hit == 0.5                              # NaN group ignored
    # popularity counts over the 15 recommended items: 0 -> 3+1+1+2+0 = 7,
    # 1 -> 0+2+1+1+1 = 5, 2 -> 0+0+1+0+2 = 3
    np.testing.assert_allclose(m.exposure, [7 / 15, 5 / 15, 3 / 15], rtol=0, atol=1e-15)
    # KL(Q||P) = 0.5 ln(0.5 / (7/15)) + 0.3 ln(0.3 / (1/3)) + 0.2 ln(0.2 / 0.2)
    #          = 0.5 ln(15/14) + 0.3 ln(0.9) = 0.5 * 0.0689929 - 0.3 * 0.1053605 = 0.0028883;
    # smoothing with ε = 1e-6 moves it by O(ε)
    assert pop_kl(Q, m.exposure, epsilon=0.0) == pytest.approx(0.0028883, abs=1e-7)
    assert m.pop_kl == pytest.approx(0.0028883, abs=1e-5)
    assert m.as_dict() == {"hit@3": 0.6, "rhit@3": 1.7, "pop_kl@3": m.pop_kl, "min_hit@3": 0.5}


def test_k10_by_hand() -> None:
    # 12 items: price = id + 1, fairness = id % 2, popularity = id // 4. Each top-10 list
    # leaves out two items, so its popularity counts are 4, 4, 4 less those two.
    items = np.arange(12)
    top_k = np.array([[9, 8, 7, 6, 5, 4, 3, 2, 1, 0],        # leaves 10, 11: counts 4 4 2
                      [2, 3, 4, 5, 6, 7, 8, 9, 10, 11],      # leaves 0, 1:   counts 2 4 4
                      [0, 1, 2, 3, 6, 7, 8, 9, 10, 11],      # leaves 4, 5:   counts 4 2 4
                      [11, 10, 7, 6, 5, 4, 3, 2, 1, 0]])     # leaves 8, 9:   counts 4 4 2
    held_out = np.array([3,    # hit,  fairness 1, price 4
                         0,    # miss, fairness 0
                         10,   # hit,  fairness 0, price 11
                         7])   # hit,  fairness 1, price 8
    q = np.array([0.35, 0.35, 0.30])
    m = ranking_metrics(top_k, held_out, items + 1.0, items % 2, 2, items // 4, 3, q)
    assert m.hit == 3 / 4
    assert m.rhit == (4 + 11 + 8) / 4 == 5.75
    np.testing.assert_array_equal(m.group_users, [2, 2])
    np.testing.assert_array_equal(m.group_hit, [1 / 2, 2 / 2])
    assert m.min_hit == 0.5
    # counts 14, 14, 12 of 40 -> P = 0.35, 0.35, 0.30 = Q, so KL = 0 (smoothing: O(ε²))
    np.testing.assert_allclose(m.exposure, q, rtol=0, atol=1e-15)
    assert abs(m.pop_kl) < 1e-10
    assert pop_kl(q, m.exposure, epsilon=0.0) == pytest.approx(0.0, abs=1e-15)
    assert list(m.as_dict()) == ["hit@10", "rhit@10", "pop_kl@10", "min_hit@10"]


def test_pop_kl_zero_exposure_group_is_smoothed() -> None:
    assert POP_KL_EPSILON == 1e-6
    # P̃ = (P + ε) / (1 + 3ε): group 2 gets 1e-6 / 1.000003 instead of 0.
    # KL = 0.5  ln(0.5  · 1.000003 / 0.500001)                ≈ 0.5  · 1e-6
    #    + 0.25 ln(0.25 · 1.000003 / 0.500001) = 0.25 (ln 0.5 + 1e-6)
    #    + 0.25 ln(0.25 · 1.000003 / 1e-6)     = 0.25 (ln 250000 + 3e-6)
    #    = 5e-7 + (-0.173286795 + 2.5e-7) + (3.107304049 + 7.5e-7) = 2.934018754
    q, p = np.array([0.5, 0.25, 0.25]), np.array([0.5, 0.5, 0.0])
    assert pop_kl(q, p) == pytest.approx(2.934018754, abs=1e-9)
    assert math.isinf(pop_kl(q, p, epsilon=0.0))


def test_pop_kl_target_zero_counts_zero() -> None:
    # q_2 = 0 contributes 0 · ln 0 = 0: KL = 2 · 0.5 ln(0.5 / 0.25) = ln 2
    q, p = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    assert pop_kl(q, p, epsilon=0.0) == pytest.approx(math.log(2), abs=1e-15)
    assert pop_kl(q, p) == pytest.approx(math.log(2), abs=1e-5)


def test_pop_kl_rejects_non_distributions() -> None:
    with pytest.raises(ValueError, match="distribution"):
        pop_kl([0.5, 0.3, 0.1], [0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"\(G,\)"):
        pop_kl([0.5, 0.5], [0.5, 0.3, 0.2])


def test_all_users_in_one_group_leave_the_others_nan() -> None:
    m = ranking_metrics(TOP_K[[0, 3]], HELD_OUT[[0, 3]], PRICE, FAIRNESS, 3, POPULARITY, 3, Q)
    np.testing.assert_array_equal(m.group_users, [2, 0, 0])
    np.testing.assert_array_equal(m.group_hit, [0.5, np.nan, np.nan])
    assert m.min_hit == 0.5


@pytest.mark.parametrize("cuts", [[2], [1, 3], [0, 5]])
def test_slices_add_up_to_one_pass(cuts: list[int]) -> None:
    bounds = [0, *cuts, len(HELD_OUT)]
    parts = [case_a(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    assert_same(merge(parts).finalize(Q), case_a().finalize(Q))


@pytest.mark.parametrize("slices", [2, 3])
def test_all_reduced_slices_equal_one_pass(slices: int) -> None:
    rng = np.random.default_rng(0)
    num_items, users = 50, 203
    price = rng.integers(0, 400, num_items) / 4          # quarters: sums are exact
    fairness, popularity = rng.integers(0, 4, num_items), np.arange(num_items) % 5
    top_k = np.argsort(rng.random((users, num_items)), axis=1)[:, :10]
    held_out = rng.integers(0, num_items, users)
    q = np.full(5, 0.2)
    args = (price, fairness, 4, popularity, 5)
    whole = ranking_metrics(top_k, held_out, *args, q)
    parts = [RankingMetricSums.from_topk(t, h, *args)
             for t, h in zip(np.array_split(top_k, slices), np.array_split(held_out, slices))]
    reduced = np.sum([part.to_array() for part in parts], axis=0)   # all_reduce(SUM)
    assert_same(RankingMetricSums.from_array(reduced, k=10, num_fairness_groups=4).finalize(q),
                whole)
    assert_same(merge(parts).finalize(q), whole)
    assert 0 < whole.hit < 1


def test_array_round_trip() -> None:
    sums = case_a()
    array = sums.to_array()
    assert array.dtype == np.float64 and array.shape == (3 + 2 * 3 + 3,)
    back = RankingMetricSums.from_array(array, k=3, num_fairness_groups=3)
    for field in dataclasses.fields(RankingMetricSums):
        np.testing.assert_array_equal(getattr(back, field.name), getattr(sums, field.name),
                                      err_msg=field.name, strict=True)
    with pytest.raises(ValueError, match="SUM, not AVG"):
        RankingMetricSums.from_array(array / 2, k=3, num_fairness_groups=3)


def test_sums_reject_mismatches() -> None:
    with pytest.raises(ValueError, match="top-3 and top-2"):
        _ = case_a() + RankingMetricSums.from_topk(TOP_K[:, :2], HELD_OUT, PRICE, FAIRNESS, 3,
                                                   POPULARITY, 3)
    with pytest.raises(ValueError, match="fairness_group ids"):
        RankingMetricSums.from_topk(TOP_K, HELD_OUT, PRICE, FAIRNESS, 1, POPULARITY, 3)
    with pytest.raises(ValueError, match="no users"):
        case_a(slice(0, 0)).finalize(Q)
    with pytest.raises(ValueError, match="nothing"):
        merge([])


# Table 2 of the paper (Electronics, MF-BPR), in percent; the PDF text drops two decimal
# points ("19756", "22519"), read as 197.56 and 225.19.
BASE = {"hit@10": 1.62, "rhit@10": 135.42, "pop_kl@10": 142.54, "min_hit@10": 0.91}
STATIC = {"hit@10": 1.62, "rhit@10": 197.56, "pop_kl@10": 37.09, "min_hit@10": 1.00}
MOREC = {"hit@10": 1.63, "rhit@10": 225.19, "pop_kl@10": 16.81, "min_hit@10": 1.05}


def test_imp_reproduces_table_2() -> None:
    # Static: (0 + 62.14/135.42 + 105.45/142.54 + 0.09/0.91) / 4
    #       = (0 + 0.458869 + 0.739792 + 0.098901) / 4 = 0.324391 (printed 32.41)
    static = improvement(BASE, STATIC)
    assert static.imp == pytest.approx(0.3244, abs=5e-4)
    assert static.per_metric["pop_kl@10"] == pytest.approx(105.45 / 142.54)
    assert static.describe() == "Imp 32.44%"
    # MoRec: (0.01/1.62 + 89.77/135.42 + 125.73/142.54 + 0.14/0.91) / 4
    #      = (0.006173 + 0.662901 + 0.882068 + 0.153846) / 4 = 0.426247 (printed 42.60)
    morec = improvement(BASE, MOREC)
    assert morec.imp == pytest.approx(0.4262, abs=5e-4)
    assert morec.imp_defined == morec.imp and morec.undefined == ()
    assert morec.describe() == "Imp 42.62%"


def test_imp_with_a_zero_base_metric() -> None:
    base = {"hit@10": 0.05, "rhit@10": 2.0, "pop_kl@10": 0.5, "min_hit@10": 0.0, "loss": 1.0}
    run = {"hit@10": 0.055, "rhit@10": 2.5, "pop_kl@10": 0.4, "min_hit@10": 0.01}
    # +10%, +25%, +20% (Pop-KL fell), min-Hit undefined: (0.10 + 0.25 + 0.20) / 3 = 0.183333
    imp = improvement(base, run)
    assert imp.imp is None and imp.undefined == ("min_hit@10",)
    assert imp.per_metric["min_hit@10"] is None
    assert imp.per_metric["pop_kl@10"] == pytest.approx(0.2)
    assert imp.imp_defined == pytest.approx(0.55 / 3)
    assert imp.describe() == "Imp undefined (base min_hit@10 = 0); over the 3 defined terms: 18.33%"

    zero = dict.fromkeys(["hit@10", "rhit@10", "pop_kl@10", "min_hit@10"], 0.0)
    none = improvement(zero, run)
    assert none.imp is None and none.imp_defined is None and len(none.undefined) == 4
    assert none.describe() == "Imp undefined (base hit@10, rhit@10, pop_kl@10, min_hit@10 = 0)"


def test_imp_over_chosen_terms() -> None:
    # MoRec over the three terms without min-Hit: (0.006173 + 0.662901 + 0.882068) / 3
    # = 0.517047; over Pop-KL alone 125.73/142.54 = 0.882068.
    three = improvement(BASE, MOREC, ("hit", "rhit", "pop_kl"))
    assert three.imp == pytest.approx(0.517047, abs=1e-6)
    assert list(three.per_metric) == ["hit@10", "rhit@10", "pop_kl@10"]
    assert improvement(BASE, MOREC, ["pop_kl"]).imp == pytest.approx(125.73 / 142.54)
    # A zero base metric outside the terms does not make Imp undefined.
    base = {**BASE, "min_hit@10": 0.0}
    assert improvement(base, MOREC, ("hit", "rhit", "pop_kl")).imp == three.imp
    for terms in (("hit", "recall"), ()):
        with pytest.raises(ValueError, match="Imp terms must be some of hit, rhit"):
            improvement(BASE, MOREC, terms)


def test_imp_of_a_run_against_itself_is_zero() -> None:
    metrics = case_a().finalize(Q).as_dict()
    assert improvement(metrics, metrics).imp == 0.0


def test_imp_needs_all_four_metrics_at_one_k() -> None:
    with pytest.raises(ValueError, match="one K"):
        improvement({**BASE, "hit@20": 1.0}, MOREC)
    with pytest.raises(ValueError, match="one K"):
        improvement({k: v for k, v in BASE.items() if k != "rhit@10"}, MOREC)


def test_validity_boundary() -> None:
    assert is_valid(0.05, 0.0485)          # exactly 97%
    assert not is_valid(0.05, 0.0484)
    assert is_valid(1.62, 1.5714)          # 0.97 · 1.62 evaluates to 1.5714000000000001
    assert not is_valid(1.62, 1.5713)
    assert is_valid(1.62, 1.70)
