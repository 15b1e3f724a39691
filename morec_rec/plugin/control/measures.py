"""What a controller holds under ``control = "validation"``: an objective's own validation
metric, relative to the base model's.

The measure of objective o at a validation pass is ``1 + (relative loss of its metric
against the base)``: ``2 − m/m_base`` for a metric where higher is better, ``m/m_base``
for one where lower is better. It is 1 at the base and rises as the objective loses
ground, linearly in the metric, so a target of 1.02 holds the metric 2% short of the
base's. Why not the training loss: on Ta-Feng MF the accuracy training loss did not
respond to β at all, while validation Hit@10 did (``experiments/control-quantity``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from morec_rec.errors import MorecError

#: Objective name -> (its validation metric, without ``@K``; whether higher is better).
METRICS: dict[str, tuple[str, bool]] = {
    "accuracy": ("hit", True),
    "revenue": ("rhit", True),
    "fairness": ("min_hit", True),
    "alignment": ("pop_kl", False),
}


def check_measurable(names: Iterable[str]) -> None:
    """MorecError naming a held objective that has no validation metric to hold."""
    for name in names:
        if name not in METRICS:
            raise MorecError(f"hold: objective {name!r} has no validation metric to control "
                             f"on (control = validation holds {', '.join(METRICS)}); "
                             "use control = training")


def relative_measures(names: Collection[str], base: Mapping[str, float],
                      current: Mapping[str, float], k: int) -> dict[str, float]:
    """Each named objective's measure (module docstring) at ``current`` against ``base``.

    Args:
        names: held objectives, each a key of :data:`METRICS`.
        base, current: validation metrics as ``RankingMetrics.as_dict()`` writes them.
        k: the K of their keys (``hit@10``: 10).

    Raises:
        MorecError: a base metric of 0, relative to which nothing can be measured.
    """
    check_measurable(names)
    measures = {}
    for name in names:
        metric, higher_is_better = METRICS[name]
        key = f"{metric}@{k}"
        if base[key] == 0:
            raise MorecError(f"hold {name!r}: the base's validation {key} is 0, so a "
                             "value relative to it is undefined")
        ratio = current[key] / base[key]
        measures[name] = 2.0 - ratio if higher_is_better else ratio
    return measures
