"""Equilibrium Propagation on a resistive network with the local conductance rule."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..equilibrium.solvers.picard import Picard
from ..models.resistive import ResistiveNetwork, local_ep_gradient
from ._batch import check_batch, free_phase_summary, nan_if_nonfinite, stack_phases
from ._validate import check_beta, check_steps, checked_beta
from .base import Estimator

_NUDGES = {"positive": (0.0, 1.0), "negative": (-1.0, 0.0), "centered": (-1.0, 1.0)}


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
        if self.variant not in _NUDGES:
            raise ValueError(
                f"ResistiveEP: `variant` must be one of {tuple(_NUDGES)}, got {self.variant!r}."
            )
        check_beta("ResistiveEP", self.beta, positive=True)
        check_steps("ResistiveEP", free_steps=self.free_steps, nudged_steps=self.nudged_steps)

    def __call__(
        self, model: ResistiveNetwork, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        if not isinstance(model, ResistiveNetwork):
            raise TypeError(f"ResistiveEP: needs a ResistiveNetwork, got {type(model).__name__}.")
        y = check_batch("ResistiveEP", model, x, y)
        lo, hi = _NUDGES[self.variant]
        if isinstance(self.beta, jax.core.Tracer):
            dtype = model.init_state(x[0])[0].dtype
            beta = checked_beta("ResistiveEP", self.beta, positive=True)
            b1, b2 = (jnp.asarray(c * beta, dtype) for c in (lo, hi))
        else:
            # A concrete β lets `relax` skip the convexity check of a positive nudge.
            b1, b2 = (c * float(self.beta) for c in (lo, hi))
        params = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
        if lo < 0 and not any(isinstance(a, jax.core.Tracer) for a in (b1, *params)):
            # Refuse a non-convex −β phase before any solve runs (`relax` checks again,
            # and under `jit` it is the only check).
            model.check_nudge(x, b1)
        free_solver = Picard(tol=0.0, max_steps=self.free_steps)
        nudged_solver = Picard(tol=0.0, max_steps=self.nudged_steps)

        def per_example(xi, yi):
            free = model.relax(xi, yi, 0.0, solver=free_solver)
            s0 = jax.lax.stop_gradient(free.value)
            phases = {
                c: model.relax(xi, yi, b, s0, solver=nudged_solver)
                for c, b in ((lo, b1), (hi, b2))
                if c != 0.0
            }
            s1, s2 = (phases[c].value if c in phases else s0 for c in (lo, hi))
            nudged = stack_phases(*phases.values())
            return free, nudged, local_ep_gradient(model, xi, s1, s2, b1, b2)

        free, nudged, grads = jax.vmap(per_example)(x, y)
        grads = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
        loss, aux = free_phase_summary(model, free, y, nudged)
        loss, grads = nan_if_nonfinite(loss, grads, aux)
        return loss, grads, aux
