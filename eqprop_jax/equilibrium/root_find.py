"""Root finding, g(z*, args) = 0, as the fixed point of z - g(z)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._solution import Solution
from .adjoints import AbstractAdjoint
from .fixed_point import _check_map, _check_state, fixed_point
from .solvers.base import AbstractSolver
from .solvers.newton import Newton


def root_find(
    g: Callable[[PyTree, Any], PyTree],
    z0: PyTree[Array],
    args: PyTree = None,
    *,
    solver: AbstractSolver | None = None,
    adjoint: AbstractAdjoint | None = None,
    has_aux: bool = False,
    best_so_far: bool = False,
    throw: bool = False,
    probe: Array | None = None,
) -> Solution:
    r"""Solve g(z*, args) = 0 for a square system (g returns z's structure).

    The roots of g are the fixed points of f(z) = z - g(z), and this is
    [`eqprop_jax.fixed_point`][] on that f, so everything there holds here: any
    solver ([`eqprop_jax.Newton`][] by default; [`eqprop_jax.Chord`][]; the
    fixed-point solvers too, which then iterate z - g(z) and need it to contract),
    every adjoint, `has_aux`, `best_so_far`, per-example stopping under `vmap`, and
    the statuses. The stopping rule reads max_i |g_i(z)| / (atol + rtol |z_i|) <= 1,
    computed as |(z - g(z)) - z|, i.e. to within one rounding of |z|.

    The derivative is the implicit function theorem for a root,

        dz*/dθ = -(∂g/∂z)⁻¹ ∂g/∂θ,

    which is the fixed-point formula with I - ∂f/∂z = ∂g/∂z. The implicit adjoints
    solve that system: [`eqprop_jax.Implicit`][] for any invertible ∂g/∂z;
    [`eqprop_jax.AlmeidaPineda`][] and [`eqprop_jax.Neumann`][] iterate with
    I - ∂g/∂z, so they need its spectral radius below one.

    Args:
        g: `g(z, args)`, returning a pytree of z's structure, shapes and dtype (with
            `has_aux=True`, a pair `(value, aux)`).
        z0, args, solver, adjoint, has_aux, best_so_far, throw, probe: as for
            [`eqprop_jax.fixed_point`][] (default solver: `Newton()`).
    """
    _check_state(z0, "root_find")
    if not callable(g):
        raise TypeError(f"root_find: `g` must be callable, got {type(g).__name__}.")
    _check_map(g, z0, args, has_aux, "root_find", "g")

    def f(z, args):
        out = g(z, args)
        r, aux = out if has_aux else (out, None)
        fz = jtu.tree_map(lambda zi, ri: zi - ri, z, r)
        return (fz, aux) if has_aux else fz

    return fixed_point(
        f,
        z0,
        args,
        solver=Newton() if solver is None else solver,
        adjoint=adjoint,
        has_aux=has_aux,
        best_so_far=best_so_far,
        throw=throw,
        probe=probe,
    )
