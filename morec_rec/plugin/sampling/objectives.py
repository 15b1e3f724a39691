"""Objectives: sampling distributions over training rows (docs/method.md).

An objective splits training rows into groups, gives each group a mass (the masses sum to
1), and draws rows within a group uniformly or in proportion to a per-row weight. The
masses are state owned by the caller: ``initial_masses`` gives the start and ``update``
maps masses and a :class:`ValidationSignal` to new masses. Objectives themselves hold
only what they were built with, so they pickle to DataLoader workers and never go stale
there.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from morec_rec.errors import MorecError

RULES = ("additive", "multiplicative")
STEP = 0.1  # the paper's sampler step α
FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class ValidationSignal:
    """What a validation pass measured; all arrays are per group of one grouping.

    Attributes:
        group_loss: row column name (e.g. ``"fairness_group"``) -> mean validation loss
            per group, shape (num_groups,); NaN where a group had no validation rows.
        exposure: row column name (e.g. ``"popularity_group"``) -> share of the top-K
            recommended items per group, shape (num_groups,), sums to 1.
        group_hit: row column name (e.g. ``"fairness_group"``) -> Hit@K of the validation
            users grouped by their held-out item, shape (num_groups,); NaN where a group
            had no validation user.
    """

    group_loss: dict[str, np.ndarray]
    exposure: dict[str, np.ndarray]
    group_hit: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Objective(abc.ABC):
    """A sampling distribution over training rows: group masses, then rows within a group.

    ``rows`` below is a window of training rows as numpy columns of equal length; an
    objective reads only the columns it names in ``columns``.
    """

    name: str
    num_groups: int
    columns: tuple[str, ...]

    def groups(self, rows: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """int64 group of each row, in ``[0, num_groups)``; None puts every row in group 0."""
        return None

    def weights(self, rows: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """float64 within-group weight of each row, >= 0; None draws uniformly."""
        return None

    @abc.abstractmethod
    def initial_masses(self) -> np.ndarray:
        """float64 group masses before any validation pass, shape (num_groups,), sum 1."""

    def update(self, masses: np.ndarray, signal: ValidationSignal) -> np.ndarray:
        """New masses after a validation pass; ``masses`` is not modified. Fixed by default."""
        return np.array(masses, dtype=np.float64)

    @property
    def is_uniform(self) -> bool:
        """Whether every row is equally likely (the sampler then draws without replacement):
        one group, and :meth:`weights` not overridden."""
        return self.num_groups == 1 and type(self).weights is Objective.weights


class OneGroup(Objective):
    """An objective whose rows form one group, so its mass is fixed at 1."""

    num_groups = 1

    def initial_masses(self) -> np.ndarray:
        return np.ones(1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Accuracy(OneGroup):
    """Every training row equally likely: the model's ordinary training distribution."""

    name = "accuracy"
    columns = ()


