"""Continual EP: weights that move at every step of the nudged phase (Ernoult et al. 2020)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..equilibrium import AbstractSolver, Result, Solution, Stats
from ..models.base import AbstractEnergyModel
from .base import Estimator
from .checks import check_batch, check_beta, check_steps, checked_beta
from .phases import (
    Phases,
    all_finite,
    batched_step,
    energy_grads,
    finish,
    fixed_steps_result,
    max_abs_change,
    phase_solver,
    relax_free,
)


def _rates(learning_rate: float | PyTree, params: PyTree) -> PyTree:
    """η for every leaf of `params`: a scalar is shared; a pytree (the trainable
    structure, or a prefix of it) gives each subtree its own rate."""
    if not jax.tree_util.tree_leaves(learning_rate):
        raise ValueError("ContinualEP: `learning_rate` holds no rate.")
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(learning_rate)):
        return jax.tree_util.tree_map(lambda _: learning_rate, params)
    try:
        return jax.tree_util.tree_map(
            lambda eta, sub: jax.tree_util.tree_map(lambda _: eta, sub), learning_rate, params
        )
    except ValueError as e:
        raise ValueError(
            "ContinualEP: a per-layer `learning_rate` must have the structure of the "
            "model's trainable parameters, `eqx.filter(model, eqx.is_inexact_array)` "
            f"(or a prefix of it), with a rate in place of each array: {e}"
        ) from None


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
        beta: the nudge (real, finite, nonzero; one-sided, as in the paper).
        learning_rate: η, the weight step taken at every nudged step (finite, > 0).
            Either a float (shared) or a pytree of floats with the structure of
            `eqx.filter(model, eqx.is_inexact_array)` (or a prefix of it), e.g.
            `jax.tree_util.tree_map(lambda _: 0.01, eqx.filter(model,
            eqx.is_inexact_array))` with some leaves changed: per-layer rates, as in
            the paper. Then θ_K = θ_0 − η ⊙ grads leaf by leaf.
        free_steps, nudged_steps: T and K.
        free_solver: override the default `Picard(tol=0, max_steps=free_steps)`.

    `aux`: "state" (s^0, batched), "predictions", "stats" and "result" of the free
    phase, "nudged_result" and "nudged_stats" of the nudged phase (shape (batch, 1):
    `max_steps`, or `nonfinite` where s_K or θ_K holds NaN or inf), "nudged_state"
    (s_K) and "model" (the model with θ_K); see
    [`eqprop_jax.estimators.Estimator`][].
    """

    beta: float = 0.1
    learning_rate: float | PyTree = 0.01
    free_steps: int = eqx.field(static=True, default=40)
    nudged_steps: int = eqx.field(static=True, default=15)
    free_solver: AbstractSolver | None = None

    def __check_init__(self):
        check_beta("ContinualEP", self.beta)
        leaves = jax.tree_util.tree_leaves(self.learning_rate)
        if not leaves:
            raise ValueError("ContinualEP: `learning_rate` holds no rate.")
        for leaf in leaves:
            if isinstance(leaf, jax.core.Tracer):
                continue
            a = np.asarray(leaf)
            if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
                raise TypeError(
                    f"ContinualEP: `learning_rate` must hold real numbers, got {leaf!r}."
                )
            if a.size == 0 or not np.all(np.isfinite(a) & (a > 0)):
                raise ValueError(
                    f"ContinualEP: `learning_rate` must be finite and positive, got {leaf!r}."
                )
        check_steps("ContinualEP", free_steps=self.free_steps, nudged_steps=self.nudged_steps)

    def __call__(
        self, model: AbstractEnergyModel, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        y = check_batch("ContinualEP", model, x, y)
        free = relax_free(model, x, y, phase_solver(self.free_solver, self.free_steps))
        s0 = lax.stop_gradient(free.value)
        dtype = jax.tree_util.tree_leaves(s0)[0].dtype
        beta = jnp.asarray(checked_beta("ContinualEP", self.beta), dtype)
        params, static = eqx.partition(model, eqx.is_inexact_array)
        lr = _rates(self.learning_rate, params)

        def body(carry, _):
            p, s, b_prev, total = carry
            s_new = batched_step(eqx.combine(p, static), s, x, y, beta)
            g = jax.tree_util.tree_map(
                lambda a, c: (a - c) / beta,
                energy_grads(p, static, s_new, x, y, beta),
                energy_grads(p, static, s, x, y, b_prev),
            )
            p = jax.tree_util.tree_map(lambda w, eta, gi: w - eta * gi, p, lr, g)
            total = jax.tree_util.tree_map(jnp.add, total, g)
            return (p, s_new, beta, total), jax.vmap(max_abs_change)(s_new, s)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (p_final, s_final, _, grads), changes = lax.scan(
            body, (params, s0, jnp.zeros((), dtype), zeros), length=self.nudged_steps
        )
        # θ is shared by the batch: NaN weights spoil every example's nudged phase.
        result = jnp.where(
            all_finite(p_final), jax.vmap(fixed_steps_result)(s_final), Result.nonfinite
        )
        n = jnp.shape(x)[0]
        nudged = Solution(
            None,
            result.astype(jnp.int32)[:, None],
            Stats(jnp.full((n, 1), self.nudged_steps, jnp.int32), changes[-1][:, None]),
        )
        return finish(
            model,
            Phases(free, nudged),
            y,
            grads,
            nudged_state=s_final,
            model=eqx.combine(p_final, static),
        )


__all__ = ["ContinualEP"]
