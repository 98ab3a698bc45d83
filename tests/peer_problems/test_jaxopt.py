"""jaxopt's fixed-point tests (`tests/fixed_point_iteration_test.py`,
`anderson_test.py`, `broyden_test.py`), on eqprop_jax (issue 17).

Tolerances: jaxopt stops when ‖f(x) - x‖₂ (Broyden: ‖g(x)‖₂) <= tol; ours stops on
the infinity norm scaled by atol + rtol |z_i|. Since ‖r‖₂ <= √d ‖r‖∞, jaxopt's `tol`
becomes `tol=tol/√d, rtol=0` here, and every test checks jaxopt's own criterion,
‖f(x) - x‖₂ < tol, on the returned state. jaxopt's `check_grads` (finite
differences in float32 with steps of 1e-3 to 1e-5) becomes a comparison with the
exact derivative: these problems have closed-form fixed points and derivatives.

Every problem runs with every solver; a case a solver cannot solve for a stated
mathematical reason (e.g. plain iteration on an isometry) checks that the status
says so honestly and is then skipped with that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy as jsp
import jax.tree_util as jtu
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import eqprop_jax as eqp

from .adjoints import IMPLICIT, ITERATIVE, NEUMANN_K
from .compiled import once

SOLVERS = {
    "picard": eqp.Picard,
    "anderson": eqp.Anderson,
    "broyden": eqp.Broyden,
    "newton": eqp.Newton,
    "chord": eqp.Chord,
}


def translated(cls, tol, z0, max_steps, **kw):
    """jaxopt's 2-norm `tol` as our max-norm tolerance (see the module docstring)."""
    d = ravel_pytree(z0)[0].size
    return cls(tol=tol / math.sqrt(d), rtol=0.0, max_steps=max_steps, **kw)


def l2(tree):
    return jnp.linalg.norm(ravel_pytree(tree)[0])


def step_norm(f, z, args):
    """jaxopt's `state.error` of FixedPointIteration: ‖f(x) - x‖₂."""
    return l2(jtu.tree_map(jnp.subtract, f(z, args), z))


# -- the problems ----------------------------------------------------------------------


def _geometric(x, _):
    return jnp.array([0.9, 0.99, 0.999]) * x


def _sin(x, _):  # another fixed point exists for x[0], ~1.11, and x³ = x has ±1
    return jnp.sin(x[0]) * x[0] ** 2, x[1] ** 3


def _sin_flip(x, _):  # anderson_test's version, with an x -> -x block
    return jnp.sin(x[0]) * x[0] ** 2, (x[1][0] ** 3, -x[1][1])


def _cos(x, theta):
    return jnp.cos(x) + theta


def _scalar(x, _):
    return 0.5 * x + 0.5


def _rotation(x, args):
    theta, c = args
    blocks = [
        jnp.stack([jnp.stack([jnp.cos(t), -jnp.sin(t)]), jnp.stack([jnp.sin(t), jnp.cos(t)])])
        for t in theta
    ]
    return jsp.linalg.block_diag(*blocks) @ (x - c) + c


def _affine(x, args):
    m, b = args
    return m @ x + b


