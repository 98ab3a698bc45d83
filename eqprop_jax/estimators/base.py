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
    `aux` a dict of extra diagnostics.

    Keys of `aux` shared by every estimator that relaxes a state (B = batch size):

    - "result": int32 (B,), the [`eqprop_jax.Result`][] of each example's free phase;
    - "stats": [`eqprop_jax.Stats`][] of the free phase, leaves (B,);
    - "nudged_result": int32 (B, P), the status of each of the P nudged phases
      actually run (EP-type estimators only; one-sided EP runs P = 1);
    - "nudged_stats": [`eqprop_jax.Stats`][] of those phases, leaves (B, P);
    - "state" and "predictions": the free equilibrium and the class scores read
      from it.

    [`eqprop_jax.estimators.phase_results`][]`(aux)` gathers all statuses as one
    (B, 1 + P) array for any estimator ((0, 0) for one without solves, e.g. DTP).
    A phase run for a fixed number of steps (`tol = 0`, the EP default) reports
    `max_steps`: nothing tested its convergence. When any phase is `nonfinite`,
    `loss` and every leaf of `grads` are NaN, so a broken solve cannot pass for a
    valid estimate. Integer labels are range-checked against `model.n_outputs`,
    eagerly or, under `jit`, at run time (`eqx.error_if`).
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
