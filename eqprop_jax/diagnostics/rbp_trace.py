"""EP's second phase against recurrent backprop, step by step (Scellier & Bengio 2019)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, PyTree

from ..equilibrium import AbstractSolver
from ..estimators.phases import batched_step, energy_grads, phase_solver, trajectory
from ..models.base import AbstractEnergyModel
from .alignment import Alignment, per_step_alignment, per_step_summary
from .gdu import check_trace, free_state, state_step_size


class RBPTrace(eqx.Module):
    r"""EP's temporal derivatives beside the Almeida–Pineda iterates (leading axis k = 0..K−1).

    - `ep_state[k]` = −(s^β_{k+1} − s^β_k)/(εβ), the scaled rate of change of the
      nudged state (per example);
    - `rbp_state[k]` = δ_k = (Jᵀ)^k ∂L/∂s, the k-th Almeida–Pineda increment at the free
      equilibrium (J = ∂step/∂s), whose partial sums u_{k+1} = Σ_{j≤k} δ_j are the AP
      adjoint iterates u ← Jᵀu + ∂L/∂s from u = 0;
    - `ep_param[k]` = [∂F/∂θ(s^β_{k+1}, β) − ∂F/∂θ(s^0, 0)]/β, EP's running estimate;
    - `rbp_param[k]` = ∂L/∂θ|direct + Σ_{j≤k} (∂step/∂θ)ᵀ δ_j, the running RBP gradient
      after k + 1 AP iterations (→ dL/dθ as k → ∞).

    Both pairs agree as β → 0 when J is symmetric (gradient dynamics); the gap is O(β).
    """

    ep_state: PyTree
    rbp_state: PyTree
    ep_param: PyTree
    rbp_param: PyTree
    beta: float

    @property
    def steps(self) -> int:
        return jax.tree_util.tree_leaves(self.ep_state)[0].shape[0]

    def state_alignment(self) -> list[Alignment]:
        return per_step_alignment(self.ep_state, self.rbp_state)

    def param_alignment(self) -> list[Alignment]:
        return per_step_alignment(self.ep_param, self.rbp_param)

    def max_rel_error(self) -> tuple[float, float]:
        """The largest relative error over k for (states, parameters): O(β)."""
        return (
            max(a.rel_error for a in self.state_alignment()),
            max(a.rel_error for a in self.param_alignment()),
        )

    def summary(self) -> dict[str, np.ndarray]:
        return per_step_summary(self.state_alignment(), self.param_alignment())


@eqx.filter_jit
def _trace(model, x, y, beta, free_solver, nudged_steps: int, eps: float):
    s_star, beta = free_state(model, x, y, beta, free_solver)
    zero = jnp.zeros((), beta.dtype)
    n = x.shape[0]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tmap = jax.tree_util.tree_map
    prev, nxt = trajectory(model, x, y, s_star, beta, nudged_steps)
    ep_state = tmap(lambda a, b: -(b - a) / (beta * eps), prev, nxt)
    f0 = energy_grads(params, static, s_star, x, y, zero)
    ep_param = jax.vmap(
        lambda s: tmap(lambda a, c: (a - c) / beta, energy_grads(params, static, s, x, y, beta), f0)
    )(nxt)

    # Almeida–Pineda at the free equilibrium: δ_{k+1} = Jᵀ δ_k, δ_0 = ∂L/∂s.
    def total_loss(p, s):
        return jnp.sum(jax.vmap(eqx.combine(p, static).loss)(s, y))

    direct, delta0 = jax.grad(total_loss, argnums=(0, 1))(params, s_star)
    _, vjp = jax.vjp(
        lambda p, s: batched_step(eqx.combine(p, static), s, x, y, zero), params, s_star
    )

    def ap_body(carry, _):
        delta, theta = carry
        g_p, g_s = vjp(delta)
        theta = tmap(lambda a, g: a + g / n, theta, g_p)
        return (g_s, theta), (delta, theta)

    theta0 = tmap(lambda a: a / n, direct)
    _, (rbp_state, rbp_param) = lax.scan(ap_body, (delta0, theta0), length=nudged_steps)
    return ep_state, rbp_state, ep_param, rbp_param


def rbp_equivalence_trace(
    model: AbstractEnergyModel,
    x: Array,
    y: Array,
    beta: float,
    free_steps: int,
    nudged_steps: int,
    *,
    free_solver: AbstractSolver | None = None,
    step_size: float | None = None,
) -> RBPTrace:
    r"""(1/β)·ds^β/dt in EP's second phase beside the Almeida–Pineda iterates.

    Scellier & Bengio 2019 (Theorem 1): for gradient dynamics ds/dt = −∂F/∂s, started
    at the free equilibrium s^0, as β → 0

        −(1/β) ds^β_t/dt → S̄_t   and   (1/β)[∂F/∂θ(s^β_t) − ∂F/∂θ(s^0)] → Θ̄_t,

    where S̄_t, Θ̄_t are recurrent backprop's adjoint and running gradient at the same
    time t. In discrete time with step s ← s − ε∂F/∂s (dt = ε), S̄_k is the k-th
    Almeida–Pineda increment (Jᵀ)^k ∂L/∂s and Θ̄ the running gradient (see
    [`RBPTrace`][]). It is a limit, not a finite-β identity: the gap is O(β) (O(β²)
    for the symmetric difference of ±β). For prototypical maps s ← σ(∂Φ/∂s) J is not
    symmetric and the match is only approximate.

    Args: as [`eqprop_jax.diagnostics.gdu_trace`][]; `step_size` is ε (read from the
    model by default, 1 for prototypical models).
    """
    check_trace("rbp_equivalence_trace", model, x, y, beta, free_steps, nudged_steps)
    eps = state_step_size(model) if step_size is None else float(step_size)
    free_solver = phase_solver(free_solver, free_steps)
    out = _trace(model, x, y, jnp.asarray(float(beta)), free_solver, nudged_steps, eps)
    return RBPTrace(*out, beta=float(beta))


__all__ = ["RBPTrace", "rbp_equivalence_trace"]
