r"""Krylov solvers of A x = b written as per-example ragged loops.

Both are [`eqprop_jax.ragged_while_loop`][]s over one example's state, so under
`vmap` an example whose solve has converged stops costing matvecs, and each
example reports its own iteration count. They return (x, iterations); the
caller ([`eqprop_jax.Implicit`][]) checks the residual.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from ._ragged import ragged_while_loop

Linear = Callable[[Array], Array]


def _dot(a, b):
    return jnp.sum(jnp.conj(a) * b)


def norm(x):
    return jnp.sqrt(jnp.sum(jnp.abs(x) ** 2))


def _standard_promotion(solver):
    """Run a Krylov solver under standard dtype promotion: its real scalars (norms,
    Givens cosines) scale complex vectors, which `jax_numpy_dtype_promotion="strict"`
    (optimistix's test setting) refuses. `op` is already linearised, so the user's
    own code is not traced under the changed setting."""

    @functools.wraps(solver)
    def wrapped(*args, **kwargs):
        with jax.numpy_dtype_promotion("standard"):
            return solver(*args, **kwargs)

    return wrapped


@_standard_promotion
def bicgstab(op: Linear, b: Array, tol: float, max_steps: int, buckets: int = 4):
    """BiCGStab (van der Vorst 1992) from x0 = 0, stopping at ‖b - A x‖₂ <= tol ‖b‖₂.

    The shadow residual is r̂ = b + ‖b‖ u/‖u‖ with u a fixed pseudo-random vector,
    not the textbook r̂ = b: on layered (bipartite) networks, where g lives on the
    output units only, r̂ = b gives ⟨r̂, r₁⟩ = 0 exactly after one step (an exact
    breakdown). Written as a per-example [`eqprop_jax.ragged_while_loop`][] so that,
    under `vmap`, examples whose adjoint has converged stop costing matvecs. A
    breakdown (ρ = 0 or ω = 0) stops the iteration; the caller's residual check
    reports it.
    """
    bnorm = norm(b)
    stop = tol * bnorm
    one = jnp.ones((), b.dtype)
    zero = jnp.zeros_like(b)
    u = jax.random.normal(jax.random.key(0), b.shape, jnp.real(b).dtype)
    shadow = b + (bnorm / jnp.maximum(norm(u), 1)) * u.astype(b.dtype)

    def cond(c):
        _, r, _, _, rho, _, omega, k = c
        ok = (rho != 0) & (omega != 0) & jnp.all(jnp.isfinite(r))
        return (k < max_steps) & (norm(r) > stop) & ok

    def body(c):
        x, r, p, v, rho, alpha, omega, k = c
        rho_new = _dot(shadow, r)
        beta = (rho_new / rho) * (alpha / omega)
        p = r + beta * (p - omega * v)
        v = op(p)
        alpha = rho_new / _dot(shadow, v)
        s = r - alpha * v
        t = op(s)
        omega = _dot(t, s) / _dot(t, t)
        done = norm(s) <= stop  # converged at the half step: skip the ω update
        x = x + alpha * p + jnp.where(done, 0, omega) * s
        r = jnp.where(done, s, s - omega * t)
        omega = jnp.where(done, one, omega)
        return x, r, p, v, rho_new, alpha, omega, k + 1

    init = (zero, b, zero, zero, one, one, one, jnp.array(0, jnp.int32))
    out = ragged_while_loop(cond, body, init, max_buckets=buckets)
    return out[0], out[-1]


def _givens(a, b):
    """c, s with [[c, s], [-s̄, c]] (a, b) = (r, 0); c real (complex-safe)."""
    abs_a, abs_b = jnp.abs(a), jnp.abs(b)
    denom = jnp.sqrt(abs_a**2 + abs_b**2)
    safe = jnp.where(denom > 0, denom, 1)
    phase = jnp.where(abs_a > 0, a / jnp.where(abs_a > 0, abs_a, 1), 1)
    c = jnp.where(denom > 0, abs_a / safe, 1)
    s = jnp.where(denom > 0, phase * jnp.conj(b) / safe, 0)
    return c.astype(jnp.real(a).dtype), s.astype(a.dtype), (phase * denom).astype(a.dtype)


@_standard_promotion
def gmres(op: Linear, b: Array, tol: float, max_restarts: int, restart: int, buckets: int = 4):
    """Restarted GMRES(m) (Saad & Schultz 1986) from x0 = 0, stopping at
    ‖b - A x‖₂ <= tol ‖b‖₂ or after `max_restarts` cycles of m = `restart` steps.

    One loop iteration is one cycle: the true residual r = b - A x, then up to m
    Arnoldi steps (classical Gram-Schmidt, applied twice) with Givens rotations
    tracking the residual norm, stopping early inside the cycle once the estimate
    meets the tolerance, then x += V y. Under `vmap` the cycles are ragged: an
    example whose solve has converged does no more cycles.
    """
    n = b.shape[0]
    m = min(restart, n)
    dtype = b.dtype
    stop = tol * norm(b)

    def cycle(x, r):
        beta = norm(r)
        basis = jnp.zeros((m + 1, n), dtype).at[0].set(r / jnp.where(beta > 0, beta, 1))
        g = jnp.zeros(m + 1, dtype).at[0].set(beta)
        R = jnp.zeros((m, m), dtype)
        cs = jnp.zeros(m, jnp.real(b).dtype)
        sn = jnp.zeros(m, dtype)

        def arnoldi_cond(c):
            j, _, g, *_ = c
            return (j < m) & (jnp.abs(g[j]) > stop)

        def arnoldi_body(c):
            j, basis, g, R, cs, sn = c
            w = op(basis[j])
            h = jnp.conj(basis) @ w  # rows beyond j are zero
            w = w - basis.T @ h
            h2 = jnp.conj(basis) @ w
            w = w - basis.T @ h2
            h = h + h2
            hn = norm(w)
            basis = basis.at[j + 1].set(w / jnp.where(hn > 0, hn, 1))

            def rotate(i, h):
                hi, hi1 = h[i], h[i + 1]
                new_i = cs[i] * hi + sn[i] * hi1
                new_i1 = -jnp.conj(sn[i]) * hi + cs[i] * hi1
                keep = i < j
                h = h.at[i].set(jnp.where(keep, new_i, hi))
                return h.at[i + 1].set(jnp.where(keep, new_i1, hi1))

            h = jnp.concatenate([h[:m], jnp.zeros(1, dtype)]).at[j + 1].set(hn.astype(dtype))
            h = lax.fori_loop(0, m - 1, rotate, h)
            c, s, rr = _givens(h[j], h[j + 1])
            R = R.at[:, j].set(jnp.where(jnp.arange(m) < j, h[:m], 0).at[j].set(rr))
            g = g.at[j + 1].set(-jnp.conj(s) * g[j]).at[j].set(c * g[j])
            return j + 1, basis, g, R, cs.at[j].set(c), sn.at[j].set(s)

        init = (jnp.array(0, jnp.int32), basis, g, R, cs, sn)
        j, basis, g, R, _, _ = lax.while_loop(arnoldi_cond, arnoldi_body, init)
        # Solve the leading j x j triangle; unused rows become the identity.
        used = jnp.arange(m) < j
        R = jnp.where(used[:, None] & used[None, :], R, jnp.eye(m, dtype=dtype))
        y = jax.scipy.linalg.solve_triangular(R, jnp.where(used, g[:m], 0), lower=False)
        x = x + basis[:m].T @ y
        return x, b - op(x), j

    def cond(c):
        _, r, cycles, _ = c
        return (cycles < max_restarts) & (norm(r) > stop) & jnp.all(jnp.isfinite(r))

    def body(c):
        x, r, cycles, steps = c
        x, r, j = cycle(x, r)
        return x, r, cycles + 1, steps + j

    zero = jnp.array(0, jnp.int32)
    x, _, _, steps = ragged_while_loop(
        cond, body, (jnp.zeros_like(b), b, zero, zero), max_buckets=buckets
    )
    return x, steps
