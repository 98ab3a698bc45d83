"""Validation of settings at construction time, and the dtype-aware default tolerance."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

# Default tolerance of a solve, by the real dtype of its state. Each is about 10-50
# ulps at unit scale (eps: float64 2.2e-16, float32 1.2e-7, float16 9.8e-4, bfloat16
# 7.8e-3), so a solve can reach it through round-off, and a float64 solve is exact to
# ~1e-12 rather than to a float32-level 1e-6.
DEFAULT_TOL = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-6,
    np.dtype(np.float16): 1e-3,
    np.dtype(jnp.bfloat16): 1e-2,
}


def default_tol(dtype: Any) -> float:
    """The default tolerance for a state of `dtype` (complex dtypes use their real part).

    float64: 1e-12, float32: 1e-6, float16: 1e-3, bfloat16: 1e-2.
    """
    real = np.dtype(jnp.finfo(dtype).dtype)
    try:
        return DEFAULT_TOL[real]
    except KeyError:  # e.g. float8: a few ulps at unit scale
        return float(10 * jnp.finfo(real).eps)


def tolerance(who: str, name: str, value: Any, *, allow_none: bool = True) -> None:
    """`value` must be a finite, non-negative Python number (or None where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{who}: `{name}` must be a Python float, got {type(value).__name__} {value!r}; "
            "tolerances are static settings (they fix the compiled program)."
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{who}: `{name}` must be finite and non-negative, got {value}.")


def positive_int(who: str, name: str, value: Any, *, minimum: int = 1) -> None:
    """`value` must be a Python int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{who}: `{name}` must be a Python int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{who}: `{name}` must be at least {minimum}, got {value}.")


def choice(who: str, name: str, value: Any, options: tuple) -> None:
    """`value` must be one of `options` (catches typos such as on_failure="rasie")."""
    if value not in options:
        raise ValueError(f"{who}: `{name}` must be one of {options}, got {value!r}.")
