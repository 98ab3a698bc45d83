"""The public entry point: `fixed_point(f, z0, args, solver=..., adjoint=...)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from ._solution import Result, Solution, Stats
from .adjoints import AbstractAdjoint, Implicit
from .solvers.base import AbstractSolver, residuals
from .solvers.picard import Picard

_RUNNING = -1


def _leaf_desc(path) -> str:
    return jtu.keystr(path) or "<root>"


def _check_map(f, z0, args, has_aux, who, name):
    """f(z0, args) must return (a pair whose first element is) z0's structure."""
    z_struct = jax.eval_shape(lambda z: z, z0)
    try:
        out_struct = jax.eval_shape(f, z0, args)
    except Exception as e:
        raise ValueError(
            f"{who}: calling {name}(z0, args) failed: {type(e).__name__}: {e}"
        ) from e
    if has_aux:
        if not isinstance(out_struct, tuple | list) or len(out_struct) != 2:
            raise ValueError(
                f"{who}: with has_aux=True, {name}(z, args) must return a pair (value, aux); "
                f"got {jtu.tree_structure(out_struct)}."
            )
        out_struct = out_struct[0]
    if jtu.tree_structure(out_struct) != jtu.tree_structure(z_struct):
        raise ValueError(
            f"{who}: {name}(z0, args) must return a pytree with the structure of z0; got "
            f"{jtu.tree_structure(out_struct)} for z0 structure {jtu.tree_structure(z_struct)}."
        )
    for (path, a), b in zip(
        jtu.tree_leaves_with_path(z_struct), jtu.tree_leaves(out_struct), strict=True
    ):
        if a.shape != b.shape:
            raise ValueError(
                f"{who}: {name}(z0, args) changes the shape of leaf {_leaf_desc(path)}: "
                f"z0 has {a.shape}, {name}(z0) has {b.shape}."
            )
        if a.dtype != b.dtype:
            raise TypeError(
                f"{who}: {name}(z0, args) changes the dtype of leaf {_leaf_desc(path)}: "
                f"z0 is {a.dtype}, {name}(z0) is {b.dtype}."
            )


def _check_state(z0, who):
    leaves = jtu.tree_leaves_with_path(z0)
    if not leaves:
        raise ValueError(f"{who}: `z0` has no array leaves.")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{who}: z0 leaf {_leaf_desc(path)} has dtype {dtype}; the state must be "
                "floating point or complex (cast it, e.g. `z0.astype(jnp.float32)`)."
            )
    dtypes = {jnp.result_type(leaf) for _, leaf in leaves}
    if len(dtypes) > 1:
        raise TypeError(
            f"{who}: z0 mixes dtypes {sorted(map(str, dtypes))}; use one dtype for the state."
        )


def _validate(f, z0, args, solver, adjoint, has_aux, who="fixed_point", name="f"):
    if not callable(f):
        raise TypeError(f"{who}: `{name}` must be callable, got {type(f).__name__}.")
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"{who}: `solver` must be an eqprop_jax solver, got {type(solver).__name__}."
        )
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"{who}: `adjoint` must be an eqprop_jax adjoint, got {type(adjoint).__name__}."
        )
    _check_state(z0, who)
    _check_map(f, z0, args, has_aux, who, name)


def _check_probe(probe):
    if not eqx.is_array(probe) or jnp.shape(probe) != (3,):
        raise ValueError(
            "fixed_point: `probe` must be an array of shape (3,) (eqprop_jax.adjoint_probe()), "
            f"got {type(probe).__name__} of shape {jnp.shape(probe)}."
        )
    if not jnp.issubdtype(probe.dtype, jnp.floating):
        raise TypeError(f"fixed_point: `probe` must be a real floating array, got {probe.dtype}.")
    return probe


