"""Ranking metrics over top-K lists, their additive sums, and Imp (docs/method.md).

Conventions:
    * Every metric is a fraction, never a percentage: Hit@K = 0.0162 where the paper prints
      1.62. rHit@K is in price units per evaluated user.
    * Users are grouped for fairness by the fairness group of their *held-out* item;
      exposure counts every recommended item of every top-K list (U·K items in all).
    * Pop-KL is KL(Q‖P̃) = Σ_g q_g·ln(q_g / P̃_g) in nats, Q the target distribution over
      popularity groups (share of training interactions) and P the exposure. Only P is
      smoothed: P̃ = (P + ε) / (1 + G·ε) with ε = ``POP_KL_EPSILON`` = 1e-6; a term with
      q_g = 0 counts 0. ε is a fixed constant because Pop-KL of a model that never
      recommends some group is dominated by it (that group costs q_g·ln(q_g/ε)): state it
      with every reported Pop-KL. 1e-6 lies below the share of one recommendation,
      1/(U·K), up to U = 10^5 users at K = 10, so it moves only groups that got (almost)
      no recommendations, and it bounds an empty group's term at q_g·(13.8 + ln q_g).
    * Imp is a fraction (0.4262) in data and a percentage only in
      :meth:`Improvement.describe`.

Distributed evaluation: each rank builds :class:`RankingMetricSums` from its slice of
users, all-reduces ``to_array()`` with SUM, and finalizes ``from_array(...)``; the counts
are exact, so the result equals one pass over all users (the price sum up to float
rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

POP_KL_EPSILON = 1e-6
VALIDITY_THRESHOLD = 0.97  # a solution is invalid when Hit@K < 97% of the base's
METRICS = ("hit", "rhit", "pop_kl", "min_hit")  # the four terms of Imp, in report order
LOWER_IS_BETTER = frozenset({"pop_kl"})


def hits(top_k: npt.ArrayLike, held_out: npt.ArrayLike) -> np.ndarray:
    """bool (U,): whether each user's held-out item is in their top-K row of ``top_k`` (U, K)."""
    top_k, held_out = np.asarray(top_k), np.asarray(held_out)
    if top_k.ndim != 2 or held_out.shape != top_k.shape[:1]:
        raise ValueError(f"top_k must be (U, K) and held_out (U,); got {top_k.shape} and "
                         f"{held_out.shape}")
    return (top_k == held_out[:, None]).any(axis=1)


def _check_ids(groups: np.ndarray, num_groups: int, name: str) -> None:
    if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(f"{name} ids must lie in [0, {num_groups}); got "
                         f"[{groups.min()}, {groups.max()}]")


def _count(groups: np.ndarray, num_groups: int, name: str) -> np.ndarray:
    """int64 (num_groups,) occurrences of each group id in ``groups``."""
    _check_ids(groups, num_groups, name)
    return np.bincount(groups.ravel(), minlength=num_groups).astype(np.int64)


def user_rows(top_k: npt.ArrayLike, held_out: npt.ArrayLike, price: npt.ArrayLike,
              fairness_group: npt.ArrayLike, num_fairness_groups: int,
              popularity_group: npt.ArrayLike, num_popularity_groups: int) -> np.ndarray:
    """float64 (U, 3 + 2·G_f + G_p): each user's own :meth:`RankingMetricSums.to_array`.

    Rows add like sums: ``w @ rows`` is the ``to_array()`` of the users counted ``w``
    times (a bootstrap resample); ``rows.sum(0)`` is that of all of them. Arguments as
    :meth:`RankingMetricSums.from_topk`, which sums the same directly, several times
    faster: evaluation uses that, paired comparisons this.
    """
    top_k, held_out = np.asarray(top_k), np.asarray(held_out)
    hit = hits(top_k, held_out)
    held_group = np.asarray(fairness_group)[held_out]
    exposure_group = np.asarray(popularity_group)[top_k]
    _check_ids(held_group, num_fairness_groups, "fairness_group")
    _check_ids(exposure_group, num_popularity_groups, "popularity_group")
    users, g_f, g_p = np.arange(hit.size), num_fairness_groups, num_popularity_groups
    rows = np.zeros((hit.size, 3 + 2 * g_f + g_p))
    rows[:, 0] = 1.0
    rows[:, 1] = hit
    rows[:, 2] = np.where(hit, np.asarray(price, dtype=np.float64)[held_out], 0.0)
    rows[users, 3 + held_group] = 1.0
    rows[users, 3 + g_f + held_group] = hit
    # Each user's recommendations per popularity group: one bincount over (user, group).
    rows[:, 3 + 2 * g_f:] = np.bincount((users[:, None] * g_p + exposure_group).ravel(),
                                        minlength=hit.size * g_p).reshape(hit.size, g_p)
    return rows


