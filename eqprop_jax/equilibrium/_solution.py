"""What a solve returns: the state, a per-example status code and statistics."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

_EnumerationMeta = type(eqx.Enumeration)




class _Probe(eqx.Enumeration):
    item = ""


_EnumerationItem = type(_Probe.item)  # equinox does not export the item class


class _Code(_EnumerationItem):
    """An enumeration item that is also its integer code.

    `eqx.Enumeration` items compare only with items of their own enumeration. Here
    a solve's status is stored per example as an `int32` array (`Solution.result`),
    which estimators stack over phases and count, so an item also compares with such
    arrays and with Python ints, converts with `int(...)`, and enters `jnp` functions
    (`jnp.where(bad, Result.nonfinite, ...)`) as its code.
    """

    def __int__(self) -> int:
        return int(self._value)

    __index__ = __int__

    def __jax_array__(self) -> Array:
        return jnp.asarray(self._value)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self._value, dtype)

    def __eq__(self, other) -> Array:  # pyright: ignore[reportIncompatibleMethodOverride]
        if isinstance(other, _EnumerationItem):
            return super().__eq__(other)
        with jax.ensure_compile_time_eval():
            return jnp.asarray(self._value) == other

    def __ne__(self, other) -> Array:  # pyright: ignore[reportIncompatibleMethodOverride]
        if isinstance(other, _EnumerationItem):
            return super().__ne__(other)
        with jax.ensure_compile_time_eval():
            return jnp.asarray(self._value) != other

    def __hash__(self) -> int:
        return hash((self._enumeration, int(self._value)))


class _StatusMeta(_EnumerationMeta):
    """Makes the items integer codes (`_Code`) and adds lookups by code."""

    def __new__(mcs, cls_name, bases, namespace):
        cls = super().__new__(mcs, cls_name, bases, namespace)
        for name, item in cls._name_to_item.items():
            cls._name_to_item[name] = _Code(item._value, cls)
        return cls

    @property
    def names(cls) -> tuple[str, ...]:
        """The items' names, in code order."""
        return tuple(cls._name_to_item)

    def name(cls, code: ArrayLike) -> str | list:
        """The name of a code, or a (nested) list of names for an array of codes."""
        arr = np.asarray(code)
        if arr.ndim == 0:
            return cls.names[int(arr)]
        return [cls.name(c) for c in arr]

    def message(cls, code: ArrayLike) -> str | list:
        """The message of a code, or a (nested) list of messages for an array of codes."""
        arr = np.asarray(code)
        if arr.ndim == 0:
            return cls._index_to_message[int(arr)]
        return [cls.message(c) for c in arr]

    def item(cls, code: Int[ArrayLike, "..."]) -> Any:
        """The item whose code is `code` (an `int32` array, e.g. `Solution.result`), so
        that its message can be raised: `Result.item(sol.result).error_if(x, pred)`."""
        return _Code(jnp.asarray(code, jnp.int32), cls)


class Result(eqx.Enumeration, metaclass=_StatusMeta):
    """Status of a solve (an `eqx.Enumeration`, each item with its message).

    `Solution.result` holds the item's integer code as an `int32` array, one per
    example under `vmap`; the items compare with such arrays and with ints, so
    `sol.result == Result.converged`, `int(sol.result) == Result.converged` and
    `jnp.where(bad, Result.nonfinite, code)` all work. `Result.name(code)` and
    `Result.message(code)` look a code up; `Result.item(code).error_if(x, pred)`
    raises its message.

    - `converged` (0): the stopping criterion was met.
    - `max_steps` (1): the step budget ran out first.
    - `diverged` (2): the residual grew past `divergence` times its best value.
    - `nonfinite` (3): the state or the map's output held NaN or inf.
    """

    converged = "fixed_point: the stopping criterion was met"
    max_steps = "fixed_point: max_steps reached before convergence"
    diverged = "fixed_point: the iteration diverged"
    nonfinite = "fixed_point: a NaN or inf appeared in the state"


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
        result: the `int32` code of a [`eqprop_jax.Result`][] item.
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
