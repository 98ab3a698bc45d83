"""Shuffled batches from an explicit key, and JAX data augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


def epoch_order(key: PRNGKeyArray, epoch: int, n: int) -> np.ndarray:
    """The example order of epoch `epoch`: a permutation of range(n) drawn from
    `fold_in(key, epoch)`, so any epoch's order can be rebuilt after a restart."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))


def steps_per_epoch(n: int, batch_size: int, max_steps: int | None = None) -> int:
    """Full batches per epoch (the remainder is dropped so every step has one shape)."""
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {n} training examples.")
    return steps if max_steps is None else max(1, min(steps, max_steps))


def batch_indices(order: np.ndarray, position: int, batch_size: int) -> np.ndarray:
    """Indices of batch number `position` within an epoch order."""
    return order[position * batch_size : (position + 1) * batch_size]


def random_crop_flip(
    key: PRNGKeyArray, x: Float[Array, "batch ..."], padding: int = 4, *, channels_first=False
) -> Float[Array, "batch ..."]:
    """Random translation by up to `padding` pixels (zero padding) and horizontal flip.

    The usual CIFAR augmentation (e.g. Laborieux et al. 2021), on NHWC batches (NCHW
    with `channels_first`).
    """
    if x.ndim != 4:
        raise ValueError(f"random_crop_flip expects 4-d image batches, got shape {x.shape}.")
    if channels_first:
        out = random_crop_flip(key, jnp.moveaxis(x, 1, -1), padding)
        return jnp.moveaxis(out, -1, 1)
    n, h, w, c = x.shape
    kc, kf = jax.random.split(key)
    offsets = jax.random.randint(kc, (n, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(kf, 0.5, (n,))
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def one(img, off, flip):
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)
