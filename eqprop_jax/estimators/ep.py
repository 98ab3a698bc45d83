"""Equilibrium Propagation: gradients from the difference of equilibria under a nudge."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..equilibrium import AbstractSolver
from ..models.activations import HOLOMORPHIC
from ..models.base import AbstractEnergyModel
from .base import Estimator
from .checks import check_batch, check_beta, check_steps, check_variant, checked_beta
from .phases import (
    VARIANTS,
    finish,
    nudge_points,
    phase_solver,
    random_sign,
    relax_nudges,
    state_dtype,
)


class EquilibriumProp(Estimator):
    r"""The Equilibrium Propagation gradient estimate (Scellier & Bengio 2017).

    A free phase relaxes `free_steps` steps to s^0; nudged phases relax from s^0 for
    `nudged_steps` steps to s^{β_p}, the equilibria of F = E + β_p C. With the
    nudges of [`eqprop_jax.estimators.phases.nudge_points`][]:

    - positive (0, β), negative (−β, 0), centered (−β, β) (Laborieux et al. 2021):
      ĝ = [∂F/∂θ(s^{β2}, β2) − ∂F/∂θ(s^{β1}, β1)] / (β2 − β1), bias O(β) one-sided,
      O(β²) centered;
    - holomorphic (Laborieux & Zenke 2022): β_k = |β| e^{2πik/N}, complex states,
      ĝ = Re (1/N) Σ_k ∂F/∂θ(s^{β_k}, β_k) / β_k — the Cauchy integral of
      d/dβ ∂F/∂θ(s^β, β) at β = 0, exact up to O(|β|^N) when the states converge.
      Conjugate pairs are folded, so ⌊N/2⌋ + 1 nudged phases run.

    ĝ estimates dL/dθ (sign of `jax.grad`) for L = `model.loss` at s^0.

    Args:
        beta: the nudge strength (real, finite, nonzero). For holomorphic EP, |β| is
            the radius.
        variant: "positive", "negative", "centered" or "holomorphic".
        n_points: N, the number of points on the circle (holomorphic only; N ≥ 2).
        free_steps, nudged_steps: steps of the two phases (fixed, as in the papers).
        random_sign: flip the sign of β at random for each call (Scellier & Bengio
            2017, to cancel the one-sided bias on average); needs `key`.
        free_solver, nudged_solver: override the default `Picard(tol=0, max_steps=...)`
            for each phase (e.g. a tolerance-based stopping rule).

    `aux`: "state" (free equilibrium, batched), "predictions", "stats" and "result" of
    the free phase, "nudged_result" and "nudged_stats" of the nudged phases run
    (shape (batch, P): P = 1 for positive and negative, 2 for centered, ⌊N/2⌋ + 1
    for holomorphic, in the order of the nudges of
    [`eqprop_jax.estimators.phases.nudge_points`][]) and "beta" used; see
    [`eqprop_jax.estimators.Estimator`][].
    """

    beta: float | Array = 0.1
    variant: Literal["positive", "negative", "centered", "holomorphic"] = eqx.field(
        static=True, default="positive"
    )
    n_points: int = eqx.field(static=True, default=4)
    free_steps: int = eqx.field(static=True, default=40)
    nudged_steps: int = eqx.field(static=True, default=15)
    random_sign: bool = eqx.field(static=True, default=False)
    free_solver: AbstractSolver | None = None
    nudged_solver: AbstractSolver | None = None

    def __check_init__(self):
        check_variant("EquilibriumProp", self.variant, VARIANTS)
        check_beta("EquilibriumProp", self.beta)
        if self.variant == "holomorphic" and (
            not isinstance(self.n_points, int) or self.n_points < 2
        ):
            raise ValueError(
                "EquilibriumProp: holomorphic EP needs `n_points` N >= 2 points on the "
                f"circle, got {self.n_points!r}."
            )
        check_steps("EquilibriumProp", free_steps=self.free_steps, nudged_steps=self.nudged_steps)

    def __call__(
        self, model: AbstractEnergyModel, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        y = check_batch("EquilibriumProp", model, x, y)
        if self.variant == "holomorphic" and not model.holomorphic:
            raise ValueError(
                "EquilibriumProp: holomorphic EP needs a holomorphic activation (complex "
                f"nudges), but this {type(model).__name__} is not holomorphic; use one of "
                f"{sorted(HOLOMORPHIC)}."
            )
        beta = jnp.asarray(checked_beta("EquilibriumProp", self.beta))
        if self.random_sign:
            beta = random_sign("EquilibriumProp", beta, key)
        nudges = nudge_points(beta, self.variant, self.n_points).astype(state_dtype(model, x))
        phases = relax_nudges(
            model,
            x,
            y,
            nudges,
            phase_solver(self.free_solver, self.free_steps),
            phase_solver(self.nudged_solver, self.nudged_steps),
        )
        states = lax.stop_gradient(nudges.states(phases))

        def surrogate(m):
            # Σ_p c_p Re F(θ, s^{β_p}, β_p): its θ-gradient is the EP estimate ĝ.
            def per_example(s_points, xi, yi):
                def term(s, b, c):
                    return jnp.real(c * m.total_energy(s, xi, yi, b))

                return jnp.sum(jax.vmap(term)(s_points, nudges.betas, nudges.weights))

            return jnp.mean(jax.vmap(per_example)(states, x, y))

        return finish(model, phases, y, eqx.filter_grad(surrogate)(model), beta=beta)
