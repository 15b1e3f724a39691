"""A PI controller whose output β scales one objective's loss term (the paper's Eq. 13–14).

After ControlVAE: there is no derivative term, and the proportional term passes the error
through a logistic, so it lies in (0, kp).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from morec_rec.errors import MorecError


@dataclasses.dataclass(frozen=True)
class PIGains:
    """Gains and output range of a :class:`PIController`; all finite.

    Attributes:
        kp: proportional gain, >= 0; the proportional term lies in (0, kp).
        ki: integral gain, >= 0, per step and per unit of loss error.
        beta_min: lower bound of the output β, >= 0.
        beta_max: upper bound of the output β, >= ``beta_min``.
    """

    kp: float
    ki: float
    beta_min: float
    beta_max: float

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not math.isfinite(value):
                raise MorecError(f"PI gains: {field.name} must be finite, got {value!r}")
        if self.kp < 0:
            raise MorecError(f"PI gains: kp must be >= 0, got {self.kp!r}")
        if self.ki < 0:
            raise MorecError(f"PI gains: ki must be >= 0, got {self.ki!r}")
        if not 0 <= self.beta_min <= self.beta_max:
            raise MorecError(f"PI gains: need 0 <= beta_min <= beta_max, got beta_min = "
                             f"{self.beta_min!r}, beta_max = {self.beta_max!r}")


class PIController:
    """Holds a loss at ``target`` through the coefficient β of its term in the combined loss.

    Each :meth:`step` takes the controlled value ℓ(t) (a training step's loss, or a
    validation pass's measure) and returns β(t)::

        err(t) = target − ℓ(t)
        P(t)   = kp / (1 + exp(err(t)))
        I(t)   = clamp(I(t−1) − ki · err(t), −P(t), beta_max − beta_min − P(t))
        β(t)   = P(t) + I(t) + beta_min

    with ``I(0) = 0``. A loss above target (err < 0) raises β; one below lowers it.
    Anti-windup clamps the integral where β reaches a bound of its range: an error large
    enough to carry β past a bound takes it to the bound (it is not ignored), and the
    integral never runs on beyond it, so β leaves a bound on the first step whose error
    has the sign that points back into the range.

    Args:
        target: the loss ℓ̂ to hold; finite and > 0.
        gains: gains and output range.
    """

    def __init__(self, target: float, gains: PIGains) -> None:
        if not (math.isfinite(target) and target > 0):
            raise MorecError(f"PI controller: target must be a finite number > 0, "
                             f"got {target!r}")
        self._target = float(target)
        self._gains = gains
        self._integral = 0.0
        self._steps = 0
        self._beta = self._output(gains.kp / 2)  # err = 0: the logistic is 1/2

    @property
    def target(self) -> float:
        """The loss ℓ̂ that the controller holds."""
        return self._target

    @property
    def gains(self) -> PIGains:
        return self._gains

    @property
    def integral(self) -> float:
        """The integral term I(t) (0 before the first step)."""
        return self._integral

    @property
    def steps(self) -> int:
        """Number of :meth:`step` calls so far."""
        return self._steps

    @property
    def beta(self) -> float:
        """The last output β; before any step, the output for err = 0 and I = 0."""
        return self._beta

    def step(self, loss: float) -> float:
        """Feeds the controlled value ℓ(t) (a batch's loss, or a validation pass's measure),
        finite; returns β(t) in [beta_min, beta_max]."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"PI controller: loss must be finite, got {loss}")
        gains = self._gains
        err = self._target - loss
        proportional = gains.kp * _logistic(-err)
        self._integral = min(max(self._integral - gains.ki * err, -proportional),
                             gains.beta_max - gains.beta_min - proportional)
        self._steps += 1
        self._beta = self._output(proportional)
        return self._beta

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`step` changes, as plain Python numbers (JSON-serialisable)."""
        return {"integral": self._integral, "steps": self._steps, "beta": self._beta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict`; the target and gains stay the constructor's."""
        try:
            integral, steps, beta = (float(state["integral"]), int(state["steps"]),
                                     float(state["beta"]))
        except KeyError as e:
            raise MorecError(f"PI controller state: missing entry {e}") from None
        if not (math.isfinite(integral) and math.isfinite(beta) and steps >= 0):
            raise MorecError(f"PI controller state: integral = {integral}, steps = {steps}, "
                             f"beta = {beta} (expected finite numbers and steps >= 0)")
        self._integral, self._steps, self._beta = integral, steps, beta

    def __repr__(self) -> str:
        return (f"PIController(target={self._target!r}, gains={self._gains!r}, "
                f"integral={self._integral!r}, steps={self._steps})")

    def _output(self, proportional: float) -> float:
        """β: the output for the current integral, clamped to the range."""
        unclamped = proportional + self._integral + self._gains.beta_min
        return min(max(unclamped, self._gains.beta_min), self._gains.beta_max)


def _logistic(x: float) -> float:
    """1 / (1 + exp(−x)), without overflow for any finite x."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
