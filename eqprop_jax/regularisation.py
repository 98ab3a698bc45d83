r"""Jacobian regularisation of equilibrium models: estimates of ∂f/∂z at z*.

A deep equilibrium model z* = f_θ(z*, x) is fast to solve and to differentiate when
J = ∂f/∂z at z* is well conditioned; training tends to let J grow until the forward
solve needs many iterations or fails (Bai, Koltun & Kolter 2021). Two estimates:

- [`eqprop_jax.jacobian_frobenius`][]: a Hutchinson estimate of ‖J‖_F², unbiased and
  differentiable, to add to the loss;
- [`eqprop_jax.spectral_radius`][]: a power-method estimate of ρ(J), the quantity
  that decides whether the fixed-point iteration and the Neumann/Almeida-Pineda
  adjoints converge (they do iff ρ(J) < 1); a diagnostic, not a loss.

ρ(J) <= ‖J‖₂ <= ‖J‖_F, so penalising the Frobenius norm bounds the spectral radius.
Both take f as [`eqprop_jax.fixed_point`][] does, `f(z, args) -> z` over a pytree z,
and act on one example: `jax.vmap` them over a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from . import _checks
from .equilibrium import ragged_while_loop


def _flat_map(f, z, args, who):
    flat, unravel = ravel_pytree(z)
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        raise TypeError(f"{who}: z must be real floating point, got dtype {flat.dtype}.")
    if flat.size == 0:
        raise ValueError(f"{who}: z has no entries.")

    def fn(zf):
        out = ravel_pytree(f(unravel(zf), args))[0]
        if out.shape != flat.shape:
            raise ValueError(
                f"{who}: f(z, args) must return a pytree the size of z ({flat.size} entries), "
                f"got {out.size}."
            )
        return out.astype(flat.dtype)

    return fn, flat


def _check_key(who, key):
    if not eqx.is_array(key):
        raise TypeError(f"{who}: `key` must be a JAX PRNG key (jax.random.key(0)), got {key!r}.")


def hutchinson_frobenius(
    vjp: Callable[[Array], Array], probes: Float[Array, "n d"]
) -> Float[Array, ""]:
    r"""(1/n) Σ_i ‖vjp(ε_i)‖² = (1/n) Σ_i ‖ε_iᵀ J‖², from the given probe vectors ε_i.

    Over probes with E[ε εᵀ] = I this averages to tr(J Jᵀ) = ‖J‖_F²; over all 2^d sign
    vectors it equals ‖J‖_F² exactly (the cross terms ε_a ε_b, a != b, cancel).
    """
    return jnp.mean(jnp.sum(jax.vmap(vjp)(probes) ** 2, axis=-1))


def jacobian_frobenius(
    f: Callable[[PyTree, Any], PyTree],
    z: PyTree[Array],
    args: PyTree = None,
    *,
    key: PRNGKeyArray,
    n_samples: int = 1,
    distribution: Literal["normal", "rademacher"] = "normal",
) -> Float[Array, ""]:
    r"""Hutchinson estimate of ‖∂f/∂z‖_F² at z, for use as a loss term.

    Jacobian regularisation (Bai, Koltun & Kolter 2021, "Stabilizing equilibrium
    models by Jacobian regularization", ICML) adds γ ‖J‖_F² at the equilibrium to the
    loss, with J = ∂f/∂z (z*). Since ‖J‖_F² = tr(JᵀJ) = E_ε ‖εᵀ J‖² for any random
    ε with E[ε εᵀ] = I (Hutchinson 1989), the estimate

        (1/n) Σ_{i=1}^{n} ‖ε_iᵀ J‖²,   ε_i ~ N(0, I) or uniform on {-1, +1}^d,

    is unbiased and costs n vector-Jacobian products of f (no Jacobian is formed).
    It is differentiable: its gradient reaches θ through f, and through z when z is
    the output of [`eqprop_jax.fixed_point`][] (pass `jax.lax.stop_gradient(z)` to
    penalise J only through f's parameters). Rademacher probes have the smaller
    variance, 2 Σ_{a≠b} (JJᵀ)_{ab}², against 2 ‖JJᵀ‖_F² for Gaussian probes.

    Bai et al.'s code divides the estimate by the size of z, so their weights γ
    (e.g. 0.5-2.0) refer to the per-unit mean; divide likewise to reuse them.

    ```python
    def loss(model, x, y, key):
        z = model.deq(x)                                   # z* (implicit gradient)
        reg = eqp.jacobian_frobenius(model.deq_cell, z, x, key=key) / z.size
        return cross_entropy(model.head(z), y) + gamma * reg
    ```

    Under `jax.vmap`, split the key per example (`jax.random.split(key, batch)`),
    or share one key: each example's estimate is unbiased either way.

    Args:
        f: the map, `f(z, args) -> z`, as for [`eqprop_jax.fixed_point`][].
        z: the point (usually the equilibrium z*), a pytree of real floating arrays.
        args: f's other input.
        key: a JAX PRNG key for the probes.
        n_samples: the number of probes n (each one a VJP).
        distribution: `"normal"` or `"rademacher"`.
    """
    who = "jacobian_frobenius"
    _checks.positive_int(who, "n_samples", n_samples)
    _checks.choice(who, "distribution", distribution, ("normal", "rademacher"))
    _check_key(who, key)
    fn, flat = _flat_map(f, z, args, who)
    shape = (n_samples, flat.size)
    if distribution == "normal":
        probes = jax.random.normal(key, shape, flat.dtype)
    else:
        probes = jax.random.rademacher(key, shape, flat.dtype)
    _, vjp = jax.vjp(fn, flat)
    return hutchinson_frobenius(lambda v: vjp(v)[0], probes)


class SpectralRadius(eqx.Module):
    """A power-method estimate of ρ(∂f/∂z): `value`, the iterations `steps`, and
    whether the estimate settled (`converged`) before `max_steps`."""

    value: Float[Array, "..."]
    steps: Int[Array, "..."]
    converged: Bool[Array, "..."]


def spectral_radius(
    f: Callable[[PyTree, Any], PyTree],
    z: PyTree[Array],
    args: PyTree = None,
    *,
    key: PRNGKeyArray | None = None,
    max_steps: int = 100,
    tol: float = 1e-4,
) -> SpectralRadius:
    r"""Power-method estimate of the spectral radius of J = ∂f/∂z at z.

    From a random unit vector v_0 (from `key`; a fixed one by default), iterate

        w_k = J v_k,   ρ_k = ‖w_k‖₂,   v_{k+1} = w_k / ρ_k

    with Jacobian-vector products (`jax.linearize`, no Jacobian formed), and stop when
    |ρ_k - ρ_{k-1}| <= tol ρ_k or after `max_steps` products (von Mises 1929; Golub &
    Van Loan, "Matrix computations", §7.3). ρ_k -> |λ₁| when J has one eigenvalue λ₁
    of largest modulus (real, or a ± pair of a symmetric J), with error shrinking as
    |λ₂/λ₁|^k. When the largest-modulus eigenvalues are a complex pair of a
    non-normal J, ρ_k oscillates around |λ₁| and may not settle (`converged` is
    then false).

    ρ(J) < 1 is the condition under which Picard iteration converges locally to z*
    and under which [`eqprop_jax.AlmeidaPineda`][] and [`eqprop_jax.Neumann`][]
    converge, so this is the number to watch while training a DEQ. It is a
    diagnostic: its value carries no gradient (use [`eqprop_jax.jacobian_frobenius`][],
    an upper bound, as a loss). Under `jax.vmap` each example stops on its own
    (a [`eqprop_jax.ragged_while_loop`][]).

    Args:
        f: the map, `f(z, args) -> z`.
        z: the point, usually z*; a pytree of real floating arrays.
        args: f's other input.
        key: PRNG key for v_0 (default: `jax.random.key(0)`).
        max_steps: at most this many Jacobian-vector products.
        tol: relative change of ρ_k at which the iteration stops.
    """
    who = "spectral_radius"
    _checks.positive_int(who, "max_steps", max_steps)
    _checks.tolerance(who, "tol", tol, allow_none=False)
    key = jax.random.key(0) if key is None else key
    _check_key(who, key)
    # The estimate is a diagnostic: cut every path to the differentiated inputs,
    # including arrays f closes over, so that calling it inside `jax.grad` is valid
    # (reverse mode cannot run through the while loop).
    fn, z, args = _stopped(f, z, args)
    flat_fn, flat = _flat_map(fn, z, args, who)
    _, jvp = jax.linearize(flat_fn, flat)
    v0 = jax.random.normal(key, flat.shape, flat.dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    real = flat.dtype

    def cond(c):
        _, prev, rho, k = c
        settled = (k >= 2) & (jnp.abs(rho - prev) <= tol * rho)
        going = ~settled & (rho > 0) & jnp.isfinite(rho)
        return (k < max_steps) & ((k == 0) | going)

    def body(c):
        v, _, rho, k = c
        w = jvp(v)
        new = jnp.linalg.norm(w)
        v = jnp.where(new > 0, w / jnp.where(new > 0, new, 1), v)
        return v, rho, new, k + 1

    init = (v0, jnp.array(jnp.inf, real), jnp.array(jnp.inf, real), jnp.array(0, jnp.int32))
    _, prev, rho, k = ragged_while_loop(cond, body, init)
    converged = (rho == 0) | ((k >= 2) & (jnp.abs(rho - prev) <= tol * rho))
    return SpectralRadius(rho, k, converged)


def _stopped(f, z, args):
    """f, z and args with every array (also those f closes over) under stop_gradient."""
    fn = eqx.filter_closure_convert(f, z, args)
    dyn, static = eqx.partition((fn, z, args), eqx.is_array)
    dyn = jtu.tree_map(lax.stop_gradient, dyn)
    return eqx.combine(dyn, static)
