r"""How a fixed-point solve is differentiated.

At z* = f(z*, θ), with J = ∂f/∂z at z*, the implicit function theorem gives

    dz*/dθ = (I - J)⁻¹ ∂f/∂θ,    dL/dθ = uᵀ ∂f/∂θ  with  (I - Jᵀ) u = g = ∂L/∂z*.

Every adjoint below except [`eqprop_jax.Unrolled`][] is a way of solving the linear
system A x = b with A = I - J (forward mode) or Aᵀ u = g (reverse mode, the
*adjoint* system). They are plugged into `jax.lax.custom_linear_solve`, so
[`eqprop_jax.fixed_point`][] supports `jax.jvp` and `jax.grad` with each of them.

Each adjoint checks its own solve: it measures the relative residual
ρ = ‖A x - b‖ / ‖b‖ and counts the solve as failed when ρ > max(10 tol, 100 ε)
(ε the dtype's machine epsilon; [`eqprop_jax.Neumann`][]: when the series grows,
ρ > 1), or when it is not finite. `on_failure` says what then happens:

- `"nan"` (default): that example's solution becomes NaN, so the gradient shows
  the failure instead of carrying a wrong finite value. It costs nothing: no host
  callback enters the compiled program.
- `"raise"`: a run-time error through `eqx.error_if` (one host callback in the
  compiled program, taken only on failure).
- `"warn"`: a `RuntimeWarning` from the host (one callback per solve and example).
- `"ignore"`: return the unconverged solution.

The statistics of the backward solves are available as arrays in two ways:
a *probe* (see [`eqprop_jax.adjoint_probe`][]), whose cotangent under `jax.grad` is
the statistics (no callback), or `callback`, a host function that receives an
[`eqprop_jax.AdjointStats`][] from every solve.

`tol=None` (the default) follows the forward solve: the tolerance the solver used
(its `tol`, or the dtype's default, [`eqprop_jax.default_tol`][]).
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

from .. import _checks
from ._krylov import bicgstab, gmres, norm
from ._ragged import ragged_while_loop

Linear = Callable[[Array], Array]
_ON_FAILURE = ("nan", "raise", "warn", "ignore")
OnFailure = Literal["nan", "raise", "warn", "ignore"]


class AdjointStats(eqx.Module):
    """Convergence of linear (adjoint) solves: iterations, relative residual, success.

    From a `callback`, one solve (one example). From
    [`eqprop_jax.AdjointStats.from_probe`][], the sums over every solve that shared
    the probe: total `steps`, summed `residual`, and `failures`, the number of
    failed solves (then `converged` is `failures == 0`).
    """

    steps: Int[Array, "..."] | Float[Array, "..."]
    residual: Float[Array, "..."]
    converged: Array
    failures: Float[Array, "..."] | None = None

    @classmethod
    def from_probe(cls, probe_cotangent: Float[Array, "... 3"]) -> AdjointStats:
        """The statistics carried by the cotangent of an [`eqprop_jax.adjoint_probe`][]."""
        ct = jnp.asarray(probe_cotangent)
        if ct.shape[-1:] != (3,):
            raise ValueError(
                f"AdjointStats.from_probe: expected the cotangent of an adjoint probe "
                f"(last axis 3), got shape {ct.shape}."
            )
        return cls(ct[..., 0], ct[..., 1], ct[..., 2] == 0, ct[..., 2])


def adjoint_probe(dtype=jnp.float32) -> Float[Array, "3"]:
    """A zero vector whose cotangent reports the backward solves' statistics.

    Pass it to [`eqprop_jax.fixed_point`][] as `probe=` and differentiate with respect
    to it as well; its cotangent holds (steps, relative residual, failures) of the
    adjoint solves that used it, summed over the examples that share it (vmap the
    probe along with the batch for per-example values). The forward values do not
    depend on it, and no host callback is involved:

    ```python
    probe = eqp.adjoint_probe()
    def loss(params, probe):
        sol = jax.vmap(lambda x: eqp.fixed_point(f, z0, (params, x), probe=probe))(xs)
        return jnp.mean(sol.value ** 2)
    g, g_probe = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, probe)
    stats = eqp.AdjointStats.from_probe(g_probe)   # total steps, failures, ...
    ```
    """
    return jnp.zeros(3, dtype)


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
    """How [`eqprop_jax.fixed_point`][] is differentiated.

    Two kinds: [`eqprop_jax.AbstractLinearAdjoint`][] (implicit differentiation: a
    linear solve at the fixed point) and [`eqprop_jax.Unrolled`][] (autodiff through
    the iterations).
    """


class AbstractLinearAdjoint(AbstractAdjoint):
    """Implicit differentiation: solves (I - J) x = b and (I - Jᵀ) u = g at z*.

    Concrete adjoints implement `linear_solve(op, b, tol)`, returning x with
    op(x) ≈ b and the iterations used; this class checks the answer (see the module
    docstring for `tol`, `on_failure` and `callback`).
    """

    tol: eqx.AbstractVar[float | None]
    on_failure: eqx.AbstractVar[OnFailure]
    callback: eqx.AbstractVar[Callable[[AdjointStats], None] | None]

    def __check_init__(self):
        who = type(self).__name__
        _checks.tolerance(who, "tol", self.tol)
        _checks.choice(who, "on_failure", self.on_failure, _ON_FAILURE)
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"{who}: `callback` must be callable, got {self.callback!r}.")

    @abc.abstractmethod
    def linear_solve(self, op: Linear, b: Array, tol: float) -> tuple[Array, Array]:
        """x with op(x) ≈ b (relative tolerance `tol`), and the iterations used."""

    def failure_threshold(self, tol: float, dtype) -> float:
        """The relative residual above which a solve counts as failed."""
        return max(10 * tol, 100 * float(jnp.finfo(dtype).eps))

    def checked_solve(self, op: Linear, b: Array, tol: float) -> tuple[Array, Array]:
        """Solve op(x) = b, check it, apply `on_failure`; returns x and the statistics
        (steps, relative residual, failed) as a vector of b's real dtype."""
        x, steps = self.linear_solve(op, b, tol)
        real = jnp.real(b).dtype
        # One extra matvec: the Krylov loops track an updated residual that drifts
        # from the true one in low precision; the check uses the true one.
        rel = norm(op(x) - b) / jnp.maximum(norm(b), jnp.finfo(real).tiny)
        converged = jnp.isfinite(rel) & (rel <= self.failure_threshold(tol, real))
        if self.on_failure == "nan":
            x = jnp.where(converged, x, jnp.nan).astype(x.dtype)
        elif self.on_failure == "raise":
            x = eqx.error_if(x, ~converged, "eqprop_jax: the adjoint linear solve did not converge")
        elif self.on_failure == "warn":
            jax.debug.callback(_warn, converged, steps, rel)
        if self.callback is not None:
            callback = self.callback
            jax.debug.callback(
                lambda c, s, r: callback(AdjointStats(s, r, c)), converged, steps, rel
            )
        stats = jnp.stack(
            [steps.astype(real), rel.astype(real), (~converged).astype(real)]
        )
        return x, stats


