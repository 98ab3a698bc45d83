r"""The phase engine of the EP-type estimators: nudges, relaxed phases, their statuses.

Every EP-type estimator (and the step-by-step traces in `eqprop_jax.diagnostics`)
runs the same two phases on each example:

1. the free phase, s⁰ = argmin_s E(s, x) (`model.relax` at β = 0);
2. nudged phases from s⁰ (held constant: `stop_gradient`), s^{β_p} = argmin_s
   E + β_p C, one per nudge β_p of a scheme ([`nudge_points`][]), or any other
   relaxation from s⁰ (a clamped phase, a step-by-step trajectory).

[`relax_phases`][] runs both under `vmap` over the batch (the nudges of one example
under an inner `vmap`, so a scheme's phases share one batched solve) and returns
[`Phases`][]; the estimators only differ in what they compute from the states. The
statuses of all phases reach `aux` the same way for every estimator
([`phase_aux`][], [`phase_results`][], [`nan_if_nonfinite`][]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from ..equilibrium import AbstractSolver, Picard, Result, Solution
from ..models.base import AbstractEnergyModel

# The two-point schemes: β1 = lo·β, β2 = hi·β (Laborieux et al. 2021).
TWO_POINT = {"positive": (0.0, 1.0), "negative": (-1.0, 0.0), "centered": (-1.0, 1.0)}
VARIANTS = (*TWO_POINT, "holomorphic")


# -- nudges --------------------------------------------------------------------------


class Nudges(eqx.Module):
    r"""The nudges β_p of a scheme and the weights c_p of its estimate
    ĝ = ∂/∂θ Σ_p c_p Re F(θ, s^{β_p}, β_p).

    `free_point` is the index of the point β = 0 of a one-sided scheme, whose state
    is the free state itself: only the other points are relaxed (`relaxed`).
    """

    betas: Array
    weights: Array
    free_point: int | None = eqx.field(static=True, default=None)

    @property
    def relaxed(self) -> Array:
        """The nudges whose phases are run (every point but the free one)."""
        if self.free_point is None:
            return self.betas
        return jnp.delete(self.betas, self.free_point, assume_unique_indices=True)

    def astype(self, dtype: Any) -> Nudges:
        """The nudges cast to the states' `dtype` (complex for complex nudges); the
        weights keep their precision."""
        if jnp.iscomplexobj(self.betas):
            dtype = jnp.result_type(dtype, jnp.complex64)
        return Nudges(self.betas.astype(dtype), self.weights, self.free_point)

    def states(self, phases: Phases) -> PyTree[Array]:
        """The state at every point, shape (batch, P, ...): the nudged phases' states
        with the free state put in at `free_point`."""
        states = phases.nudged.value
        if self.free_point is None:
            return states
        free = jax.tree_util.tree_map(lambda s: s[:, None], phases.free.value)
        pieces = [states, free] if self.free_point else [free, states]
        return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], 1), *pieces)


def nudge_points(beta: Any, variant: str, n_points: int = 2) -> Nudges:
    r"""The [`Nudges`][] of a scheme; `beta` may be a traced scalar.

    positive (0, β); negative (−β, 0); centered (−β, β), each with weights
    ±1/(β2 − β1), so that ĝ = [∂F/∂θ(s^{β2}, β2) − ∂F/∂θ(s^{β1}, β1)] / (β2 − β1)
    (bias O(β) one-sided, O(β²) centered; Laborieux et al. 2021). holomorphic
    (Laborieux & Zenke 2022): β_k = |β| e^{2πik/N} for k = 0..⌊N/2⌋ with
    c_k = w_k/(N β_k), w_k = 2 for the points whose conjugate partner k' = N − k is
    folded in (Re of a conjugate pair is twice the real part) and 1 for β_0 = |β|
    and, for even N, β_{N/2} = −|β|.
    """
    if variant == "holomorphic":
        r = jnp.abs(beta)
        ks = np.arange(n_points // 2 + 1)
        w = np.where((ks == 0) | (2 * ks == n_points), 1.0, 2.0)
        betas = r * jnp.exp(2j * np.pi * ks / n_points)
        return Nudges(betas, w / (n_points * betas))
    lo, hi = TWO_POINT[variant]
    betas = jnp.stack([lo * beta, hi * beta])
    scale = 1.0 / ((hi - lo) * beta)
    free = {"positive": 0, "negative": 1}.get(variant)
    return Nudges(betas, jnp.stack([-scale, scale]), free)


def random_sign(who: str, beta: Array, key: PRNGKeyArray | None) -> Array:
    """β with its sign flipped at random (Scellier & Bengio 2017: it cancels the
    one-sided bias on average); needs a PRNG `key`."""
    if key is None:
        raise ValueError(f"{who}: `random_sign=True` needs a PRNG `key`.")
    return jnp.where(jax.random.bernoulli(key), beta, -beta)


def state_dtype(model: AbstractEnergyModel, x: Array) -> Any:
    """The dtype of the model's state for the batch `x` (read without computing it)."""
    return jax.tree_util.tree_leaves(jax.eval_shape(model.init_state, x[0]))[0].dtype


