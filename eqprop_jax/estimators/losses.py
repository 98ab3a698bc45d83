"""The classification loss shared by the estimators that read class scores directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Scalar


def cross_entropy(logits: Float[Array, " n"], y: Int[Array, ""] | Float[Array, " n"]) -> Scalar:
    r"""Softmax cross-entropy of one example, −Σ_k t_k log softmax(z)_k.

    `y` is an integer label (t = one-hot(y): −log softmax(z)_y) or a probability
    vector t of the logits' size. Stable for any logits (`jax.nn.log_softmax` shifts
    by the maximum). Batch it with `jax.vmap`.
    """
    logp = jax.nn.log_softmax(logits)
    if jnp.issubdtype(y.dtype, jnp.integer):
        return -logp[y]
    return -jnp.sum(y * logp)


__all__ = ["cross_entropy"]