def richardson(op: Linear, b: Array, tol: float, max_steps: int, fixed: bool, buckets: int = 4):
    """x_{k+1} = x_k + (b - A x_k): for A = I - J, x_{k+1} = J x_k + b.

    From x_0 = 0 the iterates are the partial sums of the Neumann series Σ_i J^i b
    and the residual after k steps is J^k b.
    """
    if fixed:
        x = lax.fori_loop(0, max_steps, lambda _, x: x + (b - op(x)), jnp.zeros_like(b))
        return x, jnp.array(max_steps, jnp.int32)
    bnorm = norm(b)

    def cond(c):
        x, r, k = c
        return (k < max_steps) & (norm(r) > tol * bnorm) & jnp.all(jnp.isfinite(r))

    def body(c):
        x, r, k = c
        x = x + r
        return x, b - op(x), k + 1

    init = (jnp.zeros_like(b), b, jnp.array(0, jnp.int32))
    x, _, k = ragged_while_loop(cond, body, init, max_buckets=buckets)
    return x, k


class AlmeidaPineda(AbstractLinearAdjoint):
    r"""Recurrent backpropagation (Almeida 1987; Pineda 1987).

    Iterates the adjoint fixed point u_{k+1} = Jᵀ u_k + g from u_0 = 0 until
    ‖g - (I - Jᵀ) u‖₂ <= tol ‖g‖₂ or `max_steps`. It converges iff the spectral
    radius of J is below one, i.e. iff the forward fixed point is linearly stable;
    otherwise use [`eqprop_jax.Implicit`][]. Each step costs one vector-Jacobian
    product of f. (Forward mode iterates x_{k+1} = J x_k + b likewise.) Under `vmap`
    each example stops on its own and the iteration is a
    [`eqprop_jax.ragged_while_loop`][] with `batch_buckets` bucket sizes, as in
    [`eqprop_jax.AbstractSolver`][].
    """

    max_steps: int = 1000
    batch_buckets: int = 4
    tol: float | None = eqx.field(default=None, kw_only=True)
    on_failure: OnFailure = eqx.field(default="nan", kw_only=True)
    callback: Callable[[AdjointStats], None] | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        _checks.positive_int("AlmeidaPineda", "max_steps", self.max_steps)
        _checks.positive_int("AlmeidaPineda", "batch_buckets", self.batch_buckets)

    def linear_solve(self, op, b, tol):
        return richardson(op, b, tol, self.max_steps, False, self.batch_buckets)


