"""How the relaxation phases of a training step ended, counted on the device."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from ..equilibrium import Result

N_STATUSES = len(Result.names)


def phase_statuses(aux) -> list[Array]:
    """The per-example status codes ([`eqprop_jax.Result`][]) of every phase an
    estimator reports in its `aux`; empty when it reports none (e.g. DTP, BPTT)."""
    # Imported here: the estimators import the training package's optimiser helpers.
    from ..estimators.phases import phase_results

    if not isinstance(aux, Mapping) or "result" not in aux:
        return []
    return [phase_results(aux)]


def count_statuses(aux) -> Int[Array, " 4"]:
    """How many (phase, example) pairs ended converged, max_steps, diverged, nonfinite."""
    codes = [jnp.ravel(r) for r in phase_statuses(aux)]
    if not codes:
        return jnp.zeros(N_STATUSES, jnp.int32)
    codes = jnp.concatenate(codes)
    return jnp.sum(codes[:, None] == jnp.arange(N_STATUSES), axis=0, dtype=jnp.int32)


def status_fractions(counts) -> dict[str, float]:
    """`{"phase_converged": ..., ...}`, fractions of the counted phases; {} when none."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return {}
    return {f"phase_{n}": int(c) / total for n, c in zip(Result.names, counts, strict=True)}
