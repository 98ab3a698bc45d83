"""Step-by-step EP = BPTT: the GDU property of Ernoult et al. 2019."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, PyTree

from ..equilibrium.solvers.base import AbstractSolver
from ..equilibrium.solvers.picard import Picard
from ..estimators._batch import check_batch
from .alignment import Alignment, gradient_alignment


def state_step_size(model) -> float:
    """ε with which `model.step` is s ← ∂Φ'/∂s for Φ' = ½‖s‖² − εF (gradient dynamics),
    1 for prototypical maps s ← σ(∂Φ/∂s), ConvHopfield included."""
    if getattr(model, "dynamics", "gradient") == "gradient":
        return float(getattr(model, "step_size", 1.0))
    return 1.0


def _stack_align(est: PyTree, ref: PyTree, n: int) -> list[Alignment]:
    def at(tree, t):
        return jax.tree_util.tree_map(lambda a: a[t], tree)

    return [gradient_alignment(at(est, t), at(ref, t)).overall for t in range(n)]


def per_step_summary(state: list[Alignment], param: list[Alignment]) -> dict[str, np.ndarray]:
    """Per-step relative errors and sign agreements of two alignment sequences."""
    return {
        "state_rel_error": np.array([a.rel_error for a in state]),
        "state_sign": np.array([a.sign_agreement for a in state]),
        "param_rel_error": np.array([a.rel_error for a in param]),
        "param_sign": np.array([a.sign_agreement for a in param]),
    }


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
        return _stack_align(self.ep_state, neg, self.steps)

    def param_alignment(self) -> list[Alignment]:
        """Per step t: ΔEP_θ(β, t) compared with −∇_θ(t)."""
        neg = jax.tree_util.tree_map(jnp.negative, self.bptt_param)
        return _stack_align(self.ep_param, neg, self.steps)

    def summary(self) -> dict[str, np.ndarray]:
        """Per-step relative errors and sign agreements as arrays of length K."""
        return per_step_summary(self.state_alignment(), self.param_alignment())


def free_equilibrium(model, x, y, beta, free_solver):
    """The batched free equilibrium s* (no gradient), β in the state's dtype, and that dtype.

    The first phase shared by the step-by-step traces.
    """
    free = jax.vmap(lambda xi, yi: model.relax(xi, yi, 0.0, solver=free_solver))(x, y)
    s_star = lax.stop_gradient(free.value)
    dtype = jax.tree_util.tree_leaves(s_star)[0].dtype
    return s_star, jnp.asarray(beta, dtype), dtype


@eqx.filter_jit
def _trace(model, x, y, beta, free_solver, nudged_steps: int, eps: float):
    s_star, beta, dtype = free_equilibrium(model, x, y, beta, free_solver)
    n = x.shape[0]
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def batch_step(m, s, b):
        return jax.vmap(lambda si, xi, yi: m.step(si, xi, yi, b))(s, x, y)

    def ep_body(s, _):
        s_new = batch_step(model, s, beta)
        return s_new, (s, s_new)

    _, (prev, nxt) = lax.scan(ep_body, s_star, length=nudged_steps)
    ep_state = jax.tree_util.tree_map(lambda a, b: (b - a) / (beta * eps), prev, nxt)

    def d_energy(s):
        def mean_e(p):
            m = eqx.combine(p, static)
            return jnp.mean(jax.vmap(m.energy)(s, x))

        return jax.grad(mean_e)(params)

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
            return batch_step(m, s, jnp.zeros((), dtype)), None

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
    model,
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
    the model by default); for prototypical maps s ← σ(∂Φ/∂s) it holds with a
    linear σ and approximately otherwise.

    Args:
        model: an energy model (e.g. `HopfieldMLP`, `ConvHopfield`).
        x, y: a batch (leading axis).
        beta: the nudge; the comparison is an O(β) limit.
        free_steps: steps of the first phase (should converge).
        nudged_steps: K, the number of steps compared.
        free_solver: override `Picard(tol=0, max_steps=free_steps)`.
        step_size: ε above (default [`state_step_size`][]).

    Returns:
        A [`GDUTrace`][]; its `summary()` gives per-step errors and sign agreement.
    """
    check_batch("gdu_trace", model, x, y)
    if float(beta) == 0.0:
        raise ValueError("gdu_trace: `beta` must be nonzero (the increments divide by β).")
    for name, v in (("free_steps", free_steps), ("nudged_steps", nudged_steps)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"gdu_trace: `{name}` must be a positive integer, got {v!r}.")
    eps = state_step_size(model) if step_size is None else float(step_size)
    free_solver = free_solver or Picard(tol=0.0, max_steps=free_steps)
    out = _trace(model, x, y, jnp.asarray(float(beta)), free_solver, nudged_steps, eps)
    return GDUTrace(*out[:4], beta=float(beta), free_state=out[4])


__all__ = ["GDUTrace", "gdu_trace", "state_step_size"]
