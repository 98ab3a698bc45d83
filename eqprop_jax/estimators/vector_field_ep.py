"""Vector-field EP: the EP learning rule for dynamics without an energy (Scellier et al. 2018)."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..equilibrium.solvers.base import AbstractSolver
from ..equilibrium.solvers.picard import Picard
from ._batch import check_batch, free_phase_summary, nan_if_nonfinite, stack_phases
from ._validate import check_beta, check_steps, checked_beta
from .base import Estimator


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

    The model must expose `vector_field(s, x) -> μ` (per example, a pytree like the
    state), e.g. [`eqprop_jax.models.VectorFieldMLP`][], besides the usual
    `init_state`, `relax`, `loss`, `predict`. ν is one vector-Jacobian product of μ at
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
        if self.variant not in ("positive", "centered"):
            raise ValueError(
                f"VectorFieldEP: `variant` must be 'positive' or 'centered', got {self.variant!r}."
            )
        check_beta("VectorFieldEP", self.beta)
        check_steps("VectorFieldEP", free_steps=self.free_steps, nudged_steps=self.nudged_steps)

    def __call__(
        self, model, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        y = check_batch("VectorFieldEP", model, x, y)
        if not callable(getattr(model, "vector_field", None)):
            raise TypeError(
                f"VectorFieldEP: the model ({type(model).__name__}) must define "
                "`vector_field(s, x)`; use EquilibriumProp for energy-based models."
            )
        free_solver = self.free_solver or Picard(tol=0.0, max_steps=self.free_steps)
        nudged_solver = self.nudged_solver or Picard(tol=0.0, max_steps=self.nudged_steps)
        beta = jnp.asarray(checked_beta("VectorFieldEP", self.beta))
        lo = -beta if self.variant == "centered" else None

        def phases(xi, yi):
            free = model.relax(xi, yi, 0.0, solver=free_solver)
            s0 = lax.stop_gradient(free.value)
            hi = model.relax(xi, yi, beta, s0, solver=nudged_solver)
            if lo is None:
                s_lo, width, run = s0, beta, (hi,)
            else:
                low = model.relax(xi, yi, lo, s0, solver=nudged_solver)
                s_lo, width, run = low.value, 2 * beta, (low, hi)
            ds = jax.tree_util.tree_map(lambda a, b: (a - b) / width, hi.value, s_lo)
            return free, lax.stop_gradient(ds), stack_phases(*run)

        free, ds, nudged = jax.vmap(phases)(x, y)
        s0 = lax.stop_gradient(free.value)

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

        grads = eqx.filter_grad(surrogate)(model)
        loss, aux = free_phase_summary(model, free, y, nudged)
        loss, grads = nan_if_nonfinite(loss, grads, aux)
        return loss, grads, aux


__all__ = ["VectorFieldEP"]
