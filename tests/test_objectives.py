"""Objectives: initial masses, update rules, the floor, validation, and a user-defined one.

Expected numbers are worked out by hand in the comments beside them.
"""

from __future__ import annotations

import pickle

import numpy as np
import numpy.typing as npt
import pytest

from morec_rec.errors import MorecError
from morec_rec.plugin.sampling.objectives import (
    BUILTINS,
    Accuracy,
    Alignment,
    Fairness,
    Objective,
    Revenue,
    ValidationSignal,
    build_objectives,
    check_masses,
    sign_step,
)

MANIFEST = {
    "groups": {
        "fairness": {"train_rows": [6, 3, 1]},
        "popularity": {"train_rows": [1, 3, 4], "q": [0.125, 0.375, 0.5]},
    }
}
ROWS = {
    "user_id": np.array([0, 1, 2, 3], dtype=np.int32),
    "item_id": np.array([4, 0, 2, 4], dtype=np.int32),
    "price": np.array([2.5, 0.0, 10.0, 2.5]),
    "fairness_group": np.array([2, 0, 1, 2], dtype=np.int16),
    "popularity_group": np.array([0, 2, 1, 0], dtype=np.int16),
}


# Fairness, multiplicative: masses [0.5, 0.3, 0.2], group 1 worst, so it is multiplied by
# e^0.1 = 1.105171: [0.5, 0.331551, 0.2] / 1.031551.
MULTIPLIED = [0.484707, 0.321410, 0.193883]


def fairness_signal(loss: list[float]) -> ValidationSignal:
    return ValidationSignal(group_loss={"fairness_group": np.array(loss)}, exposure={})


def alignment_signal(exposure: list[float]) -> ValidationSignal:
    return ValidationSignal(group_loss={}, exposure={"popularity_group": np.array(exposure)})


def test_initial_masses_are_training_row_shares():
    accuracy, revenue, fairness, alignment = build_objectives(list(BUILTINS), MANIFEST)
    np.testing.assert_array_equal(accuracy.initial_masses(), [1.0])
    np.testing.assert_array_equal(revenue.initial_masses(), [1.0])
    np.testing.assert_allclose(fairness.initial_masses(), [0.6, 0.3, 0.1])  # 6, 3, 1 of 10
    np.testing.assert_allclose(alignment.initial_masses(), [0.125, 0.375, 0.5])  # 1, 3, 4 of 8
    np.testing.assert_allclose(alignment.target, MANIFEST["groups"]["popularity"]["q"])
    assert fairness.initial_masses().dtype == np.float64
    assert [o.num_groups for o in (accuracy, revenue, fairness, alignment)] == [1, 1, 3, 3]


def test_groups_and_weights_read_row_columns():
    accuracy, revenue, fairness, alignment = build_objectives(list(BUILTINS), MANIFEST)
    assert accuracy.groups(ROWS) is None and accuracy.weights(ROWS) is None
    assert revenue.groups(ROWS) is None
    np.testing.assert_array_equal(revenue.weights(ROWS), [2.5, 0.0, 10.0, 2.5])
    groups = fairness.groups(ROWS)
    assert groups.dtype == np.int64
    np.testing.assert_array_equal(groups, [2, 0, 1, 2])
    np.testing.assert_array_equal(alignment.groups(ROWS), [0, 2, 1, 0])
    assert fairness.weights(ROWS) is None and alignment.weights(ROWS) is None
    assert (accuracy.columns, revenue.columns) == ((), ("price",))
    assert (fairness.columns, alignment.columns) == (("fairness_group",), ("popularity_group",))
    assert [o.is_uniform for o in (accuracy, revenue, fairness, alignment)] == [
        True, False, False, False]


def test_fixed_objectives_return_masses_unchanged_as_a_copy():
    signal = ValidationSignal({"fairness_group": np.ones(3)}, {"popularity_group": np.ones(3)})
    for objective in (Accuracy(), Revenue()):
        masses = np.array([1.0])
        updated = objective.update(masses, signal)
        np.testing.assert_array_equal(updated, [1.0])
        assert updated is not masses


