r"""Implicit differentiation for any solver function (jaxopt's decorators).

`custom_root(g)(solver)` and `custom_fixed_point(f)(solver)` wrap a function
`solver(init, *args, **kwargs) -> z*` that returns a root of
`g(z, *args, **kwargs)` (or a fixed point of `f`), computed in any way at all (a
closed form, a foreign library, a Python loop), so that its derivative with respect
to `args` and `kwargs` is the implicit function theorem at z*,

    dz*/dθ = -(∂g/∂z)⁻¹ ∂g/∂θ    (for a fixed point, g(z) = z - f(z)),

instead of autodiff through the solver, which is neither traced nor differentiated
(`init` receives no derivative). The linear system is solved by one of the
library's implicit adjoints, so forward and reverse mode both work, and under
`vmap` each example's Krylov solve stops on its own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax
from jax.flatten_util import ravel_pytree

from ._ragged import BATCH_BUCKETS
from .adjoints import AbstractLinearAdjoint, Implicit


def _bind(reference, args, kwargs):
    """Keyword arguments resolved to positions by `reference`'s signature (whose first
    parameter is the solution), so that a solver called with keywords can feed an
    optimality function that takes them positionally, as jaxopt does. Left as they
    are when the signature cannot take them so (e.g. it has `*args` only)."""
    if not kwargs:
        return args, kwargs
    try:
        bound = inspect.signature(reference).bind(None, *args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    return bound.args[1:], bound.kwargs


def _stop(tree):
    return jtu.tree_map(lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x, tree)


def _attach(residual, sol, theta, adjoint: AbstractLinearAdjoint, who: str):
    """`sol`, differentiable in `theta` by the IFT on residual(sol, theta) = 0."""
    sol = jtu.tree_map(jnp.asarray, sol)
    flat, unravel = ravel_pytree(sol)
    if not jnp.issubdtype(flat.dtype, jnp.inexact):
        raise TypeError(f"{who}: the solution must be floating point, got {flat.dtype}.")
    try:
        out = jax.eval_shape(residual, sol, theta)
    except Exception as e:
        raise ValueError(
            f"{who}: calling the optimality function at the solution failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    if jtu.tree_structure(out) != jtu.tree_structure(sol) or any(
        a.shape != b.shape for a, b in zip(jtu.tree_leaves(out), jtu.tree_leaves(sol), strict=True)
    ):
        raise ValueError(
            f"{who}: the optimality function must return the solution's structure and "
            f"shapes (a square system); got {out} for a solution {jax.eval_shape(lambda: sol)}."
        )
    fn = eqx.filter_closure_convert(residual, sol, theta)
    dyn, static = eqx.partition((fn, theta), eqx.is_array)
    tol = adjoint.tolerance(None, flat.dtype)

    def flat_residual(z, dyn):
        dyn = jtu.tree_map(jnp.asarray, dyn)  # a Python float under eager grad
        fn_, theta_ = eqx.combine(dyn, static)
        return ravel_pytree(fn_(unravel(z), theta_))[0].astype(z.dtype)

    def solve(matvec, b):
        return adjoint.checked_solve(matvec, b, tol, BATCH_BUCKETS)[0]

    @jax.custom_jvp
    def implicit(z, dyn):
        return z

    @implicit.defjvp
    def implicit_jvp(primals, tangents):
        z, dyn = primals
        _, t_dyn = tangents
        _, b = jax.jvp(lambda d: flat_residual(z, d), (dyn,), (t_dyn,))
        _, jac_z = jax.linearize(lambda zz: flat_residual(zz, dyn), z)
        dz = lax.custom_linear_solve(jac_z, -b, solve=solve, transpose_solve=solve)
        return z, dz

    return unravel(implicit(flat, dyn))


def custom_root(
    optimality_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    adjoint: AbstractLinearAdjoint | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorator: differentiate `solver(init, *args, **kwargs)` implicitly, given
    that its answer z* is a root of `optimality_fn(z, *args, **kwargs)`.

    The IFT for a root g(z*, θ) = 0 with θ = (args, kwargs) gives
    dz*/dθ = -(∂g/∂z)⁻¹ ∂g/∂θ (jaxopt's `custom_root`; Blondel et al., "Efficient
    and modular implicit differentiation", NeurIPS 2022). The solver runs on
    gradient-stopped inputs; its answer is then given that derivative.

    Args:
        optimality_fn: g, called as `g(z, *args, **kwargs)`; it must return a pytree
            of z's structure and shapes (a square system), e.g. the gradient of an
            objective for an unconstrained minimiser. Keyword arguments of the
            solver call are passed by position where g's signature names them
            (jaxopt's behaviour: `solver(init, lam=1.0)` feeds `g(z, lam)`).
        has_aux: the solver returns `(z, aux)`; aux is passed through, with no
            derivative (it is computed from gradient-stopped inputs).
        adjoint: the linear solve with ∂g/∂z: [`eqprop_jax.Implicit`][] (default:
            BiCGStab, for any invertible ∂g/∂z; `Implicit(GMRES())` etc.), or
            [`eqprop_jax.AlmeidaPineda`][] /
            [`eqprop_jax.Neumann`][], which iterate with I - ∂g/∂z and need its
            spectral radius below one. `tol=None` means the dtype's
            [`eqprop_jax.default_tol`][]; `on_failure` applies as in
            [`eqprop_jax.fixed_point`][] (NaN by default).

    Returns:
        A decorator; the decorated solver has the solver's signature.
    """
    return _custom_root(optimality_fn, optimality_fn, has_aux, adjoint, "custom_root")


