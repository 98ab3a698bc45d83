"""optimistix's fixed-point and root-finding tests, on eqprop_jax (issue 17).

The problems are optimistix's `tests/helpers.py` fixed-point problems
(`fixed_point_fn_init_args`: cos, exp, nn, the nonlinear heat step and the linear
and Robertson implicit-midpoint steps), traced, as optimistix's suite runs them,
under `jax_numpy_dtype_promotion="strict"` and `jax_numpy_rank_promotion="raise"`.

Tolerances: optimistix's `rtol = atol = 1e-6` is our `tol=1e-6` (rtol defaults to
tol): both stop on max_i |f(z)_i - z_i| / (atol + rtol |z_i|) <= 1. Its checks
(`tree_allclose` at 1e-4 for the fixed point, 1e-3 for tangents) are kept, and
each fixed point is also checked against our own rule recomputed here. The
derivative reference is a dense IFT solve at the exact (or tightly solved) fixed
point, not optimistix's finite difference, which perturbs z0 too and divides a
1e-6-accurate solution error by a 1.5e-8 step.

Each problem's cases are compiled together once (see `compiled.py`).
"""

import functools

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import eqprop_jax as eqp

from . import dense
from .adjoints import IMPLICIT, ITERATIVE, NEUMANN_K
from .compiled import fast_compile, once
from .optimistix_problems import IDS, PROBLEMS

TOL = 1e-6  # optimistix's rtol = atol
MAX_STEPS = 10_000
SOLVERS = {
    "picard": eqp.Picard(tol=TOL, max_steps=MAX_STEPS),
    "anderson": eqp.Anderson(tol=TOL, max_steps=MAX_STEPS),
    "broyden": eqp.Broyden(tol=TOL, max_steps=MAX_STEPS),
    "newton": eqp.Newton(tol=TOL, max_steps=MAX_STEPS),
    "chord": eqp.Chord(tol=TOL, max_steps=MAX_STEPS),
}
ROOT_FINDERS = ("newton", "chord")  # optimistix's `_root_finders`
ADJOINTS = {**IMPLICIT, **ITERATIVE, "unrolled_forward": eqp.Unrolled(mode="forward")}
# optimistix runs its jvp test in complex128 with ImplicitAdjoint and a forward-mode
# `lax.while_loop` adjoint; so do we.
COMPLEX_ADJOINTS = ("implicit", "unrolled_forward")
# Unrolled differentiates each solver's own iterations, so it runs with every solver,
# in one mode per (problem, solver): reverse (optimistix's default
# RecursiveCheckpointAdjoint; ~1.5 s of compilation each) on cos and nn, forward
# elsewhere. Picard's forward mode is the `unrolled_forward` adjoint of the jvp test.
REVERSE = ("cos", "nn")
# The linear-solve adjoints run on the problems whose derivative is not identically
# zero. On the six midpoint problems f(0, θ) = 0 for every θ, so z* = 0 and
# dz*/dθ = 0; there the peer's own pair runs (ImplicitAdjoint and the forward
# `lax.while_loop` adjoint, in float64 and complex128).
NONZERO_DERIVATIVE = ("cos", "exp", "nn", "heat")
PEER_ADJOINTS = ("implicit", "unrolled_forward")
BY_NAME = {p.name: p for p in PROBLEMS}


def unrolled_mode(name, solver):
    if name in REVERSE:
        return "reverse"
    return None if solver == "picard" else "forward"  # Picard: in the jvp test


def adjoints_for(name):
    return ADJOINTS if name in NONZERO_DERIVATIVE else PEER_ADJOINTS


def strict(fn):
    """fn traced under optimistix's promotion settings."""

    def wrapped(*args):
        with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
            return fn(*args)

    return wrapped


def with_aux(f):
    # optimistix's `smoke_aux`, plus f(z) itself so that where aux was evaluated shows.
    return lambda z, args: (f(z, args), (jnp.ones((2, 3)), {"smoke_aux": f(z, args)}))


def has_aux_for(name, solver):
    # optimistix draws has_aux at random; here it alternates over the cases.
    return (IDS.index(name) + list(SOLVERS).index(solver)) % 2 == 0


