"""Plain backpropagation through a feedforward model: the reference of target propagation."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree

from .base import Estimator
from .checks import check_labels
from .losses import cross_entropy


class Backprop(Estimator):
    r"""Autodiff of the batch-mean softmax cross-entropy of a feedforward `model(x)`:

        L = (1/B) Σ_b [log Σ_k exp z_{b,k} − z_{b,y_b}],   z_b = model(x_b),

    the gradient DTP approaches as β → 0 (Ernoult et al. 2022 compare with it).
    `y`: integer labels (B,) or target probabilities (B, K), for which the loss is
    −Σ_k y_{b,k} log softmax(z_b)_k. `aux["predictions"]` holds the logits.
    """

    def __call__(
        self, model, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        def loss_fn(m):
            logits = jax.vmap(m)(x)
            targets = check_labels("Backprop", y, logits.shape[-1])
            return jnp.mean(jax.vmap(cross_entropy)(logits, targets)), logits

        (loss, logits), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        return loss, grads, {"predictions": logits}


__all__ = ["Backprop"]
