r"""Diagnostics of difference target propagation on a [`eqprop_jax.models.LayeredNet`][].

As Ernoult et al. 2022 and Meulemans et al. 2020 compute them, per layer n:

- forward vs feedback weights: angle and distance between W_n and V_nᵀ (dense) or
  between the feedback kernel V_n and the kernel of the transposed forward
  convolution (conv vs conv-transpose, see [`eqprop_jax.models.layered.transpose_kernel`][]);
- DTP update vs backprop: angle and distance between the DTP estimate (scaled by
  1/β, small β) and ∇_θ L for the parameters of F_n;
- Gauss–Newton angle: angle between the DTP update and the update obtained with
  Gauss–Newton targets t_n = s_n − β Δs_n, Δs_n = J_nᵀ(J_n J_nᵀ + λI)⁻¹ ∂L/∂s_N,
  J_n = ∂s_N/∂s_n (Meulemans et al. 2020).

angle = arccos(⟨A, B⟩ / ‖A‖‖B‖) in degrees and distance = ‖A − B‖/‖B‖, normalised by
the reference B (W_n, the backprop gradient, the GN update), through
[`eqprop_jax.gradient_alignment`][].
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from ..estimators.backprop import Backprop
from ..estimators.dtp import cross_entropy, dtp_gradients, local_forward_loss
from ..models.layered import ConvFeedback, DenseFeedback, LayeredNet, transpose_kernel
from .alignment import Alignment, gradient_alignment


@eqx.filter_jit
def backprop_gradients(model: LayeredNet, x: Array, y: Array) -> tuple[Array, PyTree]:
    """Batch-mean cross-entropy and its autodiff gradient (structure of the filtered
    model): [`eqprop_jax.Backprop`][]'s estimate."""
    loss, grads, _ = Backprop()(model, x, y)
    return loss, grads


def gauss_newton_targets(
    model: LayeredNet, states: list[Array], ctxs: list, y: Array, beta: float, damping: float
) -> list[Array]:
    """Gauss–Newton targets [t_1..t_N] of one example (Meulemans et al. 2020).

    t_n = s_n − β J_nᵀ(J_n J_nᵀ + λI)⁻¹ ∂L/∂s_N with J_n = ∂s_N/∂s_n (argmax of pools held at
    the forward pass's, i.e. J_n is the Jacobian of the piecewise-linear region).
    """
    n_layers = len(states) - 1
    e = jax.grad(cross_entropy)(states[-1], y)
    targets = []
    for n in range(1, n_layers + 1):

        def head(s, n=n):
            for f in model.forward[n:]:
                s, _ = f(s)
            return s

        jac = jax.jacrev(head)(states[n]).reshape(e.shape[0], -1)
        gram = jac @ jac.T + damping * jnp.eye(e.shape[0], dtype=jac.dtype)
        delta = (jac.T @ jnp.linalg.solve(gram, e)).reshape(states[n].shape)
        targets.append(states[n] - beta * delta)
    return targets


