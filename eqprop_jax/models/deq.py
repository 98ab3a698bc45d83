"""A deep equilibrium layer that drops into any equinox model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ..equilibrium import Solution
from ..equilibrium.adjoints import AbstractAdjoint, Implicit
from ..equilibrium.fixed_point import fixed_point
from ..equilibrium.solvers.base import AbstractSolver
from ..equilibrium.solvers.picard import Picard


class _StaticFn(eqx.Module):
    """A plain function held as static data, so that it is no pytree leaf (plain
    `jax.jit` rejects a function leaf)."""

    fn: Callable = eqx.field(static=True)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _as_module(fn: Any) -> Any:
    """`fn` if it is a pytree (an `eqx.Module`, a `jax.tree_util.Partial`...), whose
    arrays must stay differentiable leaves; a plain function wrapped as static data."""
    if isinstance(fn, eqx.Module) or not jtu.treedef_is_leaf(jtu.tree_structure(fn)):
        return fn
    return _StaticFn(fn)


def _check_static(name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"DEQ: `{name}` must be an eqprop_jax {name}, got {type(value).__name__}.")
    try:
        hash(value)
    except TypeError as e:
        raise TypeError(
            f"DEQ: `{name}` settings are static (part of the compiled program, not weights), so "
            f"they must be Python scalars; {value!r} holds an array ({e})."
        ) from None


def _default_dtype(x: PyTree) -> Any:
    """The float dtype to try first for the state: x's, if x is floating, else JAX's
    default float (float32, or float64 under `jax_enable_x64`)."""
    inexact = [
        jnp.result_type(leaf)
        for leaf in jtu.tree_leaves(x)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.result_type(*inexact) if inexact else jnp.result_type(float)


class DEQ(eqx.Module):
    r"""Deep equilibrium layer (Bai, Kolter & Koltun, "Deep Equilibrium Models",
    NeurIPS 2019): the output is the fixed point

        z* = f_θ(z*, x),

    found by `solver` and differentiated by `adjoint`. With the default
    [`eqprop_jax.Implicit`][] adjoint the derivative is the implicit-function-theorem
    one, dL/dθ = uᵀ ∂f/∂θ with (I - ∂f/∂zᵀ) u = ∂L/∂z*, whatever the solver did, so
    memory does not grow with the number of solver steps.

    **One example at a time.** Like every equinox layer, a `DEQ` maps one example
    `x` to one state `z*`; `state_shape` excludes the batch axis. Batch it with
    `jax.vmap`, which also lets each example stop on its own (see
    [`eqprop_jax.fixed_point`][]):

    ```python
    class Cell(eqx.Module):
        w: jax.Array
        def __call__(self, z, x):
            return jnp.tanh(self.w @ z + x)

    deq = eqp.DEQ(Cell(w), state_shape=(64,))
    z = jax.vmap(deq)(xs)            # xs: (batch, 64)
    sol = jax.vmap(deq.solve)(xs)    # the Solution: status and steps per example
    ```

    `solver`, `adjoint` and `state_shape` are static fields: they are part of the
    compiled program, not pytree leaves. A model that holds a `DEQ` therefore
    goes through plain `jax.jit` and `jax.grad`, and its weights serialise
    (`eqx.tree_serialise_leaves`) independently of the solver settings. `cell` and
    `z_init` are kept as pytrees (their arrays are the weights θ) when they are
    pytrees such as `eqx.Module`s; a plain Python function is held as static data.

    The state's dtype is that of the cell's output: the solve starts from zeros of
    the dtype `cell(z, x)` returns (so a bfloat16 `x` with float32 weights gives a
    float32 state).

    Args:
        cell: the map f_θ, `cell(z, x) -> z` (usually an `eqx.Module` holding θ).
        state_shape: shape of z for one example (an array state); the solve starts
            from zeros.
        z_init: alternatively, a function `x -> z0` giving the starting state (any
            pytree; each leaf is cast to the dtype of the cell's output).
        solver: [`eqprop_jax.Picard`][] by default; see [`eqprop_jax.fixed_point`][].
        adjoint: [`eqprop_jax.Implicit`][] by default; see [`eqprop_jax.fixed_point`][].
    """

    cell: Callable[[PyTree, PyTree], PyTree]
    state_shape: tuple[int, ...] | None = eqx.field(static=True)
    z_init: Callable[[PyTree], PyTree] | None
    solver: AbstractSolver = eqx.field(static=True)
    adjoint: AbstractAdjoint = eqx.field(static=True)

    def __init__(
        self,
        cell: Callable[[PyTree, PyTree], PyTree],
        state_shape: int | tuple[int, ...] | None = None,
        z_init: Callable[[PyTree], PyTree] | None = None,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
    ):
        if not callable(cell):
            raise TypeError(f"DEQ: `cell` must be callable, got {type(cell).__name__}.")
        if state_shape is None and z_init is None:
            raise ValueError("DEQ: give `state_shape` or `z_init` to fix the state's shape.")
        if state_shape is not None:
            shape = (state_shape,) if isinstance(state_shape, int) else state_shape
            try:
                shape = tuple(shape)
            except TypeError:
                shape = None
            if shape is None or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
            ):
                raise TypeError(
                    f"DEQ: `state_shape` must be a tuple of non-negative ints, got {state_shape!r}."
                )
            state_shape = shape
        if z_init is not None and not callable(z_init):
            raise TypeError(f"DEQ: `z_init` must be callable, got {type(z_init).__name__}.")
        solver = Picard() if solver is None else solver
        adjoint = Implicit() if adjoint is None else adjoint
        _check_static("solver", solver, AbstractSolver)
        _check_static("adjoint", adjoint, AbstractAdjoint)
        self.cell = _as_module(cell)
        self.state_shape = state_shape
        self.z_init = None if z_init is None else _as_module(z_init)
        self.solver = solver
        self.adjoint = adjoint

    def _z0(self, x: PyTree) -> PyTree:
        """The starting state, in the dtype of the cell's output."""
        if self.z_init is not None:
            z0 = self.z_init(x)
            out = self._out_struct(z0, x)
            if jtu.tree_structure(out) == jtu.tree_structure(z0):
                z0 = jtu.tree_map(lambda z, o: jnp.asarray(z).astype(o.dtype), z0, out)
            # Otherwise fixed_point names the mismatch.
            return z0
        dtype = _default_dtype(x)
        for _ in range(2):
            out = self._out_struct(jax.ShapeDtypeStruct(self.state_shape, dtype), x)
            if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != self.state_shape:
                got = (
                    f"shape {out.shape}"
                    if isinstance(out, jax.ShapeDtypeStruct)
                    else f"a pytree {jtu.tree_structure(out)}"
                )
                raise ValueError(
                    f"DEQ: cell(z, x) returns {got} but state_shape is {self.state_shape}; they "
                    "must agree. A DEQ acts on one example (no batch axis): for a batch use "
                    "jax.vmap(deq)(xs)."
                )
            if not jnp.issubdtype(out.dtype, jnp.inexact):
                raise TypeError(
                    f"DEQ: cell(z, x) returns dtype {out.dtype}; the state must be floating point."
                )
            if out.dtype == dtype:
                return jnp.zeros(self.state_shape, dtype)
            dtype = out.dtype
        raise TypeError(
            f"DEQ: the cell's output dtype does not settle: cell(z, x) returns {out.dtype} for "
            f"z of dtype {dtype}; make the cell return the dtype of its state."
        )

    def _out_struct(self, z: PyTree, x: PyTree) -> PyTree:
        try:
            return jax.eval_shape(self.cell, z, x)
        except Exception as e:
            z_shape = jtu.tree_map(jnp.shape, z)
            x_shape = jtu.tree_map(jnp.shape, x)
            what = (
                f"state_shape {self.state_shape}" if self.z_init is None else f"z_init's {z_shape}"
            )
            raise ValueError(
                f"DEQ: cell(z, x) failed for z of shape {z_shape} ({what}) and x of shape "
                f"{x_shape}: {type(e).__name__}: {str(e).rstrip('.')}. The state's shape must be "
                "that of the cell's output for one example: a DEQ has no batch axis (for a "
                "batch use jax.vmap(deq)(xs))."
            ) from e

    def solve(self, x: PyTree[Array], *, probe: Array | None = None) -> Solution:
        """The full [`eqprop_jax.Solution`][] (value, result, stats) for one example `x`.

        `probe`: an [`eqprop_jax.adjoint_probe`][] whose cotangent reports the
        backward solve's statistics (see [`eqprop_jax.fixed_point`][]).
        """
        return fixed_point(
            lambda z, x: self.cell(z, x),
            self._z0(x),
            x,
            solver=self.solver,
            adjoint=self.adjoint,
            probe=probe,
        )

    def __call__(
        self, x: PyTree[Array], *, key: jax.Array | None = None, probe: Array | None = None
    ) -> PyTree[Array]:
        """z* for one example `x` (`key` is unused; it is accepted like any equinox layer)."""
        return self.solve(x, probe=probe).value