# -- relaxed phases ------------------------------------------------------------------


class Phases(eqx.Module):
    """The relaxed phases of a batch.

    - `free`: the free phase, leaves of shape (batch, ...);
    - `nudged`: the P phases run from the free state, leaves (batch, P, ...).
    """

    free: Solution
    nudged: Solution


def phase_solver(solver: AbstractSolver | None, steps: int) -> AbstractSolver:
    """`solver`, or by default `Picard(tol=0, max_steps=steps)`: a phase of a fixed
    number of steps, as in the papers."""
    return Picard(tol=0.0, max_steps=steps) if solver is None else solver


NudgedPhases = Callable[[Array, Array, PyTree[Array]], Solution]


def relax_free(model: AbstractEnergyModel, x: Array, y: Array, solver: AbstractSolver) -> Solution:
    """The free phase of every example (β = 0, from `init_state`), batched."""
    return jax.vmap(lambda xi, yi: model.relax(xi, yi, 0.0, solver=solver))(x, y)


def nudged_relaxations(
    model: AbstractEnergyModel, betas: Array, solver: AbstractSolver
) -> NudgedPhases:
    """`(x, y, s0) -> Solution`: the phases of one example at each nudge of `betas`,
    relaxed from s0 under one `vmap` (leaves (P, ...))."""

    def run(xi, yi, s0):
        return jax.vmap(lambda b: model.relax(xi, yi, b, s0, solver=solver))(betas)

    return run


def relax_phases(
    model: AbstractEnergyModel,
    x: Array,
    y: Array,
    nudged: NudgedPhases,
    free_solver: AbstractSolver,
) -> Phases:
    """The free phase of each example, then `nudged(x, y, s⁰)` from its free state s⁰.

    s⁰ is held constant in the nudged phases (`stop_gradient`): the estimate is a
    difference of equilibria, not a derivative through the relaxation.
    `nudged` is [`nudged_relaxations`][] for EP's nudges, or any relaxation of one
    example that returns a [`eqprop_jax.Solution`][] with a leading axis over its
    phases.
    """

    def per_example(xi, yi):
        free = model.relax(xi, yi, 0.0, solver=free_solver)
        return free, nudged(xi, yi, lax.stop_gradient(free.value))

    return Phases(*jax.vmap(per_example)(x, y))


def relax_nudges(
    model: AbstractEnergyModel,
    x: Array,
    y: Array,
    nudges: Nudges,
    free_solver: AbstractSolver,
    nudged_solver: AbstractSolver,
) -> Phases:
    """The free phase, then a nudged phase at each nudge of `nudges` but the free
    point ([`relax_phases`][] with [`nudged_relaxations`][])."""
    nudged = nudged_relaxations(model, nudges.relaxed, nudged_solver)
    return relax_phases(model, x, y, nudged, free_solver)


def batched_step(model: AbstractEnergyModel, s: PyTree, x: Array, y: Array, beta: Any) -> PyTree:
    """One `model.step` for every example of a batch of states."""
    return jax.vmap(lambda si, xi, yi: model.step(si, xi, yi, beta))(s, x, y)


def trajectory(
    model: AbstractEnergyModel, x: Array, y: Array, s0: PyTree, beta: Any, steps: int
) -> tuple[PyTree, PyTree]:
    """A nudged phase step by step: (s_t, s_{t+1}) for t = 0..steps−1 from s_0 = `s0`,
    each with a leading time axis (a batch of states, `lax.scan`)."""

    def body(s, _):
        s_new = batched_step(model, s, x, y, beta)
        return s_new, (s, s_new)

    return lax.scan(body, s0, length=steps)[1]


def energy_grads(
    params: PyTree, static: PyTree, s: PyTree, x: Array, y: Array, beta: Any
) -> PyTree:
    """∂/∂θ of the batch mean of F(θ, s, β) = E + βC at the states `s`, with the model
    given as `eqx.partition(model, eqx.is_inexact_array)`."""

    def mean_f(p):
        m = eqx.combine(p, static)
        return jnp.mean(jax.vmap(lambda si, xi, yi: m.total_energy(si, xi, yi, beta))(s, x, y))

    return jax.grad(mean_f)(params)


# -- statuses ------------------------------------------------------------------------


