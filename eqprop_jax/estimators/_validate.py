"""Validators of estimator settings, shared so that every estimator says the same thing."""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


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