def draws(problem, dtype):
    """z0, args and optimistix-style random tangents for both, and a cotangent."""
    z0, args = problem.cast(dtype)
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 64))
    draw = lambda x: jax.random.normal(next(keys), jnp.shape(x), dtype)
    return z0, args, jtu.tree_map(draw, z0), jtu.tree_map(draw, args), jtu.tree_map(draw, z0)


def _build(name):
    problem = BY_NAME[name]

    @strict
    def run(real, cplx):
        z0, args, t_z0, t_args, w = real
        out = {}
        for s, solver in SOLVERS.items():
            aux = has_aux_for(name, s)
            fn = with_aux(problem.f) if aux else problem.f
            sol = eqp.fixed_point(fn, z0, args, solver=solver, has_aux=aux)
            out[f"fixed_point/{s}"] = (sol.value, sol.result, sol.aux, problem.f(sol.value, args))

            def unrolled(args, mode, solver=solver):
                adjoint = eqp.Unrolled(mode=mode)
                return eqp.fixed_point(problem.f, z0, args, solver=solver, adjoint=adjoint).value

            if unrolled_mode(name, s) == "forward":
                out[f"unrolled_forward/{s}"] = jax.jvp(
                    lambda a, u=unrolled: u(a, "forward"), (args,), (t_args,)
                )
            elif unrolled_mode(name, s) == "reverse":
                _, vjp = jax.vjp(lambda a, u=unrolled: u(a, "reverse"), args)
                out[f"unrolled_reverse/{s}"] = vjp(w)[0]
        for s in ROOT_FINDERS:
            aux = IDS.index(name) % 2 == 1
            g = with_aux(root_problem(problem.f)) if aux else root_problem(problem.f)
            sol = eqp.root_find(g, z0, args, solver=SOLVERS[s], has_aux=aux)
            gz = root_problem(problem.f)(sol.value, args)
            out[f"root_find/{s}"] = (sol.value, sol.result, sol.aux, gz)
        for a in adjoints_for(name):
            out[f"jvp/{a}"] = _jvp(problem, ADJOINTS[a], z0, args, t_z0, t_args)
        for a in COMPLEX_ADJOINTS:
            out[f"complex/{a}"] = _jvp(problem, ADJOINTS[a], *cplx[:4])
        return out

    return run, (draws(problem, jnp.float64), draws(problem, jnp.complex128))


def _jvp(problem, adjoint, z0, args, t_z0, t_args):
    solver = SOLVERS["picard"]  # optimistix's FixedPointIteration

    def solve(z0, args):
        return eqp.fixed_point(problem.f, z0, args, solver=solver, adjoint=adjoint).value

    return jax.jvp(solve, (z0, args), (t_z0, t_args))


def root_problem(f):
    # optimistix's `root_find_problem`: g(z) = f(z) - z.
    return lambda z, args: jtu.tree_map(jnp.subtract, f(z, args), z)


solved = once(_build)


def max_scaled_residual(z, fz, tol):
    z, fz = ravel_pytree(z)[0], ravel_pytree(fz)[0]
    return float(np.max(np.abs(fz - z) / (tol + tol * np.abs(z))))


@functools.cache
def expected(name, dtype):
    """The fixed point (closed form, or a tight Newton solve checked by its residual)
    and the dense references at it for the tangents and cotangent drawn above."""
    problem = BY_NAME[name]

    def references(z0, args, t_args, w):
        if problem.exact is not None:
            z = problem.exact(dtype)
        else:
            z = eqp.fixed_point(problem.f, z0, args, solver=eqp.Newton(tol=1e-14)).value
        return {
            "z": z,
            "fz": problem.f(z, args),
            "tangent": dense.tangent(problem.f, z, args, t_args),
            "neumann": dense.neumann_tangent(problem.f, z, args, t_args, NEUMANN_K),
            "cotangent": dense.cotangent(problem.f, z, args, w),
        }

    z0, args, _, t_args, w = draws(problem, dtype)
    with fast_compile():
        ref = jax.device_get(jax.jit(references)(z0, args, t_args, w))
    assert max_scaled_residual(ref["z"], ref["fz"], 1e-13) <= 1
    return ref