def contractive_affine(n):
    """jaxopt's `_make_random_affine_contractive_mapping`: M symmetric, ρ(M) < 1/2."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    m = jax.random.uniform(k1, (n, n), minval=-1.0, maxval=1.0)
    m = m + m.T
    m = m / (2 * jnp.max(jnp.abs(jnp.linalg.eigvalsh(m))) + 1e-4)
    return m, jax.random.uniform(k2, (n,))


ROT_THETA = jnp.pi / jnp.array([2, 3, 4, 5, 6, 1.27, 1.73])
ROT_CENTER = jnp.arange(1.0, 15.0)
PICARD_NEEDS_CONTRACTION = (
    "Picard converges when f is a contraction (ρ(J) < 1); here J has eigenvalues of "
    "modulus 1"
)


@dataclass(frozen=True)
class FixedPointCase:
    name: str
    f: Any
    z0: Any
    args: Any
    tol: float
    max_steps: int  # jaxopt's maxiter for its own solver
    expected: Any  # the fixed point the test asks for
    atol: float  # jaxopt's closeness check on it
    kw: dict = field(default_factory=dict)  # settings per solver, jaxopt's where it has them
    limits: dict = field(default_factory=dict)  # solver -> the reason it cannot apply


CASES = [
    FixedPointCase(
        # fixed_point_iteration_test / anderson_test / broyden_test::test_geometric_decay.
        "geometric_decay", _geometric, jnp.array([1.0, 0.4, -0.2]), None, 1e-5, 10_000,
        jnp.zeros(3), 1e-2, {"anderson": dict(history=5, ridge=1e-6)},
    ),
    FixedPointCase(
        # fixed_point_iteration_test / broyden_test::test_sin_fixed_point (pytree state).
        "sin", _sin, (jnp.array([0.6, 0.0, -0.1]), jnp.array([[0.7], [0.5]])), None, 1e-6, 100,
        (jnp.zeros(3), jnp.zeros((2, 1))), 1e-6, {},
        {
            "newton": "Newton converges only locally (no line search): at z0 = 0.6, "
            "1 - f'(0.6) = 0.025 sends the first step to -15, and it converges to "
            "another fixed point (sin(z) z = 1)",
            "chord": "the chord method needs I - J(z0) to stay a good model of I - J: "
            "1 - f'(0.6) = 0.025, so it diverges",
        },
    ),
    FixedPointCase(
        # anderson_test::test_sin_fixed_point (nested pytree, with x -> -x).
        "sin_flip", _sin_flip,
        (jnp.array([0.6, 0.0, -0.1]),
         (jnp.array([[0.7], [0.5]]), jnp.array([[-1.0, 0.0, 2.0, -0.4]]) / 3)),
        None, 1e-6, 1000, (jnp.zeros(3), (jnp.zeros((2, 1)), jnp.zeros((1, 4)))), 1e-6,
        {"anderson": dict(history=3, ridge=1e-6)},
        {
            "picard": PICARD_NEEDS_CONTRACTION + " (x -> -x has J = -1: it oscillates)",
            "newton": "Newton converges only locally (no line search): 1 - f'(0.6) = 0.025",
            "chord": "the chord method diverges from 0.6, where 1 - f'(0.6) = 0.025",
        },
    ),
    FixedPointCase(
        # fixed_point_iteration_test / anderson_test / broyden_test::test_cos_fixed_point.
        # J = -sin(π/2) = -1 at the second component: plain iteration converges, but
        # sublinearly (|e_k| ~ √(3/k)), and needs ~2.4e5 steps in float64 for tol 1e-2.
        "cos", _cos, jnp.array([0.3, jnp.pi / 4]), jnp.array([0.0, jnp.pi / 2]), 1e-2, 300_000,
        jnp.array([0.73908614842288, jnp.pi / 2]), 1e-2, {"anderson": dict(history=4, ridge=1e-6)},
    ),
    FixedPointCase(
        # anderson_test::test_support_for_scalars.
        "scalar", _scalar, jnp.array(0.0), None, 1e-4, 10_000, jnp.array(1.0), 1e-3,
        {"anderson": dict(history=5, ridge=1e-6)},
    ),
    FixedPointCase(
        # anderson_test::test_rotation_map: "Banach's theorem does not hold, Anderson works".
        "rotation", _rotation, jax.random.uniform(jax.random.PRNGKey(0), (14,)),
        (ROT_THETA, ROT_CENTER), 1e-4, 400, ROT_CENTER, 1e-3,
        {"anderson": dict(history=10, ridge=1e-7)},
        {"picard": PICARD_NEEDS_CONTRACTION + " (a rotation is an isometry)"},
    ),
    FixedPointCase(
        # fixed_point_iteration_test / anderson_test / broyden_test::
        # test_affine_contractive_mapping (n = 200).
        "affine", _affine, jnp.zeros(200), contractive_affine(200), 1e-6, 100,
        None, 1e-5, {"anderson": dict(history=5, ridge=1e-6)},
    ),
]
CASE_IDS = [c.name for c in CASES]


def _expected(case):
    if case.expected is not None:
        return case.expected
    m, b = (np.asarray(x) for x in case.args)  # the affine map's fixed point, (I - M)⁻¹ b
    return np.linalg.solve(np.eye(m.shape[0]) - m, b)


ROOT_CASES = {
    # broyden_test's root problems g(x) = f(x) - x, with its maxiter.
    "geometric_decay": 10,
    "sin": 100,
    "cos": 100,
    "affine": 100,
}
ROOT_SOLVERS = ("broyden", "newton")  # jaxopt's solver, and root_find's default


def root_problem(case):
    return lambda x, args: jtu.tree_map(jnp.subtract, case.f(x, args), x)


def _build_case(name):
    case = CASES[CASE_IDS.index(name)]

    def run(z0, args):
        out = {}
        for s, cls in SOLVERS.items():
            solver = translated(cls, case.tol, z0, case.max_steps, **case.kw.get(s, {}))
            sol = eqp.fixed_point(case.f, z0, args, solver=solver)
            out[f"fixed_point/{s}"] = (sol.value, sol.result, step_norm(case.f, sol.value, args))
        if name in ROOT_CASES:
            for s in ROOT_SOLVERS:
                solver = translated(SOLVERS[s], case.tol, z0, ROOT_CASES[name])
                sol = eqp.root_find(root_problem(case), z0, args, solver=solver)
                g_norm = l2(root_problem(case)(sol.value, args))
                out[f"root_find/{s}"] = (sol.value, sol.result, g_norm)
        return out

    return run, (case.z0, case.args)


solved = once(_build_case)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fixed_point(case, name):
    """jaxopt's forward tests: `state.error < tol` (here ‖f(x) - x‖₂ < tol) and the
    fixed point it names, with every solver."""
    value, result, error = solved(case.name)[f"fixed_point/{name}"]
    solved_it = error < case.tol
    if name in case.limits:
        # Honest status outside the solver's domain: "converged" only at a fixed point.
        assert solved_it if int(result) == eqp.Result.converged else int(result) in (
            eqp.Result.max_steps, eqp.Result.diverged
        )
        pytest.skip(case.limits[name])
    assert int(result) == eqp.Result.converged
    assert solved_it
    for a, b in zip(jtu.tree_leaves(value), jtu.tree_leaves(_expected(case)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=case.atol)


@pytest.mark.parametrize("name", ROOT_SOLVERS)
@pytest.mark.parametrize("key", ROOT_CASES)
def test_root_find(key, name):
    """broyden_test's problems as roots of g(x) = f(x) - x via `root_find`, with
    Broyden (jaxopt's solver) and Newton (`root_find`'s default); jaxopt's check is
    ‖g(x)‖₂ < tol (and, for cos, the root to 1e-2)."""
    case = CASES[CASE_IDS.index(key)]
    value, result, g_norm = solved(key)[f"root_find/{name}"]
    if name in case.limits:
        assert int(result) != eqp.Result.converged or g_norm < case.tol
        pytest.skip(case.limits[name])
    assert int(result) == eqp.Result.converged
    assert g_norm < case.tol
    if key == "cos":
        np.testing.assert_allclose(np.asarray(value), np.asarray(case.expected), atol=1e-2)


# -- has_aux -------------------------------------------------------------------------


def test_has_aux_logistic():
    """fixed_point_iteration_test / broyden_test::test_has_aux: f returns
    (cos x, r y (1 - y)) and the caller feeds aux back as y for 10 updates
    (jaxopt's `update` loop; here 10 one-step solves). The logistic map is chaotic
    at r = 3.95, so aux is checked against the recurrence itself."""
    r = jnp.array([3.95])

    def f(x, args):
        r, y = args
        return jnp.cos(x), r * y * (1 - y)

    x, y = jnp.array([1.0]), jnp.array([0.6])
    y_ref = y
    step = jax.jit(lambda x, y: eqp.fixed_point(
        f, x, (r, y), solver=eqp.Picard(tol=0.0, max_steps=1), has_aux=True
    ))
    for _ in range(10):
        sol = step(x, y)
        x, y = sol.value, sol.aux
        y_ref = r * y_ref * (1 - y_ref)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-12)
    assert float(jnp.abs(jnp.cos(x) - x)[0]) < 2e-2  # jaxopt's error < tol = 2e-2
    # Broyden's version: 10 updates reach the Dottie number to 1e-4.
    sol = eqp.fixed_point(f, jnp.array([1.0]), (r, jnp.array([0.6])),
                          solver=eqp.Broyden(tol=0.0, max_steps=10), has_aux=True)
    np.testing.assert_allclose(np.asarray(sol.value), 0.739085, atol=1e-4)
    np.testing.assert_allclose(np.asarray(sol.aux), 3.95 * 0.6 * 0.4, rtol=1e-12)


def _build_aux():
    def run(x0):
        f = lambda x, _: (0.5 * x + 0.5, 10 * x)
        return {
            s: eqp.fixed_point(f, x0, None, solver=translated(cls, 1e-4, x0, 10_000), has_aux=True)
            for s, cls in SOLVERS.items()
        }

    return run, (jnp.array([1.0, -0.5]),)


solved_aux = once(_build_aux)


@pytest.mark.parametrize("name", SOLVERS)
def test_has_aux_returns_aux_at_the_solution(name):
    """anderson_test::test_has_aux (jaxopt issue #443): f(x) = (x/2 + 1/2, 10 x)."""
    sol = solved_aux()[name]
    assert int(sol.result) == eqp.Result.converged
    assert np.linalg.norm(0.5 * sol.value + 0.5 - sol.value) < 1e-4
    np.testing.assert_allclose(np.asarray(sol.aux), np.asarray(10 * sol.value), rtol=1e-15)


# -- Anderson's own settings ----------------------------------------------------------


FREQUENCIES = (1, 5, 10)


def _build_mixing():
    def run(m, b):
        out = {}
        for k in FREQUENCIES:
            solver = translated(eqp.Anderson, 1e-6, b, 100, history=5, ridge=1e-6,
                                mixing_frequency=k)
            sol = eqp.fixed_point(_affine, jnp.zeros(10), (m, b), solver=solver)
            out[k] = (sol.value, sol.result, step_norm(_affine, sol.value, (m, b)))
        return out

    return run, contractive_affine(10)


solved_mixing = once(_build_mixing)


@pytest.mark.parametrize("frequency", FREQUENCIES)
def test_anderson_mixing_frequency(frequency):
    """anderson_test::test_mixing_frequency: an n = 10 contractive affine map."""
    m, b = contractive_affine(10)
    value, result, error = solved_mixing()[frequency]
    assert int(result) == eqp.Result.converged
    assert error < 1e-6
    exact = np.linalg.solve(np.eye(10) - np.asarray(m), np.asarray(b))
    np.testing.assert_allclose(np.asarray(value), np.asarray(exact), atol=1e-5)


def test_anderson_mixing_frequency_interleaves_plain_steps():
    # With k = 3 only steps 0, 3, 6, ... extrapolate; the others are plain steps f(z).
    m, b = contractive_affine(10)
    fn = lambda z: m @ z + b
    solver = eqp.Anderson(history=5, mixing_frequency=3)
    z = jnp.zeros(10)
    state = solver.init(z, fn(z))
    for k in range(7):
        z_next, state = solver.update(fn, z, fn(z), state)
        if k % 3:
            np.testing.assert_array_equal(np.asarray(z_next), np.asarray(fn(z)))
        elif k > 0:
            assert float(jnp.max(jnp.abs(z_next - fn(z)))) > 1e-6
        z = z_next


@pytest.mark.parametrize("ridge", [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
def test_anderson_residual_minimizer(ridge):
    """anderson_test::test_residuals_minimizer: the mixing weights α solve
    min ‖G α‖² + λ' ‖α‖² subject to Σ α = 1 (λ' = λ max_i ‖g_i‖², our scale-free
    ridge). Feeding m iterates z_i = 0 with f(z_i) = g_i makes the next iterate G α,
    from which α is recovered (G is 20 x 10, full column rank); the KKT conditions
    are (GᵀG + λ' I) α ∝ 1 and Σ α = 1."""
    m, n = 10, 20
    g = jax.random.normal(jax.random.PRNGKey(0), (n, m))
    solver = eqp.Anderson(history=m, ridge=ridge)

    @jax.jit
    def mix(g):
        zero = jnp.zeros(n)
        state = solver.init(zero, g[:, 0])
        for i in range(m):
            z_next, state = solver.update(None, zero, g[:, i], state)
        return z_next

    z_next = mix(g)
    alpha = jnp.linalg.lstsq(g, z_next)[0]
    np.testing.assert_allclose(float(jnp.sum(alpha)), 1.0, atol=1e-10)
    lam = ridge * jnp.max(jnp.sum(g**2, axis=0))
    kkt = (g.T @ g + lam * jnp.eye(m)) @ alpha
    np.testing.assert_allclose(np.asarray(kkt), float(jnp.mean(kkt)), rtol=1e-8)


# -- derivatives -------------------------------------------------------------------


@dataclass(frozen=True)
class GradCase:
    name: str
    f: Any
    z0: Any
    args: Any
    solver: Any
    exact_vjp: Any  # (args, w) -> wᵀ dz*/dargs, in closed form
    rho: float  # spectral radius of ∂f/∂z at z*
    has_aux: bool = False


# The exact derivatives, in numpy. Neumann(k) replaces (I - Jᵀ)⁻¹ w by the truncated
# series Σ_{i<=k} (Jᵀ)^i w: `k=None` is the exact inverse.


def _cos_vjp(theta, w, k=None):
    # z* = cos z* + θ: dz*/dθ = diag(1 / (1 + sin z*)); θ = (0, π/2) gives the Dottie
    # number and π/2. (ρ(J) = 1 here, so the series is not used.)
    z = np.array([0.7390851332151607, np.pi / 2])
    return np.asarray(w) / (1 + np.sin(z))


def _flat_vjp(theta, w, k=None):
    # z* = θ z*: z* = 0 and ∂f/∂θ = diag(z*) = 0 there, so every adjoint gives 0.
    return np.zeros(np.shape(theta))


def _affine_vjp(args, w, k=None):
    # z* = (I - M)⁻¹ b: with u = (I - M)⁻ᵀ w, dM = u z*ᵀ, db = u.
    m, b = (np.asarray(x) for x in args)
    a = np.eye(m.shape[0]) - m
    if k is None:
        u = np.linalg.solve(a.T, np.asarray(w))
    else:
        term = u = np.asarray(w)
        for _ in range(k):
            term = m.T @ term
            u = u + term
    return (np.outer(u, np.linalg.solve(a, b)), u)


def _flat_aux(x, theta):
    return theta * x, x


AFFINE = contractive_affine(200)
GRAD_CASES = [
    # fixed_point_iteration_test::test_simple_grads (maxiter 4000, tol 1e-6): the plain
    # iteration is sublinear on the second component, so this tests the derivative at
    # the unconverged iterate jaxopt differentiates too.
    GradCase("cos_picard", _cos, jnp.array([0.0, jnp.pi / 4]), jnp.array([0.0, jnp.pi / 2]),
             eqp.Picard(tol=1e-6 / math.sqrt(2), rtol=0.0, max_steps=4000), _cos_vjp, 1.0),
    # anderson_test::test_simple_grads (history 5, ridge 1e-5, maxiter 100, tol 1e-6).
    GradCase("cos_anderson", _cos, jnp.array([0.0, jnp.pi / 2]), jnp.array([0.0, jnp.pi / 2]),
             translated(eqp.Anderson, 1e-6, jnp.zeros(2), 100, history=5, ridge=1e-5),
             _cos_vjp, 1.0),
    # broyden_test::test_simple_grads (maxiter 400, tol 1e-6).
    GradCase("cos_broyden", _cos, jnp.array([0.0, jnp.pi / 4]), jnp.array([0.0, jnp.pi / 2]),
             translated(eqp.Broyden, 1e-6, jnp.zeros(2), 400), _cos_vjp, 1.0),
    # fixed_point_iteration_test / broyden_test::test_grads_flat_landscape (has_aux).
    GradCase("flat_picard", _flat_aux, jnp.array([1.0, -0.5]), jnp.array([0.05, 0.2]),
             translated(eqp.Picard, 1e-6, jnp.zeros(2), 1000), _flat_vjp, 0.2, True),
    # anderson_test::test_grads_flat_landscape (no aux).
    GradCase("flat_anderson", lambda x, t: t * x, jnp.array([1.0, -0.5]),
             jnp.array([0.05, 0.2]),
             translated(eqp.Anderson, 1e-6, jnp.zeros(2), 10_000, history=5, ridge=1e-6),
             _flat_vjp, 0.2),
    GradCase("flat_broyden", _flat_aux, jnp.array([1.0, -0.5]), jnp.array([0.05, 0.2]),
             translated(eqp.Broyden, 1e-6, jnp.zeros(2), 100), _flat_vjp, 0.2, True),
    # fixed_point_iteration_test / anderson_test / broyden_test::
    # test_affine_contractive_mapping: gradients with respect to M and b.
    GradCase("affine_picard", _affine, jnp.zeros(200), AFFINE,
             translated(eqp.Picard, 1e-6, jnp.zeros(200), 100), _affine_vjp, 0.5),
    GradCase("affine_anderson", _affine, jnp.zeros(200), AFFINE,
             translated(eqp.Anderson, 1e-6, jnp.zeros(200), 100, history=5, ridge=1e-6),
             _affine_vjp, 0.5),
    GradCase("affine_broyden", _affine, jnp.zeros(200), AFFINE,
             translated(eqp.Broyden, 1e-6, jnp.zeros(200), 100), _affine_vjp, 0.5),
]
ADJOINTS = {**IMPLICIT, **ITERATIVE, "unrolled": eqp.Unrolled()}


# The implicit derivative does not depend on the solver that found z*, so the
# implicit adjoints run once per problem (with jaxopt's FixedPointIteration variant);
# Unrolled differentiates each solver's own iterations and runs with all three.
IMPLICIT_VARIANT = {"cos": "cos_picard", "flat": "flat_picard", "affine": "affine_picard"}
GRAD_TESTS = [
    (c, a) for c in GRAD_CASES for a in ADJOINTS
    if a == "unrolled" or IMPLICIT_VARIANT[c.name.split("_")[0]] == c.name
]


def _build_grads(name):
    case = GRAD_CASES[[c.name for c in GRAD_CASES].index(name)]

    def run(args, w):
        out = {}
        for c, a in GRAD_TESTS:
            if c.name != name:
                continue

            def solve(args, adjoint=ADJOINTS[a]):
                return eqp.fixed_point(case.f, case.z0, args, solver=case.solver,
                                       adjoint=adjoint, has_aux=case.has_aux).value

            out[a] = jax.vjp(solve, args)[1](w)[0]
        return out

    return run, (case.args, _cotangent(case))


def _cotangent(case):
    return jax.random.normal(jax.random.PRNGKey(3), jnp.shape(case.z0))


grads = once(_build_grads)


@pytest.mark.parametrize("case, adjoint", GRAD_TESTS, ids=[f"{c.name}-{a}" for c, a in GRAD_TESTS])
def test_grads(case, adjoint):
    """jaxopt's gradient tests (`check_grads`, reverse mode, implicit_diff True and
    False), with every adjoint, against the closed-form derivative."""
    got = grads(case.name)[adjoint]
    w = _cotangent(case)
    if adjoint in ("almeida_pineda", "neumann") and case.rho >= 1:
        # AlmeidaPineda iterates u <- Jᵀ u + g, which does not converge for ρ(J) >= 1
        # and is reported as NaN; Neumann(k) is then no approximation of (I - Jᵀ)⁻¹.
        if adjoint == "almeida_pineda":
            assert bool(np.all(np.isnan(ravel_pytree(got)[0])))
        pytest.skip(f"{adjoint} needs ρ(J) < 1; here ρ(J) = {case.rho}")
    k = NEUMANN_K if adjoint == "neumann" else None  # Neumann(k): the truncated series
    expected = case.exact_vjp(case.args, w, k)
    for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3)
