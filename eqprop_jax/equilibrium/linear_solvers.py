r"""Linear solvers for the implicit adjoints: A x = b on one example's flat vector.

An implicit adjoint ([`eqprop_jax.Implicit`][]) is given one of these objects and
solves with it A x = b, A = I - J (forward mode), and Aᵀ u = g (reverse mode), J
the Jacobian of the map at its fixed point; A arrives as a linear function `op`,
never as a matrix. As in lineax, the method is chosen by passing an object, which
carries its own settings: `Implicit(GMRES(restart=30))`.

A solver returns x and the iterations it used; it does not judge its answer. The
adjoint measures the true relative residual ‖A x - b‖ / ‖b‖ and compares it with
the solver's [`failure_threshold`][eqprop_jax.AbstractLinearSolver.failure_threshold]:
max(10 tol, 100 ε) for a solve to tolerance `tol`, 1 (the series grew) for a
truncated one. The tolerance itself is the adjoint's (`tol=None` follows the forward
solve), and so is the number of bucket sizes under `vmap`, which is the forward
solver's `batch_buckets`.

Under `vmap` every solver here but [`eqprop_jax.NormalCG`][] is a per-example
[`eqprop_jax.ragged_while_loop`][]: an example whose solve has converged stops
costing matvecs, and its step count is its own.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsla
from jax import lax
from jaxtyping import Array, Inexact, Int

from .. import _checks
from ._krylov import bicgstab, gmres, norm
from ._ragged import ragged_while_loop

Linear = Callable[[Array], Array]


class AbstractLinearSolver(eqx.Module):
    """Solves A x = b, A given as a linear function on one flat vector.

    Concrete solvers implement `solve`; `failure_threshold` says when the adjoint
    counts their answer as failed.
    """

    @abc.abstractmethod
    def solve(
        self, op: Linear, b: Inexact[Array, " n"], tol: float, batch_buckets: int
    ) -> tuple[Inexact[Array, " n"], Int[Array, ""]]:
        """x with op(x) ≈ b, ‖b - op(x)‖₂ <= `tol` ‖b‖₂ where the method stops on a
        tolerance, and the iterations used. `batch_buckets`: the bucket sizes of the
        [`eqprop_jax.ragged_while_loop`][] under `vmap` (1: lockstep)."""

    def failure_threshold(self, tol: float, dtype) -> float:
        """The relative residual above which the solve counts as failed:
        max(10 tol, 100 ε), ε the machine epsilon of `dtype`."""
        return max(10 * tol, 100 * float(jnp.finfo(dtype).eps))


class BiCGStab(AbstractLinearSolver):
    """BiCGStab (van der Vorst 1992, "Bi-CGSTAB: a fast and smoothly converging
    variant of Bi-CG for the solution of nonsymmetric linear systems"), from x₀ = 0.

    Two matvecs per iteration; stops at ‖b - A x‖₂ <= tol ‖b‖₂, on a breakdown
    (ρ = 0 or ω = 0), or after `max_steps` iterations. The shadow residual is b plus
    a fixed pseudo-random vector, since r̂ = b breaks down exactly on layered
    networks whose g lives on the output units. The default of
    [`eqprop_jax.Implicit`][].
    """

    max_steps: int = 100

    def __check_init__(self):
        _checks.positive_int("BiCGStab", "max_steps", self.max_steps)

    def solve(self, op, b, tol, batch_buckets):
        return bicgstab(op, b, tol, self.max_steps, batch_buckets)


class GMRES(AbstractLinearSolver):
    """Restarted GMRES(m) (Saad & Schultz 1986, "GMRES: a generalized minimal
    residual algorithm for solving nonsymmetric linear systems"), from x₀ = 0.

    Each of at most `max_steps` cycles runs up to m = `restart` Arnoldi steps (one
    matvec each) and minimises ‖b - A x‖₂ over the Krylov space built, then
    restarts from the true residual; stops at ‖b - A x‖₂ <= tol ‖b‖₂. Slower than
    BiCGStab here but the most robust, e.g. where BiCGStab breaks down on a strongly
    non-normal J. The step count is the Arnoldi steps taken.
    """

    max_steps: int = 100
    restart: int = 20

    def __check_init__(self):
        _checks.positive_int("GMRES", "max_steps", self.max_steps)
        _checks.positive_int("GMRES", "restart", self.restart)

    def solve(self, op, b, tol, batch_buckets):
        return gmres(op, b, tol, self.max_steps, self.restart, batch_buckets)


class NormalCG(AbstractLinearSolver):
    """Conjugate gradients (Hestenes & Stiefel 1952) on the normal equations
    A Aᴴ y = b, x = Aᴴ y (CGNE).

    A Aᴴ is Hermitian positive definite for any invertible A, so CG applies, at two
    matvecs (one with A, one with Aᴴ) per iteration and with the condition number
    squared. Aᴴ v = conj(Aᵀ conj(v)) comes from `jax.linear_transpose`. The CG loop is
    `jax.scipy.sparse.linalg.cg`, stopping at ‖b - A Aᴴ y‖₂ <= tol ‖b‖₂ or after
    `max_steps` iterations; it steps a batch in lockstep and reports `max_steps` as
    its step count.
    """

    max_steps: int = 100

    def __check_init__(self):
        _checks.positive_int("NormalCG", "max_steps", self.max_steps)

    def solve(self, op, b, tol, batch_buckets):
        del batch_buckets
        op_t = jax.linear_transpose(op, b)

        def op_h(v):  # Aᴴ v = conj(Aᵀ conj(v)): the normal equations need the adjoint
            return jnp.conj(op_t(jnp.conj(v))[0])

        y, _ = jsla.cg(lambda v: op(op_h(v)), b, tol=tol, atol=0.0, maxiter=self.max_steps)
        return op_h(y), jnp.array(self.max_steps, jnp.int32)


class Richardson(AbstractLinearSolver):
    r"""Richardson iteration (Richardson 1911) with damping ω, from x₀ = 0:

        x_{k+1} = x_k + ω (b - A x_k).

    For A = I - J and ω = 1 this is x_{k+1} = J x_k + b, whose iterates are the
    partial sums of the Neumann series Σ_i J^i b; in reverse mode,
    u_{k+1} = Jᵀ u_k + g, the recurrent backpropagation of Almeida (1987) and Pineda
    (1987). It converges iff every eigenvalue μ of J has |1 - ω + ω μ| < 1 (at
    ω = 1: iff the fixed point is linearly stable). One matvec per iteration.

    `truncated=False` (default): iterate until ‖b - A x‖₂ <= tol ‖b‖₂ (or
    `max_steps`, or a non-finite residual), as a [`eqprop_jax.ragged_while_loop`][].

    `truncated=True`: exactly `max_steps` iterations, a series truncated on purpose
    (k steps at ω = 1 are truncated BPTT over k steps at the fixed point, Liao et
    al. 2018). The check is then not a tolerance: the solve counts as failed when
    the residual after the last step, (I - ωA)^k b, is larger than b, i.e. when the
    series grows and approximates nothing.

    Presets: [`eqprop_jax.AlmeidaPineda`][] (to tolerance), [`eqprop_jax.Neumann`][]
    (truncated, ω = 1) and [`eqprop_jax.PhantomGradient`][] (truncated, ω < 1).
    """

    max_steps: int = 1000
    damping: float = 1.0
    truncated: bool = False

    def __check_init__(self):
        _checks.positive_int("Richardson", "max_steps", self.max_steps)
        if isinstance(self.damping, bool) or not isinstance(self.damping, int | float):
            raise TypeError(
                f"Richardson: `damping` must be a Python float, got {self.damping!r}."
            )
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(
                f"Richardson: `damping` must be finite and positive, got {self.damping}."
            )
        if not isinstance(self.truncated, bool):
            raise TypeError(f"Richardson: `truncated` must be a bool, got {self.truncated!r}.")

    def failure_threshold(self, tol, dtype):
        if self.truncated:
            return 1.0
        return super().failure_threshold(tol, dtype)

    def solve(self, op, b, tol, batch_buckets):
        omega = self.damping
        if self.truncated:
            x = lax.fori_loop(
                0, self.max_steps, lambda _, x: x + omega * (b - op(x)), jnp.zeros_like(b)
            )
            return x, jnp.array(self.max_steps, jnp.int32)
        bnorm = norm(b)
        max_steps = self.max_steps

        def cond(c):
            x, r, k = c
            return (k < max_steps) & (norm(r) > tol * bnorm) & jnp.all(jnp.isfinite(r))

        def body(c):
            x, r, k = c
            x = x + omega * r
            return x, b - op(x), k + 1

        init = (jnp.zeros_like(b), b, jnp.array(0, jnp.int32))
        x, _, k = ragged_while_loop(cond, body, init, max_buckets=batch_buckets)
        return x, k


class _Identity(AbstractLinearSolver):
    """x = b: the identity as A⁻¹, no matvec ([`eqprop_jax.JacobianFree`][]).

    Richardson truncated after one step gives the same x, but pays a matvec with
    x₀ = 0 and counts one iteration; this solver counts none. The check is the
    growth rule of a truncated series: ‖b - A b‖ > ‖b‖ fails.
    """

    def failure_threshold(self, tol, dtype):
        return 1.0

    def solve(self, op, b, tol, batch_buckets):
        return b, jnp.array(0, jnp.int32)