class Neumann(AbstractLinearAdjoint):
    r"""Truncated Neumann series u = Σ_{i=0}^{k} (Jᵀ)^i g.

    At a converged fixed point this equals truncated BPTT through k + 1 steps of
    the map (Liao et al. 2018, "Reviving and improving recurrent
    back-propagation"); k -> ∞ recovers [`eqprop_jax.AlmeidaPineda`][].

    The truncation is intended, so the check is not a tolerance: the solve counts as
    failed when the series grows, i.e. when its next term (Jᵀ)^{k+1} g (the residual)
    is larger than g, which happens when the spectral radius of J is at least one.
    The series then does not approximate the implicit gradient at all: use
    [`eqprop_jax.Implicit`][].
    """

    k: int = 10
    tol: float | None = eqx.field(default=None, kw_only=True)  # unused: fixed length
    on_failure: OnFailure = eqx.field(default="nan", kw_only=True)
    callback: Callable[[AdjointStats], None] | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        _checks.positive_int("Neumann", "k", self.k, minimum=0)

    def failure_threshold(self, tol, dtype):
        return 1.0

    def linear_solve(self, op, b, tol):
        return richardson(op, b, 0.0, self.k + 1, fixed=True)


class Implicit(AbstractLinearAdjoint):
    r"""Implicit function theorem with a Krylov solve of (I - Jᵀ) u = g.

    `method`: `"bicgstab"` (BiCGStab, van der Vorst 1992; the default),
    `"gmres"` (restarted GMRES, Saad & Schultz 1986: slower here but the most
    robust, e.g. when BiCGStab breaks down on a strongly non-normal J), or
    `"normal_cg"` (conjugate gradients on the normal equations A Aᴴ y = g,
    u = Aᴴ y). Stops when ‖A x - b‖₂ <= tol ‖b‖₂ (relative) or after `max_steps`
    iterations (for GMRES, restart cycles of `restart` inner steps).

    BiCGStab and GMRES are this library's own per-example loops
    (`eqprop_jax._krylov`), [`eqprop_jax.ragged_while_loop`][]s with
    `batch_buckets` bucket sizes: under `vmap` an example whose adjoint has
    converged stops costing matvecs, and its statistics count its own iterations
    (GMRES: inner steps). Normal CG comes from `jax.scipy` and runs the batch in
    lockstep (its step count is `max_steps`).
    """

    method: Literal["gmres", "bicgstab", "normal_cg"] = "bicgstab"
    max_steps: int = 100
    restart: int = 20
    batch_buckets: int = 4
    tol: float | None = eqx.field(default=None, kw_only=True)
    on_failure: OnFailure = eqx.field(default="nan", kw_only=True)
    callback: Callable[[AdjointStats], None] | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        _checks.choice("Implicit", "method", self.method, ("gmres", "bicgstab", "normal_cg"))
        _checks.positive_int("Implicit", "max_steps", self.max_steps)
        _checks.positive_int("Implicit", "restart", self.restart)
        _checks.positive_int("Implicit", "batch_buckets", self.batch_buckets)

    def linear_solve(self, op, b, tol):
        if self.method == "gmres":
            return gmres(op, b, tol, self.max_steps, self.restart, self.batch_buckets)
        if self.method == "bicgstab":
            return bicgstab(op, b, tol, self.max_steps, self.batch_buckets)
        op_t = jax.linear_transpose(op, b)

        def op_h(v):  # Aᴴ v = conj(Aᵀ conj(v)): the normal equations need the adjoint
            return jnp.conj(op_t(jnp.conj(v))[0])

        y, _ = jsla.cg(lambda v: op(op_h(v)), b, tol=tol, atol=0.0, maxiter=self.max_steps)
        return op_h(y), jnp.array(self.max_steps, jnp.int32)


