"""Limited-memory ("good") Broyden on the residual g(z) = f(z) - z."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ... import _checks
from .base import AbstractSolver, FlatFn


class _BroydenState(eqx.Module):
    us: Array  # (history, d)
    vs: Array  # (history, d); inverse Jacobian B = -I + Σ_i u_i v_iᵀ
    count: Int[Array, ""]
    z_prev: Array
    g_prev: Array
    started: Array


def _apply(us, vs, x):
    return -x + us.T @ (vs @ x)


def _apply_t(us, vs, x):
    return -x + vs.T @ (us @ x)


class Broyden(AbstractSolver):
    r"""Limited-memory Broyden's method for g(z) = f(z) - z = 0.

    Keeps an approximation B ≈ (∂g/∂z)⁻¹ = (J - I)⁻¹ as B = -I + Σ_i u_i v_iᵀ over
    the last `history` rank-one updates, steps z_{k+1} = z_k - B g(z_k), and
    applies the "good" Broyden inverse update

        B <- B + (Δz - B Δg) Δzᵀ B / (Δzᵀ B Δg)

    (Broyden 1965; the limited-memory form used for DEQs by Bai et al. 2019).
    With no history the step is plain iteration z + g(z) = f(z). Updates with a
    vanishing or non-finite denominator are skipped, and a non-finite step falls
    back to plain iteration.

    With `tol = rtol = 0` (a fixed-step solve, see [`eqprop_jax.AbstractSolver`][])
    Broyden often stops before `max_steps`, with status `converged`: it solves a
    small or nearly linear problem to the last bit (e.g. in 5 steps in float32),
    and once f(z) = z holds exactly no further step could change z.

    There is no line search and no step size (jaxopt's `Broyden` has both, with
    B₀ = γ I): starting from B₀ = -I makes the first step, and every step right
    after a memory restart, a plain fixed-point step, which already decreases the
    residual of a contraction, and quasi-Newton directions for a nonsymmetric
    Jacobian are not descent directions of ‖g‖² in general, so a backtracking
    search on it can fail where the full step converges. For a map that is not a
    contraction use [`eqprop_jax.Newton`][] or [`eqprop_jax.root_find`][]; for
    differentiating the iterations, [`eqprop_jax.Unrolled`][] differentiates this
    solver directly (jaxopt needs a fixed step size there, as it cannot
    differentiate through its line search).

    Args:
        history: rank-one updates kept (>= 1); when full, the memory restarts from
            B = -I.
        tol, rtol, max_steps, divergence: see [`eqprop_jax.AbstractSolver`][].
    """

    history: int = 10

    def __check_init__(self):
        super().__check_init__()
        _checks.positive_int("Broyden", "history", self.history)

    def init(self, z: Float[Array, " d"], fz: Float[Array, " d"]) -> _BroydenState:
        hist = jnp.zeros((self.history,) + z.shape, z.dtype)
        return _BroydenState(hist, hist, jnp.array(0, jnp.int32), z, fz - z, jnp.array(False))

    def update(self, fn: FlatFn, z, fz, state: _BroydenState):
        g = fz - z
        us, vs, count = state.us, state.vs, state.count
        dz = z - state.z_prev
        dg = g - state.g_prev
        b_dg = _apply(us, vs, dg)
        v_new = _apply_t(us, vs, dz)
        den = v_new @ dg
        scale = jnp.linalg.norm(dz) * jnp.linalg.norm(b_dg)
        ok = (
            state.started
            & jnp.isfinite(den)
            & (jnp.abs(den) > 1e3 * jnp.finfo(jnp.real(den).dtype).eps * scale)
            & jnp.all(jnp.isfinite(v_new))
        )
        # A full memory restarts from B = -I (before this update): overwriting the
        # oldest pair instead leaves an inconsistent B that can stall the iteration.
        full = ok & (count >= self.history)
        us = jnp.where(full, 0, us)
        vs = jnp.where(full, 0, vs)
        count = jnp.where(full, 0, count)
        b_dg = jnp.where(full, -dg, b_dg)
        v_new = jnp.where(full, -dz, v_new)
        den = jnp.where(full, -(dz @ dg), den)
        u_new = (dz - b_dg) / jnp.where(ok, den, 1)
        us = jnp.where(ok, us.at[count].set(u_new), us)
        vs = jnp.where(ok, vs.at[count].set(v_new), vs)
        count = count + ok.astype(count.dtype)
        z_new = z - _apply(us, vs, g)
        z_new = jnp.where(jnp.all(jnp.isfinite(z_new)), z_new, fz)
        return z_new, _BroydenState(us, vs, count, z, g, jnp.array(True))
