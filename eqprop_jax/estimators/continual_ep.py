"""Continual EP: weights that move at every step of the nudged phase (Ernoult et al. 2020)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..solvers.base import AbstractSolver
from ..solvers.picard import Picard
from ._batch import check_batch, free_phase_summary
from .base import Estimator


class ContinualEP(Estimator):
    r"""C-EP (Ernoult, Grollier, Querlioz, Bengio & Scellier 2020).

    After a free phase to s_0 = s^0, the nudged phase runs K = `nudged_steps` steps in
    which the state and the weights move together:

        s_{t+1} = step_{θ_t}(s_t, x, y, β),
        θ_{t+1} = θ_t − (η/β) [∂F/∂θ(θ_t, s_{t+1}, β) − ∂F/∂θ(θ_t, s_t, β_t)],

    with F = E + βC (β_0 = 0 for the free state, β_t = β after), averaged over the
    batch. For the layered energies E = −Σ ρ(s_{l+1})ᵀ W_l ρ(s_l) this is the paper's
    ΔW_t = (η/β)(ρ(s_{t+1})ρ(s_{t+1})ᵀ − ρ(s_t)ρ(s_t)ᵀ). The increments telescope, so
    as η → 0 (θ_t ≈ θ_0) their sum is η times the EP estimate
    [∂F/∂θ(s^β) − ∂F/∂θ(s^0)]/β, which tends to dL/dθ as β → 0 (their Theorem).

    `grads` is −(θ_K − θ_0)/η = Σ_t [∂F/∂θ(θ_t, s_{t+1}) − ∂F/∂θ(θ_t, s_t)]/β (summed
    directly, not by differencing parameters), so one SGD step θ ← θ − η·grads with the
    same η reproduces the weights C-EP reaches; use it with `optax.sgd(η)`.

    Args:
        beta: the nudge (nonzero, real; one-sided, as in the paper).
        learning_rate: η, the weight step taken at every nudged step (> 0). Either a
            float (shared) or a pytree of floats with the model's trainable structure
            (per-layer rates, as in the paper).
        free_steps, nudged_steps: T and K.
        free_solver: override the default `Picard(tol=0, max_steps=free_steps)`.

    `aux`: "state" (s^0, batched), "predictions", "stats" and "result" of the free
    phase, "nudged_state" (s_K) and "model" (the model with θ_K).
    """

    beta: float = 0.1
    learning_rate: float | PyTree = 0.01
    free_steps: int = eqx.field(static=True, default=40)
    nudged_steps: int = eqx.field(static=True, default=15)
    free_solver: AbstractSolver | None = None

    def __check_init__(self):
        if jnp.iscomplexobj(jnp.asarray(self.beta)):
            raise TypeError("ContinualEP: `beta` must be real.")
        if not isinstance(self.beta, jax.core.Tracer) and float(self.beta) == 0.0:
            raise ValueError("ContinualEP: `beta` must be nonzero (the update divides by β).")
        for leaf in jax.tree_util.tree_leaves(self.learning_rate):
            if not isinstance(leaf, jax.core.Tracer) and not float(jnp.min(leaf)) > 0:
                raise ValueError(
                    f"ContinualEP: `learning_rate` must be positive, got {self.learning_rate!r}."
                )
        for name in ("free_steps", "nudged_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ContinualEP: `{name}` must be a positive integer, got {v!r}.")

    def __call__(
        self, model, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        check_batch("ContinualEP", model, x, y)
        free_solver = self.free_solver or Picard(tol=0.0, max_steps=self.free_steps)
        free = jax.vmap(lambda xi, yi: model.relax(xi, yi, 0.0, solver=free_solver))(x, y)
        s0 = lax.stop_gradient(free.value)
        dtype = jax.tree_util.tree_leaves(s0)[0].dtype
        beta = jnp.asarray(self.beta, dtype)
        params, static = eqx.partition(model, eqx.is_inexact_array)
        lr = self.learning_rate
        # One rate for all: a float or scalar array. (jnp.ndim of a model-shaped tree of
        # per-layer rates is also 0, so test the tree's structure, not its ndim.)
        if not jax.tree_util.tree_leaves(lr) or jax.tree_util.treedef_is_leaf(
            jax.tree_util.tree_structure(lr)
        ):
            lr = jax.tree_util.tree_map(lambda _: self.learning_rate, params)

        def d_f(p, s, b):
            def mean_f(p):
                m = eqx.combine(p, static)
                return jnp.mean(jax.vmap(lambda si, xi, yi: m.total_energy(si, xi, yi, b))(s, x, y))

            return jax.grad(mean_f)(p)

        def body(carry, _):
            p, s, b_prev, total = carry
            m = eqx.combine(p, static)
            s_new = jax.vmap(lambda si, xi, yi: m.step(si, xi, yi, beta))(s, x, y)
            g = jax.tree_util.tree_map(
                lambda a, c: (a - c) / beta, d_f(p, s_new, beta), d_f(p, s, b_prev)
            )
            p = jax.tree_util.tree_map(lambda w, eta, gi: w - eta * gi, p, lr, g)
            total = jax.tree_util.tree_map(jnp.add, total, g)
            return (p, s_new, beta, total), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (p_final, s_final, _, grads), _ = lax.scan(
            body, (params, s0, jnp.zeros((), dtype), zeros), length=self.nudged_steps
        )
        loss, aux = free_phase_summary(model, free, y)
        aux.update(nudged_state=s_final, model=eqx.combine(p_final, static))
        return loss, grads, aux


__all__ = ["ContinualEP"]
