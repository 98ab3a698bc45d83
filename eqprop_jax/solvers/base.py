"""The solver interface: one update rule z_k -> z_{k+1} on a flat vector."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree

FlatFn = Callable[[Array], Array]


def _check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, int | float) and not value >= 0:
        raise ValueError(f"`{name}` must be non-negative, got {value}.")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a Python int, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be at least 1, got {value}.")


class AbstractSolver(eqx.Module):
    """A fixed-point solver for z = f(z) on a flat vector z.

    Stopping rule (all solvers): with r = f(z) - z, stop when

        max_i |r_i| / (atol + rtol * |z_i|) <= 1,

    i.e. the infinity norm of the residual scaled elementwise, the rule of
    optimistix. `tol` is the absolute tolerance `atol`; `rtol` defaults to `tol`.
    The solve also stops when `max_steps` updates have been taken, when the
    residual exceeds `divergence` times the smallest residual seen so far, or when
    a NaN/inf appears.

    Under `jax.vmap` the iteration is a [`eqprop_jax.ragged_while_loop`][]: every
    so often the examples still running are gathered into a smaller batch, so
    finished examples cost nothing. `batch_buckets` caps the number of batch sizes
    used (each compiles one copy of f and the update); 1 steps the whole batch in
    lockstep until the slowest example stops, as `lax.while_loop` does. With
    `tol = rtol = 0` (a fixed number of steps, as EP's phases use) no example stops
    early, and the loop is not compacted.

    Concrete solvers implement `init` (their state from z0 and f(z0)) and `update`
    (the next iterate from z, f(z) and the state).
    """

    tol: float = 1e-6
    rtol: float | None = None
    max_steps: int = 1000
    divergence: float = 1e8
    batch_buckets: int = 4

    def __check_init__(self):
        _check_nonnegative("tol", self.tol)
        _check_positive_int("batch_buckets", self.batch_buckets)
        if self.rtol is not None:
            _check_nonnegative("rtol", self.rtol)
        _check_positive_int("max_steps", self.max_steps)
        if isinstance(self.divergence, int | float) and not self.divergence > 1:
            raise ValueError(f"`divergence` must be > 1, got {self.divergence}.")

    @property
    def atol_rtol(self) -> tuple[float, float]:
        return self.tol, self.tol if self.rtol is None else self.rtol

    @abc.abstractmethod
    def init(self, z: Array, fz: Array) -> PyTree:
        """Solver state at the start, given z0 and f(z0)."""

    @abc.abstractmethod
    def update(self, fn: FlatFn, z: Array, fz: Array, state: PyTree) -> tuple[Array, PyTree]:
        """The next iterate and state, given the current iterate z and f(z)."""


def scaled_residual(z: Array, fz: Array, atol: float, rtol: float) -> Array:
    """max_i |f(z)_i - z_i| / (atol + rtol |z_i|); NaN propagates."""
    if z.size == 0:
        return jnp.zeros((), jnp.real(z).dtype)
    scale = atol + rtol * jnp.abs(z)
    # Guard atol = rtol = 0 ("run to max_steps"): 0/0 must not read as NaN.
    scale = jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
    return jnp.max(jnp.abs(fz - z) / scale)
