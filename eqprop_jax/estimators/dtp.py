r"""Difference Target Propagation (Lee et al. 2015; DRL, Meulemans et al. 2020; L-DRL,
Ernoult et al. 2022) as a gradient estimator for a [`eqprop_jax.models.LayeredNet`][].

Targets (all three variants), per example:

    t_N     = s_N − β ∇_{s_N} L(s_N, y)
    t_{n−1} = s_{n−1} + G_n(t_n) − G_n(s_n)          (difference rule, n = N..2)

and the forward weights θ_n of F_n follow the local loss
(1/β) Σ_n ½‖F_n(sg(s_{n−1})) − sg(t_n)‖², whose gradient is returned as the estimate
of dL/dθ: for the top layer it is exactly ∇_θ L, and for a lower layer it tends to
∇_θ L as β → 0 when the feedback Jacobians J_{G_n} equal J_{F_n}ᵀ.

The variants differ in how the feedback layers G_n are trained ([`DTP.pre_step`][]),
with ε ~ N(0, σ_n² I) at s_{n−1} and η ~ N(0, σ_n² I) at s_n:

- [`Lee`][] (Lee et al. 2015): ‖G_n(F_n(s_{n−1} + ε)) − (s_{n−1} + ε)‖²
  (G_n learns to invert F_n);
- [`DRL`][] (Meulemans et al. 2020): s_{n−1} + ε is run forward to the output, brought
  back down to layer n−1 with the difference rule through G_N..G_n, and compared
  with s_{n−1} + ε; plus λ‖G_n(s_n + η) − G_n(s_n)‖² (not local: it uses the layers
  above);
- [`LDRL`][] (Ernoult et al. 2022, local difference reconstruction loss):
  −2 εᵀ(G_n(F_n(s_{n−1} + ε)) − G_n(s_n)) + ‖G_n(s_n + η) − G_n(s_n)‖²,
  whose expectation is, to second order in σ, σ²‖J_{G_n} − J_{F_n}ᵀ‖²_F + const:
  it is minimised by Jacobian matching J_{G_n} = J_{F_n}ᵀ.

Losses are summed over units and averaged over the batch. Each feedback layer takes
`feedback_steps` steps of its optax optimiser (plain SGD by default) with fresh noise
per step, the forward weights fixed. A variant is one small Module with one method,
[`FeedbackLoss.__call__`][], so a new feedback loss is one class.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..models.layered import LayeredNet
from .base import Estimator
from .checks import check_beta, check_labels, check_steps
from .losses import cross_entropy


def dtp_targets(
    model: LayeredNet, states: list[Array], ctxs: list[Any], y: Array, beta: float
) -> list[Array]:
    """Targets [t_1, ..., t_N] of one example from its activations [s_0, ..., s_N].

    t_N = s_N − β ∇L(s_N), t_{n−1} = s_{n−1} + G_n(t_n) − G_n(s_n).
    """
    n_layers = len(states) - 1
    t = states[-1] - beta * jax.grad(cross_entropy)(states[-1], y)
    targets = [t]
    for n in range(n_layers, 1, -1):
        g = lambda s, n=n: model.propagate(n, s, ctxs[n - 1])
        t = states[n - 1] + g(t) - g(states[n])
        targets.append(t)
    return targets[::-1]


def local_forward_loss(model: LayeredNet, states: list[Array], targets: list[Array]) -> Array:
    """Σ_n ½‖F_n(sg(s_{n−1})) − sg(t_n)‖² for one example."""
    total = 0.0
    for n, f in enumerate(model.forward, start=1):
        s, _ = f(jax.lax.stop_gradient(states[n - 1]))
        total = total + 0.5 * jnp.sum((s - jax.lax.stop_gradient(targets[n - 1])) ** 2)
    return total


def ldrl_loss(forward_layer, feedback_layer, s_prev, s, ctx, eps, eta) -> Array:
    """L-DRL of one example: −2εᵀ(G(F(s_prev + ε)) − G(s)) + ‖G(s + η) − G(s)‖²."""
    g_s = feedback_layer(s, ctx)
    s_noisy, _ = forward_layer(s_prev + eps)
    rec = feedback_layer(s_noisy, ctx) - g_s
    return -2.0 * jnp.sum(eps * rec) + jnp.sum((feedback_layer(s + eta, ctx) - g_s) ** 2)


def lee_loss(forward_layer, feedback_layer, s_prev, ctx, eps) -> Array:
    """Lee et al. 2015 reconstruction loss of one example: ‖G(F(s_prev + ε)) − (s_prev + ε)‖²."""
    s_noisy, _ = forward_layer(s_prev + eps)
    return jnp.sum((feedback_layer(s_noisy, ctx) - (s_prev + eps)) ** 2)


def drl_loss(model: LayeredNet, n: int, feedback_layer, states, ctxs, eps, eta, lam) -> Array:
    """DRL (Meulemans et al. 2020) of one example for G_n, with `feedback_layer` as G_n.

    ‖t̃_{n−1} − (s_{n−1} + ε)‖² + λ‖G_n(s_n + η) − G_n(s_n)‖², where t̃ is s_{n−1} + ε run
    forward to the output and back down with the difference rule.
    """
    n_layers = len(states) - 1
    s = states[n - 1] + eps
    for f in model.forward[n - 1 :]:
        s, _ = f(s)
    t = s
    for k in range(n_layers, n - 1, -1):
        g = feedback_layer if k == n else jax.lax.stop_gradient(model.feedback[k - 2])
        t = states[k - 1] + g(t, ctxs[k - 1]) - g(states[k], ctxs[k - 1])
    loss = jnp.sum((t - states[n - 1] - eps) ** 2)
    g_s = feedback_layer(states[n], ctxs[n - 1])
    return loss + lam * jnp.sum((feedback_layer(states[n] + eta, ctxs[n - 1]) - g_s) ** 2)


class FeedbackLoss(eqx.Module):
    """How DTP trains a feedback layer G_n: the batch-mean loss G_n descends.

    A variant of DTP is one subclass; `DTP(variant=LDRL())` picks it.
    """

    @abc.abstractmethod
    def __call__(
        self,
        model: LayeredNet,
        n: int,
        feedback_layer: Any,
        states: list[Array],
        ctxs: list[Any],
        eps: Array,
        eta: Array,
    ) -> Array:
        """Batch-mean loss of G_n, given as `feedback_layer`, at the batched activations
        `states` [s_0..s_N] (each (B, ...)) with noise ε (B, *s_{n−1}) and η (B, *s_n)."""


class LDRL(FeedbackLoss):
    """Local difference reconstruction loss (Ernoult et al. 2022), [`ldrl_loss`][]:
    −2εᵀ(G_n(F_n(s_{n−1} + ε)) − G_n(s_n)) + ‖G_n(s_n + η) − G_n(s_n)‖²."""

    def __call__(self, model, n, feedback_layer, states, ctxs, eps, eta):
        f = model.forward[n - 1]
        per = jax.vmap(lambda sp, s, c, e, h: ldrl_loss(f, feedback_layer, sp, s, c, e, h))(
            states[n - 1], states[n], ctxs[n - 1], eps, eta
        )
        return jnp.mean(per)


class Lee(FeedbackLoss):
    """Lee et al. 2015's reconstruction loss, [`lee_loss`][]:
    ‖G_n(F_n(s_{n−1} + ε)) − (s_{n−1} + ε)‖² (G_n learns to invert F_n)."""

    def __call__(self, model, n, feedback_layer, states, ctxs, eps, eta):
        f = model.forward[n - 1]
        per = jax.vmap(lambda sp, c, e: lee_loss(f, feedback_layer, sp, c, e))(
            states[n - 1], ctxs[n - 1], eps
        )
        return jnp.mean(per)


class DRL(FeedbackLoss):
    """Difference reconstruction loss (Meulemans et al. 2020), [`drl_loss`][], with the
    regulariser λ‖G_n(s_n + η) − G_n(s_n)‖² of weight `lam` ≥ 0 (not local: it runs
    s_{n−1} + ε through the layers above)."""

    lam: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        if isinstance(self.lam, bool) or not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"DRL: the regulariser weight lam must be >= 0, got {self.lam}.")

    def __call__(self, model, n, feedback_layer, states, ctxs, eps, eta):
        per = jax.vmap(
            lambda st, cs, e, h: drl_loss(model, n, feedback_layer, st, cs, e, h, self.lam)
        )(states, ctxs, eps, eta)
        return jnp.mean(per)


def feedback_mask(params: PyTree) -> PyTree[bool]:
    """True on the leaves under `.feedback` of a [`LayeredNet`][] (filtered or not), False
    elsewhere: the weights [`DTP.pre_step`][] trains itself, which the main optimiser
    must leave alone (`TrainConfig(frozen=feedback_mask)`; its gradient estimate for
    them is zero, but weight decay or momentum would still move them)."""
    if not isinstance(params, LayeredNet):
        raise TypeError(f"feedback_mask: expected a LayeredNet, got {type(params).__name__}.")
    mask = jtu.tree_map(lambda _: False, params)
    return eqx.tree_at(lambda m: m.feedback, mask, jtu.tree_map(lambda _: True, params.feedback))


def _as_tuple(name, value, count, kind):
    if isinstance(value, (tuple, list)):
        if len(value) != count:
            raise ValueError(
                f"DTP: `{name}` has {len(value)} entries but the model has {count} feedback "
                f"layers (G_2..G_N)."
            )
        return tuple(kind(v) for v in value)
    return (kind(value),) * count


def _check_data(model, x, y, where):
    if not isinstance(model, LayeredNet):
        raise TypeError(f"DTP.{where}: the model must be a LayeredNet, got {type(model).__name__}.")
    x, y = jnp.asarray(x), jnp.asarray(y)
    shape = tuple(model.input_shape)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"DTP.{where}: x must be a batch of shape (B, *{shape}), got {tuple(x.shape)}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"DTP.{where}: x must be floating point, got dtype {x.dtype}.")
    n_out = model.n_outputs
    if jnp.issubdtype(y.dtype, jnp.integer):
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"DTP.{where}: integer labels y must have shape ({x.shape[0]},), got {y.shape}."
            )
        y = check_labels(f"DTP.{where}", y, n_out)
    elif y.shape != (x.shape[0], n_out):
        raise ValueError(
            f"DTP.{where}: y must be integer labels of shape ({x.shape[0]},) or target "
            f"probabilities of shape ({x.shape[0]}, {n_out}), got {y.shape} ({y.dtype})."
        )
    if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
        raise ValueError(f"DTP.{where}: x contains NaN or infinite values.")
    return x, y


class DTP(Estimator):
    r"""Difference target propagation; its feedback loss `variant` is an object:
    [`LDRL`][]`()` (default), [`DRL`][]`(lam)` or [`Lee`][]`()`.

    `loss, grads, aux = DTP(...)(model, x, y)` gives the batch-mean cross-entropy and
    the DTP estimate of dL/dθ for the forward layers (module docstring; zeros for the
    feedback leaves). `model = DTP(...).pre_step(model, x, y, key=key)` trains the
    feedback layers on the batch and returns the updated model. The main optimiser
    must leave the feedback weights alone: `TrainConfig(frozen=feedback_mask)`.

    Args:
        variant: the feedback loss, a [`FeedbackLoss`][].
        beta: target step β > 0 (the paper uses 0.7; β → 0 compares with backprop).
        feedback_steps: optimiser steps K_n per batch for each feedback layer (int or
            one per feedback layer G_2..G_N, bottom to top).
        noise: σ_n > 0 of the noise ε, η (scalar or one per feedback layer).
        feedback_lr: learning rate of plain SGD on the feedback weights (scalar or per
            layer; default 0.1), the default feedback optimiser.
        feedback_optimizer: an optax `GradientTransformation` for the feedback weights
            (or one per feedback layer), instead of SGD at `feedback_lr`. Its state
            starts afresh on each batch: an estimator keeps nothing between training
            steps but the model. Build the estimator once and reuse it: each call of
            `optax.adam(...)` makes new functions, hence a new compilation.
        unroll: `lax.scan` unroll of the K_n feedback steps; None (default) keeps the
            loops rolled, so compile time does not grow with K_n.
    """

    variant: FeedbackLoss = eqx.field(default_factory=LDRL)
    beta: float = eqx.field(static=True, default=0.7)
    feedback_steps: int | tuple[int, ...] = eqx.field(static=True, default=1)
    noise: float | tuple[float, ...] = eqx.field(static=True, default=0.1)
    feedback_lr: float | tuple[float, ...] | None = eqx.field(static=True, default=None)
    feedback_optimizer: (
        optax.GradientTransformation | tuple[optax.GradientTransformation, ...] | None
    ) = eqx.field(static=True, default=None)
    unroll: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not isinstance(self.variant, FeedbackLoss):
            raise TypeError(
                "DTP: variant must be a FeedbackLoss, e.g. LDRL(), DRL(lam) or Lee(), got "
                f"{self.variant!r}."
            )
        check_beta("DTP", self.beta, positive=True)
        lrs = () if self.feedback_lr is None else self.feedback_lr
        for name, vals, strict in (("noise σ", self.noise, True), ("feedback_lr", lrs, False)):
            for v in vals if isinstance(vals, (tuple, list)) else (vals,):
                if not math.isfinite(v) or (v <= 0 if strict else v < 0):
                    rel = "> 0" if strict else ">= 0"
                    raise ValueError(f"DTP: {name} must be finite and {rel}, got {vals}.")
        check_steps("DTP", minimum=0, feedback_steps=self.feedback_steps)
        opt = self.feedback_optimizer
        if opt is not None:
            if self.feedback_lr is not None:
                raise ValueError(
                    "DTP: give either `feedback_lr` (plain SGD) or `feedback_optimizer`, not both."
                )
            opts = (opt,) if isinstance(opt, optax.GradientTransformation) else opt
            if not isinstance(opts, Sequence) or not all(
                isinstance(o, optax.GradientTransformation) for o in opts
            ):
                raise TypeError(
                    "DTP: feedback_optimizer must be an optax GradientTransformation or a "
                    f"tuple of them (one per feedback layer), got {opt!r}."
                )

    def _layer_settings(self, model: LayeredNet):
        count = len(model.feedback)
        opt = self.feedback_optimizer
        if opt is None:
            lrs = 0.1 if self.feedback_lr is None else self.feedback_lr
            opts = tuple(optax.sgd(lr) for lr in _as_tuple("feedback_lr", lrs, count, float))
        elif isinstance(opt, optax.GradientTransformation):
            opts = (opt,) * count
        else:
            opts = _as_tuple("feedback_optimizer", opt, count, lambda o: o)
        return (
            _as_tuple("feedback_steps", self.feedback_steps, count, int),
            _as_tuple("noise", self.noise, count, float),
            opts,
        )

    def __call__(
        self, model: LayeredNet, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        x, y = _check_data(model, x, y, "__call__")
        # β as an array: one compiled estimate serves every β (sweeps β -> 0).
        return _estimate(model, x, y, jnp.asarray(self.beta, x.dtype))

    def pre_step(
        self, model: LayeredNet, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> LayeredNet:
        """Train the feedback layers on this batch (K_n optimiser steps each); returns
        the model."""
        x, y = _check_data(model, x, y, "pre_step")
        self._layer_settings(model)
        if key is None:
            raise ValueError("DTP.pre_step needs a `key` for the feedback noise ε, η.")
        return _train_feedback(self, model, x, key)

    def feedback_losses(self, model: LayeredNet, x: Array, *, key: PRNGKeyArray) -> Array:
        """Batch-mean feedback loss of each G_2..G_N (for monitoring), one noise draw."""
        x, _ = _check_data(model, x, jnp.zeros((len(x),), jnp.int32), "feedback_losses")
        return _feedback_losses(self, model, x, key)


def _unroll(est: DTP, k_steps: int) -> int:
    # Rolled by default: the conv layers' derivatives (models/_conv.py) run as fast
    # inside the loop as unrolled (LeNet, batch 128, K = 5: 0.54 s rolled vs 0.61 s
    # unrolled), and an unrolled loop compiles one copy of the body per step
    # (SimpleVGG's K = 20..55 never finished compiling).
    return 1 if est.unroll is None else max(1, min(int(est.unroll), k_steps))


def _noise(key, n, states, sigma):
    k1, k2 = jax.random.split(key)
    eps = sigma * jax.random.normal(k1, states[n - 1].shape, states[n - 1].dtype)
    eta = sigma * jax.random.normal(k2, states[n].shape, states[n].dtype)
    return eps, eta


@eqx.filter_jit
def _train_feedback(est: DTP, model: LayeredNet, x: Array, key: PRNGKeyArray) -> LayeredNet:
    steps, sigmas, opts = est._layer_settings(model)
    frozen = jax.lax.stop_gradient(model)
    states, ctxs = jax.vmap(frozen.activations)(x)
    new_feedback = list(model.feedback)
    # Layers with the same K_n share one scan (one compiled loop for the usual single K).
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(steps):
        if k > 0:
            groups.setdefault(k, []).append(i)
    for g_idx, (k_steps, layers) in enumerate(sorted(groups.items())):
        parts = [eqx.partition(model.feedback[i], eqx.is_inexact_array) for i in layers]
        params = [part[0] for part in parts]
        opt_states = [opts[i].init(q) for i, q in zip(layers, params, strict=True)]

        def step(carry, k, layers=layers, parts=parts):
            params, opt_states = carry
            keys = jax.random.split(k, len(layers))
            new_params, new_states = [], []
            for j, i in enumerate(layers):
                n, static = i + 2, parts[j][1]
                eps, eta = _noise(keys[j], n, states, sigmas[i])
                grad = jax.grad(
                    lambda p, n=n, static=static, eps=eps, eta=eta: est.variant(
                        frozen, n, eqx.combine(p, static), states, ctxs, eps, eta
                    )
                )(params[j])
                updates, state = opts[i].update(grad, opt_states[j], params[j])
                new_params.append(optax.apply_updates(params[j], updates))
                new_states.append(state)
            return (new_params, new_states), None

        (params, _), _ = jax.lax.scan(
            step,
            (params, opt_states),
            jax.random.split(jax.random.fold_in(key, g_idx), k_steps),
            unroll=_unroll(est, k_steps),
        )
        for j, i in enumerate(layers):
            new_feedback[i] = eqx.combine(params[j], parts[j][1])
    return eqx.tree_at(lambda m: m.feedback, model, tuple(new_feedback))


@eqx.filter_jit
def _feedback_losses(est: DTP, model: LayeredNet, x: Array, key: PRNGKeyArray) -> Array:
    _, sigmas, _ = est._layer_settings(model)
    states, ctxs = jax.vmap(model.activations)(x)
    keys = jax.random.split(key, max(len(model.feedback), 1))
    out = []
    for i, n in enumerate(range(2, model.num_layers + 1)):
        eps, eta = _noise(keys[i], n, states, sigmas[i])
        out.append(est.variant(model, n, model.feedback[i], states, ctxs, eps, eta))
    return jnp.stack(out) if out else jnp.zeros((0,))


def dtp_gradients(model: LayeredNet, x: Array, y: Array, beta: float) -> tuple[Array, PyTree, dict]:
    """Batch-mean loss, DTP estimate (1/β)·∇_θ Σ_n ½‖F_n(s_{n−1}) − t_n‖² and aux (no checks)."""
    states, ctxs = jax.vmap(model.activations)(x)
    targets = jax.vmap(lambda st, cs, yy: dtp_targets(model, st, cs, yy, beta))(states, ctxs, y)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def local(p):
        m = eqx.combine(p, static)
        return jnp.mean(jax.vmap(lambda st, tg: local_forward_loss(m, st, tg))(states, targets))

    grads = jax.grad(local)(params)
    grads = jax.tree.map(lambda g: g / beta, grads)
    logits = states[-1]
    loss = jnp.mean(jax.vmap(cross_entropy)(logits, y))
    layer_dist = jnp.stack(
        [
            jnp.mean(jnp.sum((s - t).reshape(len(x), -1) ** 2, -1))
            for s, t in zip(states[1:], targets, strict=True)
        ]
    )
    if jnp.issubdtype(y.dtype, jnp.integer):
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
    else:
        acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(y, -1))
    aux = {"accuracy": acc, "target_distance": layer_dist / beta**2, "logits": logits}
    return loss, grads, aux


@eqx.filter_jit
def _estimate(model: LayeredNet, x: Array, y: Array, beta: Array):
    return dtp_gradients(model, x, y, beta)


__all__ = [
    "DRL",
    "DTP",
    "LDRL",
    "FeedbackLoss",
    "Lee",
    "cross_entropy",
    "drl_loss",
    "dtp_gradients",
    "dtp_targets",
    "feedback_mask",
    "ldrl_loss",
    "lee_loss",
    "local_forward_loss",
]
