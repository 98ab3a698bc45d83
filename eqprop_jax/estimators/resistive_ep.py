"""Equilibrium Propagation on a resistive network with the local conductance rule."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..models.resistive import ResistiveNetwork, batch_local_ep_gradient
from .base import Estimator
from .checks import check_batch, check_beta, check_steps, check_variant, checked_beta
from .phases import TWO_POINT, finish, nudge_points, phase_solver, relax_nudges, state_dtype


class ResistiveEP(Estimator):
    r"""EP on a [`eqprop_jax.models.ResistiveNetwork`][], each conductance seeing its own drop.

    Free phase: `free_steps` exact coordinate-descent sweeps from the input's initial
    state to V^0. Nudged phases: `nudged_steps` sweeps from V^0 with the outputs tied
    to their targets by conductance β_p. Then, per conductance g_ij (Kendall et al.
    2020; Scellier 2024),

        ĝ_ij = [(ΔV_ij^{β2})² − (ΔV_ij^{β1})²] / (2 (β2 − β1)),

    averaged over the batch; positive (0, β), negative (−β, 0), centered (−β, β)
    (Scellier 2024 trains DRNs with centered EP, β = 1). This equals the generic
    [`eqprop_jax.estimators.EquilibriumProp`][] estimate for the same phases (∂P/∂g =
    ½ ΔV²) but needs no autodiff of the energy. The SGD step is Δg = −η ĝ, followed
    by `model.project()` to keep g ≥ 0.

    The −β phase of the centered and negative variants is a negative conductance at
    each output; past the network's convexity bound
    ([`eqprop_jax.models.ResistiveNetwork.max_negative_nudge`][]) the nudged power has
    no minimum and `relax` refuses the nudge with an error naming the output node and
    the bound (use a smaller β or the positive variant).

    `aux`: "state" (free equilibrium, batched), "predictions", "stats" and "result"
    of the free phase; "nudged_stats" and "nudged_result" of the phases that were
    relaxed (axes: batch, then phase: (−β, β) centered, the one nudge otherwise); see
    [`eqprop_jax.estimators.Estimator`][].
    """

    beta: float = 1.0
    variant: Literal["positive", "negative", "centered"] = eqx.field(
        static=True, default="centered"
    )
    free_steps: int = eqx.field(static=True, default=4)
    nudged_steps: int = eqx.field(static=True, default=4)

    def __check_init__(self):
        check_variant("ResistiveEP", self.variant, tuple(TWO_POINT))
        check_beta("ResistiveEP", self.beta, positive=True)
        check_steps("ResistiveEP", free_steps=self.free_steps, nudged_steps=self.nudged_steps)

    def __call__(
        self, model: ResistiveNetwork, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        if not isinstance(model, ResistiveNetwork):
            raise TypeError(f"ResistiveEP: needs a ResistiveNetwork, got {type(model).__name__}.")
        y = check_batch("ResistiveEP", model, x, y)
        lo, hi = TWO_POINT[self.variant]
        dtype = state_dtype(model, x)
        beta = checked_beta("ResistiveEP", self.beta, positive=True)
        if isinstance(beta, jax.core.Tracer):
            b1, b2 = (jnp.asarray(c * beta, dtype) for c in (lo, hi))
        else:
            # A concrete β keeps the local rule's 1/(2(β2 − β1)) in Python precision.
            b1, b2 = (c * float(beta) for c in (lo, hi))
        params = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
        if lo < 0 and not any(isinstance(a, jax.core.Tracer) for a in (b1, *params)):
            # Refuse a non-convex −β phase before any solve runs (`relax` checks again,
            # and under `jit` it is the only check).
            model.check_nudge(x, b1)
        nudges = nudge_points(beta, self.variant).astype(dtype)
        free_solver = phase_solver(None, self.free_steps)
        phases = relax_nudges(
            model, x, y, nudges, free_solver, phase_solver(None, self.nudged_steps)
        )
        s1, s2 = (
            jax.tree_util.tree_map(lambda a, p=p: a[:, p], nudges.states(phases)) for p in (0, 1)
        )
        grads = batch_local_ep_gradient(model, x, s1, s2, b1, b2)
        return finish(model, phases, y, grads)