def _iterate(
    solver: AbstractSolver,
    fn: Callable[[Array], Array],
    z0: Array,
    loop: Callable[..., Any],
    tols: tuple[float, float],
    min_steps: int = 0,
    best_so_far: bool = False,
):
    """Run `solver` on the flat map `fn` from `z0`; returns (z, result, steps, residual).

    `loop(cond, body, init, *, max_steps, buckets)`: the while loop, the adjoint's
    choice (a [`eqprop_jax.ragged_while_loop`][], or one autodiff can go through).
    `tols` are the resolved (atol, rtol). `min_steps` forces that many updates before
    any stopping test but the non-finite one (the unrolled adjoint needs one, so that
    its gradient sees f even when z0 already meets the tolerance); the iterates
    before it are not candidates for `best_so_far` either.
    """
    atol, rtol = tols
    fixed = solver.fixed_steps
    fz0 = fn(z0)

    def measure(z, fz):
        scaled, absolute = residuals(z, fz, atol, rtol)
        # Fixed-step solves report the unscaled residual: dividing by atol = 0 would
        # overflow (a step of 5 read as inf) and stop the solve at step 0.
        return (absolute if fixed else scaled), absolute

    res0, abs0 = measure(z0, fz0)
    real = res0.dtype

    def status(res, absolute, best, step):
        done = absolute == 0 if fixed else res <= 1
        return jnp.where(
            ~jnp.isfinite(absolute),
            Result.nonfinite,
            jnp.where(
                done & (step >= min_steps),
                Result.converged,
                jnp.where(
                    absolute > solver.divergence * best,
                    Result.diverged,
                    jnp.where(step >= solver.max_steps, Result.max_steps, _RUNNING),
                ),
            ),
        ).astype(jnp.int32)

    if best_so_far:
        # The lowest residual seen and its iterate; inf means "no candidate yet".
        candidate = jnp.isfinite(res0) & (min_steps == 0)
        keep = (z0, jnp.where(candidate, res0, jnp.inf).astype(real))
    else:
        keep = ()
    init = (
        z0,
        fz0,
        solver.start(fn, z0, fz0),
        jnp.array(0, jnp.int32),
        res0,
        abs0,
        keep,
        status(res0, abs0, abs0, 0),
    )

    def cond(carry):
        return carry[-1] == _RUNNING

    def body(carry):
        z, fz, state, step, _, best, keep, _ = carry
        z, state = solver.update(fn, z, fz, state)
        fz = fn(z)
        res, absolute = measure(z, fz)
        step = step + 1
        result = status(res, absolute, best, step)
        if best_so_far:
            z_best, res_best = keep
            better = (res < res_best) & (step >= min_steps)
            keep = (jnp.where(better, z, z_best), jnp.where(better, res, res_best))
        return z, fz, state, step, res, jnp.minimum(best, absolute), keep, result

    # A fixed-step solve stops an example early only when f(z) = z holds exactly, so
    # compaction would only add compiled copies of the body.
    buckets = 1 if fixed else solver.batch_buckets
    out = loop(cond, body, init, max_steps=solver.max_steps, buckets=buckets)
    z, _, _, step, res, _, keep, result = out
    # A non-finite solve returns NaN, never a finite iterate that looks valid...
    z = jnp.where(result == Result.nonfinite, jnp.nan, z).astype(z.dtype)
    if best_so_far:
        # ...unless the lowest-residual iterate was asked for: it is returned with
        # its residual, whatever the status (which stays the solve's own).
        z_best, res_best = keep
        found = res_best < jnp.inf
        z = jnp.where(found, z_best, z)
        res = jnp.where(found, res_best, res)
    return z, result, step, res.astype(real)


