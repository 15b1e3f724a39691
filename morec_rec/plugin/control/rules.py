"""Multi-objective baselines' weights: one combined loss from the objectives' gradients.

Each rule maps the objectives' losses ``L`` (n,) and their gradients' Gram matrix ``G``
(n, n), ``G_ij = <∇L_i, ∇L_j>``, to weights ``α`` (n,); the loss to backpropagate is
``Σ_i α_i L_i``, whose gradient is the method's direction ``Σ_i α_i ∇L_i``. A step is
therefore one backward pass of the combined loss, whatever the rule: no parameter, and no
fused embedding table, is updated twice.

- :class:`Static`: fixed weights (linear scalarisation), no gradients needed.
- :class:`Coefficients`: MoRec's own PI-controlled coefficients (its ablation without the
  data sampler), no gradients needed.
- :class:`MGDA`: the min-norm point of the gradients' convex hull (Sener and Koltun, 2018),
  by Frank–Wolfe with away steps (:func:`min_norm`).
- :class:`ParetoMTL`: MGDA with the constraints that keep the solution in its preference
  vector's sub-region (Lin et al., 2019), for any number of objectives.
- :class:`EPO`: exact Pareto optimal search (Mahapatra and Rajan, 2020), whose linear
  programs SciPy's HiGHS solves (the ``epo`` extra); where one fails, the step falls back
  to the preference's linear scalarisation, as the authors' code does, and counts it.

Every rule is deterministic in ``(L, G)``: ranks that feed it all-reduced values agree.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import numpy as np

from morec_rec.errors import MorecError

logger = logging.getLogger(__name__)


#: The baseline coordinators, by their names in ``MoRecConfig.coordinator``.
BASELINES = ("static", "mgda", "pe-mtl", "epo")


class Rule(Protocol):
    """Weights ``α`` (n,) of the combined loss from the losses and their Gram matrix."""

    #: Whether :meth:`weights` reads the losses and the Gram matrix; where it does not,
    #: both may be passed as None.
    needs_gradients: bool

    def weights(self, losses: np.ndarray | None, gram: np.ndarray | None) -> np.ndarray: ...


def min_norm(gram: np.ndarray, *, max_iter: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """``argmin_{α ∈ simplex} αᵀ G α``: the weights of the min-norm point of the convex hull
    of n vectors whose Gram matrix is ``gram``.

    Frank–Wolfe with away steps and exact line search (the away steps give it linear
    convergence on the simplex, where plain Frank–Wolfe, as in Sener and Koltun's Alg. 2,
    zig-zags): from uniform weights, each step moves towards the vertex of smallest
    ``(Gα)_t`` or away from the used vertex of largest, whichever descends faster. It stops
    when the duality gap ``αᵀGα − min_t (Gα)_t`` is below ``tol`` times the largest
    squared norm ``max_t G_tt`` (the weights do not depend on the vectors' scale) or after
    ``max_iter`` steps.

    Args:
        gram: float (n, n), symmetric positive semi-definite, n >= 1.

    Returns:
        float64 (n,), entries >= 0 summing to 1.
    """
    gram = np.asarray(gram, dtype=np.float64)
    n = gram.shape[0]
    alpha = np.full(n, 1.0 / n)
    largest = float(np.max(np.diag(gram)))
    if largest > 0:
        gram = gram / largest
    for _ in range(max_iter):
        g_alpha = gram @ alpha
        norm_sq = alpha @ g_alpha
        toward = int(np.argmin(g_alpha))
        if norm_sq - g_alpha[toward] <= tol:
            break
        used = np.flatnonzero(alpha > 0)
        away = int(used[np.argmax(g_alpha[used])])
        direction = -alpha.copy()
        if norm_sq - g_alpha[toward] >= g_alpha[away] - norm_sq:  # towards a vertex
            direction[toward] += 1.0
            longest = 1.0
        else:  # away from one: the other weights grow in proportion
            direction = -direction
            direction[away] -= 1.0
            longest = alpha[away] / (1.0 - alpha[away])
        curvature = direction @ gram @ direction
        slope = g_alpha @ direction  # half the derivative of |v|² along the direction
        step = longest if curvature <= 0 else min(longest, max(0.0, -slope / curvature))
        alpha = np.clip(alpha + step * direction, 0.0, None)
        alpha /= alpha.sum()
    return alpha


def _check_preference(preference: np.ndarray, positive: bool) -> np.ndarray:
    preference = np.asarray(preference, dtype=np.float64)
    if preference.ndim != 1 or not np.isfinite(preference).all() or (preference < 0).any() \
            or not preference.sum() > 0 or (positive and not (preference > 0).all()):
        raise MorecError(f"preference {preference.tolist()} must be finite entries "
                         f"{'> 0' if positive else '>= 0, not all 0'}")
    return preference / preference.sum()


class Static:
    """Fixed weights: ``α`` is the preference, normalised to sum to 1.

    Args:
        preference: float (n,), entries >= 0, not all 0.
    """

    needs_gradients = False

    def __init__(self, preference: np.ndarray) -> None:
        self.preference = _check_preference(preference, positive=False)

    def weights(self, losses: np.ndarray | None, gram: np.ndarray | None) -> np.ndarray:
        return self.preference.copy()


class Coefficients:
    """MoRec's own coefficients q, read when each step asks (its controllers move them at
    validation passes): MoRec with the objectives' loss forms in place of its data
    sampler.

    Args:
        q: returns float (n,), the coordinator's current coefficients (not normalised,
            as under ``loss`` coefficients).
    """

    needs_gradients = False

    def __init__(self, q: Callable[[], np.ndarray]) -> None:
        self._q = q

    def weights(self, losses: np.ndarray | None, gram: np.ndarray | None) -> np.ndarray:
        return np.asarray(self._q(), dtype=np.float64).copy()


class MGDA:
    """The min-norm convex combination of the gradients: a common descent direction of
    every objective, or zero at a Pareto-stationary point."""

    needs_gradients = True

    def weights(self, losses: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        return min_norm(_gram(gram, losses))


class ParetoMTL:
    """Pareto MTL: MGDA restricted to the sub-region of one preference vector.

    The sub-region of reference vector ``u_k`` among ``u_1..u_K`` holds the losses closer
    in angle to ``u_k`` than to any other: constraint j is
    ``c_j(L) = (û_j − û_k) · L/|L| <= 0`` (hats: unit length), violated when ``c_j > 0``.
    While the losses lie outside the region (an initial phase, at most ``init_steps``
    steps), the direction is the min-norm combination of the violated constraints'
    gradients; once inside, of the objectives' and the violated constraints' gradients.
    Since ``∇c_j = Σ_i (û_j − û_k)_i ∇L_i`` (ignoring |L|'s change, as the authors do), the
    direction is a combination of the objectives' gradients; its weights are scaled so
    that ``Σ|α_i| = n`` in both phases (the authors' code scales the main phase's so and
    leaves the initial phase's as they are). Where the losses lie inside the sub-region
    from the first step, no constraint is violated and the weights are MGDA's times n.

    Args:
        references: float (K, n), the reference vectors, K >= 2, entries >= 0.
        index: k, the row of ``references`` this solution belongs to.
        init_steps: most steps of the initial phase.
    """

    needs_gradients = True

    def __init__(self, references: np.ndarray, index: int, init_steps: int = 100) -> None:
        references = np.asarray(references, dtype=np.float64)
        if references.ndim != 2 or len(references) < 2 or not 0 <= index < len(references):
            raise MorecError(f"Pareto MTL needs K >= 2 reference vectors and an index among "
                             f"them; got shape {references.shape}, index {index}")
        for row in references:
            _check_preference(row, positive=False)
        unit = references / np.linalg.norm(references, axis=1, keepdims=True)
        self.constraints = np.delete(unit, index, axis=0) - unit[index]  # (K-1, n)
        self.init_steps = init_steps
        self.steps = 0
        self.feasible = False

    def weights(self, losses: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        losses = np.asarray(losses, dtype=np.float64)
        gram = _gram(gram, losses)
        n = len(losses)
        violated = self.constraints[self.constraints @ (losses / np.linalg.norm(losses)) > 0]
        self.steps += 1
        if not self.feasible and self.steps <= self.init_steps and len(violated):
            directions = violated
        else:
            self.feasible = True
            directions = np.concatenate([np.eye(n), violated])
        # The directions' gradients are directions @ ∇L: their Gram is D G Dᵀ.
        alpha = directions.T @ min_norm(directions @ gram @ directions.T)
        total = np.abs(alpha).sum()
        return alpha * (n / total) if total > 0 else alpha

    def state_dict(self) -> dict[str, object]:
        return {"steps": self.steps, "feasible": self.feasible}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.steps, self.feasible = int(state["steps"]), bool(state["feasible"])


class EPO:
    """Exact Pareto optimal search: descends while driving ``r ⊙ L`` to uniform.

    With ``C = G`` and the non-uniformity ``μ = KL(r⊙L / Σ r⊙L ‖ uniform)``: while
    ``μ > eps`` a *balance* LP picks α on the simplex maximising ``αᵀ C a`` (``a`` the
    adjustment towards uniform, ``a_i = r_i (log(n·l̂_i) − μ)``) without raising the
    objectives that are already worst; otherwise a *descent* LP maximises ``Σ C α``
    subject to ``C α >= 0`` (no objective rises, to first order). The weights are
    ``n · α`` (the authors' scale). Where an LP is infeasible or its solver fails, α is
    ``r / Σ r`` for that step (:attr:`fallbacks` counts them; the first is logged). The
    losses are taken as they are: where their scales differ, the objective with the
    largest ``r_i · L_i`` may be the only one a balance step descends, step after step.

    Args:
        preference: r, float (n,), entries > 0: the solution sought has
            ``r_i · L_i`` equal across objectives (a larger r_i, a smaller L_i).
        eps: the non-uniformity below which the step descends rather than balances.
    """

    needs_gradients = True

    def __init__(self, preference: np.ndarray, eps: float = 1e-4) -> None:
        try:
            from scipy.optimize import linprog
        except ImportError as error:
            raise MorecError("the EPO coordinator solves linear programs with SciPy: "
                             "pip install 'morec-rec[epo]'") from error
        self._linprog = linprog
        self.preference = _check_preference(preference, positive=True)
        self.eps = eps
        self.fallbacks = 0

    def weights(self, losses: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        losses = np.asarray(losses, dtype=np.float64)
        gram = _gram(gram, losses)
        if not (losses > 0).all():
            raise MorecError(f"EPO needs positive losses, got {losses.tolist()}")
        n, r = len(losses), self.preference
        rl = r * losses
        share = rl / rl.sum()
        mu = float(np.sum(share * np.log(share * n)))
        ca = gram @ (r * (np.log(share * n) - mu))
        if mu > self.eps:  # balance: the worst objective must not rise
            if (ca > 0).any():
                lower = np.where(ca > 0, -np.inf, ca)
                lower[rl == rl.max()] = 0.0
            else:
                lower = np.zeros(n)
            kept = np.isfinite(lower)
            alpha = self._solve(-ca, gram[kept], lower[kept])
        else:  # descent: no objective rises, and the balance does not worsen much
            floor = min(float(ca.max()), 0.0)
            alpha = self._solve(-gram.sum(axis=0), np.vstack([gram, ca]),
                                np.append(np.zeros(n), floor))
        if alpha is None:
            if not self.fallbacks:
                logger.warning("EPO: a linear program of this step has no solution; the "
                               "step weighs the preference r instead (EPO.fallbacks "
                               "counts such steps)")
            self.fallbacks += 1
            alpha = r.copy()
        return n * alpha

    def _solve(self, cost: np.ndarray, rows: np.ndarray, lower: np.ndarray
               ) -> np.ndarray | None:
        """``argmin cost·α`` over the simplex subject to ``rows @ α >= lower``; None if the
        LP has no solution or the solver fails."""
        n = len(cost)
        try:
            result = self._linprog(cost, A_ub=-rows, b_ub=-lower,
                                   A_eq=np.ones((1, n)), b_eq=[1.0], bounds=(0, None),
                                   method="highs")
        except ValueError:
            return None
        if result.status != 0 or not np.isfinite(result.x).all():
            return None
        alpha = np.clip(result.x, 0.0, None)  # HiGHS may return -1e-12
        return alpha / alpha.sum()


def build_rule(name: str, preference: np.ndarray) -> Rule:
    """The baseline rule ``name`` (one of :data:`BASELINES`) for the preference ``r`` over
    all objectives (entries >= 0; > 0 for ``pe-mtl`` and ``epo``).

    Pareto MTL's reference vectors live in loss space: the preference's own, ``1/r``
    (the losses EPO seeks, ``r_i L_i`` equal), and each objective's axis, so that the
    solution stays closer in angle to the preferred losses than to any one objective
    alone.
    """
    try:
        match name:
            case "static":
                return Static(preference)
            case "mgda":
                return MGDA()
            case "pe-mtl":
                r = _check_preference(preference, positive=True)
                return ParetoMTL(np.vstack([1 / r, np.eye(len(r))]), index=0)
            case "epo":
                return EPO(preference)
    except MorecError as error:
        raise MorecError(f"coordinator {name}: {error}") from None
    raise MorecError(f"unknown baseline coordinator {name!r}; known: {', '.join(BASELINES)}")


def _gram(gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
    if gram is None:
        raise MorecError("this coordinator needs the objectives' gradients (their Gram matrix)")
    gram = np.asarray(gram, dtype=np.float64)
    n = len(losses)
    if gram.shape != (n, n) or not np.isfinite(gram).all():
        raise MorecError(f"Gram matrix of shape {gram.shape} (finite: "
                         f"{bool(np.isfinite(gram).all())}), expected finite ({n}, {n})")
    return gram