@dataclasses.dataclass(frozen=True, eq=False)
class RankingMetrics:
    """The metrics of one evaluation over ``users`` users' top-``k`` lists.

    Attributes:
        hit: Hit@K, the share of users whose held-out item is in their top K.
        rhit: rHit@K, the mean over users of price(held-out item) · hit.
        pop_kl: KL(Q‖P̃) over popularity groups, P̃ smoothed with ``POP_KL_EPSILON``.
        min_hit: the smallest per-group Hit@K over fairness groups that have users.
        group_hit: float64 (num_fairness_groups,) per-group Hit@K; NaN for a group with
            no users.
        group_users: int64 (num_fairness_groups,) users per fairness group.
        exposure: P, float64 (num_popularity_groups,) share of all recommended items per
            popularity group, unsmoothed, sums to 1.
        k: the list length K.
        users: the number of evaluated users U.
    """

    hit: float
    rhit: float
    pop_kl: float
    min_hit: float
    group_hit: np.ndarray
    group_users: np.ndarray
    exposure: np.ndarray
    k: int
    users: int

    def as_dict(self) -> dict[str, float]:
        """The Imp metrics, keyed ``"hit@K"``, ``"rhit@K"``, ``"pop_kl@K"``, ``"min_hit@K"``."""
        return {f"{name}@{self.k}": float(getattr(self, name)) for name in METRICS}


