"""Paired bootstrap over users: is one model's lead over another more than test-set noise?

Two models evaluated on the same users (:func:`~morec_rec.plugin.eval.ranking.evaluate_users`)
are resampled together: each resample draws U users with replacement, the same users for
both, and recomputes every metric from the resampled users' sums (so Pop-KL and min-Hit,
which are not means over users, are resampled as they are defined). The spread of the
differences is the test-set noise of the comparison; the models are fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from morec_rec.plugin.eval.metrics import (
    LOWER_IS_BETTER,
    METRICS,
    RankingMetricSums,
    improvement,
)

#: Resamples whose weight matrix is built at once: (CHUNK, U) int64.
_CHUNK = 100


@dataclasses.dataclass(frozen=True)
class PairedBootstrap:
    """Model A against model B on the same users, ``resamples`` paired resamples.

    Attributes:
        a, b: each model's metrics on the users as evaluated, keyed ``"hit@K"`` etc.
        difference: A − B per metric, on the users as evaluated.
        interval: per metric, the (low, high) percentile interval of A − B over the
            resamples at ``level``.
        ahead: per metric, the share of resamples in which A's value is better than B's
            (higher; lower for Pop-KL).
        imp: Imp of A over B (B as the base) over the terms of ``imp_terms`` that every
            resample defines, so that it and its resamples are one statistic; None if no
            term is left.
        imp_undefined: the metrics of ``imp_terms`` that Imp leaves out, B's being 0 on
            the users as evaluated.
        imp_unresolved: the other metrics of ``imp_terms`` that Imp leaves out, with the
            number of resamples in which B's is 0 (which would leave them out of those
            resamples' Imp alone).
        imp_interval: the percentile interval of that Imp over the resamples (None with
            ``imp``).
        imp_positive: the share of resamples in which A's Imp over B is > 0 (None as
            above).
        imp_terms: the metrics Imp was asked to be over (names of ``METRICS``).
        imp_over: those it is over, the others left out (none, if no term is left).
        resamples, level, seed: as given.
    """

    a: dict[str, float]
    b: dict[str, float]
    difference: dict[str, float]
    interval: dict[str, tuple[float, float]]
    ahead: dict[str, float]
    imp: float | None
    imp_undefined: tuple[str, ...]
    imp_unresolved: dict[str, int]
    imp_interval: tuple[float, float] | None
    imp_positive: float | None
    imp_terms: tuple[str, ...]
    imp_over: tuple[str, ...]
    resamples: int
    level: float
    seed: int


def paired_bootstrap(rows_a: np.ndarray, rows_b: np.ndarray, q: np.ndarray, *, k: int,
                     num_fairness_groups: int, resamples: int = 1000, level: float = 0.95,
                     seed: int = 0, imp_terms: Sequence[str] = METRICS) -> PairedBootstrap:
    """Compares A and B from their per-user rows (U, D), row u of both the same user.

    ``q`` is the target popularity distribution (``RankingTask.q``); Imp is over
    ``imp_terms`` (e.g. without ``min_hit`` where the test set cannot resolve it).
    Deterministic for a given ``seed``.
    """
    if rows_a.shape != rows_b.shape or rows_a.ndim != 2 or len(rows_a) == 0:
        raise ValueError(f"per-user rows of A and B must have the same (U, D) shape, U > 0; "
                         f"got {rows_a.shape} and {rows_b.shape}")
    if not np.array_equal(rows_a[:, 3:3 + num_fairness_groups],
                          rows_b[:, 3:3 + num_fairness_groups]):
        raise ValueError("A and B were not evaluated on the same users (held-out groups differ)")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1; got {resamples}, {level}")

    def metrics(total: np.ndarray) -> dict[str, float]:
        sums = RankingMetricSums.from_array(total, k=k, num_fairness_groups=num_fairness_groups)
        return sums.finalize(q).as_dict()

    a, b = metrics(rows_a.sum(axis=0)), metrics(rows_b.sum(axis=0))
    users = len(rows_a)
    rng = np.random.default_rng(seed)
    pairs = []  # each resample's (A's, B's) metrics
    for start in range(0, resamples, _CHUNK):
        weights = rng.multinomial(users, np.full(users, 1.0 / users),
                                  size=min(_CHUNK, resamples - start)).astype(np.float64)
        pairs += [(metrics(total_a), metrics(total_b))
                  for total_a, total_b in zip(weights @ rows_a, weights @ rows_b)]
    keys = list(a)
    differences = np.array([[pa[m] - pb[m] for m in keys] for pa, pb in pairs])
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    bounds = np.percentile(differences, tails, axis=0)
    better = np.array([-1.0 if m.partition("@")[0] in LOWER_IS_BETTER else 1.0 for m in keys])
    gain = improvement(b, a, imp_terms)
    # A term is left out of every resample's Imp where B's is 0 in any resample.
    zeros = {key: sum(pb[key] == 0 for _, pb in pairs)
             for key in gain.per_metric if key not in gain.undefined}
    unresolved = {key: count for key, count in zeros.items() if count}
    terms = [key.partition("@")[0] for key in zeros if key not in unresolved]
    imps = (np.array([improvement(pb, pa, terms).imp for pa, pb in pairs], dtype=np.float64)
            if terms else None)
    return PairedBootstrap(
        a=a, b=b, difference={m: a[m] - b[m] for m in keys},
        interval={m: (float(bounds[0, i]), float(bounds[1, i])) for i, m in enumerate(keys)},
        ahead=dict(zip(keys, np.mean(differences * better > 0, axis=0).tolist())),
        imp=improvement(b, a, terms).imp if terms else None, imp_undefined=gain.undefined,
        imp_unresolved=unresolved,
        imp_interval=(None if imps is None
                      else tuple(float(x) for x in np.percentile(imps, tails))),
        imp_positive=None if imps is None else float(np.mean(imps > 0)),
        imp_terms=tuple(imp_terms), imp_over=tuple(terms), resamples=resamples, level=level,
        seed=seed,
    )
