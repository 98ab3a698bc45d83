"""The estimator interface shared by autodiff references, EP and target propagation."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
from jaxtyping import Array, PRNGKeyArray, PyTree


class Estimator(eqx.Module):
    """A gradient estimator: `loss, grads, aux = estimator(model, x, y, key=key)`.

    `grads` has the structure of `eqx.filter(model, eqx.is_inexact_array)` and
    estimates dL/dθ with the sign `jax.grad` gives, so every estimator is compared
    with autodiff the same way (see [`eqprop_jax.gradient_alignment`][]).
    `loss` is the scalar loss of the batch at the model's (free) equilibrium and
    `aux` a dict of extra diagnostics (states, solver statistics, ...).
    """

    @abc.abstractmethod
    def __call__(
        self, model: Any, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        """Loss, gradient estimate, auxiliary information."""