def test_fairness_worst_group_gains_step_then_renormalises():
    fairness = Fairness([6, 3, 1])
    masses = np.array([0.5, 0.3, 0.2])
    # Group 1 has the largest loss: [0.5, 0.4, 0.2] / 1.1.
    updated = fairness.update(masses, fairness_signal([0.1, 0.4, 0.2]))
    np.testing.assert_allclose(updated, [0.5 / 1.1, 0.4 / 1.1, 0.2 / 1.1])
    np.testing.assert_array_equal(masses, [0.5, 0.3, 0.2])  # input untouched


def test_fairness_floor_holds_after_renormalising():
    fairness = Fairness([6, 3, 1], floor=0.05)
    # Group 2 gains: [0.05, 0.55, 0.5] / 1.1 puts group 0 at 0.045 < 0.05, so it is held at
    # 0.05 and groups 1 and 2 share the remaining 0.95 as 0.55 : 0.5 = 11 : 10.
    updated = fairness.update(np.array([0.05, 0.55, 0.4]), fairness_signal([0.1, 0.2, 0.3]))
    np.testing.assert_allclose(updated, [0.05, 0.95 * 11 / 21, 0.95 * 10 / 21])


def test_fairness_ignores_nan_groups_and_breaks_ties_low():
    fairness = Fairness([6, 3, 1])
    masses = np.array([0.5, 0.3, 0.2])
    # Group 0 has no validation rows; group 2 is the worst of the rest.
    np.testing.assert_allclose(fairness.update(masses, fairness_signal([np.nan, 0.2, 0.3])),
                               [0.5 / 1.1, 0.3 / 1.1, 0.3 / 1.1])
    # Groups 1 and 2 tie: the lower index gains.
    np.testing.assert_allclose(fairness.update(masses, fairness_signal([0.1, 0.3, 0.3])),
                               [0.5 / 1.1, 0.4 / 1.1, 0.2 / 1.1])
    np.testing.assert_allclose(fairness.update(masses, fairness_signal([np.nan] * 3)), masses)


def test_fairness_by_hit_lifts_the_group_with_the_lowest_validation_hit():
    fairness = Fairness([6, 3, 1], signal="hit")
    masses = np.array([0.5, 0.3, 0.2])
    # The loss would pick group 1; the Hit picks group 0 (0.01), ignoring group 2 (no user).
    signal = ValidationSignal(group_loss={"fairness_group": np.array([0.1, 0.4, 0.2])},
                              exposure={},
                              group_hit={"fairness_group": np.array([0.01, 0.05, np.nan])})
    np.testing.assert_allclose(fairness.update(masses, signal), [0.6 / 1.1, 0.3 / 1.1, 0.2 / 1.1])
    with pytest.raises(MorecError, match="unknown signal 'ndcg'"):
        Fairness([6, 3, 1], signal="ndcg")


def test_fairness_multiplicative():
    fairness = Fairness([6, 3, 1], rule="multiplicative")
    updated = fairness.update(np.array([0.5, 0.3, 0.2]), fairness_signal([0.1, 0.4, 0.2]))
    np.testing.assert_allclose(updated, MULTIPLIED, atol=1e-6)


def test_alignment_sign_rule():
    alignment = Alignment([2, 3, 5])  # Q = [0.2, 0.3, 0.5]
    # P - Q = [-0.1, 0, +0.1]: group 0 under-exposed gains 0.1, group 1 (P == Q) is
    # unchanged, group 2 over-exposed loses 0.1; the sum stays 1.
    updated = alignment.update(np.array([0.2, 0.3, 0.5]), alignment_signal([0.1, 0.3, 0.6]))
    np.testing.assert_allclose(updated, [0.3, 0.3, 0.4])


