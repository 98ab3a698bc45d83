"""A deep equilibrium layer that drops into any equinox model."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._solution import Solution
from ..adjoints import AbstractAdjoint, Implicit
from ..fixed_point import fixed_point
from ..solvers.base import AbstractSolver
from ..solvers.picard import Picard


class DEQ(eqx.Module):
    r"""Deep equilibrium layer: z* = f_θ(z*, x) (Bai, Kolter & Koltun 2019).

    `cell(z, x) -> z` is any callable (usually an `eqx.Module` holding θ). The layer
    returns z*, differentiated with respect to θ and x by `adjoint` (implicit
    differentiation by default), so memory does not grow with the solver's steps.

    Args:
        cell: the map f_θ.
        state_shape: shape of z; the solve starts from zeros of x's dtype.
        z_init: alternatively, a function `x -> z0` giving the starting state.
        solver, adjoint: see [`eqprop_jax.fixed_point`][].
    """

    cell: Callable[[PyTree, Array], PyTree]
    state_shape: tuple[int, ...] | None = eqx.field(static=True, default=None)
    z_init: Callable | None = None
    solver: AbstractSolver = Picard()
    adjoint: AbstractAdjoint = Implicit()

    def __check_init__(self):
        if self.state_shape is None and self.z_init is None:
            raise ValueError("DEQ: give `state_shape` or `z_init` to fix the state's shape.")

    def solve(self, x: Array) -> Solution:
        """The full [`eqprop_jax.Solution`][] (value, result, stats) for input `x`."""
        if self.z_init is not None:
            z0 = self.z_init(x)
        else:
            z0 = jnp.zeros(self.state_shape, jnp.result_type(x))
        return fixed_point(
            lambda z, x: self.cell(z, x), z0, x, solver=self.solver, adjoint=self.adjoint
        )

    def __call__(self, x: Array, *, key: jax.Array | None = None) -> PyTree:
        return self.solve(x).value
