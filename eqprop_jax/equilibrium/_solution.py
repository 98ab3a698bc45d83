"""What a solve returns: the state, a per-example status code and statistics."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree


class Result:
    """Status codes of a solve, stored as `int32` arrays (one per example under `vmap`).

    - `converged` (0): the stopping criterion was met.
    - `max_steps` (1): the step budget ran out first.
    - `diverged` (2): the residual grew past `divergence` times its best value.
    - `nonfinite` (3): the state or the map's output held NaN or inf.
    """

    converged = 0
    max_steps = 1
    diverged = 2
    nonfinite = 3
    names = ("converged", "max_steps", "diverged", "nonfinite")

    @classmethod
    def name(cls, code) -> str | list:
        """The name of a code, or a (nested) list of names for an array of codes."""
        arr = jnp.asarray(code)
        if arr.ndim == 0:
            return cls.names[int(arr)]
        return [cls.name(c) for c in arr]


class Stats(eqx.Module):
    """Per-solve statistics: `steps` taken and the final scaled residual.

    `residual` is max_i |f(z)_i - z_i| / (atol + rtol |z_i|): the solve converged
    when it is at most 1.
    """

    steps: Int[Array, "..."]
    residual: Float[Array, "..."]


class Solution(eqx.Module):
    """The output of [`eqprop_jax.fixed_point`][].

    Attributes:
        value: the equilibrium z* (same pytree structure as `z0`).
        result: an `int32` [`eqprop_jax.Result`][] code.
        stats: [`eqprop_jax.Stats`][] (steps and residual).
        aux: with `has_aux=True`, the auxiliary output of f evaluated at the
            returned `value` (differentiable like `value`); otherwise None.
    """

    value: PyTree[Array]
    result: Int[Array, "..."]
    stats: Stats
    aux: PyTree = None

    @property
    def converged(self) -> Array:
        return self.result == Result.converged
