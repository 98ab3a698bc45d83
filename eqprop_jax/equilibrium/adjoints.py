r"""How a fixed-point solve is differentiated.

At z* = f(z*, θ), with J = ∂f/∂z at z*, the implicit function theorem gives

    dz*/dθ = (I - J)⁻¹ ∂f/∂θ,    dL/dθ = uᵀ ∂f/∂θ  with  (I - Jᵀ) u = g = ∂L/∂z*.

Every adjoint below except [`eqprop_jax.Unrolled`][] is a way of solving the linear
system A x = b with A = I - J (forward mode) or Aᵀ u = g (reverse mode, the
*adjoint* system) with a linear solver object ([`eqprop_jax.AbstractLinearSolver`][]:
[`eqprop_jax.BiCGStab`][], [`eqprop_jax.GMRES`][], [`eqprop_jax.NormalCG`][],
[`eqprop_jax.Richardson`][]). They are plugged into `jax.lax.custom_linear_solve`,
so [`eqprop_jax.fixed_point`][] supports `jax.jvp` and `jax.grad` with each of them.
[`eqprop_jax.Implicit`][] takes any linear solver; [`eqprop_jax.AlmeidaPineda`][],
[`eqprop_jax.Neumann`][] and [`eqprop_jax.PhantomGradient`][] are presets of
Richardson under the names the literature gives them.

Every adjoint owns the differentiation of the solve through one method, `apply`
(as optimistix's adjoints do): the implicit ones run the solve outside autodiff and
attach the implicit-function-theorem derivative, `Unrolled` runs it in a loop that
autodiff can go through.

Each implicit adjoint checks its own solve: it measures the relative residual
ρ = ‖A x - b‖ / ‖b‖ and counts the solve as failed when ρ exceeds the linear
solver's threshold, max(10 tol, 100 ε) (ε the dtype's machine epsilon; for a
truncated series such as [`eqprop_jax.Neumann`][]'s, 1: the series grows), or when
it is not finite. `on_failure` says what then happens:

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
(its `tol`, or the dtype's default, [`eqprop_jax.default_tol`][]). Under `vmap` the
backward solves use the forward solver's `batch_buckets`.
"""

# No `from __future__ import annotations`: equinox reads `eqx.AbstractVar` only from
# evaluated annotations (as strings they would silently become plain fields).
import abc
import warnings
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int, PyTree

from .. import _checks
from .._checks import default_tol
from ._implicit import implicit_jvp
from ._krylov import norm
from ._ragged import ragged_while_loop
from .linear_solvers import AbstractLinearSolver, BiCGStab, Richardson, _Identity
from .solvers.base import AbstractSolver

Linear = Callable[[Array], Array]
FlatMap = Callable[[PyTree, Array], Array]
SolveOutput = tuple[Array, Array, Array, Array]  # z, result, steps, residual
Primal = Callable[[tuple[PyTree, Array], Callable[..., PyTree], int], SolveOutput]
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
    def from_probe(cls, probe_cotangent: Float[Array, "... 3"]) -> "AdjointStats":
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


# The loops an adjoint hands to the solve, all called as
# loop(cond, body, init, *, max_steps, buckets) -> final carry.


def _ragged_loop(cond, body, init, *, max_steps, buckets):
    del max_steps
    return ragged_while_loop(cond, body, init, max_buckets=buckets)


def _checkpointed_loop(cond, body, init, *, max_steps, buckets):
    del buckets
    return eqxi.while_loop(cond, body, init, max_steps=max_steps, kind="checkpointed")


def _lax_loop(cond, body, init, *, max_steps, buckets):
    del max_steps, buckets
    return lax.while_loop(cond, body, init)


class AbstractAdjoint(eqx.Module):
    """How [`eqprop_jax.fixed_point`][] is differentiated: the adjoint runs the solve.

    As in optimistix, the adjoint owns differentiation through one method, `apply`,
    which receives the solve as a function and decides both the loop it runs in and
    the derivative its answer gets. Two kinds: [`eqprop_jax.AbstractLinearAdjoint`][]
    (the implicit function theorem: a linear solve at the fixed point) and
    [`eqprop_jax.Unrolled`][] (autodiff through the iterations).
    """

    @abc.abstractmethod
    def apply(
        self,
        primal: Primal,
        fn: FlatMap,
        inputs: tuple[PyTree, Array],
        solver: AbstractSolver,
        *,
        probe: Array | None = None,
        best_so_far: bool = False,
    ) -> SolveOutput:
        """Run the solve and give its answer this adjoint's derivative.

        Args:
            primal: the solve, `primal(inputs, loop, min_steps)`, returning
                (z, result, steps, residual). `loop(cond, body, init, *, max_steps,
                buckets)` is the while loop it iterates in; `min_steps` the updates
                it must take before it may stop on the tolerance.
            fn: the flat map, `fn(dyn, z) = f(z)`, of which z is the fixed point.
            inputs: `(dyn, z0)`: the differentiable arrays of f and its arguments,
                and the flat initial state.
            solver: the forward solver: its tolerance and `batch_buckets` are the
                ones the backward solves follow.
            probe: an [`eqprop_jax.adjoint_probe`][], or None.
            best_so_far: the solve returns its lowest-residual iterate, which is
                finite even when the solve is not.
        """