@dataclasses.dataclass(frozen=True, eq=False)
class RankingMetricSums:
    """Additive sufficient statistics of :class:`RankingMetrics` over a set of users.

    Sums over disjoint sets of users add (``+``, :func:`merge`) to the sums over their union.

    Attributes:
        users: evaluated users.
        hits: users whose held-out item is in their top K.
        price_hits: Σ over users of price(held-out item) · hit.
        group_users: int64 (num_fairness_groups,) users per fairness group.
        group_hits: int64 (num_fairness_groups,) hits per fairness group.
        exposure_counts: int64 (num_popularity_groups,) recommended items per popularity group.
        k: the list length K.
    """

    users: int
    hits: int
    price_hits: float
    group_users: np.ndarray
    group_hits: np.ndarray
    exposure_counts: np.ndarray
    k: int

    @classmethod
    def from_topk(cls, top_k: npt.ArrayLike, held_out: npt.ArrayLike, price: npt.ArrayLike,
                  fairness_group: npt.ArrayLike, num_fairness_groups: int,
                  popularity_group: npt.ArrayLike,
                  num_popularity_groups: int) -> RankingMetricSums:
        """Sums over U users.

        Args:
            top_k: int64 (U, K) recommended item ids per user, best first.
            held_out: int64 (U,) each user's held-out item id.
            price: float64 (num_items,) price per item id.
            fairness_group: int (num_items,) fairness group per item id.
            num_fairness_groups: number of fairness groups.
            popularity_group: int (num_items,) popularity group per item id.
            num_popularity_groups: number of popularity groups.
        """
        top_k, held_out = np.asarray(top_k), np.asarray(held_out)
        hit = hits(top_k, held_out)
        held_group = np.asarray(fairness_group)[held_out]
        return cls(
            users=int(hit.size),
            hits=int(hit.sum()),
            price_hits=float(np.asarray(price, dtype=np.float64)[held_out][hit].sum()),
            group_users=_count(held_group, num_fairness_groups, "fairness_group"),
            group_hits=_count(held_group[hit], num_fairness_groups, "fairness_group"),
            exposure_counts=_count(np.asarray(popularity_group)[top_k], num_popularity_groups,
                                   "popularity_group"),
            k=int(top_k.shape[1]),
        )

    def __add__(self, other: RankingMetricSums) -> RankingMetricSums:
        if not isinstance(other, RankingMetricSums):
            return NotImplemented
        if other.k != self.k:
            raise ValueError(f"cannot add sums over top-{self.k} and top-{other.k} lists")
        if (other.group_users.shape != self.group_users.shape
                or other.exposure_counts.shape != self.exposure_counts.shape):
            raise ValueError("cannot add sums over different numbers of groups")
        return RankingMetricSums(
            users=self.users + other.users,
            hits=self.hits + other.hits,
            price_hits=self.price_hits + other.price_hits,
            group_users=self.group_users + other.group_users,
            group_hits=self.group_hits + other.group_hits,
            exposure_counts=self.exposure_counts + other.exposure_counts,
            k=self.k,
        )

    def to_array(self) -> np.ndarray:
        """float64 (3 + 2·G_f + G_p,): users, hits, price_hits, group_users, group_hits,
        exposure_counts; ``k`` is left out so that the vector can be all-reduced with SUM.
        Counts are exact up to 2^53."""
        return np.concatenate([[self.users, self.hits, self.price_hits], self.group_users,
                               self.group_hits, self.exposure_counts]).astype(np.float64)

    @classmethod
    def from_array(cls, array: npt.ArrayLike, *, k: int,
                   num_fairness_groups: int) -> RankingMetricSums:
        """Inverse of :meth:`to_array`; the number of popularity groups follows from the length."""
        array = np.asarray(array, dtype=np.float64)
        num_popularity_groups = array.size - 3 - 2 * num_fairness_groups
        if array.ndim != 1 or num_popularity_groups < 1:
            raise ValueError(f"expected a flat vector of 3 + 2·{num_fairness_groups} + G_p "
                             f"values; got shape {array.shape}")
        counts = np.delete(array, 2)
        if not np.array_equal(counts, np.round(counts)):
            raise ValueError("counts are not whole numbers: all-reduce with SUM, not AVG")
        group_users, group_hits, exposure_counts = np.split(
            counts[2:].astype(np.int64), [num_fairness_groups, 2 * num_fairness_groups])
        return cls(users=int(array[0]), hits=int(array[1]), price_hits=float(array[2]),
                   group_users=group_users, group_hits=group_hits,
                   exposure_counts=exposure_counts, k=k)

    def finalize(self, q: npt.ArrayLike) -> RankingMetrics:
        """The metrics, with ``q`` float64 (num_popularity_groups,) the target distribution Q."""
        if self.users == 0:
            raise ValueError("no users were evaluated")
        with np.errstate(invalid="ignore", divide="ignore"):
            group_hit = np.where(self.group_users > 0, self.group_hits / self.group_users,
                                 np.nan)
        exposure = self.exposure_counts / self.exposure_counts.sum()
        return RankingMetrics(
            hit=self.hits / self.users,
            rhit=self.price_hits / self.users,
            pop_kl=pop_kl(q, exposure),
            min_hit=float(np.nanmin(group_hit)),
            group_hit=group_hit,
            group_users=self.group_users.copy(),
            exposure=exposure,
            k=self.k,
            users=self.users,
        )


def merge(parts: Sequence[RankingMetricSums]) -> RankingMetricSums:
    """The sums over the union of the disjoint user sets of ``parts`` (at least one)."""
    if not parts:
        raise ValueError("nothing to merge")
    return functools.reduce(operator.add, parts)


def pop_kl(q: npt.ArrayLike, exposure: npt.ArrayLike, epsilon: float = POP_KL_EPSILON) -> float:
    """KL(Q‖P̃) in nats, P̃ = (P + ε) / (1 + G·ε); ``q`` and ``exposure`` (G,) each sum to 1.

    With ``epsilon=0`` the divergence is inf where some q_g > 0 has P_g = 0.
    """
    q = np.asarray(q, dtype=np.float64)
    p = np.asarray(exposure, dtype=np.float64)
    if q.ndim != 1 or q.shape != p.shape:
        raise ValueError(f"q and exposure must both be (G,); got {q.shape} and {p.shape}")
    for name, dist in (("q", q), ("exposure", p)):
        if (dist < 0).any() or not math.isclose(dist.sum(), 1.0, rel_tol=1e-6):
            raise ValueError(f"{name} must be a distribution (>= 0, sum 1); got {dist}")
    smoothed = (p + epsilon) / (1.0 + q.size * epsilon)
    support = q > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(q[support] * np.log(q[support] / smoothed[support])))


