"""How the relaxation phases of a training step ended, counted on the device."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Int

from ..equilibrium import Result

N_STATUSES = len(Result.names)


def phase_statuses(aux) -> list[Array]:
    """The per-example status codes ([`eqprop_jax.Result`][]) of every phase an
    estimator reports in its `aux`; empty when it reports none (e.g. DTP, BPTT)."""
    from .. import estimators

    helper = getattr(estimators, "phase_results", None)
    if helper is not None:
        return [jnp.asarray(r) for r in jtu.tree_leaves(helper(aux))]
    if not isinstance(aux, Mapping):
        return []
    return [jnp.asarray(aux[k]) for k in ("result", "nudged_result") if aux.get(k) is not None]


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
