"""Eager checks and vmapped helpers shared by the energy-model estimators."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array


def check_batch(who: str, model, x: Array, y: Array) -> Array:
    """Raise a clear error for a batch `x, y` the model cannot take (before tracing).

    Returns `y`. Under `jit` label values are not known in Python; then integer labels
    come back wrapped in a run-time check (`eqx.error_if`) against the model's
    `n_outputs`, so an out-of-range label fails loudly instead of one-hot encoding to
    zeros.
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
    if (
        isinstance(y, jax.core.Tracer)
        and isinstance(n_out, int)
        and jnp.issubdtype(jnp.result_type(y), jnp.integer)
    ):
        y = eqx.error_if(y, (y < 0) | (y >= n_out), f"{who}: labels out of range (0..{n_out - 1})")
    return y


def batch_mean(fn, *args):
    """Mean over the batch of a per-example scalar `fn(*args)`, args batched on axis 0."""
    return jnp.mean(jax.vmap(fn)(*args))


def free_phase_summary(model, free, y: Array) -> tuple[Array, dict]:
    """Batch-mean loss at the free equilibrium and the `aux` entries shared by the
    EP-type estimators: "state", "predictions", "stats" and "result" of the free phase.

    `free` is the batched [`eqprop_jax.Solution`][] of the free phase.
    """
    s0 = free.value
    aux = {
        "state": s0,
        "predictions": jax.vmap(model.predict)(s0),
        "stats": free.stats,
        "result": free.result,
    }
    return batch_mean(model.loss, s0, y), aux
