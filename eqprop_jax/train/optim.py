"""optax optimisers with per-layer learning rates, weight decay and cosine schedules."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

import equinox as eqx
import jax.tree_util as jtu
import optax
from jaxtyping import PyTree

from ..models.base import AbstractModel

# A regular expression on leaf paths, or a function of the parameters giving a
# boolean per leaf (e.g. `eqprop_jax.estimators.dtp.feedback_mask`).
Frozen = str | Callable[[PyTree], PyTree[bool]] | None


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
    (`.weights[2]`, `.biases[2]`, `.forward[2].weight` -> 2). Leaves under one of the
    model's declared `readout_fields` (see [`eqprop_jax.AbstractModel`][]) or under no
    indexed field come after the last indexed layer.
    """
    readout = params.readout_fields if isinstance(params, AbstractModel) else ()
    leaves = jtu.tree_leaves_with_path(params)
    found = [_field_and_index(p) for p, _ in leaves]
    top = max((i for name, i in found if i is not None and name not in readout), default=-1)

    def index(path, _):
        name, i = _field_and_index(path)
        return top + 1 if (i is None or name in readout) else i

    return jtu.tree_map_with_path(index, params)


OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


def _rate(v, where: str) -> float:
    if isinstance(v, bool | str | bytes):
        raise ValueError(f"{where} must be a number, got {v!r}.")
    if not isinstance(v, int | float):
        try:
            v = float(v)  # NumPy and JAX scalars
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {v!r}.") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{where} must be a finite number > 0, got {v!r}.")
    return float(v)


def check_learning_rate(lr, who: str = "lr") -> None:
    """Refuse a learning rate that is not finite and positive, in any of its forms
    (one number, one per layer, or a mapping from path patterns to rates)."""
    if isinstance(lr, Mapping):
        if not lr:
            raise ValueError(f"{who} is an empty mapping; give at least a '*' rate.")
        for k, v in lr.items():
            if not isinstance(k, str):
                raise ValueError(f"{who}: keys must be regular expressions (str), got {k!r}.")
            if k != "*":
                try:
                    re.compile(k)
                except re.error as e:
                    raise ValueError(f"{who}: {k!r} is not a regular expression ({e}).") from e
            _rate(v, f"{who}[{k!r}]")
    elif isinstance(lr, Sequence) and not isinstance(lr, str):
        if not lr:
            raise ValueError(f"{who} is an empty sequence; give one rate per layer.")
        for i, v in enumerate(lr):
            _rate(v, f"{who}[{i}]")
    else:
        _rate(lr, who)


def check_optimizer_settings(
    *, optimizer, momentum, weight_decay, schedule, frozen, who: str = ""
) -> None:
    """Refuse unknown names and out-of-range values before any work is done."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown {who}optimizer {optimizer!r}; choose 'sgd', 'nesterov', 'adam' or 'adamw'."
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown {who}schedule {schedule!r}; choose 'constant' or 'cosine'.")
    for name, v, hi in (("momentum", momentum, 1.0), ("weight_decay", weight_decay, math.inf)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not (0 <= v < hi):
            bound = "[0, 1)" if hi == 1.0 else "a finite number >= 0"
            raise ValueError(f"{who}{name} must lie in {bound}, got {v!r}.")
    if frozen is not None and not callable(frozen):
        try:
            re.compile(frozen)
        except (re.error, TypeError) as e:
            raise ValueError(
                f"{who}frozen must be a regular expression or a function of the parameters "
                f"giving a boolean per leaf, got {frozen!r}."
            ) from e


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The arguments of [`make_optimizer`][] as one hashable value.

    A jitted step that holds these settings as a static field, rather than the optax
    transformation they build, compiles once for equal settings: a resumed or
    repeated run in one process reuses its compiled step with no global cache.
    `lr` is a number, a tuple of per-layer rates, or a tuple of (pattern, rate) pairs.
    """

    lr: float | tuple
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    total_steps: int | None = None
    warmup_steps: int = 0
    frozen: Frozen = None

    @classmethod
    def of(cls, lr, **kw) -> OptimizerSettings:
        if isinstance(lr, Mapping):
            lr = tuple((str(k), float(v)) for k, v in lr.items())
        elif isinstance(lr, Sequence) and not isinstance(lr, str):
            lr = tuple(float(v) for v in lr)
        else:
            lr = float(lr)
        return cls(lr, **kw)

    def __call__(self, params: PyTree) -> optax.GradientTransformation:
        lr = self.lr
        if isinstance(lr, tuple) and lr and isinstance(lr[0], tuple):
            lr = dict(lr)
        return make_optimizer(
            params,
            lr=lr,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            frozen=self.frozen,
        )


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
    frozen: Frozen = None,
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
        frozen: leaves that get no update: a regular expression on the leaf path, or
            a function `params -> PyTree[bool]` (True: frozen), e.g.
            [`eqprop_jax.estimators.dtp.feedback_mask`][] for the weights DTP trains
            itself.
    """
    check_learning_rate(lr)
    check_optimizer_settings(
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        frozen=frozen,
    )
    if schedule == "cosine" and not total_steps:
        raise ValueError("a cosine schedule needs `total_steps`.")
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

    if callable(frozen):
        is_frozen = frozen(params)
    else:
        frozen_re = re.compile(frozen) if frozen else None
        is_frozen = jtu.tree_map(
            lambda path: frozen_re is not None and bool(frozen_re.search(path)), paths
        )
    labels = jtu.tree_map(
        lambda path, layer, off: "frozen" if off else repr(rate_of(path, layer)),
        paths,
        layer_indices(params),
        is_frozen,
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
