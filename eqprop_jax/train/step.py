"""One training step, jitted once: estimate, update, project, refuse what is not finite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from jaxtyping import Array, PyTree

from ..data.batching import random_crop_flip
from ..equilibrium import batch_compaction
from .optim import OptimizerSettings
from .statuses import count_statuses

# Why a step was refused (0: accepted).
REFUSED = {
    1: "non-finite loss",
    2: "non-finite gradient",
    3: "an update that makes the parameters or the optimiser state non-finite",
}


def _all_finite(tree) -> Array:
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _fill_missing(grads: PyTree, params: PyTree) -> PyTree:
    """Zeros where an estimator returns no gradient for a trainable array."""
    return jtu.tree_map(
        lambda p, g: g if p is None or g is not None else jnp.zeros_like(p),
        params,
        grads,
        is_leaf=lambda x: x is None,
    )


class _StepSpec(eqx.Module):
    """What a training step closes over; hashable, so equal specs share one compilation."""

    estimator: Any
    tx: Any = eqx.field(static=True)  # OptimizerSettings (hashed by value) or optax's
    augment: bool = eqx.field(static=True)
    channels_first: bool = eqx.field(static=True)
    compaction: bool = eqx.field(static=True, default=True)


@eqx.filter_jit(donate="all-except-first")
def _train_step(spec: _StepSpec, model, opt_state, counts, x, y, key):
    with batch_compaction(spec.compaction):  # static, so part of the jit cache key
        return _train_step_body(spec, model, opt_state, counts, x, y, key)


def _train_step_body(spec: _StepSpec, model, opt_state, counts, x, y, key):
    estimator = spec.estimator
    k_aug, k_pre, k_est = jax.random.split(key, 3)
    if spec.augment:
        x = random_crop_flip(k_aug, x, channels_first=spec.channels_first)
    new = estimator.pre_step(model, x, y, key=k_pre)
    loss, grads, aux = estimator(new, x, y, key=k_est)
    counts = counts + count_statuses(aux)
    params = eqx.filter(new, eqx.is_inexact_array)
    grads = _fill_missing(grads, params)
    tx = spec.tx(params) if isinstance(spec.tx, OptimizerSettings) else spec.tx
    updates, new_opt = tx.update(grads, opt_state, params)
    candidate = eqx.apply_updates(new, updates).project()
    # The state after the update is checked, not only the one before: an update that
    # overflows is refused like a NaN loss.
    flag = jnp.select(
        [
            ~jnp.isfinite(loss),
            ~_all_finite(grads),
            ~(_all_finite(candidate) & _all_finite(new_opt)),
        ],
        [1, 2, 3],
        0,
    )
    keep = lambda a, b: jnp.where(flag == 0, a, b) if eqx.is_array(a) else a
    model = jtu.tree_map(keep, candidate, model)
    opt_state = jtu.tree_map(keep, new_opt, opt_state)
    return model, opt_state, counts, loss, flag


def make_train_step(
    estimator,
    tx: optax.GradientTransformation | OptimizerSettings,
    *,
    augment: bool = False,
    channels_first: bool = False,
    compaction: bool = True,
) -> Callable:
    """`model, opt_state, counts, loss, flag = step(model, opt_state, counts, x, y, key)`,
    jitted once.

    One step: the estimator's `pre_step` (e.g. DTP's feedback training), the
    gradient estimate, the optax update, then projection onto the model's admissible
    set. `counts` (int32, shape (4,)) adds up how the estimator's relaxation phases
    ended (converged, max_steps, diverged, nonfinite; see
    [`eqprop_jax.train.statuses.count_statuses`][]) without leaving the device.
    `flag` is 0 when the step was applied; 1, 2 or 3 when the loss, a gradient, or
    the updated parameters or optimiser state were NaN/inf: then the old model and
    optimiser state come back unchanged. The model, optimiser state, counts and
    batch are donated (the caller must not reuse them). `compaction=False` steps
    vmapped solves in lockstep (see [`eqprop_jax.batch_compaction`][]): what a batch
    sharded over several devices needs.
    """
    spec = _StepSpec(estimator, tx, augment, channels_first, compaction)
    return lambda model, opt_state, counts, x, y, key: _train_step(
        spec, model, opt_state, counts, x, y, key
    )
