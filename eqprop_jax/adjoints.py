r"""How a fixed-point solve is differentiated.

At z* = f(z*, θ), with J = ∂f/∂z at z*, the implicit function theorem gives

    dz*/dθ = (I - J)⁻¹ ∂f/∂θ,    dL/dθ = uᵀ ∂f/∂θ  with  (I - Jᵀ) u = g = ∂L/∂z*.

Every adjoint below except [`eqprop_jax.Unrolled`][] is a way of solving the linear
system A x = b with A = I - J (forward mode) or Aᵀ u = g (reverse mode, the
*adjoint* system). They are plugged into `jax.lax.custom_linear_solve`, so
[`eqprop_jax.fixed_point`][] supports `jax.jvp` and `jax.grad` with each of them.

Each adjoint checks its own solve: it measures the relative residual
‖A x - b‖ / ‖b‖, and `on_failure` says what happens when that exceeds `tol`
(`"warn"`, `"raise"` through `eqx.error_if`, or `"ignore"`); `callback`, if given,
receives an [`eqprop_jax.AdjointStats`][] from every backward (or forward-mode) solve.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsla
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from ._krylov import _norm, bicgstab, gmres
from ._ragged import ragged_while_loop
from .solvers.base import _check_nonnegative, _check_positive_int

Linear = Callable[[Array], Array]


class AdjointStats(eqx.Module):
    """Convergence of one linear (adjoint) solve: iterations and relative residual."""

    steps: Int[Array, "..."]
    residual: Float[Array, "..."]
    converged: Array


def _warn(converged, steps, residual):
    converged = np.asarray(converged)
    if not np.all(converged):
        warnings.warn(
            "eqprop_jax: the linear (adjoint) solve did not converge: relative residual "
            f"{np.max(np.asarray(residual)):.3e} after {np.max(np.asarray(steps))} steps.",
            RuntimeWarning,
            stacklevel=2,
        )


class AbstractAdjoint(eqx.Module):
    """Base class: solves (I - J) x = b and (I - Jᵀ) u = g for a fixed point's derivative."""

    @abc.abstractmethod
    def _linear_solve(self, op: Linear, b: Array) -> tuple[Array, Array]:
        """x with op(x) ≈ b, and the number of iterations used."""

    def _checked(self, op: Linear, b: Array) -> Array:
        x, steps = self._linear_solve(op, b)
        rel = _norm(op(x) - b) / jnp.maximum(_norm(b), jnp.finfo(jnp.real(b).dtype).tiny)
        tol = getattr(self, "tol", None)
        converged = jnp.isfinite(rel) if tol is None else rel <= max(tol, 0) * 10
        on_failure = getattr(self, "on_failure", "ignore")
        callback = getattr(self, "callback", None)
        if on_failure == "warn":
            jax.debug.callback(_warn, converged, steps, rel)
        elif on_failure == "raise":
            x = eqx.error_if(x, ~converged, "eqprop_jax: the adjoint linear solve did not converge")
        if callback is not None:
            jax.debug.callback(
                lambda c, s, r: callback(AdjointStats(s, r, c)), converged, steps, rel
            )
        return x

    def solve(self, matvec: Linear, b: Array) -> Array:
        """Forward mode: x = (I - J)⁻¹ b, given `matvec` = I - J."""
        return self._checked(matvec, b)

    def transpose_solve(self, vecmat: Linear, g: Array) -> Array:
        """Reverse mode: u = (I - Jᵀ)⁻¹ g, given `vecmat` = I - Jᵀ."""
        return self._checked(vecmat, g)


_OnFailure = Literal["warn", "raise", "ignore"]


def _richardson(op: Linear, b: Array, tol: float, max_steps: int, fixed: bool, buckets: int = 4):
    """x_{k+1} = x_k + (b - A x_k): for A = I - J, x_{k+1} = J x_k + b."""
    if fixed:
        x = lax.fori_loop(0, max_steps, lambda _, x: x + (b - op(x)), jnp.zeros_like(b))
        return x, jnp.array(max_steps, jnp.int32)
    bnorm = _norm(b)

    def cond(c):
        x, r, k = c
        return (k < max_steps) & (_norm(r) > tol * bnorm) & jnp.all(jnp.isfinite(r))

    def body(c):
        x, r, k = c
        x = x + r
        return x, b - op(x), k + 1

    init = (jnp.zeros_like(b), b, jnp.array(0, jnp.int32))
    x, _, k = ragged_while_loop(cond, body, init, max_buckets=buckets)
    return x, k


