"""The public entry point: `fixed_point(f, z0, args, solver=..., adjoint=...)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from ._ragged import ragged_while_loop
from ._solution import Result, Solution, Stats
from .adjoints import AbstractAdjoint, Implicit, Unrolled
from .solvers.base import AbstractSolver, scaled_residual
from .solvers.picard import Picard

_RUNNING = -1


def _leaf_desc(path) -> str:
    return jtu.keystr(path) or "<root>"


def _validate(f, z0, args, solver, adjoint):
    if not callable(f):
        raise TypeError(f"fixed_point: `f` must be callable, got {type(f).__name__}.")
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"fixed_point: `solver` must be an eqprop_jax solver, got {type(solver).__name__}."
        )
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"fixed_point: `adjoint` must be an eqprop_jax adjoint, got {type(adjoint).__name__}."
        )
    leaves = jtu.tree_leaves_with_path(z0)
    if not leaves:
        raise ValueError("fixed_point: `z0` has no array leaves.")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"fixed_point: z0 leaf {_leaf_desc(path)} has dtype {dtype}; the state must be "
                "floating point or complex (cast it, e.g. `z0.astype(jnp.float32)`)."
            )
    dtypes = {jnp.result_type(leaf) for _, leaf in leaves}
    if len(dtypes) > 1:
        raise TypeError(
            f"fixed_point: z0 mixes dtypes {sorted(map(str, dtypes))}; use one dtype for the state."
        )
    z_struct = jax.eval_shape(lambda z: z, z0)
    try:
        out_struct = jax.eval_shape(f, z0, args)
    except Exception as e:
        raise ValueError(f"fixed_point: calling f(z0, args) failed: {type(e).__name__}: {e}") from e
    if jtu.tree_structure(out_struct) != jtu.tree_structure(z_struct):
        raise ValueError(
            "fixed_point: f(z0, args) must return a pytree with the structure of z0; got "
            f"{jtu.tree_structure(out_struct)} for z0 structure {jtu.tree_structure(z_struct)}."
        )
    for (path, a), b in zip(
        jtu.tree_leaves_with_path(z_struct), jtu.tree_leaves(out_struct), strict=True
    ):
        if a.shape != b.shape:
            raise ValueError(
                f"fixed_point: f(z0, args) changes the shape of leaf {_leaf_desc(path)}: "
                f"z0 has {a.shape}, f(z0) has {b.shape}."
            )
        if a.dtype != b.dtype:
            raise TypeError(
                f"fixed_point: f(z0, args) changes the dtype of leaf {_leaf_desc(path)}: "
                f"z0 is {a.dtype}, f(z0) is {b.dtype}."
            )


def _iterate(solver: AbstractSolver, fn: Callable[[Array], Array], z0: Array, kind: str):
    """Run `solver` on the flat map `fn` from `z0`; returns (z, result, steps, residual)."""
    atol, rtol = solver.atol_rtol
    fz0 = fn(z0)
    res0 = scaled_residual(z0, fz0, atol, rtol)
    real = res0.dtype

    def status(res, best, step):
        return jnp.where(
            ~jnp.isfinite(res),
            Result.nonfinite,
            jnp.where(
                res <= 1,
                Result.converged,
                jnp.where(
                    res > solver.divergence * best,
                    Result.diverged,
                    jnp.where(step >= solver.max_steps, Result.max_steps, _RUNNING),
                ),
            ),
        ).astype(jnp.int32)

    init = (
        z0,
        fz0,
        solver.init(z0, fz0),
        jnp.array(0, jnp.int32),
        res0,
        res0,
        status(res0, res0, 0),
    )

    def cond(carry):
        return carry[-1] == _RUNNING

    def body(carry):
        z, fz, state, step, _, best, _ = carry
        z, state = solver.update(fn, z, fz, state)
        fz = fn(z)
        res = scaled_residual(z, fz, atol, rtol)
        step = step + 1
        result = status(res, best, step)
        return z, fz, state, step, res, jnp.minimum(best, res), result

    if kind == "lax":
        # tol = rtol = 0 means "run max_steps": no example finishes early, so
        # compaction would only add compiled copies of the body.
        fixed = all(isinstance(t, int | float) and t == 0 for t in (atol, rtol))
        buckets = 1 if fixed else solver.batch_buckets
        out = ragged_while_loop(cond, body, init, max_buckets=buckets)
    else:
        out = eqxi.while_loop(cond, body, init, max_steps=solver.max_steps, kind=kind)
    z, _, _, step, res, _, result = out
    return z, result, step, res.astype(real)


def _solve_implicit(dyn, z0, *, flat_fn, solver, adjoint):
    @jax.custom_jvp
    def solve(dyn, z0):
        return _iterate(solver, lambda z: flat_fn(dyn, z), lax.stop_gradient(z0), "lax")

    @solve.defjvp
    def solve_jvp(primals, tangents):
        dyn, z0 = primals
        t_dyn, _ = tangents
        out = solve(dyn, z0)
        z = out[0]
        _, b = jax.jvp(lambda d: flat_fn(d, z), (dyn,), (t_dyn,))
        _, jac_z = jax.linearize(lambda zz: flat_fn(dyn, zz), z)
        dz = lax.custom_linear_solve(
            lambda v: v - jac_z(v),
            b,
            solve=adjoint.solve,
            transpose_solve=adjoint.transpose_solve,
        )
        t_int = np.zeros(out[1].shape, jax.dtypes.float0)
        return out, (dz, t_int, np.zeros(out[2].shape, jax.dtypes.float0), jnp.zeros_like(out[3]))

    return solve(dyn, z0)


def fixed_point(
    f: Callable[[PyTree, Any], PyTree],
    z0: PyTree[Array],
    args: PyTree = None,
    *,
    solver: AbstractSolver | None = None,
    adjoint: AbstractAdjoint | None = None,
    throw: bool = False,
) -> Solution:
    r"""Solve z* = f(z*, args) and make the answer differentiable.

    Args:
        f: the map, `f(z, args) -> z`, over any pytree of floating (or complex) arrays
            of one dtype. It may close over arrays (e.g. an `eqx.Module`'s weights):
            they are differentiated like `args`.
        z0: the initial state. The solution does not depend on it, so it receives no
            gradient.
        args: anything else f needs; its floating arrays are differentiable.
        solver: [`eqprop_jax.Picard`][] (default), [`eqprop_jax.Anderson`][] or
            [`eqprop_jax.Broyden`][]; it fixes the stopping rule (see
            [`eqprop_jax.AbstractSolver`][]).
        adjoint: how to differentiate: [`eqprop_jax.Implicit`][] (default),
            [`eqprop_jax.AlmeidaPineda`][], [`eqprop_jax.Neumann`][] or
            [`eqprop_jax.Unrolled`][] (BPTT through the iterations).
        throw: raise at run time (through `eqx.error_if`) when the solve does not
            converge. By default the status is returned in `Solution.result` and the
            caller decides, which is what a jitted training step wants.

    Returns:
        A [`eqprop_jax.Solution`][] with `value`, `result` and `stats`.

    Batching: under `jax.vmap` each example iterates until its own stopping rule
    holds, so `stats.steps` and `result` are per example, and each example's answer
    equals the one it gets alone. The loop is a [`eqprop_jax.ragged_while_loop`][]:
    finished examples are dropped from the work as the batch is compacted, so a
    batch costs about Σ_i steps_i evaluations of f rather than B · max_i steps_i
    (`solver.batch_buckets = 1`, or tracing inside
    [`eqprop_jax.batch_compaction`][]`(False)`, turns this off: do so when `jit`
    shards the batch axis over several devices). Nested `vmap`s are compacted as
    one batch.

    The derivative of z* follows the implicit function theorem,
    dz*/dθ = (I - ∂f/∂z)⁻¹ ∂f/∂θ, whatever solver found z*; the adjoint decides how
    that linear system is solved. Both `jax.jvp` and `jax.grad` work (except forward
    mode through `Unrolled`).
    """
    solver = Picard() if solver is None else solver
    adjoint = Implicit() if adjoint is None else adjoint
    _validate(f, z0, args, solver, adjoint)
    z0 = jtu.tree_map(jnp.asarray, z0)
    flat0, unravel = ravel_pytree(z0)
    fn = eqx.filter_closure_convert(f, z0, args)
    dyn, static = eqx.partition((fn, args), eqx.is_array)

    def flat_fn(dyn, zf):
        fn_, args_ = eqx.combine(dyn, static)
        return ravel_pytree(fn_(unravel(zf), args_))[0]

    if isinstance(adjoint, Unrolled):
        out = _iterate(solver, lambda z: flat_fn(dyn, z), lax.stop_gradient(flat0), "checkpointed")
    else:
        out = _solve_implicit(dyn, flat0, flat_fn=flat_fn, solver=solver, adjoint=adjoint)
    z, result, steps, res = out
    if throw:
        z = eqx.branched_error_if(
            z,
            result != Result.converged,
            jnp.clip(result, 0, 3),
            [
                "",
                "fixed_point: max_steps reached before convergence",
                "fixed_point: the iteration diverged",
                "fixed_point: a NaN or inf appeared in the state",
            ],
        )
    return Solution(unravel(z), result, Stats(steps, res))
