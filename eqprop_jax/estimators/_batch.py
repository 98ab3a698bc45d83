"""Batch checks, phase statuses and the `aux` entries shared by the estimators."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PyTree

from ..equilibrium import Result, Solution


def check_labels(who: str, y: Array, n_outputs: int) -> Array:
    """Integer labels `y`, checked to lie in [0, n_outputs).

    Concrete labels raise a `ValueError` at once. Under `jit` their values are not
    known in Python, so `y` comes back wrapped in a run-time check (`eqx.error_if`,
    one reduction over the batch): an out-of-range label would otherwise one-hot
    encode to zeros, or index out of bounds, and train on garbage without a word.
    Float targets are returned unchanged.
    """
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        return y
    msg = f"{who}: labels out of range: the model has {n_outputs} outputs"
    msg += f" (labels 0..{n_outputs - 1})"
    if isinstance(y, jax.core.Tracer):
        return eqx.error_if(y, (y < 0) | (y >= n_outputs), msg + ".")
    # NumPy, not jnp: inside a `jit` trace jnp would stage even concrete labels out.
    labels = np.asarray(y)
    if labels.size and (labels.min() < 0 or labels.max() >= n_outputs):
        raise ValueError(f"{msg}; y spans [{labels.min()}, {labels.max()}].")
    return y


def check_batch(who: str, model, x: Array, y: Array) -> Array:
    """Raise a clear error for a batch `x, y` the model cannot take (before tracing).

    Returns `y`, range-checked against the model's `n_outputs` by [`check_labels`][]
    (a model without an integer `n_outputs` gets no range check).
    """
    if jnp.ndim(x) < 1 or jnp.ndim(y) < 1:
        raise ValueError(
            f"{who}: x and y must be batches with a leading axis; got shapes "
            f"{jnp.shape(x)} and {jnp.shape(y)}."
        )
    if jnp.shape(x)[0] != jnp.shape(y)[0]:
        raise ValueError(
            f"{who}: x and y hold different numbers of examples: {jnp.shape(x)[0]} vs "
            f"{jnp.shape(y)[0]}."
        )
    check = getattr(model, "check_input", None)
    if check is not None:
        check(x, y)
    n_out = getattr(model, "n_outputs", None)
    if isinstance(n_out, int | np.integer) and not isinstance(n_out, bool):
        y = check_labels(who, y, int(n_out))
    return y


def batch_mean(fn, *args):
    """Mean over the batch of a per-example scalar `fn(*args)`, args batched on axis 0."""
    return jnp.mean(jax.vmap(fn)(*args))


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


def stack_phases(*phases: Solution) -> Solution:
    """Several phases of one example as one [`eqprop_jax.Solution`][] whose `result`
    and `stats` have a last axis over the phases (the value is dropped)."""
    stack = lambda *a: jnp.stack(a, axis=-1)
    return Solution(
        None,
        stack(*(p.result for p in phases)),
        jax.tree_util.tree_map(stack, *(p.stats for p in phases)),
    )


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
    model, free: Solution, y: Array, nudged: Solution | None = None
) -> tuple[Array, dict]:
    """Batch-mean loss at the free equilibrium and the `aux` entries shared by the
    EP-type estimators: "state", "predictions", and the phase statuses of
    [`phase_aux`][].

    `free` is the batched [`eqprop_jax.Solution`][] of the free phase.
    """
    s0 = free.value
    aux = {"state": s0, "predictions": jax.vmap(model.predict)(s0), **phase_aux(free, nudged)}
    return batch_mean(model.loss, s0, y), aux


__all__ = [
    "all_finite",
    "check_batch",
    "check_labels",
    "fixed_steps_result",
    "free_phase_summary",
    "max_abs_change",
    "nan_if_nonfinite",
    "phase_aux",
    "phase_results",
    "stack_phases",
]
