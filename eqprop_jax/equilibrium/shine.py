r"""SHINE: the backward pass reuses the forward Broyden solver's inverse estimate.

Ramzi, Mannel, Bai, Starck, Ciuciu & Moreau 2022, "SHINE: SHaring the INverse
Estimate from the forward pass for bi-level optimization and implicit models",
ICLR.
"""

# No `from __future__ import annotations`: equinox reads `eqx.AbstractVar` only from
# evaluated annotations.
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _checks
from ._implicit import zero_tangent
from ._krylov import norm
from ._solution import Result
from .adjoints import AbstractLinearAdjoint, AdjointStats, OnFailure, _ragged_loop
from .linear_solvers import AbstractLinearSolver, BiCGStab
from .solvers.broyden import Broyden, _apply, _apply_t


class SHINE(AbstractLinearAdjoint):
    r"""SHINE (Ramzi et al. 2022, ICLR): the adjoint system solved with the inverse
    Jacobian estimate that the forward [`eqprop_jax.Broyden`][] solve built.

    Broyden keeps B ≈ (∂g/∂z)⁻¹ = (J - I)⁻¹ for g(z) = f(z) - z, as
    B = -I + Σ_i u_i v_iᵀ over its last rank-one updates. SHINE uses -B for
    (I - J)⁻¹ in the implicit function theorem:

        u = -Bᵀ g = g - Σ_i v_i (u_iᵀ g)      (reverse mode; forward: x = -B b),

    which costs 2 · history dot products and no product with J. The estimate is
    exact when Broyden's secant pairs have captured J (e.g. a linear f whose
    updates span the space) and approximate otherwise; Ramzi et al. bound the
    error of the resulting hypergradient under Broyden's convergence assumptions.

    **Fallback.** The estimate is *poor* when the relative residual of the linear
    system it solves, ρ = ‖(I - Jᵀ) u - g‖₂ / ‖g‖₂, exceeds `threshold` (one product
    with Jᵀ measures it). For those examples the solve continues with
    `linear_solver` (a Krylov solve, [`eqprop_jax.BiCGStab`][] by default, as in
    [`eqprop_jax.Implicit`][]), on the correction (I - Jᵀ) δ = g - (I - Jᵀ) u, i.e.
    warm-started from u, and checked like [`eqprop_jax.Implicit`][]'s solve (`tol`,
    `on_failure`, `callback`). Under `vmap` the examples whose estimate is good pass
    a zero right-hand side, which stops at iteration 0 and costs nothing once the
    batch is compacted. `fallback=False` returns -Bᵀ g unchecked, as the paper's
    plain SHINE does (its code offers a fallback to Jacobian-free backprop on a
    norm test instead; a residual test is used here because it is the quantity the
    implicit gradient's accuracy depends on).

    Needs `solver=`[`eqprop_jax.Broyden`][]`(...)` in the forward solve (its final
    state reaches this adjoint through [`eqprop_jax.fixed_point`][]). A memory
    restart (more than `history` updates) discards the estimate, so choose
    `history` >= the forward steps when possible. Both `jax.jvp` and `jax.grad`
    work. A `probe` is not supported (use `callback` for the fallback's statistics).
    """

    linear_solver: AbstractLinearSolver = BiCGStab()
    threshold: float = 0.1
    fallback: bool = True
    tol: float | None = eqx.field(default=None, kw_only=True)
    on_failure: OnFailure = eqx.field(default="nan", kw_only=True)
    callback: Callable[[AdjointStats], None] | None = eqx.field(default=None, kw_only=True)

    # fixed_point hands the forward solver's final state to adjoints that ask for it.
    needs_solver_state: ClassVar[bool] = True

    def __check_init__(self):
        _checks.tolerance("SHINE", "threshold", self.threshold, allow_none=False)
        if not isinstance(self.fallback, bool):
            raise TypeError(f"SHINE: `fallback` must be a bool, got {self.fallback!r}.")
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                f"SHINE: `linear_solver` must be an eqprop_jax linear solver, got "
                f"{self.linear_solver!r}."
            )

    def _solve(self, op, rhs, inverse, tol, buckets):
        """inverse(rhs), and where its relative residual exceeds `threshold`, the
        checked Krylov correction."""
        x = inverse(rhs)
        if not self.fallback:
            return x
        r = rhs - op(x)
        real = jnp.real(rhs).dtype
        rel = norm(r) / jnp.maximum(norm(rhs), jnp.finfo(real).tiny)
        poor = ~(rel <= self.threshold)  # a NaN estimate is poor too
        delta, _ = self.checked_solve(op, jnp.where(poor, r, 0).astype(r.dtype), tol, buckets)
        return jnp.where(poor, x + delta, x)

    def apply(self, primal, fn, inputs, solver, *, probe=None, best_so_far=False):
        if not isinstance(solver, Broyden):
            raise TypeError(
                "SHINE reuses the inverse Jacobian estimate of the forward Broyden solve: "
                f"use solver=eqprop_jax.Broyden(...), got {type(solver).__name__}."
            )
        if probe is not None:
            raise ValueError("SHINE: `probe` is not supported; use `callback=`.")
        dyn, z0 = inputs
        tol = self.tolerance(solver, z0.dtype)
        buckets = solver.batch_buckets

        @jax.custom_jvp
        def solve(dyn, z0):
            return primal((dyn, lax.stop_gradient(z0)), _ragged_loop, 0)

        @solve.defjvp
        def solve_jvp(primals, tangents):
            dyn, z0 = primals
            t_dyn, _ = tangents
            out = solve(dyn, z0)
            z, state = out[0], out[4].solver_state
            us, vs = state.us, state.vs
            _, b = jax.jvp(lambda d: fn(d, z), (dyn,), (t_dyn,))
            _, jac_z = jax.linearize(lambda zz: fn(dyn, zz), z)

            def matvec(v):
                return v - jac_z(v)

            def forward(op, rhs):  # (I - J) x = b with (I - J)⁻¹ ≈ -B
                return self._solve(op, rhs, lambda x: -_apply(us, vs, x), tol, buckets)

            def backward(op, rhs):  # (I - Jᵀ) u = g with (I - Jᵀ)⁻¹ ≈ -Bᵀ
                return self._solve(op, rhs, lambda x: -_apply_t(us, vs, x), tol, buckets)

            dz = lax.custom_linear_solve(matvec, b, solve=forward, transpose_solve=backward)
            if not best_so_far:
                dz = dz * jnp.where(out[1] == Result.nonfinite, jnp.nan, 1).astype(dz.dtype)
            t_out = (
                dz,
                np.zeros(out[1].shape, jax.dtypes.float0),
                np.zeros(out[2].shape, jax.dtypes.float0),
                jnp.zeros_like(out[3]),
            )
            return out, t_out + jax.tree_util.tree_map(zero_tangent, tuple(out[4:]))

        return solve(dyn, z0)