def gauss_newton_gradients(
    model: LayeredNet, x: Array, y: Array, beta: float = 1e-2, damping: float = 1e-3
) -> PyTree:
    """(1/β)·∇_θ Σ_n ½‖F_n(s_{n−1}) − t_n^{GN}‖², batch mean: the Gauss–Newton target update.

    With t_n^{GN} = s_n − β Δs_n ([`gauss_newton_targets`][]) and F_n(s_{n−1}) = s_n this
    is Δs_nᵀ ∂F_n/∂θ_n, the same for every β: the update that Meulemans et al. 2020
    (their GNT angle) and Ernoult et al. 2022 compare DTP's with. Backprop's gradient
    is the same expression with Δs_n = J_nᵀ ∂L/∂s_N instead (no pseudo-inverse).
    """
    states, ctxs = jax.vmap(model.activations)(x)
    targets = jax.vmap(lambda st, cs, yy: gauss_newton_targets(model, st, cs, yy, beta, damping))(
        states, ctxs, y
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def local(p):
        m = eqx.combine(p, static)
        return jnp.mean(jax.vmap(lambda st, tg: local_forward_loss(m, st, tg))(states, targets))

    return jax.tree.map(lambda g: g / beta, jax.grad(local)(params))


def weight_alignment(model: LayeredNet) -> list[Alignment]:
    """For G_2..G_N: [`Alignment`][] of the feedback weight (as Vᵀ) with the forward weight W.

    Dense: estimate Vᵀ, reference W. Conv: estimate V, reference the kernel of the
    transposed forward convolution.
    """
    out = []
    for f, g in zip(model.forward[1:], model.feedback, strict=True):
        if isinstance(g, DenseFeedback):
            est, ref = g.weight.T, f.weight
        elif isinstance(g, ConvFeedback):
            est, ref = g.weight, transpose_kernel(f.weight)
        else:
            raise TypeError(f"weight_alignment: unknown feedback layer {type(g).__name__}.")
        out.append(gradient_alignment(est, ref).overall)
    return out


@eqx.filter_jit
def _all_grads(model, x, y, beta, damping, with_gn):
    loss, g_bp = backprop_gradients(model, x, y)
    _, g_dtp, _ = dtp_gradients(model, x, y, beta)
    g_gn = gauss_newton_gradients(model, x, y, beta, damping) if with_gn else None
    return loss, g_bp, g_dtp, g_gn


def dtp_alignment(
    model: LayeredNet,
    x: Array,
    y: Array,
    *,
    beta: float = 1e-2,
    gn_damping: float = 1e-3,
    gauss_newton: bool = True,
) -> dict[str, np.ndarray]:
    """Per-layer diagnostics of DTP on the batch (x, y), one array entry per layer F_1..F_N.

    Returns a dict of float arrays of length N (NaN where undefined: layer 1 has no
    feedback weight), convenient to append to a history and plot over training:
    `weight_angle`, `weight_distance` (W_n vs V_nᵀ), `update_angle`, `update_distance`
    (DTP update at `beta`, scaled 1/β, vs backprop), `gn_angle` (DTP vs Gauss–Newton
    target update), `gn_bp_angle` (Gauss–Newton vs backprop), and the scalar `loss`.
    The top layer's DTP update equals backprop's exactly, so its angles are ~0.
    """
    if beta <= 0 or gn_damping < 0:
        raise ValueError(
            f"dtp_alignment: need beta > 0 and gn_damping >= 0, got {beta}, {gn_damping}."
        )
    dtype = jnp.result_type(x)
    beta_a, damping_a = jnp.asarray(beta, dtype), jnp.asarray(gn_damping, dtype)
    loss, g_bp, g_dtp, g_gn = _all_grads(model, x, y, beta_a, damping_a, gauss_newton)
    n_layers = model.num_layers
    nan = np.full(n_layers, np.nan)
    out = {
        k: nan.copy()
        for k in (
            "weight_angle",
            "weight_distance",
            "update_angle",
            "update_distance",
            "gn_angle",
            "gn_bp_angle",
        )
    }
    for i, a in enumerate(weight_alignment(model), start=1):
        out["weight_angle"][i], out["weight_distance"][i] = a.angle, a.rel_error
    for i in range(n_layers):
        a = gradient_alignment(g_dtp.forward[i], g_bp.forward[i]).overall
        out["update_angle"][i], out["update_distance"][i] = a.angle, a.rel_error
        if g_gn is not None:
            out["gn_angle"][i] = gradient_alignment(g_dtp.forward[i], g_gn.forward[i]).overall.angle
            out["gn_bp_angle"][i] = gradient_alignment(
                g_gn.forward[i], g_bp.forward[i]
            ).overall.angle
    out["loss"] = np.asarray(float(loss))
    return out


def plot_dtp_alignment(
    history: list[dict[str, np.ndarray]], keys=("weight_angle", "update_angle", "gn_angle")
):
    """Plot [`dtp_alignment`][] results over training: a panel per key, a line per layer."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = np.stack([h[key] for h in history])
        for layer in range(values.shape[1]):
            if np.all(np.isnan(values[:, layer])):
                continue
            ax.plot(values[:, layer], label=f"layer {layer + 1}")
        ax.set_title(key)
        ax.set_xlabel("evaluation")
        ax.set_ylabel("degrees" if "angle" in key else "")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


__all__ = [
    "backprop_gradients",
    "dtp_alignment",
    "gauss_newton_gradients",
    "gauss_newton_targets",
    "plot_dtp_alignment",
    "weight_alignment",
]
