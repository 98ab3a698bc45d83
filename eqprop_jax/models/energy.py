"""The energy-model interface shared by every EP-trainable model."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from ..equilibrium._solution import Solution
from ..equilibrium.adjoints import AbstractAdjoint
from ..equilibrium.fixed_point import fixed_point
from ..equilibrium.solvers.base import AbstractSolver
from ..equilibrium.solvers.picard import Picard

State = PyTree[Array]


class EnergyModel(eqx.Module):
    r"""A model whose state s settles at a minimum (or fixed point) of F = E + βC.

    All methods act on **one example** (no batch axis); estimators and training
    `jax.vmap` over the batch. The state `s` is a pytree (usually a tuple of layer
    arrays). `β` may be complex (holomorphic EP): implementations must not cast it
    to real.

    - `energy(s, x)`: E(s, x; θ). For the discrete-time "prototypical" models of
      Ernoult et al. 2019 it is E = -Φ, so that EP's formula is the same for all.
    - `cost(s, y)`: C(s, y; θ), the nudging cost (it may hold parameters, e.g. a
      cross-entropy readout outside the dynamics, Laborieux et al. 2021).
    - `step(s, x, y, beta)`: one relaxation update towards argmin_s E + βC (a
      gradient-flow step, s <- σ(-∂F/∂s), a block coordinate sweep, ...). Its fixed
      point is the equilibrium s^β.
    - `loss(s, y)`: the objective L whose gradient the estimators estimate
      (default: `cost`).
    - `total_energy(s, x, y, beta)`: F = E + βC; EP's estimate is
      ĝ = [∂F/∂θ(s^{β2}, β2) - ∂F/∂θ(s^{β1}, β1)] / (β2 - β1), which also covers
      parameters that only appear in C.
    """

    @abc.abstractmethod
    def init_state(self, x: Array) -> State:
        """The starting state for input `x` (usually zeros)."""

    @abc.abstractmethod
    def energy(self, s: State, x: Array) -> Scalar:
        """E(s, x; θ)."""

    @abc.abstractmethod
    def cost(self, s: State, y: Array) -> Scalar:
        """C(s, y; θ)."""

    @abc.abstractmethod
    def step(self, s: State, x: Array, y: Array, beta: Any) -> State:
        """One relaxation update of the state towards argmin E + βC."""

    @abc.abstractmethod
    def predict(self, s: State) -> Array:
        """Class scores (logits or output activities) read from an equilibrium state."""

    def loss(self, s: State, y: Array) -> Scalar:
        return self.cost(s, y)

    def total_energy(self, s: State, x: Array, y: Array, beta: Any) -> Scalar:
        return self.energy(s, x) + beta * self.cost(s, y)

    def relax(
        self,
        x: Array,
        y: Array,
        beta: Any = 0.0,
        s0: State | None = None,
        *,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
    ) -> Solution:
        """The equilibrium s^β from `s0` (default `init_state(x)`) by iterating `step`.

        `solver` defaults to `Picard(tol=0, max_steps=50)` (fixed number of steps);
        a complex `beta` makes the state complex.
        """
        s0 = self.init_state(x) if s0 is None else s0
        if jnp.iscomplexobj(jnp.asarray(beta)):
            s0 = to_complex(s0)
        solver = Picard(tol=0.0, max_steps=50) if solver is None else solver
        return fixed_point(
            lambda s, args: self.step(s, args[0], args[1], args[2]),
            s0,
            (x, y, beta),
            solver=solver,
            adjoint=adjoint,
        )


def to_complex(tree: PyTree) -> PyTree:
    """Cast every floating leaf of `tree` to the matching complex dtype."""

    def cast(a):
        a = jnp.asarray(a)
        if jnp.iscomplexobj(a):
            return a
        return a.astype(jnp.result_type(a.dtype, jnp.complex64))

    return jax.tree_util.tree_map(cast, tree)
