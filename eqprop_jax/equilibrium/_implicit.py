r"""The implicit function theorem as a `custom_jvp` around a fixed-point solve.

At z* = f(z*, θ), dz*/dθ = (I - J)⁻¹ ∂f/∂θ θ̇ with J = ∂f/∂z at z*. The tangent rule
below builds that linear system and hands it to `lax.custom_linear_solve`, whose
transpose rule gives reverse mode the adjoint system (I - Jᵀ) u = g; both are solved
by the adjoint's `linear_solve`. (optimistix's `implicit_jvp` in `_ad.py` does the
same with a lineax operator.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, PyTree

from ._solution import Result

# linear_solve(matvec, b) -> (x, statistics (steps, residual, failed))
LinearSolve = Callable[[Callable[[Array], Array], Array], tuple[Array, Array]]


def implicit_jvp(
    primal: Callable[[PyTree, Array], tuple[Array, Array, Array, Array]],
    fn: Callable[[PyTree, Array], Array],
    dyn: PyTree,
    z0: Array,
    probe: Array | None,
    linear_solve: LinearSolve,
    best_so_far: bool,
) -> tuple[Array, Array, Array, Array]:
    """`primal(dyn, z0)`, whose first output z is a fixed point of `fn(dyn, ·)`,
    differentiated in `dyn` by the implicit function theorem.

    z0 receives no derivative (the solution does not depend on it). With a `probe`
    (a 3-vector), its tangent/cotangent carries the linear solves' statistics.
    """

    def linear(matvec, rhs):
        # With a probe the system is augmented with a 3-vector slot, (A x, s) = (b, p),
        # whose "solution" is the solve's statistics: they become the probe's
        # cotangent under `jax.grad` (and its tangent's image under `jax.jvp`).
        if probe is None:
            return linear_solve(matvec, rhs)[0]
        b, slot = rhs
        x, stats = linear_solve(lambda v: matvec((v, jnp.zeros_like(slot)))[0], b)
        return x, stats.astype(slot.dtype)

    @jax.custom_jvp
    def solve(dyn, z0, probe):
        return primal(dyn, lax.stop_gradient(z0))

    @solve.defjvp
    def solve_jvp(primals, tangents):
        dyn, z0, probe_ = primals
        t_dyn, _, t_probe = tangents
        out = solve(dyn, z0, probe_)
        z = out[0]
        _, b = jax.jvp(lambda d: fn(d, z), (dyn,), (t_dyn,))
        _, jac_z = jax.linearize(lambda zz: fn(dyn, zz), z)
        if probe is None:
            matvec = lambda v: v - jac_z(v)
            rhs = b
        else:
            matvec = lambda v: (v[0] - jac_z(v[0]), v[1])
            # custom_linear_solve transposes only when every part of its right-hand
            # side is linear in the differentiated inputs: a never-taken `select`
            # couples each part to the other (for when only the probe, or only θ, is
            # differentiated). Unlike 0 * x, it transposes to an exact zero even when
            # the other part's cotangent is NaN.
            never = jnp.zeros((), bool)
            zero_b = jnp.zeros((), b.dtype)
            zero_p = jnp.zeros((), t_probe.dtype)
            rhs = (
                b + lax.select(never, jnp.sum(t_probe).astype(b.dtype), zero_b),
                t_probe + lax.select(never, jnp.sum(jnp.real(b)).astype(zero_p.dtype), zero_p),
            )
        dz = lax.custom_linear_solve(matvec, rhs, solve=linear, transpose_solve=linear)
        if probe is not None:
            dz = dz[0]
        # A non-finite solve has a NaN derivative too, in forward and reverse mode alike
        # (a product with NaN transposes to NaN; a `where` would transpose to zero).
        # A best-so-far iterate is finite: it is differentiated like any other.
        if not best_so_far:
            dz = dz * jnp.where(out[1] == Result.nonfinite, jnp.nan, 1).astype(dz.dtype)
        t_int = np.zeros(out[1].shape, jax.dtypes.float0)
        return out, (dz, t_int, np.zeros(out[2].shape, jax.dtypes.float0), jnp.zeros_like(out[3]))

    return solve(dyn, z0, probe)

