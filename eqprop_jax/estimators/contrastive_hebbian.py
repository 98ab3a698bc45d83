r"""Contrastive Hebbian learning: a free phase and a phase with the outputs clamped."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..equilibrium import AbstractSolver, Solution, fixed_point
from ..models.base import AbstractEnergyModel, State
from .base import Estimator
from .checks import check_batch, check_steps
from .phases import finish, phase_solver, relax_phases


class Clamp(eqx.Module):
    """Which state components are outputs (`mask`, a pytree of bools like the state)
    and their targets (`target`, like the state; used where `mask` is set)."""

    mask: PyTree[Array]
    target: PyTree[Array]

    def __call__(self, s: State) -> State:
        """`s` with its outputs set to their targets."""
        return jax.tree_util.tree_map(jnp.where, self.mask, self.target, s)


def output_clamp(model: AbstractEnergyModel, s: State, y: Array) -> Clamp:
    r"""The outputs of the state `s` and their targets, read from the cost.

    For a cost C = ½‖P s − t‖², P selecting the outputs (any layout: a last layer, the
    tail of one vector), ∂C/∂s at s = 0 is −Pᵀt and the Hessian times a vector of ones
    is Pᵀ1: one forward-over-reverse product gives both, exactly in floating point.
    A cost of another form (e.g. a cross-entropy readout outside the dynamics) has no
    outputs to clamp: then that product is not 0/1, or C is not 0 at the clamped state,
    and the clamp comes back wrapped in a run-time error (`eqx.error_if`) saying so.
    """
    zeros = jax.tree_util.tree_map(jnp.zeros_like, s)
    ones = jax.tree_util.tree_map(jnp.ones_like, s)
    grad, curvature = jax.jvp(jax.grad(lambda u: model.cost(u, y)), (zeros,), (ones,))
    leaves = jax.tree_util.tree_leaves(curvature)
    clamp = Clamp(
        jax.tree_util.tree_map(lambda h: h == 1, curvature),
        jax.tree_util.tree_map(jnp.negative, grad),
    )
    unit = jnp.all(jnp.stack([jnp.all((h == 0) | (h == 1)) for h in leaves]))
    some = jnp.any(jnp.stack([jnp.any(h == 1) for h in leaves]))
    ok = unit & some & (model.cost(clamp(s), y) == 0)
    return eqx.error_if(
        clamp,
        ~ok,
        "ContrastiveHebbian: the outputs cannot be clamped: the model's cost is not "
        "C = ½‖s_out − t‖² over some of the state's components (e.g. a cross-entropy "
        "readout outside the dynamics). Use a model with an MSE cost on its outputs.",
    )


class ContrastiveHebbian(Estimator):
    r"""Contrastive Hebbian learning (CHL; Movellan 1991), on any energy model whose
    cost ties some state components, the outputs, to the target: C = ½‖s_out − t‖²
    (see [`output_clamp`][]).

    The free phase relaxes `free_steps` steps from `init_state` to s⁻ = argmin_s E(s, x).
    The clamped phase starts at s⁻ with the outputs set to t and relaxes
    `clamped_steps` steps of the free dynamics (β = 0), the outputs put back to t
    after every step, to s⁺ = argmin E(s, x) over the states with s_out = t. Then

        ĝ = ∂E/∂θ(s⁺) − ∂E/∂θ(s⁻),

    averaged over the batch: Hebbian in the clamped phase, anti-Hebbian in the free one
    (for E = −Σ ρ(s_{l+1})ᵀ W_l ρ(s_l) + ..., ΔW_l = −η ĝ = η [ρ(s⁺_{l+1})ρ(s⁺_l)ᵀ −
    ρ(s⁻_{l+1})ρ(s⁻_l)ᵀ]). Both states minimise E over their sets, so ĝ is the exact
    gradient of the contrastive loss J(θ) = E(s⁺) − E(s⁻) ≥ 0, not of the model's
    loss L. It is EP's β → ∞ limit (Scellier & Bengio 2017 relate the two): with C
    independent of θ, β·ĝ_EP(β) = ∂E/∂θ(s^β) − ∂E/∂θ(s⁰) → ĝ as s^β → s⁺.

    The clamp is applied after each `step`, so s⁺ is the clamped equilibrium when a
    step updates every layer from the state it is given, or the outputs after the
    layers next to them (synchronous updates; layer sweeps that end with the
    outputs). A block sweep that updates the outputs first shows the layers after
    them the unclamped outputs.

    Args:
        free_steps, clamped_steps: steps of the two phases (fixed).
        free_solver, clamped_solver: override the default `Picard(tol=0, max_steps=...)`
            for each phase (e.g. a tolerance-based stopping rule).

    `aux`: "state" (s⁻, batched), "predictions", "stats" and "result" of the free
    phase, "nudged_result" and "nudged_stats" of the clamped phase (shape (batch, 1)),
    "clamped_state" (s⁺) and "contrastive_loss" (the batch mean of J); see
    [`eqprop_jax.estimators.Estimator`][].
    """

    free_steps: int = eqx.field(static=True, default=40)
    clamped_steps: int = eqx.field(static=True, default=15)
    free_solver: AbstractSolver | None = None
    clamped_solver: AbstractSolver | None = None

    def __check_init__(self):
        check_steps(
            "ContrastiveHebbian", free_steps=self.free_steps, clamped_steps=self.clamped_steps
        )

    def __call__(
        self, model: AbstractEnergyModel, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        y = check_batch("ContrastiveHebbian", model, x, y)
        solver = phase_solver(self.clamped_solver, self.clamped_steps)

        def clamped_phase(xi, yi, s0) -> Solution:
            clamp = output_clamp(model, s0, yi)

            def f(s, args):
                return clamp(model.step(s, xi, yi, 0.0))

            sol = fixed_point(f, clamp(s0), solver=solver)
            return jax.tree_util.tree_map(lambda a: a[None], sol)

        phases = relax_phases(
            model, x, y, clamped_phase, phase_solver(self.free_solver, self.free_steps)
        )
        free = lax.stop_gradient(phases.free.value)
        clamped = jax.tree_util.tree_map(lambda a: lax.stop_gradient(a[:, 0]), phases.nudged.value)

        def contrastive(m):
            # J = E(s⁺) − E(s⁻) at fixed states: its θ-gradient is ĝ.
            return jnp.mean(jax.vmap(m.energy)(clamped, x) - jax.vmap(m.energy)(free, x))

        j, grads = eqx.filter_value_and_grad(contrastive)(model)
        return finish(model, phases, y, grads, clamped_state=clamped, contrastive_loss=j)


__all__ = ["Clamp", "ContrastiveHebbian", "output_clamp"]
