"""Step-by-step EP = BPTT: the GDU property of Ernoult et al. 2019."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PyTree

from ..equilibrium import AbstractSolver
from ..estimators.checks import check_batch, check_beta, check_steps
from ..estimators.phases import batched_step, energy_grads, phase_solver, relax_free, trajectory
from ..models.base import AbstractEnergyModel
from .alignment import Alignment, per_step_alignment, per_step_summary


def state_step_size(model: AbstractEnergyModel) -> float:
    """ε with which `model.step` is s ← ∂Φ'/∂s for Φ' = ½‖s‖² − εF: the model's
    `flow_step_size` for gradient-flow dynamics, 1 for discrete-time maps
    s ← σ(∂Φ/∂s) and other steps (`flow_step_size` None)."""
    eps = model.flow_step_size
    return 1.0 if eps is None else float(eps)


def free_state(model: AbstractEnergyModel, x: Array, y: Array, beta: Any, solver: AbstractSolver):
    """The batched free equilibrium s⁰ (held constant) and β in the state's dtype: the
    first phase of the step-by-step traces."""
    s0 = lax.stop_gradient(relax_free(model, x, y, solver).value)
    return s0, jnp.asarray(beta, jax.tree_util.tree_leaves(s0)[0].dtype)


def check_trace(who: str, model, x, y, beta, free_steps, nudged_steps) -> None:
    """The eager checks of a step-by-step trace: the batch, β and the step counts."""
    check_batch(who, model, x, y)
    check_beta(who, beta)
    check_steps(who, free_steps=free_steps, nudged_steps=nudged_steps)


class GDUTrace(eqx.Module):
    r"""EP's increments and BPTT's gradients, step by step (leading axis: t = 0..K−1).

    - `ep_state[t]` = ΔEP_s(β, t) = (s^β_{t+1} − s^β_t)/(εβ), shape (K, batch, ...);
    - `ep_param[t]` = ΔEP_θ(β, t) = −[∂E/∂θ(s^β_{t+1}) − ∂E/∂θ(s^β_t)]/β (batch mean);
    - `bptt_state[t]` = ∇_s(t) = ∂L/∂s_{T−t} (per example);
    - `bptt_param[t]` = ∇_θ(t) = ∂L/∂θ_{T−t}, the gradient through the weights used by
      the transition s_{T−t−1} → s_{T−t} (batch mean).

    The GDU theorem: ΔEP(β, t) → −∇(t) as β → 0. Summed over t, `ep_param` is −EP's
    estimate and `bptt_param` is truncated BPTT's gradient.
    """

    ep_state: PyTree
    ep_param: PyTree
    bptt_state: PyTree
    bptt_param: PyTree
    beta: float
    free_state: PyTree

    @property
    def steps(self) -> int:
        return jax.tree_util.tree_leaves(self.ep_state)[0].shape[0]

    def state_alignment(self) -> list[Alignment]:
        """Per step t: ΔEP_s(β, t) compared with −∇_s(t) (cosine, rel. error, sign, ...)."""
        neg = jax.tree_util.tree_map(jnp.negative, self.bptt_state)
        return per_step_alignment(self.ep_state, neg)

    def param_alignment(self) -> list[Alignment]:
        """Per step t: ΔEP_θ(β, t) compared with −∇_θ(t)."""
        neg = jax.tree_util.tree_map(jnp.negative, self.bptt_param)
        return per_step_alignment(self.ep_param, neg)

    def summary(self) -> dict[str, Any]:
        """Per-step relative errors and sign agreements as arrays of length K."""
        return per_step_summary(self.state_alignment(), self.param_alignment())


@eqx.filter_jit
def _trace(model, x, y, beta, free_solver, nudged_steps: int, eps: float):
    s_star, beta = free_state(model, x, y, beta, free_solver)
    zero = jnp.zeros((), beta.dtype)
    n = x.shape[0]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    prev, nxt = trajectory(model, x, y, s_star, beta, nudged_steps)
    ep_state = jax.tree_util.tree_map(lambda a, b: (b - a) / (beta * eps), prev, nxt)

    def d_energy(s):
        # ∂E/∂θ: F at β = 0.
        return energy_grads(params, static, s, x, y, zero)

    ep_param = jax.vmap(
        lambda a, b: jax.tree_util.tree_map(lambda u, v: -(v - u) / beta, d_energy(a), d_energy(b))
    )(prev, nxt)

    # BPTT through K steps from the converged state, with a separate weight offset per
    # step (δ_k) and a state offset at every time (e_k): ∂L/∂δ_k and ∂L/∂e_k are the
    # per-step gradients of the theorem.
    def unrolled(deltas, offsets):
        def body(s, inp):
            d, e = inp
            m = eqx.combine(jax.tree_util.tree_map(jnp.add, params, d), static)
            s = jax.tree_util.tree_map(jnp.add, s, e)
            return batched_step(m, s, x, y, zero), None

        head = jax.tree_util.tree_map(lambda e: e[:-1], offsets)
        s, _ = lax.scan(body, s_star, (deltas, head))
        s = jax.tree_util.tree_map(lambda a, e: a + e[-1], s, offsets)
        return jnp.sum(jax.vmap(model.loss)(s, y))

    deltas = jax.tree_util.tree_map(lambda p: jnp.zeros((nudged_steps, *p.shape), p.dtype), params)
    offsets = jax.tree_util.tree_map(
        lambda a: jnp.zeros((nudged_steps + 1, *a.shape), a.dtype), s_star
    )
    g_delta, g_off = jax.grad(unrolled, argnums=(0, 1))(deltas, offsets)
    bptt_state = jax.tree_util.tree_map(lambda g: g[1:][::-1], g_off)
    bptt_param = jax.tree_util.tree_map(lambda g: g[::-1] / n, g_delta)
    return ep_state, ep_param, bptt_state, bptt_param, s_star


def gdu_trace(
    model: AbstractEnergyModel,
    x: Array,
    y: Array,
    beta: float,
    free_steps: int,
    nudged_steps: int,
    *,
    free_solver: AbstractSolver | None = None,
    step_size: float | None = None,
) -> GDUTrace:
    r"""EP's neural and weight increments and BPTT's gradients, step by step.

    Ernoult et al. 2019, Theorem 1 (GDU): in the discrete-time setting
    s_{t+1} = ∂Φ/∂s(x, s_t, θ), with the first phase converged to s* (here: relaxed for
    `free_steps` steps), the second phase s^β_{t+1} = ∂(Φ − βL)/∂s satisfies, for every
    t < K = `nudged_steps`,

        (s^β_{t+1} − s^β_t)/β → −∂L/∂s_{T−t},
        (∂Φ/∂θ(s^β_{t+1}) − ∂Φ/∂θ(s^β_t))/β → −∂L/∂θ_{T−t}   (β → 0),

    the right sides being BPTT's gradients through the last K steps of the first phase.
    With E = −Φ the weight increment is −ΔE_θ/β. The theorem is exact when `step` is
    the gradient of a scalar: for gradient-flow models s ← s − ε∂F/∂s
    (Φ' = ½‖s‖² − εF) the state increments are divided by ε (`step_size`, read from
    the model's `flow_step_size` by default); for prototypical maps s ← σ(∂Φ/∂s) it holds with a
    linear σ and approximately otherwise.

    Args:
        model: an [`eqprop_jax.AbstractEnergyModel`][] (e.g. `HopfieldMLP`,
            `ConvHopfield`).
        x, y: a batch (leading axis).
        beta: the nudge; the comparison is an O(β) limit.
        free_steps: steps of the first phase (should converge).
        nudged_steps: K, the number of steps compared.
        free_solver: override `Picard(tol=0, max_steps=free_steps)`.
        step_size: ε above (default [`state_step_size`][]).

    Returns:
        A [`GDUTrace`][]; its `summary()` gives per-step errors and sign agreement.
    """
    check_trace("gdu_trace", model, x, y, beta, free_steps, nudged_steps)
    eps = state_step_size(model) if step_size is None else float(step_size)
    free_solver = phase_solver(free_solver, free_steps)
    out = _trace(model, x, y, jnp.asarray(float(beta)), free_solver, nudged_steps, eps)
    return GDUTrace(*out[:4], beta=float(beta), free_state=out[4])


__all__ = ["GDUTrace", "check_trace", "free_state", "gdu_trace", "state_step_size"]
