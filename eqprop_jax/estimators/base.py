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

    def pre_step(self, model: Any, x: Array, y: Array, *, key: PRNGKeyArray | None = None) -> Any:
        """Work on the model that precedes the gradient estimate of a training step.

        Training loops call `model = estimator.pre_step(model, x, y, key=k1)` and then
        `estimator(model, x, y, key=k2)`. The default returns the model unchanged;
        target propagation trains its feedback weights here, so their state lives in
        the model rather than in globals.
        """
        return model

    @abc.abstractmethod
    def __call__(
        self, model: Any, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        """Loss, gradient estimate, auxiliary information."""