class Revenue(OneGroup):
    """Rows drawn in proportion to the item's price (the paper's Eq. 5); free items are
    never drawn."""

    name = "revenue"
    columns = ("price",)

    def weights(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(rows["price"], dtype=np.float64)


class GroupObjective(Objective):
    """Groups from one row column, uniform within a group, masses stepped after validation.

    Masses start at each group's share of the training rows; ``update`` steps them along
    :meth:`direction` with :func:`sign_step`, so the floor holds from the first update on.

    Args:
        train_rows: training rows per group, shape (num_groups,).
        step: the step α of the update rule.
        floor: the smallest mass a group keeps after an update; ``floor * num_groups < 1``.
        rule: ``"additive"`` (m + α·s) or ``"multiplicative"`` (m·exp(α·s)).
    """

    column: str

    def __init__(self, train_rows: npt.ArrayLike, *, step: float = STEP, floor: float = FLOOR,
                 rule: str = "additive") -> None:
        self.num_groups = len(train_rows)
        self.columns = (self.column,)
        self.shares = check_masses(self.name, train_rows, self.num_groups,
                                   what="training rows per group")
        if rule not in RULES:
            raise MorecError(f"objective {self.name!r}: unknown update rule {rule!r} "
                             f"(expected one of {', '.join(RULES)})")
        if not (np.isfinite(step) and step >= 0):
            raise MorecError(f"objective {self.name!r}: step must be a finite number >= 0, "
                             f"got {step}")
        if not (0 <= floor and floor * self.num_groups < 1):
            raise MorecError(f"objective {self.name!r}: floor {floor} does not fit "
                             f"{self.num_groups} groups (need 0 <= floor < 1/{self.num_groups})")
        self.step = float(step)
        self.floor = float(floor)
        self.rule = rule

    def groups(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(rows[self.column], dtype=np.int64)

    def initial_masses(self) -> np.ndarray:
        return self.shares.copy()

    def update(self, masses: np.ndarray, signal: ValidationSignal) -> np.ndarray:
        return sign_step(masses, self.direction(signal), self.step, self.floor, self.rule)

    @abc.abstractmethod
    def direction(self, signal: ValidationSignal) -> np.ndarray:
        """float64 direction s of the update, shape (num_groups,), entries in {-1, 0, 1}."""

    def per_group(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """This objective's entry of a :class:`ValidationSignal` field, shape-checked."""
        array = np.asarray(values[self.column], dtype=np.float64)
        if array.shape != (self.num_groups,):
            raise ValueError(f"objective {self.name!r}: signal for {self.column!r} has shape "
                             f"{array.shape}, expected ({self.num_groups},)")
        return array

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_groups={self.num_groups}, step={self.step}, "
                f"floor={self.floor}, rule={self.rule!r})")


#: What marks fairness's most miserable group: the largest validation loss (the paper's), or
#: the lowest validation Hit@K (the group min-Hit@K measures).
FAIRNESS_SIGNALS = ("loss", "hit")


class Fairness(GroupObjective):
    """Least misery over item-category groups (the paper's Eq. 6–8).

    After a validation pass the most miserable group gains ``step``: by default the one
    with the largest mean validation loss (the paper's), with ``signal="hit"`` the one with the
    lowest validation Hit@K. Groups without validation rows (NaN) are ignored, ties go to
    the lowest index, and if every group is NaN no group gains (the masses only pass
    through the floor).
    """

    name = "fairness"
    column = "fairness_group"

    def __init__(self, train_rows: npt.ArrayLike, *, signal: str = "loss",
                 **update: Any) -> None:
        super().__init__(train_rows, **update)
        if signal not in FAIRNESS_SIGNALS:
            raise MorecError(f"objective {self.name!r}: unknown signal {signal!r} "
                             f"(expected one of {', '.join(FAIRNESS_SIGNALS)})")
        self.signal = signal

    def direction(self, signal: ValidationSignal) -> np.ndarray:
        if self.signal == "loss":
            misery = self.per_group(signal.group_loss)
        else:
            misery = -self.per_group(signal.group_hit)
        direction = np.zeros(self.num_groups)
        if not np.isnan(misery).all():
            direction[np.nanargmax(misery)] = 1.0  # the first maximum: ties to the lowest index
        return direction


class Alignment(GroupObjective):
    """Popularity alignment (the paper's Eq. 9–11): m_g ← m_g − step·sign(P_g − Q_g) for every g.

    P is the popularity-group share of the top-K recommendations on the validation users,
    Q the target: by default each group's share of the training rows (the manifest's
    ``groups.popularity.q``), or a configured distribution over the groups.
    """

    name = "alignment"
    column = "popularity_group"

    def __init__(self, train_rows: npt.ArrayLike, target: npt.ArrayLike | None = None, *,
                 step: float = STEP, floor: float = FLOOR, rule: str = "additive") -> None:
        super().__init__(train_rows, step=step, floor=floor, rule=rule)
        if target is None:
            self.target = self.shares.copy()
            return
        self.target = check_masses(self.name, target, self.num_groups, what="target")
        total = float(np.sum(target))
        if abs(total - 1) > 1e-6:
            raise MorecError(f"objective {self.name!r}: target must be a distribution "
                             f"(sum 1), got sum {total:g}")

    def direction(self, signal: ValidationSignal) -> np.ndarray:
        return -np.sign(self.per_group(signal.exposure) - self.target)


def sign_step(masses: np.ndarray, direction: np.ndarray, step: float, floor: float,
              rule: str) -> np.ndarray:
    """Steps group masses along ``direction``, then applies the floor; returns a new array.

    ``additive``: m + step·s; ``multiplicative``: m·exp(step·s). The result sums to 1 and
    every entry is >= ``floor`` exactly (see :func:`floor_and_normalise`).
    """
    masses = np.asarray(masses, dtype=np.float64)
    if rule == "additive":
        stepped = masses + step * direction
    elif rule == "multiplicative":
        stepped = masses * np.exp(step * direction)
    else:
        raise ValueError(f"unknown update rule {rule!r} (expected one of {', '.join(RULES)})")
    return floor_and_normalise(stepped, floor)


def floor_and_normalise(values: np.ndarray, floor: float) -> np.ndarray:
    """The distribution max(floor, c·v) for the c that makes it sum to 1.

    Negative values count as 0. Entries that fall below the floor are set to it and the rest
    share what is left in proportion to ``values``; since that sharing can push further
    entries under the floor, repeat until none does (at most ``len(values)`` rounds).
    Requires ``floor * len(values) < 1`` and a positive entry.
    """
    values = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
    if not values.sum() > 0:
        raise ValueError(f"no positive mass to normalise: {values.tolist()}")
    at_floor = np.zeros(len(values), dtype=bool)
    while True:
        # The scale only shrinks from round to round, so an entry once at the floor stays.
        scale = (1 - floor * np.count_nonzero(at_floor)) / values[~at_floor].sum()
        result = np.where(at_floor, floor, values * scale)
        below = ~at_floor & (result < floor)
        if not below.any():
            return result
        at_floor |= below


def check_masses(name: str, masses: npt.ArrayLike, num_groups: int, *,
                 what: str = "masses") -> np.ndarray:
    """Validates group masses of objective ``name``; returns them as float64 summing to 1.

    Zero entries are allowed. Raises :class:`MorecError`, naming the objective and the
    problem, for a shape other than (num_groups,), a NaN or infinite entry, a negative
    entry, or a sum of 0.
    """
    array = np.asarray(masses, dtype=np.float64)
    problem = None
    if array.shape != (num_groups,):
        problem = f"must have shape ({num_groups},), got {array.shape}"
    elif not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        problem = f"must be finite, entry {bad} is {array[bad]}"
    elif (array < 0).any():
        bad = int(np.flatnonzero(array < 0)[0])
        problem = f"must be >= 0, entry {bad} is {array[bad]:g}"
    elif array.sum() == 0:
        problem = "sum to 0"
    if problem is not None:
        raise MorecError(f"objective {name!r}: {what} {problem}")
    return array / array.sum()


def row_groups(objective: Objective, rows: Mapping[str, np.ndarray],
               num_rows: int) -> np.ndarray | None:
    """``objective.groups(rows)`` of ``num_rows`` rows, checked: integers of shape
    (num_rows,) in ``[0, num_groups)``, or None. MorecError naming the objective
    otherwise."""
    groups = _one_a_row(objective, "groups", rows, num_rows, "iu", "integers")
    if groups is not None:
        outside = (groups < 0) | (groups >= objective.num_groups)
        if outside.any():
            raise MorecError(f"objective {objective.name!r}: groups() gave group "
                             f"{groups[outside][0]}, outside [0, {objective.num_groups})")
    return groups


def row_weights(objective: Objective, rows: Mapping[str, np.ndarray],
                num_rows: int) -> np.ndarray | None:
    """``objective.weights(rows)`` of ``num_rows`` rows, checked: finite numbers >= 0 of
    shape (num_rows,), as float64, or None. MorecError naming the objective otherwise."""
    weights = _one_a_row(objective, "weights", rows, num_rows, "iuf", "numbers")
    if weights is None:
        return None
    weights = weights.astype(np.float64, copy=False)
    bad = ~(weights >= 0) | np.isinf(weights)  # NaN fails >= 0
    if bad.any():
        raise MorecError(f"objective {objective.name!r}: weights() gave weight "
                         f"{weights[bad][0]}, expected finite weights >= 0")
    return weights


def _one_a_row(objective: Objective, method: str, rows: Mapping[str, np.ndarray],
               num_rows: int, kinds: str, expected: str) -> np.ndarray | None:
    """What ``objective.<method>(rows)`` gives, as an array of shape (num_rows,) whose
    dtype is of one of numpy's ``kinds``, or None; MorecError naming it otherwise."""
    values = getattr(objective, method)(rows)
    if values is None:
        return None
    values = np.asarray(values)
    if values.shape != (num_rows,) or values.dtype.kind not in kinds:
        raise MorecError(f"objective {objective.name!r}: {method}() gave {values.dtype} of "
                         f"shape {values.shape} for {num_rows} rows, expected {expected} of "
                         f"shape ({num_rows},)")
    return values


BUILTINS: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Accuracy, Revenue, Fairness, Alignment)
}


