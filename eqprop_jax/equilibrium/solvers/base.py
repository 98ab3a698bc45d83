"""The solver interface: one update rule z_k -> z_{k+1} on a flat vector."""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ... import _checks
from .._ragged import BATCH_BUCKETS

FlatFn = Callable[[Array], Array]


class AbstractSolver(eqx.Module):
    """A fixed-point solver for z = f(z) on a flat vector z.

    Stopping rule (all solvers): with r = f(z) - z, stop when

        max_i |r_i| / (atol + rtol * |z_i|) <= 1,

    i.e. the infinity norm of the residual scaled elementwise, the rule of
    optimistix. `tol` is the absolute tolerance `atol`; `rtol` defaults to `tol`.
    `tol=None` (the default) picks a tolerance from the state's dtype
    ([`eqprop_jax.default_tol`][]: 1e-12 for float64, 1e-6 for float32, 1e-3 for
    float16, 1e-2 for bfloat16), so a float64 solve is exact to float64 precision.

    The solve also stops when `max_steps` updates have been taken (status
    `max_steps`), when the unscaled residual max_i |r_i| exceeds `divergence` times
    the smallest one seen so far (`diverged`), or when a NaN/inf appears in the
    state or in f's output (`nonfinite`; the returned state is then NaN, never a
    finite value that looks valid).

    **Fixed-step solves.** `tol = 0` (with `rtol` unset or 0) runs exactly
    `max_steps` updates, whatever the scale of the state, as EP's phases do; the
    status is then `max_steps`, or `converged` if f(z) = z holds exactly (in
    floating point) earlier, since further steps could not change z. `stats.residual`
    is the unscaled max_i |r_i| in that mode.

    Under `jax.vmap` the iteration is a [`eqprop_jax.ragged_while_loop`][]: every
    so often the examples still running are gathered into a smaller batch, so
    finished examples cost nothing. `batch_buckets` caps the number of batch sizes
    used (each compiles one copy of f and the update); 1 steps the whole batch in
    lockstep until the slowest example stops, as `lax.while_loop` does. Fixed-step
    solves are not compacted (an example stops early only when f(z) = z holds
    exactly). This is the one place the setting is declared: the implicit adjoints'
    backward solves use the forward solver's `batch_buckets` too, and
    [`eqprop_jax.batch_compaction`][]`(False)` overrides every one of them to 1 for
    the code traced inside it.

    Settings are validated when the solver is built: tolerances must be finite,
    non-negative Python numbers (they are static: they fix the compiled program).

    Concrete solvers implement `init` (their state from z0 and f(z0)) and `update`
    (the next iterate from z, f(z) and the state).
    """

    tol: float | None = None
    rtol: float | None = None
    max_steps: int = 1000
    divergence: float = 1e8
    batch_buckets: int = BATCH_BUCKETS

    def __check_init__(self):
        who = type(self).__name__
        _checks.tolerance(who, "tol", self.tol)
        _checks.tolerance(who, "rtol", self.rtol)
        _checks.positive_int(who, "max_steps", self.max_steps)
        _checks.positive_int(who, "batch_buckets", self.batch_buckets)
        if (
            isinstance(self.divergence, bool)
            or not isinstance(self.divergence, int | float)
            or not self.divergence > 1  # NaN fails this too; inf turns the test off
        ):
            raise ValueError(f"{who}: `divergence` must be a number > 1, got {self.divergence!r}.")

    @property
    def fixed_steps(self) -> bool:
        """True when the solve runs exactly `max_steps` updates (`tol = 0`, `rtol` 0/unset)."""
        return self.tol == 0 and not self.rtol

    def tolerances(self, dtype) -> tuple[float, float]:
        """(atol, rtol) for a state of `dtype`, with `tol=None` resolved by dtype."""
        atol = _checks.default_tol(dtype) if self.tol is None else float(self.tol)
        return atol, atol if self.rtol is None else float(self.rtol)

    @abc.abstractmethod
    def init(self, z: Array, fz: Array) -> PyTree:
        """Solver state at the start, given z0 and f(z0)."""

    def start(self, fn: FlatFn, z: Array, fz: Array) -> PyTree:
        """Solver state at the start, for solvers that need f itself there (the
        Jacobian at z0 of [`eqprop_jax.Chord`][]); by default `init(z, fz)`."""
        return self.init(z, fz)

    @abc.abstractmethod
    def update(self, fn: FlatFn, z: Array, fz: Array, state: PyTree) -> tuple[Array, PyTree]:
        """The next iterate and state, given the current iterate z and f(z)."""


def residuals(z: Array, fz: Array, atol: float, rtol: float) -> tuple[Array, Array]:
    """(scaled, absolute) residuals: max_i |r_i| / (atol + rtol |z_i|) and max_i |r_i|.

    A zero scale (atol = 0 at z_i = 0) gives an infinite scaled residual for r_i ≠ 0
    (not converged), never a NaN; NaN/inf in z or f(z) show in the absolute one.
    """
    if z.size == 0:
        zero = jnp.zeros((), jnp.real(z).dtype)
        return zero, zero
    r = jnp.abs(fz - z)
    scale = atol + rtol * jnp.abs(z)
    safe = jnp.where(scale > 0, scale, 1)
    scaled = jnp.where(scale > 0, r / safe, jnp.where(r > 0, jnp.inf, 0))
    return jnp.max(scaled), jnp.max(r)