class AbstractLinearAdjoint(AbstractAdjoint):
    """Implicit differentiation: solves (I - J) x = b and (I - Jᵀ) u = g at z*.

    The solve runs outside autodiff (a [`eqprop_jax.ragged_while_loop`][]); its answer
    is given the derivative of the implicit function theorem, whose linear systems
    `linear_solver` ([`eqprop_jax.AbstractLinearSolver`][]) solves and this class
    checks (see the module docstring for `tol`, `on_failure` and `callback`).
    Concrete adjoints declare these four; [`eqprop_jax.Implicit`][] takes any linear
    solver, the others are presets of one.
    """

    linear_solver: eqx.AbstractVar[AbstractLinearSolver]
    tol: eqx.AbstractVar[float | None]
    on_failure: eqx.AbstractVar[OnFailure]
    callback: eqx.AbstractVar[Callable[[AdjointStats], None] | None]

    def __check_init__(self):
        who = type(self).__name__
        _checks.tolerance(who, "tol", self.tol)
        _checks.choice(who, "on_failure", self.on_failure, _ON_FAILURE)
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"{who}: `callback` must be callable, got {self.callback!r}.")

    def tolerance(self, solver: AbstractSolver | None, dtype) -> float:
        """The linear solves' relative tolerance: `tol`, or with `tol=None` the forward
        solve's (its atol), or the dtype's [`eqprop_jax.default_tol`][] where there is
        no forward tolerance (no solver, or a fixed-step solve)."""
        if self.tol is not None:
            return self.tol
        if solver is None or solver.fixed_steps:
            return default_tol(dtype)
        return solver.tolerances(dtype)[0]

    def checked_solve(
        self, op: Linear, b: Array, tol: float, batch_buckets: int
    ) -> tuple[Array, Array]:
        """Solve op(x) = b, check it, apply `on_failure`; returns x and the statistics
        (steps, relative residual, failed) as a vector of b's real dtype."""
        x, steps = self.linear_solver.solve(op, b, tol, batch_buckets)
        real = jnp.real(b).dtype
        # One extra matvec: the Krylov loops track an updated residual that drifts
        # from the true one in low precision; the check uses the true one.
        rel = norm(op(x) - b) / jnp.maximum(norm(b), jnp.finfo(real).tiny)
        threshold = self.linear_solver.failure_threshold(tol, real)
        converged = jnp.isfinite(rel) & (rel <= threshold)
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

    def apply(self, primal, fn, inputs, solver, *, probe=None, best_so_far=False):
        dyn, z0 = inputs
        tol = self.tolerance(solver, z0.dtype)
        buckets = solver.batch_buckets

        def linear_solve(op, b):
            return self.checked_solve(op, b, tol, buckets)

        return implicit_jvp(
            lambda dyn, z0: primal((dyn, z0), _ragged_loop, 0),
            fn,
            dyn,
            z0,
            probe,
            linear_solve,
            best_so_far,
        )


class Implicit(AbstractLinearAdjoint):
    r"""The implicit function theorem, (I - Jᵀ) u = g solved by `linear_solver`.

    `linear_solver`: an [`eqprop_jax.AbstractLinearSolver`][]:
    [`eqprop_jax.BiCGStab`][] (the default), [`eqprop_jax.GMRES`][] (slower here but
    the most robust, e.g. when BiCGStab breaks down on a strongly non-normal J),
    [`eqprop_jax.NormalCG`][] (CG on the normal equations) or
    [`eqprop_jax.Richardson`][] (the adjoint fixed-point iteration; see the presets
    [`eqprop_jax.AlmeidaPineda`][], [`eqprop_jax.Neumann`][],
    [`eqprop_jax.PhantomGradient`][]). Each carries its own step budget:
    `Implicit(GMRES(max_steps=50, restart=30), tol=1e-10)`.

    The solve stops when ‖A x - b‖₂ <= tol ‖b‖₂ (relative); `tol=None` follows the
    forward solve. Under `vmap` the solves are per-example ragged loops with the
    forward solver's `batch_buckets` bucket sizes (except NormalCG's, in lockstep).
    """

    linear_solver: AbstractLinearSolver = BiCGStab()
    tol: float | None = eqx.field(default=None, kw_only=True)
    on_failure: OnFailure = eqx.field(default="nan", kw_only=True)
    callback: Callable[[AdjointStats], None] | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                "Implicit: `linear_solver` must be an eqprop_jax linear solver (BiCGStab(), "
                f"GMRES(), NormalCG(), Richardson()), got {self.linear_solver!r}."
            )


