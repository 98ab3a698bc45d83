"""Vector-field EP: the EP learning rule for dynamics without an energy (Scellier et al. 2018)."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..equilibrium import AbstractSolver
from ..models.base import AbstractVectorFieldModel
from .base import Estimator
from .checks import check_batch, check_beta, check_steps, check_variant, checked_beta
from .phases import TWO_POINT, finish, nudge_points, phase_solver, relax_nudges, state_dtype

_VARIANTS = ("positive", "centered")


class VectorFieldEP(Estimator):
    r"""The EP-style update of Scellier, Goyal, Binas, Mesnard & Bengio 2018.

    For dynamics ds/dt = μ(θ, x, s) − β ∂C/∂s (forward and feedback weights free to
    differ), the free phase gives s^0 (μ = 0) and the nudged phase s^β. The update is

        ν = (∂μ/∂θ(s^0))ᵀ (s^{β2} − s^{β1}) / (β2 − β1)  →  (∂μ/∂θ)ᵀ (∂μ/∂s)⁻¹ ∂C/∂s,

    while the true gradient is dL/dθ = −(∂μ/∂θ)ᵀ (∂μ/∂s)⁻ᵀ ∂C/∂s. So −ν = dL/dθ
    exactly (as β → 0) iff the Jacobian ∂μ/∂s is symmetric, i.e. when the feedback
    weights are the transposed forward ones; then it equals EP's estimate. As the
    feedback tilts away, the angle between −ν and dL/dθ grows. `grads` is −ν (the
    sign of `jax.grad`, for a descent step).

    The model must be an [`eqprop_jax.AbstractVectorFieldModel`][] (it defines
    `vector_field(s, x) -> μ`, per example, a pytree like the state), e.g.
    [`eqprop_jax.models.VectorFieldMLP`][]. ν is one vector-Jacobian product of μ at
    s^0, so θ here is whatever μ depends on.

    Args:
        beta: the nudge (real, finite, nonzero).
        variant: "positive" (0, β) or "centered" (−β, β): bias O(β) or O(β²).
        free_steps, nudged_steps: steps of each phase (fixed, as in the papers).
        free_solver, nudged_solver: override the default `Picard(tol=0, max_steps=...)`.

    `aux`: "state" (s^0, batched), "predictions", "stats" and "result" of the free
    phase, "nudged_result" and "nudged_stats" (shape (batch, P), the phases at
    (β) for "positive" and (−β, β) for "centered"); see
    [`eqprop_jax.estimators.Estimator`][].
    """

    beta: float = 0.1
    variant: Literal["positive", "centered"] = eqx.field(static=True, default="positive")
    free_steps: int = eqx.field(static=True, default=100)
    nudged_steps: int = eqx.field(static=True, default=50)
    free_solver: AbstractSolver | None = None
    nudged_solver: AbstractSolver | None = None

    def __check_init__(self):
        check_variant("VectorFieldEP", self.variant, _VARIANTS)
        check_beta("VectorFieldEP", self.beta)
        check_steps("VectorFieldEP", free_steps=self.free_steps, nudged_steps=self.nudged_steps)

    def __call__(
        self,
        model: AbstractVectorFieldModel,
        x: Array,
        y: Array,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Array, PyTree, dict]:
        if not isinstance(model, AbstractVectorFieldModel):
            raise TypeError(
                f"VectorFieldEP: the model ({type(model).__name__}) must be an "
                "AbstractVectorFieldModel, which defines `vector_field(s, x)`; use "
                "EquilibriumProp for energy-based models."
            )
        y = check_batch("VectorFieldEP", model, x, y)
        beta = jnp.asarray(checked_beta("VectorFieldEP", self.beta))
        nudges = nudge_points(beta, self.variant).astype(state_dtype(model, x))
        phases = relax_nudges(
            model,
            x,
            y,
            nudges,
            phase_solver(self.free_solver, self.free_steps),
            phase_solver(self.nudged_solver, self.nudged_steps),
        )
        lo, hi = TWO_POINT[self.variant]
        states = nudges.states(phases)
        ds = jax.tree_util.tree_map(lambda s: (s[:, 1] - s[:, 0]) / ((hi - lo) * beta), states)
        ds = lax.stop_gradient(ds)
        s0 = lax.stop_gradient(phases.free.value)

        def surrogate(m):
            # ⟨Δs/β, μ(θ, s^0)⟩: its θ-gradient is ν.
            def per_example(si, xi, dsi):
                mu = m.vector_field(si, xi)
                return sum(
                    jnp.sum(a * b)
                    for a, b in zip(
                        jax.tree_util.tree_leaves(dsi), jax.tree_util.tree_leaves(mu), strict=True
                    )
                )

            return -jnp.mean(jax.vmap(per_example)(s0, x, ds))

        return finish(model, phases, y, eqx.filter_grad(surrogate)(model))


__all__ = ["VectorFieldEP"]