class Unrolled(AbstractAdjoint):
    """Autodiff through the solver's iterations (BPTT): the reference.

    The derivative is exactly that of the iterations that ran (same stopping step).
    At least one step is always taken, so it sees f even when z0 already meets the
    tolerance, and z0 is differentiated too (through those steps).

    `mode="reverse"` (default): `jax.grad`/`jax.vjp` through
    `equinox.internal.while_loop(kind="checkpointed")`, whose memory grows as
    O(log) of the steps taken rather than linearly. Forward mode raises an error.

    `mode="forward"`: `jax.jvp`/`jax.jacfwd` through a `lax.while_loop`, carrying
    the tangents along the iterations (what optimistix's tests do with a
    `lax.while_loop` adjoint); no memory beyond the iterate's. Under `vmap` each
    example still stops on its own, but the batch steps in lockstep (no
    compaction: the compacted loop has no forward-mode rule under `vmap`). Reverse
    mode raises an error.

    The implicit adjoints ([`eqprop_jax.Implicit`][], [`eqprop_jax.AlmeidaPineda`][],
    [`eqprop_jax.Neumann`][]) support both modes.
    """

    mode: Literal["reverse", "forward"] = "reverse"

    def __check_init__(self):
        _checks.choice("Unrolled", "mode", self.mode, ("reverse", "forward"))


# -- inexact gradients: truncations that are cheap by design ------------------------