class AlmeidaPineda(AbstractLinearAdjoint):
    r"""Recurrent backpropagation (Almeida 1987; Pineda 1987): a preset of
    [`eqprop_jax.Richardson`][]`(max_steps)`.

    Iterates the adjoint fixed point u_{k+1} = Jᵀ u_k + g from u_0 = 0 until
    ‖g - (I - Jᵀ) u‖₂ <= tol ‖g‖₂ or `max_steps`. It converges iff the spectral
    radius of J is below one, i.e. iff the forward fixed point is linearly stable;
    otherwise use [`eqprop_jax.Implicit`][]. Each step costs one vector-Jacobian
    product of f. (Forward mode iterates x_{k+1} = J x_k + b likewise.) Under `vmap`
    each example stops on its own and the iteration is a
    [`eqprop_jax.ragged_while_loop`][] with the forward solver's `batch_buckets`.

    `AlmeidaPineda(max_steps)` computes exactly what
    `Implicit(Richardson(max_steps))` does.
    """

    max_steps: int = 1000
    tol: float | None = eqx.field(default=None, kw_only=True)
    on_failure: OnFailure = eqx.field(default="nan", kw_only=True)
    callback: Callable[[AdjointStats], None] | None = eqx.field(default=None, kw_only=True)

    def __check_init__(self):
        _checks.positive_int("AlmeidaPineda", "max_steps", self.max_steps)

    @property
    def linear_solver(self) -> Richardson:
        return Richardson(self.max_steps)


class Neumann(AbstractLinearAdjoint):
    r"""Truncated Neumann series u = Σ_{i=0}^{k} (Jᵀ)^i g: a preset of
    [`eqprop_jax.Richardson`][]`(k + 1, truncated=True)`.

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

    @property
    def linear_solver(self) -> Richardson:
        return Richardson(self.k + 1, truncated=True)


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
    [`eqprop_jax.Neumann`][]) support both modes. A `probe` is not used.
    """

    mode: Literal["reverse", "forward"] = "reverse"

    def __check_init__(self):
        _checks.choice("Unrolled", "mode", self.mode, ("reverse", "forward"))

    def apply(self, primal, fn, inputs, solver, *, probe=None, best_so_far=False):
        del fn, solver, probe, best_so_far
        if self.mode == "forward":
            z, *rest = primal(inputs, _lax_loop, 1)
            return (eqxi.nondifferentiable_backward(z, msg=_NO_REVERSE), *rest)
        try:
            return primal(inputs, _checkpointed_loop, 1)
        except TypeError as e:
            if "forward-mode" not in str(e) and "jvp" not in str(e):
                raise
            raise TypeError(
                "fixed_point: forward-mode autodiff (jax.jvp, jax.jacfwd) is not supported "
                "through adjoint=Unrolled(), which differentiates the loop in reverse mode "
                "only. Use Unrolled(mode='forward') for forward mode through the iterations, "
                "or an implicit adjoint (both modes): Implicit(), AlmeidaPineda() or Neumann(k)."
            ) from None


_NO_REVERSE = (
    "fixed_point: adjoint=Unrolled(mode='forward') differentiates the iterations in "
    "forward mode only (jax.jvp, jax.jacfwd); for reverse mode (jax.grad, jax.vjp) use "
    "Unrolled() (mode='reverse') or an implicit adjoint."
)


# -- inexact gradients: truncations that are cheap by design ------------------------


class JacobianFree(AbstractLinearAdjoint):
    r"""Jacobian-free backpropagation (Fung et al. 2022, "JFB: Jacobian-free
    backpropagation for implicit networks", AAAI).

    Replaces (I - Jᵀ)⁻¹ by the identity: u = g, so dL/dθ ≈ gᵀ ∂f/∂θ at z*, the
    gradient of one application of f at the equilibrium with z* held fixed
    (forward mode likewise returns x = b = ∂f/∂θ · θ̇). It is exactly
    [`eqprop_jax.Neumann`][]`(0)` (the series Σ_{i=0}^{0} (Jᵀ)^i g = g) and
    [`eqprop_jax.PhantomGradient`][]`(k=1, damping=1.0)`, but not a preset of
    [`eqprop_jax.Richardson`][]: that one step from u_0 = 0 would cost a product with
    Jᵀ (of zero) and count as one iteration, where this costs none and counts none.

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

    @property
    def linear_solver(self) -> AbstractLinearSolver:
        return _Identity()


class PhantomGradient(AbstractLinearAdjoint):
    r"""Unrolled phantom gradient (Geng, Zhang, Bai, Wang & Lin 2021, "On training
    implicit models", NeurIPS), with `k` steps and damping λ = `damping`: a preset of
    [`eqprop_jax.Richardson`][]`(k, damping, truncated=True)`.

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

    @property
    def linear_solver(self) -> Richardson:
        return Richardson(self.k, self.damping, truncated=True)