def build_objectives(names: Sequence[str], manifest: Mapping[str, Any], *, step: float = STEP,
                     floor: float = FLOOR, rule: str = "additive",
                     alignment_target: npt.ArrayLike | None = None,
                     fairness_signal: str = "loss") -> list[Objective]:
    """The built-in objectives ``names``, in that order, for a prepared dataset's manifest.

    ``step``, ``floor`` and ``rule`` configure the updating objectives (fairness and
    alignment); ``alignment_target`` replaces alignment's default target Q;
    ``fairness_signal`` picks fairness's most miserable group. Raises :class:`MorecError`
    for an unknown or repeated name, a bad target or an unknown signal.
    """
    for i, name in enumerate(names):
        if name not in BUILTINS:
            raise MorecError(f"unknown objective {name!r} "
                             f"(expected one of {', '.join(BUILTINS)})")
        if name in names[:i]:
            raise MorecError(f"objective {name!r} is listed twice")
    groups = manifest["groups"]
    update = {"step": step, "floor": floor, "rule": rule}

    def build(name: str) -> Objective:
        if name == Fairness.name:
            return Fairness(groups["fairness"]["train_rows"], signal=fairness_signal,
                            **update)
        if name == Alignment.name:
            return Alignment(groups["popularity"]["train_rows"], alignment_target, **update)
        return BUILTINS[name]()

    return [build(name) for name in names]
