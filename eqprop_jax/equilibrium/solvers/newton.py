"""Newton's method on the fixed-point residual g(z) = z - f(z)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PyTree

from ... import _checks
from ..linear_solvers import AbstractLinearSolver
from .base import AbstractSolver, FlatFn


def dense_system(lin: Callable[[Array], Array], z: Array) -> Array:
    """I - J as a dense matrix, J v = `lin(v)` (d Jacobian-vector products)."""
    eye = jnp.eye(z.size, dtype=z.dtype)
    # Row j of vmap(lin)(eye) is J e_j, the j-th column of J.
    return eye - jax.vmap(lin)(eye).T


class AbstractNewtonSolver(AbstractSolver):
    """Shared settings of [`eqprop_jax.Newton`][] and [`eqprop_jax.Chord`][]: how the
    linear system (I - J) δ = f(z) - z of each step is solved.

    - `linear_solver=None` (default): I - J is formed from d Jacobian-vector
      products and solved by LU, as optimistix's default linear solver does for a
      square Jacobian. Exact; O(d) JVPs and O(d³) work per factorisation, so for
      states up to a few thousand.
    - a linear solver object ([`eqprop_jax.GMRES`][], [`eqprop_jax.BiCGStab`][], ...,
      e.g. `Newton(linear_solver=GMRES(max_steps=50))`): matrix-free, to relative
      tolerance `linear_tol` (None: the dtype's [`eqprop_jax.default_tol`][]) within
      the object's step budget: inexact Newton (Dembo, Eisenstat & Steihaug, SIAM J.
      Numer. Anal. 1982). The solve runs in lockstep (one bucket: it sits inside the
      solver's own compacted loop) and is wrapped in `jax.lax.custom_linear_solve`,
      so [`eqprop_jax.Unrolled`][] differentiates it by its own implicit rule
      instead of through its loop.

    A step whose solve gives NaN/inf (a singular I - J) falls back to plain
    iteration, z_{k+1} = f(z_k).
    """

    linear_solver: AbstractLinearSolver | None = None
    linear_tol: float | None = None

    def __check_init__(self):
        super().__check_init__()
        who = type(self).__name__
        if self.linear_solver is not None and not isinstance(
            self.linear_solver, AbstractLinearSolver
        ):
            raise TypeError(
                f"{who}: `linear_solver` must be None (dense LU) or an eqprop_jax linear "
                f"solver (GMRES(), BiCGStab(), ...), got {self.linear_solver!r}."
            )
        _checks.tolerance(who, "linear_tol", self.linear_tol)

    def _krylov(self, op: Callable[[Array], Array], r: Array) -> Array:
        tol = _checks.default_tol(r.dtype) if self.linear_tol is None else self.linear_tol
        linear_solver = self.linear_solver

        def solve(op, b):
            # One bucket: the solve runs inside the solver's own (compacted) loop.
            return linear_solver.solve(op, b, tol, 1)[0]

        return lax.custom_linear_solve(op, r, solve=solve, transpose_solve=solve)

    @staticmethod
    def _step(z, fz, delta):
        z_new = z + delta
        return jnp.where(jnp.all(jnp.isfinite(z_new)), z_new, fz)


class Newton(AbstractNewtonSolver):
    r"""Newton's method for z = f(z), i.e. for the root of g(z) = z - f(z):

        z_{k+1} = z_k + (I - J_k)⁻¹ (f(z_k) - z_k),    J_k = ∂f/∂z at z_k.

    Converges quadratically near a solution where I - J is invertible, and in one
    step when f is affine, whatever its spectral radius: unlike
    [`eqprop_jax.Picard`][] it does not need f to be a contraction. There is no line
    search (nor in optimistix's `Newton`): far from a solution the iteration may
    wander, and the `divergence` test stops it. [`eqprop_jax.root_find`][] uses it by
    default.

    Args:
        linear_solver, linear_tol: the linear solve of each step (see
            [`eqprop_jax.AbstractNewtonSolver`][]).
        tol, rtol, max_steps, divergence: see [`eqprop_jax.AbstractSolver`][].
    """

    def init(self, z: Array, fz: Array) -> PyTree:
        return None

    def update(self, fn: FlatFn, z: Array, fz: Array, state: PyTree) -> tuple[Array, PyTree]:
        _, lin = jax.linearize(fn, z)
        r = fz - z
        if self.linear_solver is None:
            delta = jnp.linalg.solve(dense_system(lin, z), r)
        else:
            delta = self._krylov(lambda v: v - lin(v), r)
        return self._step(z, fz, delta), state
