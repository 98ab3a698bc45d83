"""optax optimisers with per-layer learning rates, weight decay and cosine schedules."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax.tree_util as jtu
import optax
from jaxtyping import PyTree

# Fields read as the layer after the last indexed one (a readout outside the dynamics).
READOUT_FIELDS = ("readout", "head", "classifier", "output_layer")


def _field_and_index(path) -> tuple[str, int | None]:
    name, index = "", None
    for k in path:
        if isinstance(k, jtu.GetAttrKey) and not name:
            name = k.name
        elif isinstance(k, jtu.SequenceKey) and name and index is None:
            index = k.idx
            break
    return name, index


def layer_indices(params: PyTree) -> PyTree[int]:
    """The layer number of every array leaf of `params` (a filtered model).

    A leaf's layer is the first sequence index after its top-level field
    (`.weights[2]`, `.biases[2]`, `.forward[2].weight` -> 2). Leaves under a readout
    field (`readout`, `head`, ...) or under no indexed field come after the last
    indexed layer.
    """
    leaves = jtu.tree_leaves_with_path(params)
    found = [_field_and_index(p) for p, _ in leaves]
    top = max((i for name, i in found if i is not None and name not in READOUT_FIELDS), default=-1)

    def index(path, _):
        name, i = _field_and_index(path)
        return top + 1 if (i is None or name in READOUT_FIELDS) else i

    return jtu.tree_map_with_path(index, params)


def leaf_paths(params: PyTree) -> PyTree[str]:
    return jtu.tree_map_with_path(lambda p, _: jtu.keystr(p), params)


def make_optimizer(
    params: PyTree,
    *,
    lr: float | Sequence[float] | Mapping[str, float],
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    total_steps: int | None = None,
    warmup_steps: int = 0,
    frozen: str | None = None,
) -> optax.GradientTransformation:
    r"""An optax transformation with one learning rate per layer.

    Args:
        params: the trainable arrays, `eqx.filter(model, eqx.is_inexact_array)`.
        lr: one rate for all; a sequence, rate `lr[l]` for layer l (see
            [`layer_indices`][]; e.g. Scellier & Bengio 2017 use 0.1 / 0.05 for the
            two weight layers of 784-500-10); or a mapping from a regular expression
            on the leaf path (e.g. `r"\.readout"`) to a rate, first match wins, the
            key `"*"` being the default.
        optimizer: "sgd" (with `momentum`, heavy ball), "nesterov", "adam" or "adamw".
        weight_decay: L2 decay λ added to the update (decoupled for "adamw"); the
            decay is scaled by each layer's rate, as in SGD with weight decay.
        schedule: "constant" or "cosine" (cosine decay to 0 over `total_steps`, after
            `warmup_steps` of linear warm-up).
        frozen: a regular expression; leaves whose path matches get no update.
    """
    if optimizer not in ("sgd", "nesterov", "adam", "adamw"):
        raise ValueError(
            f"unknown optimizer {optimizer!r}; choose 'sgd', 'nesterov', 'adam' or 'adamw'."
        )
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; choose 'constant' or 'cosine'.")
    if schedule == "cosine" and not total_steps:
        raise ValueError("a cosine schedule needs `total_steps`.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    paths = leaf_paths(params)
    if isinstance(lr, Mapping):
        rules = [(re.compile(k), float(v)) for k, v in lr.items() if k != "*"]
        default = lr.get("*")

        def rate_of(path, layer):
            for pattern, v in rules:
                if pattern.search(path):
                    return v
            if default is None:
                raise ValueError(f"no learning rate matches parameter {path} (add a '*' key).")
            return float(default)

    elif isinstance(lr, Sequence) and not isinstance(lr, str):
        rates = [float(v) for v in lr]
        n_layers = max(jtu.tree_leaves(layer_indices(params)), default=-1) + 1
        if len(rates) != n_layers:
            raise ValueError(
                f"got {len(rates)} per-layer learning rates but the model has {n_layers} "
                f"layers of parameters ({_describe_layers(params)})."
            )

        def rate_of(path, layer):
            return rates[layer]

    else:

        def rate_of(path, layer):
            return float(lr)

    frozen_re = re.compile(frozen) if frozen else None
    labels = jtu.tree_map(
        lambda path, layer: (
            "frozen"
            if frozen_re is not None and frozen_re.search(path)
            else repr(rate_of(path, layer))
        ),
        paths,
        layer_indices(params),
    )
    transforms = {"frozen": optax.set_to_zero()}
    for label in set(jtu.tree_leaves(labels)) - {"frozen"}:
        transforms[label] = _one(
            float(label), optimizer, momentum, weight_decay, schedule, total_steps, warmup_steps
        )
    # A callable, since a model with `__call__` passed as labels would be called by optax.
    return optax.multi_transform(transforms, lambda _: labels)


def _one(rate, optimizer, momentum, weight_decay, schedule, total_steps, warmup_steps):
    if schedule == "cosine":
        if warmup_steps:
            sched = optax.warmup_cosine_decay_schedule(0.0, rate, warmup_steps, total_steps)
        else:
            sched = optax.cosine_decay_schedule(rate, total_steps)
    else:
        sched = rate
    if optimizer == "adamw":
        return optax.adamw(sched, weight_decay=weight_decay)
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if optimizer == "adam":
        core = optax.adam(sched)
    else:
        core = optax.sgd(sched, momentum=momentum or None, nesterov=optimizer == "nesterov")
    return optax.chain(*decay, core)


def _describe_layers(params) -> str:
    groups: dict[int, list[str]] = {}
    for path, layer in zip(
        jtu.tree_leaves(leaf_paths(params)), jtu.tree_leaves(layer_indices(params)), strict=True
    ):
        groups.setdefault(layer, []).append(path)
    return "; ".join(f"layer {k}: {', '.join(v)}" for k, v in sorted(groups.items()))


def trainable(model) -> PyTree:
    return eqx.filter(model, eqx.is_inexact_array)