def test_alignment_floor_for_a_group_pushed_below_it():
    alignment = Alignment([2, 3, 5])
    # Signs [+1, +1, -1]: [0.4, 0.75, -0.05]; group 2 is held at the floor 0.001 and groups 0
    # and 1 share 0.999 as 0.4 : 0.75.
    updated = alignment.update(np.array([0.3, 0.65, 0.05]), alignment_signal([0.1, 0.2, 0.7]))
    np.testing.assert_allclose(updated, [0.999 * 0.4 / 1.15, 0.999 * 0.75 / 1.15, 0.001])


def test_alignment_configured_target_and_multiplicative():
    alignment = Alignment([2, 3, 5], target=[0.5, 0.25, 0.25], rule="multiplicative")
    # P - target = [-0.2, +0.05, +0.15]: signs [+1, -1, -1] on uniform masses.
    updated = alignment.update(np.full(3, 1 / 3), alignment_signal([0.3, 0.3, 0.4]))
    e, f = np.exp(0.1), np.exp(-0.1)
    np.testing.assert_allclose(updated, np.array([e, f, f]) / (e + 2 * f))


def test_floor_is_exact_when_renormalising_pushes_another_group_under():
    # [0, 0.105, 0.895]: group 0 goes to the floor 0.1, scaling the rest by 0.9 puts group 1
    # at 0.0945 < 0.1, so it joins; group 2 keeps the remaining 0.8.
    result = sign_step(np.array([0.0, 0.105, 0.895]), np.zeros(3), 0.1, 0.1, "additive")
    np.testing.assert_allclose(result, [0.1, 0.1, 0.8])
    assert result.min() >= 0.1


def test_update_rule_options_are_checked():
    with pytest.raises(MorecError, match="objective 'fairness': unknown update rule 'linear'"):
        Fairness([6, 3, 1], rule="linear")
    with pytest.raises(MorecError, match="objective 'alignment': floor 0.5 does not fit 3"):
        Alignment([2, 3, 5], floor=0.5)
    with pytest.raises(MorecError, match="objective 'fairness': step must be"):
        Fairness([6, 3, 1], step=-0.1)


@pytest.mark.parametrize("masses, problem", [
    ([0.5, 0.5], r"masses must have shape \(3,\), got \(2,\)"),
    ([0.5, -0.1, 0.6], "masses must be >= 0, entry 1 is -0.1"),
    ([0.5, np.nan, 0.5], "masses must be finite, entry 1 is nan"),
    ([0.5, 0.5, np.inf], "masses must be finite, entry 2 is inf"),
    ([0.0, 0.0, 0.0], "masses sum to 0"),
])
def test_check_masses_errors_name_the_objective(masses, problem):
    with pytest.raises(MorecError, match=f"^objective 'fairness': {problem}$"):
        check_masses("fairness", masses, 3)


def test_check_masses_allows_zeros_and_returns_a_distribution():
    masses = check_masses("fairness", [0, 1, 3], 3)
    assert masses.dtype == np.float64
    np.testing.assert_array_equal(masses, [0.0, 0.25, 0.75])


@pytest.mark.parametrize("names, message", [
    (["accuracy", "x"],
     "unknown objective 'x' (expected one of accuracy, revenue, fairness, alignment)"),
    (["fairness", "revenue", "fairness"], "objective 'fairness' is listed twice"),
])
def test_build_objectives_rejects_bad_names(names, message):
    with pytest.raises(MorecError) as error:
        build_objectives(names, MANIFEST)
    assert str(error.value) == message


@pytest.mark.parametrize("target, problem", [
    ([0.5, 0.5], r"target must have shape \(3,\), got \(2,\)"),
    ([0.5, 0.5, 0.5], "target must be a distribution"),
    ([1.2, -0.2, 0.0], "target must be >= 0"),
])
def test_build_objectives_rejects_a_bad_alignment_target(target, problem):
    with pytest.raises(MorecError, match=f"objective 'alignment': {problem}"):
        build_objectives(["alignment"], MANIFEST, alignment_target=target)


