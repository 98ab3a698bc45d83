"""Accuracy and loss of a model at its free equilibrium, in batches of one static shape."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..equilibrium import batch_compaction
from ..losses import cross_entropy
from ..models.base import AbstractEnergyModel, AbstractModel
from .progress import Progress
from .sharding import shard_batch


def _predict_one(model, x, y, solver):
    """Class scores and loss of one example: at the free equilibrium of an energy
    model, else the logits `model(x)` of a feedforward net and their cross-entropy."""
    if not isinstance(model, AbstractEnergyModel):
        logits = model(x)
        return logits, cross_entropy(logits, y)
    sol = model.relax(x, y, 0.0) if solver is None else model.relax(x, y, 0.0, solver=solver)
    return model.predict(sol.value), model.loss(sol.value, y)


def _eval_counts(model, x, y, mask, solver):
    logits, loss = jax.vmap(_predict_one, in_axes=(None, 0, 0, None))(model, x, y, solver)
    logits, loss = jnp.real(logits), jnp.real(loss)
    finite = jnp.all(jnp.isfinite(logits), axis=-1) & jnp.isfinite(loss)
    # A non-finite prediction is never counted as correct (argmax of NaN is 0).
    correct = (jnp.argmax(logits, axis=-1) == y) & finite & mask
    nonfinite = ~finite & mask
    return jnp.sum(correct), jnp.sum(jnp.where(mask, loss, 0.0)), jnp.sum(nonfinite)


@eqx.filter_jit
def _eval_batch(model, x, y, mask, solver, compaction: bool):
    with batch_compaction(compaction):  # a Python bool: static, in the cache key
        return _eval_counts(model, x, y, mask, solver)


def evaluate(
    model: AbstractModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 500,
    solver: Any = None,
    mesh=None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Accuracy, mean loss and the fraction of non-finite predictions over (x, y),
    each example relaxed by the model itself (an energy model: `model.relax(x, y,
    beta=0)` then `predict`; any other model: the logits `model(x)`).

    Batches have one static shape (the last one is padded and masked), so this
    compiles once. A non-finite prediction counts as wrong and makes the loss NaN.
    """
    return _evaluate(
        model, x, y, batch_size=batch_size, solver=solver, mesh=mesh, progress=progress
    )


def _evaluate(
    model, x, y, *, batch_size, solver, mesh, progress, stop: Callable[[], bool] | None = None
) -> dict[str, float] | None:
    """`evaluate`, abandoned (returning None) when `stop()` turns true between batches:
    `fit` stops within one batch of a SIGINT/SIGTERM instead of after a whole pass."""
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(
            f"evaluate needs as many labels as examples, at least one; got {n} "
            f"examples and {len(y)} labels."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be a positive integer, got {batch_size!r}.")
    if mesh is not None:
        d = mesh.devices.size
        batch_size = max(d, batch_size // d * d)
    batch_size = min(batch_size, n) if mesh is None else batch_size
    correct, total_loss, nonfinite = 0, 0.0, 0
    bar = Progress(math.ceil(n / batch_size), "eval", enabled=progress)
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        m = len(xb)
        mask = np.arange(batch_size) < m
        if m < batch_size:
            xb = np.concatenate([xb, np.repeat(xb[:1], batch_size - m, 0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], batch_size - m, 0)])
        batch = (jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(mask))
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        # A sharded batch is stepped in lockstep: see eqprop_jax.batch_compaction.
        c, s, bad = jax.device_get(_eval_batch(model, *batch, solver, mesh is None))
        correct += int(c)
        total_loss += float(s)
        nonfinite += int(bad)
        bar.update()
        if stop is not None and stop():
            bar.close()
            return None
    bar.close()
    return {"accuracy": correct / n, "loss": total_loss / n, "nonfinite": nonfinite / n}
