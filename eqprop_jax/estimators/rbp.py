"""Recurrent backprop: the gradient of L(s*) through the fixed point, by an adjoint solve."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..equilibrium import AbstractAdjoint, AbstractSolver, Implicit, Picard
from .base import Estimator
from .checks import check_batch
from .phases import nan_if_nonfinite, phase_aux


class RecurrentBackprop(Estimator):
    r"""dL(s*)/dθ = ∂L/∂s* (I − J)⁻¹ ∂f/∂θ at the free equilibrium s* = f(s*), f = `step`.

    The free state comes from [`eqprop_jax.fixed_point`][] with `solver`; `adjoint`
    decides how the linear system is solved: [`eqprop_jax.Implicit`][] (Krylov, the
    exact implicit gradient), [`eqprop_jax.AlmeidaPineda`][] (the recurrent backprop
    iteration of Almeida 1987 / Pineda 1987), [`eqprop_jax.Neumann`][] or
    [`eqprop_jax.Unrolled`][]. This is the quantity EP estimates as β → 0 (Scellier &
    Bengio 2019).

    `aux`: "state" (s*, batched), "predictions", "stats" and "result" of the solve
    (see [`eqprop_jax.estimators.Estimator`][]).
    """

    adjoint: AbstractAdjoint = Implicit()
    solver: AbstractSolver = Picard(max_steps=1000)

    def __check_init__(self):
        if not isinstance(self.adjoint, AbstractAdjoint):
            raise TypeError(
                f"RecurrentBackprop: `adjoint` must be an eqprop_jax adjoint, got "
                f"{type(self.adjoint).__name__}."
            )
        if not isinstance(self.solver, AbstractSolver):
            raise TypeError(
                f"RecurrentBackprop: `solver` must be an eqprop_jax solver, got "
                f"{type(self.solver).__name__}."
            )

    def __call__(
        self, model, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        y = check_batch("RecurrentBackprop", model, x, y)

        def run(m, xi, yi):
            sol = m.relax(xi, yi, 0.0, solver=self.solver, adjoint=self.adjoint)
            return m.loss(sol.value, yi), sol

        def batch_loss(m):
            losses, sol = jax.vmap(run, in_axes=(None, 0, 0))(m, x, y)
            return jnp.mean(losses), sol

        (loss, sol), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(model)
        aux = {
            "state": sol.value,
            "predictions": jax.vmap(model.predict)(sol.value),
            **phase_aux(sol),
        }
        loss, grads = nan_if_nonfinite(loss, grads, aux)
        return loss, grads, aux