@dataclasses.dataclass(frozen=True)
class Improvement:
    """Relative improvement of a run over the base model (Imp), as fractions.

    Attributes:
        per_metric: metric key -> (x − base)/base, or (base − x)/base for Pop-KL; None
            where the base is 0 and the ratio is undefined.
        imp: the mean over the requested terms (all four by default); None if any is
            undefined.
        imp_defined: the mean over the defined terms; None if none is defined.
        undefined: the keys whose base is 0.
    """

    per_metric: dict[str, float | None]
    imp: float | None
    imp_defined: float | None
    undefined: tuple[str, ...]

    def describe(self) -> str:
        """One line, in percent: ``"Imp 42.62%"``, or which terms are undefined and the
        mean over the rest, labelled as such."""
        if self.imp is not None:
            return f"Imp {100 * self.imp:.2f}%"
        text = f"Imp undefined (base {', '.join(self.undefined)} = 0)"
        if self.imp_defined is None:
            return text
        defined = len(self.per_metric) - len(self.undefined)
        terms = "term" if defined == 1 else "terms"
        return f"{text}; over the {defined} defined {terms}: {100 * self.imp_defined:.2f}%"


def _metric_keys(metrics: Mapping[str, float]) -> list[str]:
    """The keys of the four Imp metrics in ``metrics`` (e.g. ``"hit@10"``), in ``METRICS`` order."""
    found = [(name, k) for name, _, k in (key.partition("@") for key in metrics)
             if name in METRICS]
    if sorted(name for name, _ in found) != sorted(METRICS) or len({k for _, k in found}) != 1:
        raise ValueError(f"expected one key each for {METRICS} at one K; got {sorted(metrics)}")
    return [f"{name}@{found[0][1]}" for name in METRICS]


def improvement(base: Mapping[str, float], run: Mapping[str, float],
                terms: Collection[str] = METRICS) -> Improvement:
    """Imp of ``run`` over ``base``, both keyed as :meth:`RankingMetrics.as_dict` (other
    keys are ignored), over the ``terms`` named (default: the four of :data:`METRICS`); the
    scale cancels, so fractions and percentages both work."""
    unknown = sorted(set(terms) - set(METRICS))
    if unknown or not terms:
        raise ValueError(f"Imp terms must be some of {', '.join(METRICS)}; got {sorted(terms)}")
    per_metric: dict[str, float | None] = {}
    for key in _metric_keys(base):
        if key.partition("@")[0] not in terms:
            continue
        b, x = float(base[key]), float(run[key])
        if not (math.isfinite(b) and math.isfinite(x)):
            raise ValueError(f"{key}: base {b} and run {x} must be finite")
        gain = b - x if key.partition("@")[0] in LOWER_IS_BETTER else x - b
        per_metric[key] = None if b == 0 else gain / b
    defined = [value for value in per_metric.values() if value is not None]
    undefined = tuple(key for key, value in per_metric.items() if value is None)
    imp_defined = sum(defined) / len(defined) if defined else None
    return Improvement(per_metric=per_metric, imp=None if undefined else imp_defined,
                       imp_defined=imp_defined, undefined=undefined)


def is_valid(base_hit: float, run_hit: float, threshold: float = VALIDITY_THRESHOLD) -> bool:
    """Whether ``run_hit`` is at least ``threshold`` · ``base_hit`` (else invalid).

    A run exactly at the threshold is valid; equality is judged to 1e-9 relative so that
    rounding in the product does not decide it.
    """
    bound = threshold * base_hit
    return run_hit >= bound or math.isclose(run_hit, bound, rel_tol=1e-9)