def test_build_objectives_passes_options_in_order():
    revenue, alignment = build_objectives(["revenue", "alignment"], MANIFEST, step=0.2,
                                          floor=0.01, rule="multiplicative",
                                          alignment_target=[0.2, 0.3, 0.5])
    assert isinstance(revenue, Revenue) and isinstance(alignment, Alignment)
    assert (alignment.step, alignment.floor, alignment.rule) == (0.2, 0.01, "multiplicative")
    np.testing.assert_allclose(alignment.target, [0.2, 0.3, 0.5])
    np.testing.assert_allclose(alignment.initial_masses(), [0.125, 0.375, 0.5])


def test_builtins_survive_pickling():
    for objective in build_objectives(list(BUILTINS), MANIFEST, rule="multiplicative"):
        clone = pickle.loads(pickle.dumps(objective))
        assert type(clone) is type(objective)
        np.testing.assert_array_equal(clone.initial_masses(), objective.initial_masses())
    clone = pickle.loads(pickle.dumps(Fairness([6, 3, 1], rule="multiplicative")))
    updated = clone.update(np.array([0.5, 0.3, 0.2]), fairness_signal([0.1, 0.4, 0.2]))
    np.testing.assert_allclose(updated, MULTIPLIED, atol=1e-6)


class NewItems(Objective):
    """A user-defined objective: boosts new items, written against the public API only.

    Group 1 holds rows whose item is new, group 0 the rest. After a validation pass, while
    the new items' mean validation loss is above ``target_loss``, group 1 gains ``step``;
    once it is below, group 1 gives ``step`` back. The evaluator reports the loss under this
    objective's name, grouping validation rows with :meth:`groups`.
    """

    name = "new_items"
    num_groups = 2
    columns = ("item_id",)

    def __init__(self, new_items: npt.ArrayLike, num_items: int, share: float,
                 target_loss: float, step: float = 0.1) -> None:
        self.group_of_item = np.zeros(num_items, dtype=np.int64)
        self.group_of_item[np.asarray(new_items)] = 1
        self.share = share
        self.target_loss = target_loss
        self.step = step

    def groups(self, rows):
        return self.group_of_item[rows["item_id"]]

    def initial_masses(self) -> np.ndarray:
        return np.array([1 - self.share, self.share])

    def update(self, masses: np.ndarray, signal: ValidationSignal) -> np.ndarray:
        above = signal.group_loss[self.name][1] > self.target_loss
        return sign_step(masses, np.array([0.0, 1.0 if above else -1.0]), self.step, 0.01,
                         "additive")


def test_user_defined_objective_works_through_the_same_api():
    objective = pickle.loads(pickle.dumps(NewItems([2, 4], num_items=5, share=0.2,
                                                   target_loss=0.5)))
    np.testing.assert_array_equal(objective.groups(ROWS), [1, 0, 1, 1])  # items 4, 0, 2, 4
    assert objective.weights(ROWS) is None and not objective.is_uniform
    masses = check_masses(objective.name, objective.initial_masses(), objective.num_groups)
    np.testing.assert_allclose(masses, [0.8, 0.2])

    def signal(new_item_loss: float) -> ValidationSignal:
        return ValidationSignal({objective.name: np.array([0.3, new_item_loss])}, {})

    masses = objective.update(masses, signal(0.9))  # [0.8, 0.3] / 1.1
    np.testing.assert_allclose(masses, [0.8 / 1.1, 0.3 / 1.1])
    masses = objective.update(masses, signal(0.4))  # group 1 gives 0.1 back
    np.testing.assert_allclose(masses, np.array([0.8, 0.3 - 0.11]) / 0.99)
    check_masses(objective.name, masses, objective.num_groups)
    with pytest.raises(MorecError, match="objective 'new_items': masses must have shape"):
        check_masses(objective.name, np.ones(3), objective.num_groups)
