"""The objective coordinator: per-objective losses in, the coefficients of one loss out.

MoRec's loss combination (the paper's Eq. 12), generalised so that any objective, not only
accuracy, may be held at a target by its own :class:`PIController`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from morec_rec.config import MoRecConfig
from morec_rec.errors import MorecError
from morec_rec.plugin.control.measures import check_measurable
from morec_rec.plugin.control.pi import PIController, PIGains

ACCURACY = "accuracy"


class Coordinator:
    """Turns each step's per-objective losses ℓ into coefficients q of ``Σ_o q_o · ℓ_o``.

    ``q_o = c_o · w_o``: the fixed weight ``w_o`` is 1 for accuracy and ``scale · p_o``
    for every other objective; ``c_o`` is the output β of the controller holding o, or 1
    where none does. Holding accuracy alone is the paper's MoRec.

    Under ``training`` control the hook calls :meth:`step` with every batch's losses;
    under ``validation`` control the job calls :meth:`observe` at each validation pass
    and the hook reads :attr:`q`. Both are deterministic, so ranks that feed them the same
    (already all-reduced) values keep identical controllers and coefficients.

    Args:
        objectives: the sampler's objective names in segment-id order; distinct.
        preference: p, one entry per objective other than ``"accuracy"``, in the order of
            ``objectives``; finite entries >= 0 that sum to 1 (within 1e-6).
        scale: λ, finite and > 0.
        targets: held objective name -> its target loss ℓ̂, finite and > 0.
        gains: gains and output range of every controller.
    """

    def __init__(self, objectives: Sequence[str], preference: Sequence[float], scale: float,
                 targets: Mapping[str, float], gains: PIGains) -> None:
        objectives = tuple(objectives)
        for i, name in enumerate(objectives):
            if name in objectives[:i]:
                raise MorecError(f"objectives {objectives}: {name!r} is listed twice")
        others = [name for name in objectives if name != ACCURACY]
        if len(preference) != len(others):
            raise MorecError(f"preference {tuple(preference)} has {len(preference)} entries "
                             f"for {len(others)} objectives other than accuracy "
                             f"({', '.join(others)})")
        if not all(math.isfinite(p) and p >= 0 for p in preference):
            raise MorecError(f"preference {tuple(preference)} must have finite entries >= 0")
        # With no objective besides accuracy, p is empty and has nothing to sum to 1.
        if others and abs(math.fsum(preference) - 1) > 1e-6:
            raise MorecError(f"preference {tuple(preference)} must sum to 1, "
                             f"got {math.fsum(preference):g}")
        if not (math.isfinite(scale) and scale > 0):
            raise MorecError(f"scale must be a finite number > 0, got {scale!r}")
        for name, target in targets.items():
            _check_held(name, objectives, "targets")
            if not (math.isfinite(target) and target > 0):
                raise MorecError(f"targets[{name!r}] must be a finite number > 0, "
                                 f"got {target!r}")

        p = iter(preference)
        self._objectives = objectives
        self._weights = np.array(
            [1.0 if name == ACCURACY else scale * next(p) for name in objectives])
        # In objective order, so every rank steps (and saves) them in the same order.
        self._controllers = {name: PIController(targets[name], gains)
                             for name in objectives if name in targets}
        self._measured: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: MoRecConfig, objectives: Sequence[str],
                    base_losses: Mapping[str, float] | None) -> Coordinator:
        """The coordinator that ``config`` describes over the sampler's ``objectives``.

        Args:
            config: preference, scale, gains, ``control`` and ``hold``.
            objectives: as for the constructor.
            base_losses: objective name -> the base model's mean loss on its sub-batches;
                under ``training`` control a ``relative`` target is relative to it. Needed only
                where :func:`needs_base_losses` says so; None otherwise. (Under
                ``validation`` control every measure is 1 at the base.)
        """
        if config.control == "validation":
            base_losses = dict.fromkeys(objectives, 1.0)
        targets: dict[str, float] = {}
        for name, target in config.hold.items():
            _check_held(name, objectives, "hold")
            if target.value is not None:
                targets[name] = target.value
            elif base_losses is None or name not in base_losses:
                raise MorecError(f"hold {name} (relative = {target.relative}) needs the base "
                                 f"model's loss on {name!r}, which was not measured")
            else:
                targets[name] = target.relative * base_losses[name]
        if config.control == "validation":
            check_measurable(targets)
        gains = PIGains(config.kp, config.ki, config.beta_min, config.beta_max)
        return cls(objectives, config.preference, config.scale, targets, gains)

    @property
    def objectives(self) -> tuple[str, ...]:
        return self._objectives

    @property
    def weights(self) -> np.ndarray:
        """The fixed weights w, float64 (num_objectives,); a copy."""
        return self._weights.copy()

    @property
    def targets(self) -> dict[str, float]:
        """Held objective name -> target loss ℓ̂."""
        return {name: c.target for name, c in self._controllers.items()}

    @property
    def coefficients(self) -> dict[str, float]:
        """Held objective name -> its controller's current β."""
        return {name: c.beta for name, c in self._controllers.items()}

    @property
    def measured(self) -> dict[str, float]:
        """Held objective name -> the value its controller last saw (absent before any)."""
        return dict(self._measured)

    @property
    def q(self) -> np.ndarray:
        """float64 (num_objectives,): the coefficients in force, ``w`` times each held
        objective's current β; the loss to backpropagate is ``Σ_o q_o · ℓ_o``."""
        q = self._weights.copy()
        for i, name in enumerate(self._objectives):
            if name in self._controllers:
                q[i] *= self._controllers[name].beta
        return q

    def observe(self, values: Mapping[str, float]) -> None:
        """Steps the controller of each held objective with its measured value.

        Args:
            values: held objective name -> the controlled quantity, finite; every held
                objective, and the same on every rank.
        """
        if set(values) != set(self._controllers):
            raise ValueError(f"values for {sorted(values)}, expected the held objectives "
                             f"{sorted(self._controllers)}")
        for name, controller in self._controllers.items():
            controller.step(values[name])
            self._measured[name] = float(values[name])

    def step(self, losses: np.ndarray) -> np.ndarray:
        """Steps every controller with its objective's loss (:meth:`observe`); returns q.

        Args:
            losses: float64 (num_objectives,), this step's mean loss per objective, finite
                and identical on every rank.
        """
        values = np.asarray(losses, dtype=np.float64)
        if values.shape != (len(self._objectives),):
            raise ValueError(f"losses has shape {values.shape}, expected "
                             f"({len(self._objectives)},) for objectives {self._objectives}")
        if not np.isfinite(values).all():
            raise ValueError(f"losses {values.tolist()} has a non-finite entry")
        self.observe({name: values[i] for i, name in enumerate(self._objectives)
                      if name in self._controllers})
        return self.q

    def state_dict(self) -> dict[str, Any]:
        """The controllers' states, their targets and last measured values;
        JSON-serialisable."""
        return {"targets": self.targets, "measured": self.measured,
                "controllers": {name: c.state_dict() for name, c in self._controllers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict` saved by a coordinator holding the same targets."""
        saved, controllers = state.get("targets"), state.get("controllers", {})
        if saved != self.targets or set(controllers) != set(self._controllers):
            raise MorecError(f"coordinator state holds targets {saved} and controllers "
                             f"{sorted(controllers)}, this coordinator holds {self.targets}")
        for name, controller in self._controllers.items():
            controller.load_state_dict(controllers[name])
        self._measured = {name: float(v) for name, v in state.get("measured", {}).items()}

    def __repr__(self) -> str:
        return (f"Coordinator(objectives={self._objectives}, weights={self._weights.tolist()}, "
                f"targets={self.targets})")


def needs_base_losses(config: MoRecConfig) -> bool:
    """Whether a ``hold`` target is ``relative`` under ``training`` control, so the base
    model's training losses must be measured."""
    return config.control == "training" and any(target.relative is not None
                                                for target in config.hold.values())


def _check_held(name: str, objectives: Sequence[str], field: str) -> None:
    if name not in objectives:
        raise MorecError(f"{field}: {name!r} is not among the objectives "
                         f"({', '.join(objectives)})")
