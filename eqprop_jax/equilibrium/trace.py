r"""What a solve can record on request, besides its answer: the convergence trace.

`fixed_point(..., trace=K)` (or `trace=`[`eqprop_jax.Trace`][]`(K, iterates=True)`)
keeps, per example, the residual after each of the first K updates, and optionally
the iterates themselves, in the carry of the solve's own loop: static shapes, no
host callback, and under `vmap` each example records its own solve. The forward
solver's final state is recorded the same way for the adjoints that reuse it
([`eqprop_jax.SHINE`][]). This module is the only code that knows the layout.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PyTree

from .. import _checks


class Trace(eqx.Module):
    r"""Ask [`eqprop_jax.fixed_point`][] for the convergence trace of the first `steps`
    updates, per example: `fixed_point(f, z0, args, trace=Trace(50))`
    (`trace=50` is the same).

    The solve records r_k, the residual it tests after update k (k = 1, …, K):

        r_k = max_i |f(z_k)_i - z_{k,i}| / (atol + rtol |z_{k,i}|),

    the quantity of `stats.residual` (unscaled, max_i |f(z_k)_i - z_{k,i}|, for a
    fixed-step solve), into `sol.stats.trace`, an array of shape (..., K): entry
    k - 1 is r_k. **Entries after the solve stopped are NaN**, so a plot shows where
    each example stopped (`stats.steps` of them are finite when steps <= K). With
    `iterates=True` the iterates z_1, …, z_K are returned too, in `sol.iterates`
    (z0's structure with a leading axis K); **there the entries after the solve
    stopped repeat its last iterate** (z0 when it took no step), so that a loss on
    them stays finite ([`eqprop_jax.fixed_point_correction`][] reads them).
    Neither carries a derivative.

    Cost: a (K,) buffer (and a (K, d) one with `iterates`) per example in the loop's
    carry, written once per update; nothing when not asked for.
    """

    steps: int
    iterates: bool = False

    def __check_init__(self):
        _checks.positive_int("Trace", "steps", self.steps)
        if not isinstance(self.iterates, bool):
            raise TypeError(f"Trace: `iterates` must be a bool, got {self.iterates!r}.")


def as_trace(trace: int | Trace | None) -> Trace | None:
    """`fixed_point`'s `trace` argument as a [`eqprop_jax.Trace`][] (None: no trace)."""
    if trace is None or isinstance(trace, Trace):
        return trace
    if isinstance(trace, bool) or not isinstance(trace, int):
        raise TypeError(
            f"fixed_point: `trace` must be an int (the number of updates to record) or an "
            f"eqprop_jax.Trace, got {trace!r}."
        )
    return Trace(trace)


class Recorded(eqx.Module):
    """What a `Recorder` returns after the solve (absent parts are None)."""

    residual: Float[Array, "... K"] | None
    iterates: Float[Array, "... K d"] | None
    solver_state: PyTree | None


class Recorder(eqx.Module):
    """Records, inside `fixed_point`'s loop, the trace and (for an adjoint that
    reuses it) the solver's final state. `_iterate` calls `init` once, `update` after
    every update, and `finish` after the loop."""

    steps: int = 0
    iterates: bool = False
    solver_state: bool = False

    def init(self, z0: Array) -> tuple:
        real = jnp.real(z0).dtype
        res = jnp.full((self.steps,), jnp.nan, real) if self.steps else ()
        its = jnp.zeros((self.steps,) + z0.shape, z0.dtype) if self.iterates else ()
        return res, its

    def update(self, rec: tuple, step: Int[Array, ""], z: Array, state: PyTree, res: Array):
        del state
        res_t, its = rec
        # step counts from 1; writes past K are dropped.
        if self.steps:
            res_t = res_t.at[step - 1].set(res.astype(res_t.dtype), mode="drop")
        if self.iterates:
            its = its.at[step - 1].set(z, mode="drop")
        return res_t, its

    def finish(self, rec: tuple, z: Array, step: Int[Array, ""], state: PyTree) -> Recorded:
        res_t, its = rec
        if self.iterates:
            stopped = jnp.arange(self.steps) >= step
            its = jnp.where(stopped[:, None], z[None], its)
        return Recorded(
            res_t if self.steps else None,
            its if self.iterates else None,
            state if self.solver_state else None,
        )


def with_trace(stats, recorded: Recorded, unravel) -> tuple:
    """`stats` with the recorded residuals, and the iterates as pytrees (leading axis
    K), both cut from autodiff."""
    residual = recorded.residual
    if residual is not None:
        stats = eqx.tree_at(
            lambda s: s.trace, stats, lax.stop_gradient(residual), is_leaf=lambda x: x is None
        )
    iterates = recorded.iterates
    if iterates is not None:
        iterates = jax.vmap(unravel)(lax.stop_gradient(iterates))
    return stats, iterates


def with_spectral_radius(stats, f, value, args):
    """`stats` with ρ(∂f/∂z) at `value` ([`eqprop_jax.spectral_radius`][])."""
    # regularisation imports the equilibrium package, so it is imported here.
    from ..regularisation import spectral_radius

    rho = spectral_radius(f, value, args).value
    return eqx.tree_at(lambda s: s.spectral_radius, stats, rho, is_leaf=lambda x: x is None)