def max_abs_change(a: PyTree[Array], b: PyTree[Array]) -> Array:
    """max |a − b| over every leaf of two states of one example (unscaled)."""
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: jnp.abs(u - v), a, b))
    return jnp.max(jnp.stack([jnp.max(leaf) for leaf in leaves]))


def all_finite(tree: PyTree[Array]) -> Array:
    """Whether every leaf of `tree` is free of NaN and inf (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(tree)]))


def fixed_steps_result(state: PyTree[Array]) -> Int[Array, ""]:
    """The status of a phase that runs a fixed number of steps outside `fixed_point`
    (BPTT's unrolled relaxation, C-EP's nudged phase), for one example.

    `nonfinite` if the final state holds NaN or inf, else `max_steps`: like a
    `fixed_point` solve with `tol = 0`, nothing was tested for convergence.
    """
    return jnp.where(all_finite(state), Result.max_steps, Result.nonfinite).astype(jnp.int32)


def phase_aux(free: Solution, nudged: Solution | None = None) -> dict:
    """The status entries of `aux` (see [`eqprop_jax.estimators.Estimator`][]).

    `free` is the batched solve of the free phase (`result` of shape (batch,)) and
    `nudged`, if any, the nudged phases with `result` of shape (batch, n_nudged).
    """
    aux = {"result": free.result, "stats": free.stats}
    if nudged is not None:
        aux.update(nudged_result=nudged.result, nudged_stats=nudged.stats)
    return aux


def phase_results(aux: dict) -> Int[Array, "batch phases"]:
    """Every phase status in an estimator's `aux`, as an int32 array (batch, n_phases).

    Column 0 is the free phase (`aux["result"]`), the others the nudged phases
    (`aux["nudged_result"]`), each an [`eqprop_jax.Result`][] code. An estimator that
    runs no solve (DTP, plain backprop) gives shape (0, 0). E.g. the fraction of
    phases that went non-finite is `jnp.mean(phase_results(aux) == Result.nonfinite)`.
    """
    if "result" not in aux:
        return jnp.zeros((0, 0), jnp.int32)
    free = jnp.asarray(aux["result"], jnp.int32)
    cols = [free[:, None]]
    if "nudged_result" in aux:
        cols.append(jnp.asarray(aux["nudged_result"], jnp.int32).reshape(free.shape[0], -1))
    return jnp.concatenate(cols, axis=1)


def nan_if_nonfinite(loss: Array, grads: PyTree, aux: dict) -> tuple[Array, PyTree]:
    """`loss` and `grads` turned to NaN when any phase of `aux` went non-finite.

    A phase that met NaN or inf has no valid equilibrium, so no estimate built on it
    is valid either; NaN makes that impossible to miss (a finite-looking loss or a
    zero gradient would train on garbage silently).
    """
    bad = jnp.any(phase_results(aux) == Result.nonfinite)
    nan = lambda a: jnp.where(bad, jnp.nan, a)
    return nan(loss), jax.tree_util.tree_map(nan, grads)


def free_phase_summary(
    model: AbstractEnergyModel, free: Solution, y: Array, nudged: Solution | None = None
) -> tuple[Array, dict]:
    """Batch-mean loss at the free equilibrium and the `aux` entries shared by the
    EP-type estimators: "state", "predictions", and the phase statuses of
    [`phase_aux`][].

    `free` is the batched [`eqprop_jax.Solution`][] of the free phase.
    """
    s0 = free.value
    aux = {"state": s0, "predictions": jax.vmap(model.predict)(s0), **phase_aux(free, nudged)}
    return jnp.mean(jax.vmap(model.loss)(s0, y)), aux


def finish(
    model: AbstractEnergyModel, phases: Phases, y: Array, grads: PyTree, /, **extra: Any
) -> tuple[Array, PyTree, dict]:
    """`loss, grads, aux` of an EP-type estimator from its phases and estimate: the
    loss at the free state, the shared `aux` entries (plus `extra`), and NaN in
    `loss` and `grads` if any phase went non-finite."""
    loss, aux = free_phase_summary(model, phases.free, y, phases.nudged)
    aux.update(extra)
    loss, grads = nan_if_nonfinite(loss, grads, aux)
    return loss, grads, aux


__all__ = [
    "TWO_POINT",
    "VARIANTS",
    "Nudges",
    "Phases",
    "all_finite",
    "batched_step",
    "energy_grads",
    "finish",
    "fixed_steps_result",
    "free_phase_summary",
    "max_abs_change",
    "nan_if_nonfinite",
    "nudge_points",
    "nudged_relaxations",
    "phase_aux",
    "phase_results",
    "phase_solver",
    "random_sign",
    "relax_free",
    "relax_nudges",
    "relax_phases",
    "state_dtype",
    "trajectory",
]
