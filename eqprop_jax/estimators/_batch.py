"""Eager checks and vmapped helpers shared by the energy-model estimators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array


def check_batch(who: str, model, x: Array, y: Array) -> None:
    """Raise a clear error for a batch `x, y` the model cannot take (before tracing)."""
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


def batch_mean(fn, *args):
    """Mean over the batch of a per-example scalar `fn(*args)`, args batched on axis 0."""
    return jnp.mean(jax.vmap(fn)(*args))
