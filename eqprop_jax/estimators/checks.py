"""Checks of estimator settings and batches, shared so every estimator says the same thing.

Settings (step counts, β, the variant) are checked when an estimator is built; a
batch is checked eagerly when it is called, against the model's declared contract
([`eqprop_jax.AbstractModel`][]: `check_input` and `n_outputs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ..models.base import AbstractEnergyModel, AbstractModel


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def check_steps(who: str, minimum: int = 1, **steps: Any) -> None:
    """Raise unless every named step count is a Python integer ≥ `minimum`.

    A value may also be a tuple of such integers (one per layer, as `DTP` allows).
    """
    for name, value in steps.items():
        values = value if isinstance(value, tuple | list) else (value,)
        if not values or not all(_is_int(v) and v >= minimum for v in values):
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ValueError(f"{who}: `{name}` must be {kind}, got {value!r}.")


def check_variant(who: str, variant: Any, allowed: Sequence[str], name: str = "variant") -> None:
    """Raise unless `variant` is one of the `allowed` names."""
    if variant not in allowed:
        raise ValueError(f"{who}: `{name}` must be one of {tuple(allowed)}, got {variant!r}.")


def check_beta(who: str, beta: Any, *, positive: bool = False) -> None:
    """Raise unless the nudge β is a real scalar, finite and nonzero (> 0 if `positive`).

    EP divides by β, so β = 0 gives inf and β = ±inf or NaN gives NaN. A traced β
    (an estimator built inside `jit`) is left to [`checked_beta`][] at run time.
    """
    if isinstance(beta, complex) or jnp.iscomplexobj(jnp.asarray(beta)):
        raise TypeError(
            f"{who}: `beta` must be real, got {beta!r} (holomorphic EP builds its complex "
            "nudges |β|e^{2πik/N} from a real β)."
        )
    if jnp.ndim(beta) != 0:
        raise ValueError(f"{who}: `beta` must be a scalar, got shape {jnp.shape(beta)}.")
    if isinstance(beta, jax.core.Tracer):
        return
    value = float(beta)
    if not math.isfinite(value) or value == 0.0 or (positive and value < 0):
        want = "finite and > 0" if positive else "finite and nonzero"
        raise ValueError(
            f"{who}: `beta` must be {want} (the estimate divides by the nudge β), got {value}."
        )


def checked_beta(who: str, beta: Any, *, positive: bool = False) -> Any:
    """β, wrapped in a run-time check (`eqx.error_if`) when it is traced.

    An estimator passed through `jit` with an array β sees a tracer here; one scalar
    comparison is all it costs. A concrete β was checked when it was built.
    """
    if not isinstance(beta, jax.core.Tracer):
        return beta
    bad = ~jnp.isfinite(beta) | (beta <= 0 if positive else beta == 0)
    want = "finite and > 0" if positive else "finite and nonzero"
    return eqx.error_if(beta, bad, f"{who}: `beta` must be {want}.")


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


def check_batch(
    who: str, model: AbstractModel, x: Array, y: Array, kind: type = AbstractEnergyModel
) -> Array:
    """Raise a clear error for a model that is not a `kind` (by default an
    [`eqprop_jax.AbstractEnergyModel`][]) or a batch `x, y` it cannot take (before
    tracing).

    Runs `model.check_input(x, y)` and returns `y`, range-checked against
    `model.n_outputs` by [`check_labels`][].
    """
    if not isinstance(model, kind):
        raise TypeError(
            f"{who}: the model must be an eqprop_jax {kind.__name__}, got {type(model).__name__}."
        )
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
    model.check_input(x, y)
    return check_labels(who, y, model.n_outputs)


__all__ = [
    "check_batch",
    "check_beta",
    "check_labels",
    "check_steps",
    "check_variant",
    "checked_beta",
]