class AlmeidaPineda(AbstractAdjoint):
    r"""Recurrent backpropagation (Almeida 1987; Pineda 1987).

    Iterates the adjoint fixed point u_{k+1} = Jᵀ u_k + g from u_0 = 0 until
    ‖g - (I - Jᵀ) u‖₂ <= tol ‖g‖₂ or `max_steps`. It converges iff the spectral
    radius of J is below one, i.e. iff the forward fixed point is linearly stable.
    Each step costs one vector-Jacobian product of f. (Forward mode iterates
    x_{k+1} = J x_k + b likewise.) Under `vmap` each example stops on its own and
    the iteration is a [`eqprop_jax.ragged_while_loop`][] with `batch_buckets`
    bucket sizes, as in [`eqprop_jax.AbstractSolver`][].
    """

    tol: float = 1e-6
    max_steps: int = 1000
    on_failure: _OnFailure = "warn"
    callback: Callable | None = None
    batch_buckets: int = 4

    def __check_init__(self):
        _check_nonnegative("tol", self.tol)
        _check_positive_int("max_steps", self.max_steps)
        _check_positive_int("batch_buckets", self.batch_buckets)

    def _linear_solve(self, op, b):
        return _richardson(op, b, self.tol, self.max_steps, False, self.batch_buckets)


class Neumann(AbstractAdjoint):
    r"""Truncated Neumann series u = Σ_{i=0}^{k} (Jᵀ)^i g.

    At a converged fixed point this equals truncated BPTT through k + 1 steps of
    the map (Liao et al. 2018, "Reviving and improving recurrent
    back-propagation"); k -> ∞ recovers [`eqprop_jax.AlmeidaPineda`][].
    """

    k: int = 10
    on_failure: _OnFailure = "ignore"
    callback: Callable | None = None

    def __check_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"`k` must be a non-negative int, got {self.k!r}.")

    def _linear_solve(self, op, b):
        return _richardson(op, b, 0.0, self.k + 1, fixed=True)


class Implicit(AbstractAdjoint):
    r"""Implicit function theorem with a Krylov solve of (I - Jᵀ) u = g.

    `method`: `"bicgstab"` (BiCGStab, van der Vorst 1992; the default),
    `"gmres"` (restarted GMRES, Saad & Schultz 1986: slower here but the most
    robust, e.g. when BiCGStab breaks down on a strongly non-normal J), or
    `"normal_cg"` (conjugate gradients on the normal equations A Aᵀ y = g,
    u = Aᵀ y). Stops when ‖A x - b‖₂ <= tol ‖b‖₂ (relative) or after `max_steps`
    iterations (for GMRES, restart cycles of `restart` inner steps).

    BiCGStab and GMRES are this library's own per-example loops
    (`eqprop_jax._krylov`), [`eqprop_jax.ragged_while_loop`][]s with
    `batch_buckets` bucket sizes: under `vmap` an example whose adjoint has
    converged stops costing matvecs, and `AdjointStats.steps` is its own count of
    iterations (GMRES: inner steps). Normal CG comes from `jax.scipy` and runs the
    batch in lockstep (its `steps` is `max_steps`).
    """

    method: Literal["gmres", "bicgstab", "normal_cg"] = "bicgstab"
    tol: float = 1e-6
    max_steps: int = 100
    restart: int = 20
    on_failure: _OnFailure = "warn"
    callback: Callable | None = None
    batch_buckets: int = 4

    def __check_init__(self):
        if self.method not in ("gmres", "bicgstab", "normal_cg"):
            raise ValueError(
                f"`method` must be 'gmres', 'bicgstab' or 'normal_cg', got {self.method!r}."
            )
        _check_nonnegative("tol", self.tol)
        _check_positive_int("max_steps", self.max_steps)
        _check_positive_int("restart", self.restart)
        _check_positive_int("batch_buckets", self.batch_buckets)

    def _linear_solve(self, op, b):
        if self.method == "gmres":
            x, steps = gmres(op, b, self.tol, self.max_steps, self.restart, self.batch_buckets)
        elif self.method == "bicgstab":
            x, steps = bicgstab(op, b, self.tol, self.max_steps, self.batch_buckets)
        else:
            op_t = jax.linear_transpose(op, b)
            y, _ = jsla.cg(
                lambda v: op(op_t(v)[0]), b, tol=self.tol, atol=0.0, maxiter=self.max_steps
            )
            x = op_t(y)[0]
            steps = jnp.array(self.max_steps, jnp.int32)  # jax.scipy reports no count
        return x, steps


class Unrolled(AbstractAdjoint):
    """Autodiff through the solver's iterations (BPTT): the reference.

    Reverse mode runs through `equinox.internal.while_loop(kind="checkpointed")`,
    so memory grows as O(log) of the steps taken rather than linearly, and the
    gradient is exactly that of the iterations that ran (same stopping step).
    Forward mode is not supported through this adjoint.
    """

    def _linear_solve(self, op, b):  # pragma: no cover - never used
        raise NotImplementedError
