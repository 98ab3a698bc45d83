"""Anderson acceleration (type II, Walker & Ni 2011)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ... import _checks
from .base import AbstractSolver, FlatFn


class _AndersonState(eqx.Module):
    zs: Array  # (history, d) past iterates
    fzs: Array  # (history, d) f at those iterates
    count: Int[Array, ""]


class Anderson(AbstractSolver):
    r"""Anderson acceleration with `history` m, ridge λ and mixing β.

    With residuals r_i = f(z_i) - z_i over the last m iterates, solve

        α = argmin_α ‖Σ_i α_i r_i‖² + λ' ‖α‖²   subject to Σ_i α_i = 1,

    (λ' = λ · max_i ‖r_i‖², so the ridge is scale-free), then

        z_{k+1} = β Σ_i α_i f(z_i) + (1 - β) Σ_i α_i z_i.

    The ridge keeps the m x m system well posed when residuals become collinear;
    a NaN/inf in the extrapolation falls back to the damped step
    z + β (f(z) - z). Reference: Walker & Ni, "Anderson acceleration for
    fixed-point iterations", SIAM J. Numer. Anal. 2011; as used for DEQs by
    Bai et al. 2019.

    With `mixing_frequency` k > 1 only every k-th step extrapolates and the others
    are damped steps z + β (f(z) - z), while the history records every iterate:
    "alternating Anderson" (Pratapa, Suryanarayana & Pask, J. Comput. Phys. 2016),
    jaxopt's `mixing_frequency`. Under `vmap` the skipped extrapolations still run
    (a per-example branch is a `select`), so it changes the iterates, not the cost.

    Args:
        history: m >= 1 (m = 1 is damped iteration).
        ridge: λ >= 0.
        mixing: β in (0, 1].
        mixing_frequency: k >= 1, extrapolate on every k-th step (1: every step).
        tol, rtol, max_steps, divergence: see [`eqprop_jax.AbstractSolver`][].
    """

    history: int = 5
    ridge: float = 1e-8
    mixing: float = 1.0
    mixing_frequency: int = 1

    def __check_init__(self):
        super().__check_init__()
        _checks.positive_int("Anderson", "history", self.history)
        _checks.positive_int("Anderson", "mixing_frequency", self.mixing_frequency)
        _checks.tolerance("Anderson", "ridge", self.ridge, allow_none=False)
        if isinstance(self.mixing, int | float) and not 0 < self.mixing <= 1:
            raise ValueError(f"`mixing` must lie in (0, 1], got {self.mixing}.")

    def init(self, z: Float[Array, " d"], fz: Float[Array, " d"]) -> _AndersonState:
        hist = jnp.zeros((self.history,) + z.shape, z.dtype)
        return _AndersonState(hist, hist, jnp.array(0, jnp.int32))

    def update(self, fn: FlatFn, z, fz, state: _AndersonState):
        m = self.history
        idx = state.count % m
        zs = state.zs.at[idx].set(z)
        fzs = state.fzs.at[idx].set(fz)
        count = state.count + 1
        valid = jnp.arange(m, dtype=count.dtype) < jnp.minimum(count, m)
        # The m x m least squares runs in at least float32: XLA has no bfloat16 or
        # float16 LU, and a half-precision Gram matrix loses the small residuals.
        if jnp.finfo(z.dtype).bits >= 32:
            wide = z.dtype
        else:
            wide = jnp.complex64 if jnp.iscomplexobj(z) else jnp.float32
        res = jnp.where(valid[:, None], fzs - zs, 0).astype(wide)
        gram = jnp.conj(res) @ res.T
        diag = jnp.real(jnp.diagonal(gram))
        lam = self.ridge * jnp.max(diag) + jnp.finfo(diag.dtype).tiny
        both = valid[:, None] & valid[None, :]
        gram = jnp.where(both, gram, 0) + jnp.diag(jnp.where(valid, lam, 1.0)).astype(wide)
        y = jnp.linalg.solve(gram, valid.astype(wide))
        alpha = (y / jnp.sum(y)).astype(z.dtype)
        z_new = self.mixing * (alpha @ fzs) + (1 - self.mixing) * (alpha @ zs)
        fallback = z + self.mixing * (fz - z)
        extrapolate = jnp.all(jnp.isfinite(z_new))
        if self.mixing_frequency > 1:
            extrapolate = extrapolate & (state.count % self.mixing_frequency == 0)
        z_new = jnp.where(extrapolate, z_new, fallback)
        return z_new, _AndersonState(zs, fzs, count)