def _custom_root(optimality_fn, reference, has_aux, adjoint, who):
    adjoint = Implicit() if adjoint is None else adjoint
    if not isinstance(adjoint, AbstractLinearAdjoint):
        raise TypeError(
            f"{who}: `adjoint` must be an implicit adjoint (Implicit, AlmeidaPineda, "
            f"Neumann), got {type(adjoint).__name__}: there are no iterations to unroll."
        )
    if not callable(reference):
        raise TypeError(f"{who}: the optimality function must be callable, got {reference!r}.")

    def residual(z, theta):
        args, kwargs = _bind(reference, *theta)
        return optimality_fn(z, *args, **kwargs)

    def decorator(solver):
        @functools.wraps(solver)
        def wrapped(init, *args, **kwargs):
            out = solver(_stop(init), *_stop(args), **_stop(kwargs))
            if has_aux:
                if not isinstance(out, tuple | list) or len(out) != 2:
                    raise ValueError(
                        f"{who}: with has_aux=True the solver must return (z, aux)."
                    )
                sol, aux = out
            else:
                sol = out
            sol = _attach(residual, sol, (args, kwargs), adjoint, who)
            return (sol, aux) if has_aux else sol

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    adjoint: AbstractLinearAdjoint | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorator: differentiate `solver(init, *args, **kwargs)` implicitly, given
    that its answer z* is a fixed point, z* = `fixed_point_fn(z*, *args, **kwargs)`.

    This is [`eqprop_jax.custom_root`][] with g(z) = z - f(z), so
    dz*/dθ = (I - ∂f/∂z)⁻¹ ∂f/∂θ, as in [`eqprop_jax.fixed_point`][] (jaxopt's
    `custom_fixed_point`). [`eqprop_jax.AlmeidaPineda`][] and
    [`eqprop_jax.Neumann`][] then need ρ(∂f/∂z) < 1; [`eqprop_jax.Implicit`][]
    (default) only that I - ∂f/∂z be invertible.

    Args:
        fixed_point_fn: f, called as `f(z, *args, **kwargs)`, returning z's structure
            (keywords resolved by its signature, as for `custom_root`).
        has_aux, adjoint: as for [`eqprop_jax.custom_root`][].
    """

    def optimality_fn(z, *args, **kwargs):
        return jtu.tree_map(jnp.subtract, z, fixed_point_fn(z, *args, **kwargs))

    return _custom_root(optimality_fn, fixed_point_fn, has_aux, adjoint, "custom_fixed_point")
