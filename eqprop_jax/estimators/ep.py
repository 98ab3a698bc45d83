"""Equilibrium Propagation: gradients from the difference of equilibria under a nudge."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..equilibrium.solvers.base import AbstractSolver
from ..equilibrium.solvers.picard import Picard
from ..models.activations import HOLOMORPHIC
from ._batch import check_batch, free_phase_summary, nan_if_nonfinite
from ._validate import check_beta, check_steps, checked_beta
from .base import Estimator

_VARIANTS = ("positive", "negative", "centered", "holomorphic")


def nudge_points(beta, variant: str, n_points: int = 2) -> tuple[np.ndarray, np.ndarray]:
    r"""The nudges β_p and weights c_p with ĝ = ∂/∂θ Σ_p c_p Re F(θ, s^{β_p}, β_p).

    positive: (0, β); negative: (−β, 0); centered: (−β, β), each with weights
    ±1/(β2 − β1). holomorphic: β_k = |β| e^{2πik/N} for k = 0..⌊N/2⌋ with
    c_k = w_k/(N β_k), w_k = 2 for the points whose conjugate partner k' = N − k is
    folded in (Re of a conjugate pair is twice the real part) and 1 for β_0 = |β|
    and, for even N, β_{N/2} = −|β|. `beta` may be a traced scalar.
    """
    if variant == "holomorphic":
        r = jnp.abs(beta)
        ks = np.arange(n_points // 2 + 1)
        w = np.where((ks == 0) | (2 * ks == n_points), 1.0, 2.0)
        betas = r * jnp.exp(2j * np.pi * ks / n_points)
        return betas, w / (n_points * betas)
    lo, hi = {"positive": (0.0, 1.0), "negative": (-1.0, 0.0), "centered": (-1.0, 1.0)}[variant]
    betas = jnp.stack([lo * beta, hi * beta])
    scale = 1.0 / ((hi - lo) * beta)
    return betas, jnp.stack([-scale, scale])


class EquilibriumProp(Estimator):
    r"""The Equilibrium Propagation gradient estimate (Scellier & Bengio 2017).

    A free phase relaxes `free_steps` steps to s^0; nudged phases relax from s^0 for
    `nudged_steps` steps to s^{β_p}, the equilibria of F = E + β_p C. With the
    nudges of [`nudge_points`][]:

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
    for holomorphic, in the order of the nudges of [`nudge_points`][]) and "beta"
    used; see [`eqprop_jax.estimators.Estimator`][].
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
        if self.variant not in _VARIANTS:
            raise ValueError(
                f"EquilibriumProp: `variant` must be one of {_VARIANTS}, got {self.variant!r}."
            )
        check_beta("EquilibriumProp", self.beta)
        if self.variant == "holomorphic" and (
            not isinstance(self.n_points, int) or self.n_points < 2
        ):
            raise ValueError(
                "EquilibriumProp: holomorphic EP needs `n_points` N >= 2 points on the "
                f"circle, got {self.n_points!r}."
            )
        check_steps("EquilibriumProp", free_steps=self.free_steps, nudged_steps=self.nudged_steps)

    def _solvers(self):
        free = self.free_solver or Picard(tol=0.0, max_steps=self.free_steps)
        nudged = self.nudged_solver or Picard(tol=0.0, max_steps=self.nudged_steps)
        return free, nudged

    def __call__(
        self, model, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        y = check_batch("EquilibriumProp", model, x, y)
        act = getattr(model, "activation", None)
        if self.variant == "holomorphic" and isinstance(act, str) and act not in HOLOMORPHIC:
            raise ValueError(
                f"EquilibriumProp: holomorphic EP needs a holomorphic activation, but the "
                f"model uses {act!r}; use one of {sorted(HOLOMORPHIC)}."
            )
        beta = jnp.asarray(checked_beta("EquilibriumProp", self.beta))
        if self.random_sign:
            if key is None:
                raise ValueError("EquilibriumProp: `random_sign=True` needs a PRNG `key`.")
            beta = jnp.where(jax.random.bernoulli(key), beta, -beta)
        betas, weights = nudge_points(beta, self.variant, self.n_points)
        state_dtype = jax.tree_util.tree_leaves(jax.eval_shape(model.init_state, x[0]))[0].dtype
        if self.variant == "holomorphic":
            betas = betas.astype(jnp.result_type(state_dtype, jnp.complex64))
        else:
            betas = betas.astype(state_dtype)
        # The one-sided variants nudge once: their β = 0 point is the free state itself.
        free_index = {"positive": 0, "negative": 1}.get(self.variant)
        relaxed = betas if free_index is None else betas[1 - free_index :][:1]
        free_solver, nudged_solver = self._solvers()

        def phases(xi, yi):
            free = model.relax(xi, yi, 0.0, solver=free_solver)
            s0 = lax.stop_gradient(free.value)
            nudged = jax.vmap(lambda b: model.relax(xi, yi, b, s0, solver=nudged_solver))(relaxed)
            return free, nudged

        free, nudged = jax.vmap(phases)(x, y)
        states = nudged.value
        if free_index is not None:
            pieces = [states, jax.tree_util.tree_map(lambda s: s[:, None], free.value)]
            if free_index == 0:
                pieces = pieces[::-1]
            states = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], 1), *pieces)
        states = lax.stop_gradient(states)

        def surrogate(m):
            # Σ_p c_p Re F(θ, s^{β_p}, β_p): its θ-gradient is the EP estimate ĝ.
            def per_example(s_points, xi, yi):
                def term(s, b, c):
                    return jnp.real(c * m.total_energy(s, xi, yi, b))

                return jnp.sum(jax.vmap(term)(s_points, betas, weights))

            return jnp.mean(jax.vmap(per_example)(states, x, y))

        grads = eqx.filter_grad(surrogate)(model)
        loss, aux = free_phase_summary(model, free, y, nudged)
        aux.update(beta=beta)
        loss, grads = nan_if_nonfinite(loss, grads, aux)
        return loss, grads, aux
