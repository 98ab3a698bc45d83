"""Eager input checks shared by the classifier models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def check_classifier_input(
    who: str,
    x: Array,
    y: Array | None,
    in_shape: tuple[int, ...],
    n_outputs: int,
    *,
    batched: bool = True,
    shape_hint: str = "",
) -> None:
    """Raise a clear error if `x` (and labels or targets `y`) cannot be fed to a model.

    `x` must be real floating point of shape `in_shape` (with a leading batch axis
    when `batched`) and free of NaN/inf; `y` holds integer labels in
    [0, n_outputs) or float targets of size `n_outputs`. Values are checked only
    when concrete (with NumPy, so that concrete arrays closed over by a `jit`-ted
    function are checked too); estimators call this before tracing.
    """
    x_shape = tuple(jnp.shape(x))
    want = ("batch", *in_shape) if batched else tuple(in_shape)
    if len(x_shape) != len(want) or x_shape[len(want) - len(in_shape) :] != tuple(in_shape):
        raise ValueError(
            f"{who}: expected input x of shape {want}{shape_hint}, got shape {x_shape}."
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"{who}: input x must be real floating point, got {jnp.result_type(x)} "
            "(scale images to [0, 1] floats first)."
        )
    if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
        raise ValueError(f"{who}: input x contains NaN or inf.")
    if y is None:
        return
    y_shape = tuple(jnp.shape(y))
    n_batch = (x_shape[0],) if batched else ()
    if jnp.issubdtype(jnp.result_type(y), jnp.integer):
        if y_shape != n_batch:
            raise ValueError(
                f"{who}: integer labels y must have shape {n_batch} to match x {x_shape}, "
                f"got {y_shape}."
            )
        if not isinstance(y, jax.core.Tracer) and jnp.size(y):
            lo, hi = int(np.min(np.asarray(y))), int(np.max(np.asarray(y)))
            if lo < 0 or hi >= n_outputs:
                raise ValueError(
                    f"{who}: labels out of range: y spans [{lo}, {hi}] but the model has "
                    f"{n_outputs} classes (labels 0..{n_outputs - 1})."
                )
    elif jnp.issubdtype(jnp.result_type(y), jnp.floating):
        if y_shape != (*n_batch, n_outputs):
            raise ValueError(
                f"{who}: float targets y must have shape {(*n_batch, n_outputs)}, got {y_shape}."
            )
    else:
        raise TypeError(
            f"{who}: y must hold integer labels or float targets, got {jnp.result_type(y)}."
        )
