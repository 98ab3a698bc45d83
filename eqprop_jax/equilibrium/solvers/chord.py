"""The chord method: Newton's method with the Jacobian frozen at the start."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.scipy.linalg as jsl
from jaxtyping import Array

from .base import FlatFn
from .newton import AbstractNewtonSolver, dense_system


class _ChordState(eqx.Module):
    lu: Array | None  # dense: LU factors of I - J(z0)
    pivots: Array | None
    z0: Array | None  # Krylov: where J is taken


class Chord(AbstractNewtonSolver):
    r"""The chord method for z = f(z): Newton's step with J taken once, at z0,

        z_{k+1} = z_k + (I - J_0)⁻¹ (f(z_k) - z_k),    J_0 = ∂f/∂z at z0.

    Converges linearly, at the rate ρ((I - J_0)⁻¹ (J_k - J_0)) near the solution,
    and exactly in one step when f is affine (Kelley, "Iterative methods for
    linear and nonlinear equations", SIAM 1995, §5.4). With
    `linear_solver=None` (dense) I - J_0 is factored once (LU) and each step costs
    one evaluation of f and two triangular solves; with a linear solver object
    (`Chord(linear_solver=GMRES())`) each step re-solves with J_0 matrix-free.

    Args:
        linear_solver, linear_tol: the linear solves (see
            [`eqprop_jax.AbstractNewtonSolver`][]).
        tol, rtol, max_steps, divergence: see [`eqprop_jax.AbstractSolver`][].
    """

    def init(self, z: Array, fz: Array) -> _ChordState:
        raise TypeError("Chord needs f to build its Jacobian at z0: call `start(fn, z, fz)`.")

    def start(self, fn: FlatFn, z: Array, fz: Array) -> _ChordState:
        if self.linear_solver is None:
            _, lin = jax.linearize(fn, z)
            lu, pivots = jsl.lu_factor(dense_system(lin, z))
            return _ChordState(lu, pivots, None)
        return _ChordState(None, None, z)

    def update(self, fn: FlatFn, z: Array, fz: Array, state: _ChordState):
        r = fz - z
        if self.linear_solver is None:
            delta = jsl.lu_solve((state.lu, state.pivots), r)
        else:
            _, lin = jax.linearize(fn, state.z0)
            delta = self._krylov(lambda v: v - lin(v), r)
        return self._step(z, fz, delta), state