class JacobianFree(AbstractLinearAdjoint):
    r"""Jacobian-free backpropagation (Fung et al. 2022, "JFB: Jacobian-free
    backpropagation for implicit networks", AAAI).

    Replaces (I - Jᵀ)⁻¹ by the identity: u = g, so dL/dθ ≈ gᵀ ∂f/∂θ at z*, the
    gradient of one application of f at the equilibrium with z* held fixed
    (forward mode likewise returns x = b = ∂f/∂θ · θ̇). It is exactly
    [`eqprop_jax.Neumann`][]`(0)` (the series Σ_{i=0}^{0} (Jᵀ)^i g = g) and
    [`eqprop_jax.PhantomGradient`][]`(k=1, damping=1.0)`.

    Fung et al. show that when f is a contraction in z (‖J‖ <= γ < 1) this is a
    descent direction. The check follows that condition: the relative residual of
    the adjoint system is ‖g - (I - Jᵀ) g‖ / ‖g‖ = ‖Jᵀ g‖ / ‖g‖, and the solve counts
    as failed when it exceeds 1 (J expands along g: the next Neumann term would be
    larger than g) or is not finite. That check costs one product with Jᵀ; with
    `on_failure="ignore"` and no probe or callback nothing reads it, so XLA removes
    it from the compiled program and the backward is a single VJP of f.
    """

    tol: float | None = eqx.field(default=None, kw_only=True)  # unused: no iteration
    on_failure: OnFailure = eqx.field(default="nan", kw_only=True)
    callback: Callable[[AdjointStats], None] | None = eqx.field(default=None, kw_only=True)

    def failure_threshold(self, tol, dtype):
        return 1.0

    def linear_solve(self, op, b, tol):
        return b, jnp.array(0, jnp.int32)


class PhantomGradient(AbstractLinearAdjoint):
    r"""Unrolled phantom gradient (Geng, Zhang, Bai, Wang & Lin 2021, "On training
    implicit models", NeurIPS), with `k` steps and damping λ = `damping`.

    The paper differentiates k damped steps h_{t+1} = λ f(h_t) + (1 - λ) h_t run
    from h_0 = z* (held fixed). At a fixed point every step has the same Jacobian,
    so with B = λ J + (1 - λ) I the gradient is

        dh_k/dθ = λ Σ_{t=0}^{k-1} B^t ∂f/∂θ,     u = λ Σ_{t=0}^{k-1} (Bᵀ)^t g,

    which is what this adjoint computes: k steps of damped Richardson iteration on
    (I - Jᵀ) u = g from u_0 = 0,

        u_{t+1} = u_t + λ (g - (I - Jᵀ) u_t) = (1 - λ) u_t + λ (Jᵀ u_t + g),

    each costing one vector-Jacobian product (forward mode iterates J likewise).
    Jacobians are evaluated at the solver's z*, so this equals the paper's
    unrolling when z* is a fixed point. At λ = 1, B = J and u = Σ_{t=0}^{k-1} (Jᵀ)^t g
    is [`eqprop_jax.Neumann`][]`(k - 1)`; k = 1, λ = 1 is
    [`eqprop_jax.JacobianFree`][]. As k -> ∞ it converges to the implicit gradient
    whenever every eigenvalue μ of J has |1 - λ + λ μ| < 1, which a small λ
    secures for any J whose eigenvalues have real part below 1: damping makes the
    series usable where Neumann diverges. (torchdeq, by the same group, recommends
    λ = 0.5-0.7 for multiscale DEQs.)

    Inexact by design, so the check is not a tolerance: the residual after k steps is
    Bᵀᵏ g, and the solve counts as failed when ‖Bᵀᵏ g‖ > ‖g‖ (the damped series
    grows) or the result is not finite.
    """

    k: int = 5
    damping: float = 0.5
    tol: float | None = eqx.field(default=None, kw_only=True)  # unused: fixed length
    on_failure: OnFailure = eqx.field(default="nan", kw_only=True)
    callback: Callable[[AdjointStats], None] | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        _checks.positive_int("PhantomGradient", "k", self.k)
        if isinstance(self.damping, bool) or not isinstance(self.damping, int | float):
            raise TypeError(
                f"PhantomGradient: `damping` must be a Python float, got {self.damping!r}."
            )
        if not 0 < self.damping <= 1:
            raise ValueError(f"PhantomGradient: `damping` must lie in (0, 1], got {self.damping}.")

    def failure_threshold(self, tol, dtype):
        return 1.0

    def linear_solve(self, op, b, tol):
        lam = self.damping
        x = lax.fori_loop(0, self.k, lambda _, x: x + lam * (b - op(x)), jnp.zeros_like(b))
        return x, jnp.array(self.k, jnp.int32)