def fixed_point(
    f: Callable[[PyTree, Any], PyTree],
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
    r"""Solve z* = f(z*, args) and make the answer differentiable.

    Args:
        f: the map, `f(z, args) -> z`, over any pytree of floating (or complex) arrays
            of one dtype. It may close over arrays (e.g. an `eqx.Module`'s weights):
            they are differentiated like `args`.
        z0: the initial state. The solution does not depend on it, so it receives no
            gradient (except through [`eqprop_jax.Unrolled`][], which differentiates
            the iterations that ran from it).
        args: anything else f needs; its floating arrays are differentiable.
        solver: [`eqprop_jax.Picard`][] (default), [`eqprop_jax.Anderson`][],
            [`eqprop_jax.Broyden`][], [`eqprop_jax.Newton`][] or
            [`eqprop_jax.Chord`][]; it fixes the stopping rule (see
            [`eqprop_jax.AbstractSolver`][]).
        adjoint: how to differentiate: [`eqprop_jax.Implicit`][] (default, with a
            [`eqprop_jax.BiCGStab`][] linear solve; or `Implicit(GMRES())`, ...), its
            Richardson presets [`eqprop_jax.AlmeidaPineda`][],
            [`eqprop_jax.Neumann`][] and [`eqprop_jax.PhantomGradient`][],
            [`eqprop_jax.JacobianFree`][], or [`eqprop_jax.Unrolled`][] (BPTT
            through the iterations). The adjoint runs the solve
            ([`eqprop_jax.AbstractAdjoint`][]`.apply`).
        has_aux: f returns a pair `(z, aux)`; only z enters the fixed point, and
            `Solution.aux` is aux evaluated at the returned value (one more
            evaluation of f after the solve), differentiable through it.
        best_so_far: return the iterate with the lowest residual seen (optimistix's
            `BestSoFarFixedPoint`, torchdeq's `lowest_xest`) instead of the last one,
            with that residual in `stats.residual`. The status and step count stay
            the solve's own: a solve that ran out of steps, diverged or hit NaN/inf
            still says so, but returns its best finite iterate (not NaN), and is
            differentiated at it like any other. A converged solve returns its last
            iterate either way (it is the first to meet the tolerance).
        throw: raise at run time (through `eqx.error_if`) when the solve does not
            converge. By default the status is returned in `Solution.result` and the
            caller decides, which is what a jitted training step wants.
        probe: an [`eqprop_jax.adjoint_probe`][]; differentiate with respect to it to
            receive the backward (adjoint) solves' statistics as its cotangent,
            without any host callback. Unused by [`eqprop_jax.Unrolled`][].

    Returns:
        A [`eqprop_jax.Solution`][] with `value`, `result`, `stats` and `aux`.

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
    dz*/dθ = (I - ∂f/∂z)⁻¹ ∂f/∂θ, whatever solver found z*; the adjoint's linear
    solver ([`eqprop_jax.AbstractLinearSolver`][]) solves that linear system, with
    the forward solver's `batch_buckets` under `vmap`. Both `jax.jvp` and `jax.grad` work with the
    implicit adjoints; [`eqprop_jax.Unrolled`][] works in one mode, reverse by
    default and forward with `mode="forward"`. By default a failed backward solve
    gives NaN in the affected example's derivative (see
    [`eqprop_jax.AbstractLinearAdjoint`][]).

    Defaults are exact to the state's dtype and cost nothing under `jit`: the
    solver's and the adjoint's tolerances follow the dtype
    ([`eqprop_jax.default_tol`][]), the adjoint's follows the forward solve's, and no
    host callback is compiled in unless asked for (`throw=True`,
    `on_failure="warn"/"raise"`, or a `callback`).
    """
    solver = Picard() if solver is None else solver
    adjoint = Implicit() if adjoint is None else adjoint
    _validate(f, z0, args, solver, adjoint, has_aux)
    z0 = jtu.tree_map(jnp.asarray, z0)
    flat0, unravel = ravel_pytree(z0)
    f_z = (lambda z, a: f(z, a)[0]) if has_aux else f
    fn = eqx.filter_closure_convert(f_z, z0, args)
    dyn, static = eqx.partition((fn, args), eqx.is_array)

    def flat_fn(dyn, zf):
        # Under eager `jax.grad` a Python float in `args` reaches the custom_jvp rule
        # as a plain float, which the closure-converted f would treat as static.
        dyn = jtu.tree_map(jnp.asarray, dyn)
        fn_, args_ = eqx.combine(dyn, static)
        return ravel_pytree(fn_(unravel(zf), args_))[0]

    tols = solver.tolerances(flat0.dtype)
    if probe is not None:
        probe = _check_probe(probe)

    def primal(inputs, loop, min_steps):
        dyn, z0 = inputs
        fn = lambda z: flat_fn(dyn, z)
        return _iterate(solver, fn, z0, loop, tols, min_steps, best_so_far)

    out = adjoint.apply(
        primal, flat_fn, (dyn, flat0), solver, probe=probe, best_so_far=best_so_far
    )
    z, result, steps, res = out
    if throw:
        code = jnp.clip(result, 0, len(Result) - 1)
        z = Result.item(code).error_if(z, result != Result.converged)
    value = unravel(z)
    aux = f(value, args)[1] if has_aux else None
    return Solution(value, result, Stats(steps, res), aux)