def allclose(a, b, tol):
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    )


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_fixed_point(problem, solver):
    """optimistix `test_fixed_point.py::test_fixed_point`, with every solver: the
    solve converges, f(z) ≈ z (`tree_allclose` at 1e-4, and our own 1e-6 rule), z is
    the closed-form fixed point where there is one, and with has_aux the aux is f's
    at the returned z."""
    value, result, aux, fz = solved(problem.name)[f"fixed_point/{solver}"]
    z0, _ = problem.cast(jnp.float64)
    assert int(result) == eqp.Result.converged
    assert max_scaled_residual(value, fz, TOL) <= 1
    assert allclose(value, fz, 1e-4)
    if problem.exact is not None:
        assert allclose(value, problem.exact(jnp.float64), 1e-5)
    if has_aux_for(problem.name, solver):
        assert allclose(aux[1]["smoke_aux"], fz, 1e-15)
        assert jtu.tree_structure(aux) == jtu.tree_structure((0, {"smoke_aux": z0}))
    else:
        assert aux is None


@pytest.mark.parametrize("solver", ROOT_FINDERS)
@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_root_find(problem, solver):
    """optimistix `test_root_find.py::test_root_find`: Newton and Chord on the root of
    g(z) = f(z) - z, checked by `tree_allclose(g(root), 0, atol=rtol=1e-5)`."""
    value, result, aux, gz = solved(problem.name)[f"root_find/{solver}"]
    assert int(result) == eqp.Result.converged
    assert allclose(gz, jtu.tree_map(jnp.zeros_like, gz), 1e-5)
    if aux is not None:
        assert allclose(aux[1]["smoke_aux"], gz, 1e-15)


def _check_tangent(name, dtype, adjoint, out, t_out):
    ref = expected(name, dtype)
    assert allclose(out, ref["z"], 1e-3)
    assert allclose(t_out, ref["neumann" if adjoint == "neumann" else "tangent"], 1e-3)


JVP = [(p, a) for p in PROBLEMS for a in adjoints_for(p.name)]


@pytest.mark.parametrize("problem, adjoint", JVP, ids=[f"{p.name}-{a}" for p, a in JVP])
def test_fixed_point_jvp(problem, adjoint):
    """optimistix `test_fixed_point.py::test_fixed_point_jvp` (float64), with every
    adjoint: `jax.jvp` with random tangents for z0 and args, against the dense IFT
    tangent (for Neumann(k), the truncated series it computes). The implicit
    solution does not depend on z0; the unrolled one only through the last steps."""
    out, t_out = solved(problem.name)[f"jvp/{adjoint}"]
    _check_tangent(problem.name, jnp.float64, adjoint, out, t_out)


@pytest.mark.parametrize("adjoint", COMPLEX_ADJOINTS)
@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_fixed_point_jvp_complex(problem, adjoint):
    """optimistix `test_fixed_point.py::test_fixed_point_jvp` in complex128 (states,
    arguments and tangents all complex)."""
    out, t_out = solved(problem.name)[f"complex/{adjoint}"]
    _check_tangent(problem.name, jnp.complex128, adjoint, out, t_out)


UNROLLED = [(p, s, unrolled_mode(p.name, s)) for p in PROBLEMS for s in SOLVERS
            if unrolled_mode(p.name, s)]


@pytest.mark.parametrize(
    "problem, solver, mode", UNROLLED, ids=[f"{p.name}-{s}-{m}" for p, s, m in UNROLLED]
)
def test_unrolled(problem, solver, mode):
    """Autodiff through every solver's iterations (`Unrolled`; optimistix's
    RecursiveCheckpointAdjoint in reverse mode, and the forward-differentiated
    `lax.while_loop` of its tests), with respect to args, against the dense IFT
    derivative at a fixed point solved to 1e-6, to 1e-3.

    Only args are perturbed: quasi-Newton iterates (Anderson, Broyden) stop at a z_K
    whose sensitivity to z0 is still up to ~1e-2 here (their secant history depends
    on z0), though the limit does not depend on z0 (Griewank et al., "Derivative
    convergence for iterative equation solvers", 1993). The Picard jvp test above
    perturbs z0 too, as optimistix does. (Picard's forward mode is tested there.)
    """
    got = solved(problem.name)[f"unrolled_{mode}/{solver}"]
    ref = expected(problem.name, jnp.float64)
    if mode == "forward":
        out, t_out = got
        assert allclose(out, ref["z"], 1e-3)
        assert allclose(t_out, ref["tangent"], 1e-3)
    else:
        assert allclose(got, ref["cotangent"], 1e-3)
