"""Right and fast by default: the solver core's defaults, statuses, NaN handling and settings.

Every test states the reference it is checked against: an analytic answer, a dense
float64 implicit-function-theorem solve, or the program JAX compiles.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqprop_jax as eqp

SOLVERS = [eqp.Picard, eqp.Anderson, eqp.Broyden]


# -- fixed-step solves -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_fixed_step_runs_exactly_its_steps(dtype):
    # z <- z/2 + a from 0: z_k = 2a (1 - 2^-k). Before the fix, any update above ~4
    # overflowed the scaled residual to inf and the solve stopped at step 0 as
    # "nonfinite", returning z0.
    solve = jax.jit(lambda a: eqp.fixed_point(
        lambda z, a: 0.5 * z + a, jnp.zeros(3, dtype), a, solver=eqp.Picard(tol=0.0, max_steps=50)
    ))
    eps = float(jnp.finfo(dtype).eps)
    for a in [3.0, 5.0, 10.0, 1e3, 1e6]:
        sol = solve(jnp.asarray(a, dtype))
        np.testing.assert_allclose(np.asarray(sol.value), 2 * a * (1 - 0.5**50), rtol=8 * eps)
        # Either all 50 steps ran, or f(z) = z held exactly in floating point earlier.
        if int(sol.result) == eqp.Result.max_steps:
            assert int(sol.stats.steps) == 50
        else:
            assert int(sol.result) == eqp.Result.converged
            assert float(sol.stats.residual) == 0.0


@pytest.mark.parametrize("solver_cls", SOLVERS)
def test_fixed_step_counts_steps_at_any_scale(solver_cls):
    # A slowly contracting rotation-scaling map never meets f(z) = z exactly in 7 steps,
    # so each solver must run exactly 7 updates whatever the scale (1e6).
    theta = 0.3
    rot = 0.9 * jnp.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])

    def f(z, c):
        return rot @ z + c

    sol = eqp.fixed_point(
        f, jnp.zeros(2), jnp.array([1e6, -2e6]), solver=solver_cls(tol=0.0, max_steps=7)
    )
    assert int(sol.result) == eqp.Result.max_steps
    assert int(sol.stats.steps) == 7
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    # The reported residual is the unscaled max |f(z) - z|.
    residual = jnp.max(jnp.abs(f(sol.value, jnp.array([1e6, -2e6])) - sol.value))
    np.testing.assert_allclose(float(sol.stats.residual), float(residual), rtol=1e-12)


def test_fixed_step_status_is_honest_when_diverging():
    # z <- 2z + 1 diverges: the residual doubles each step and passes divergence = 1e8
    # times its best value after 27 steps.
    sol = eqp.fixed_point(
        lambda z, _: 2 * z + 1, jnp.zeros(1), None, solver=eqp.Picard(tol=0.0, max_steps=100)
    )
    assert int(sol.result) == eqp.Result.diverged
    assert int(sol.stats.steps) == 27


# -- NaN is never hidden -----------------------------------------------------------


def test_nan_in_args_returns_nan_not_z0():
    sol = eqp.fixed_point(lambda z, a: 0.5 * z + a, jnp.ones(3), jnp.array([1.0, jnp.nan, 1.0]))
    assert int(sol.result) == eqp.Result.nonfinite
    assert bool(jnp.all(jnp.isnan(sol.value)))


def test_nan_reaches_the_gradient():
    def loss(c):
        return jnp.sum(eqp.fixed_point(lambda z, c: 0.5 * z + c, jnp.zeros(2), c).value)

    g = jax.grad(loss)(jnp.array([1.0, jnp.nan]))
    assert not bool(jnp.all(jnp.isfinite(g)))


def test_zero_scale_is_not_read_as_nonfinite():
    # atol = 0 with rtol > 0 at z = 0: the scaled residual is infinite (not converged),
    # which must not be taken for a NaN/inf in the state.
    sol = eqp.fixed_point(
        lambda z, _: 0.5 * z + 1.0, jnp.zeros(2), None, solver=eqp.Picard(tol=0.0, rtol=1e-6)
    )
    assert int(sol.result) == eqp.Result.converged
    np.testing.assert_allclose(np.asarray(sol.value), 2.0, rtol=1e-5)


def test_neumann_reports_a_divergent_series_as_nan():
    # jaxopt's ridge problem in miniature: f(z) = -5 z + c has J = -5, ρ(J) ≥ 1, so the
    # Neumann series Σ (-5)^i grows. The exact derivative dz*/dc = 1/6 needs Implicit.
    def loss(c, adjoint):
        return jnp.sum(eqp.fixed_point(
            lambda z, c: z - 0.1 * (6 * z - c),  # a convergent map with the same root
            jnp.zeros(2), c, adjoint=adjoint,
        ).value)

    c = jnp.array([1.0, 2.0])
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(c, eqp.Implicit())), 1 / 6, rtol=1e-9)

    def bad(c, adjoint):
        # The same fixed point seen through f(z) = -5 z + c: ρ(J) = 5.
        z = jax.lax.stop_gradient(jnp.broadcast_to(c / 6, (2,)))
        return jnp.sum(eqp.fixed_point(
            lambda z, c: -5 * z + c, z, c,
            solver=eqp.Picard(tol=0.0, max_steps=1), adjoint=adjoint,
        ).value)

    assert bool(jnp.all(jnp.isnan(jax.grad(bad)(c, eqp.Neumann(10)))))
    assert bool(jnp.all(jnp.isnan(jax.grad(bad)(c, eqp.AlmeidaPineda()))))
    np.testing.assert_allclose(
        np.asarray(jax.grad(bad)(c, eqp.Implicit(eqp.GMRES()))), 1 / 6, rtol=1e-9
    )


# -- no host callback in the compiled program by default ---------------------------

D = 16


def _deq_problem(dtype=jnp.float64):
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(k[0], (D, D), dtype)
    w = 0.8 * w / jnp.linalg.norm(w, 2)
    xs = jax.random.normal(k[1], (8, D), dtype)
    return w, xs


def _tanh_cell(z, args):
    w, x = args
    return jnp.tanh(w @ z + x)


def _sigmoid_cell(z, args):
    w, x = args
    return jax.nn.sigmoid(w @ z + x)


def _count_callbacks(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return len(re.findall(r"callback", text))


@pytest.mark.parametrize(
    "adjoint", [eqp.Implicit(), eqp.Implicit(eqp.GMRES()), eqp.AlmeidaPineda(), eqp.Neumann(5)]
)
def test_no_host_callback_by_default(adjoint):
    w, xs = _deq_problem()

    def loss(w, adjoint):
        sol = jax.vmap(lambda x: eqp.fixed_point(_tanh_cell, jnp.zeros(D), (w, x),
                                                 adjoint=adjoint))(xs)
        return jnp.sum(sol.value**2)

    assert _count_callbacks(jax.grad(lambda w: loss(w, adjoint)), w) == 0
    # The counter does see a callback when one is asked for.
    warn = eqx.tree_at(lambda a: a.on_failure, adjoint, "warn")
    assert _count_callbacks(jax.grad(lambda w: loss(w, warn)), w) > 0


def test_throw_still_raises():
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(eqp.fixed_point(
            lambda z, _: 0.99 * z + 1.0, jnp.zeros(2), None,
            solver=eqp.Picard(max_steps=3), throw=True,
        ).value)


def test_throw_raises_the_status_message():
    with pytest.raises(Exception, match="a NaN or inf appeared in the state"):
        jax.block_until_ready(eqp.fixed_point(
            lambda z, _: z * jnp.nan, jnp.ones(2), None, throw=True,
        ).value)


# -- statuses: an enumeration whose items are also integer codes ---------------------


def test_result_is_an_enumeration_with_its_messages():
    R = eqp.Result
    assert issubclass(R, eqx.Enumeration) and isinstance(R.diverged, R)
    assert R.names == ("converged", "max_steps", "diverged", "nonfinite") and len(R) == 4
    assert [int(getattr(R, n)) for n in R.names] == [0, 1, 2, 3]
    assert R[R.max_steps] == "fixed_point: max_steps reached before convergence"
    assert R.message(R.diverged) == "fixed_point: the iteration diverged"
    assert R.message(np.array([3, 0])) == [R[R.nonfinite], R[R.converged]]
    assert R.name(jnp.array([[1], [3]])) == [["max_steps"], ["nonfinite"]]
    assert bool(R.converged == R.converged) and bool(R.converged != R.nonfinite)


def test_result_items_compare_with_codes():
    R = eqp.Result
    codes = jnp.array([0, 1, 2, 3], jnp.int32)
    # Both orders, ints, numpy and jax arrays, inside and outside jit.
    assert np.asarray(codes == R.diverged).tolist() == [False, False, True, False]
    assert np.asarray(R.diverged != codes).tolist() == [True, True, False, True]
    assert np.asarray(np.asarray(codes) == R.max_steps).tolist() == [False, True, False, False]
    assert 3 == R.nonfinite and int(codes[0]) == R.converged and np.int32(1) in (R.max_steps,)
    flip = jax.jit(lambda c: jnp.where(c == R.converged, R.nonfinite, R.converged))(codes)
    assert flip.dtype == jnp.int32 and flip.tolist() == [3, 0, 0, 0]
    assert len({R.converged, R.converged, R.max_steps}) == 2
    sol = eqp.fixed_point(lambda z, _: 0.5 * z, jnp.ones(2), None)
    assert sol.result.dtype == jnp.int32 and bool(sol.converged)
    with pytest.raises(ValueError):  # other enumerations stay incomparable
        class Other(eqx.Enumeration):
            a = ""

        R.converged == Other.a  # noqa: B015


def test_result_item_raises_its_message():
    R = eqp.Result

    @jax.jit
    def check(code, x):
        return R.item(code).error_if(x, code != R.converged)

    np.testing.assert_array_equal(np.asarray(check(jnp.int32(0), jnp.ones(2))), 1.0)
    with pytest.raises(Exception, match="the iteration diverged"):
        jax.block_until_ready(check(jnp.int32(2), jnp.ones(2)))


# -- backward statistics as arrays -------------------------------------------------


def test_adjoint_probe_matches_the_callback():
    w, xs = _deq_problem()
    seen = []

    def loss(w, probes, adjoint):
        def one(x, p):
            return eqp.fixed_point(_tanh_cell, jnp.zeros(D), (w, x), adjoint=adjoint, probe=p)

        return jnp.sum(jax.vmap(one)(xs, probes).value ** 2)

    probes = jnp.zeros((xs.shape[0], 3))
    adjoint = eqp.AlmeidaPineda(callback=seen.append)
    g_w, g_p = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(w, probes, adjoint)
    jax.effects_barrier()
    stats = eqp.AdjointStats.from_probe(g_p)
    cb_steps = np.concatenate([np.atleast_1d(np.asarray(s.steps)) for s in seen])
    cb_res = np.concatenate([np.atleast_1d(np.asarray(s.residual)) for s in seen])
    np.testing.assert_array_equal(np.sort(np.asarray(stats.steps)), np.sort(cb_steps))
    np.testing.assert_allclose(np.sort(np.asarray(stats.residual)), np.sort(cb_res), rtol=1e-12)
    assert bool(jnp.all(stats.converged)) and bool(jnp.all(stats.steps > 0))
    # The gradient is the one obtained without a probe.
    g_ref = jax.grad(loss)(w, probes, eqp.AlmeidaPineda())
    np.testing.assert_allclose(np.asarray(g_w), np.asarray(g_ref), rtol=1e-12)

    # A shared probe sums over the batch; a failed solve is counted (and NaN by default).
    def shared(w, p, adjoint):
        return loss(w, jnp.broadcast_to(p, probes.shape), adjoint)

    g_w, g_p = jax.grad(shared, argnums=(0, 1))(w, eqp.adjoint_probe(jnp.float64),
                                                 eqp.AlmeidaPineda(max_steps=2))
    total = eqp.AdjointStats.from_probe(g_p)
    assert float(total.failures) == xs.shape[0] and float(total.steps) == 2 * xs.shape[0]
    assert bool(jnp.all(jnp.isnan(g_w)))


def test_probe_has_no_effect_on_values_or_forward_mode():
    w, xs = _deq_problem()
    x = xs[0]

    def value(w, p):
        return eqp.fixed_point(_tanh_cell, jnp.zeros(D), (w, x), probe=p).value

    p = eqp.adjoint_probe(jnp.float64)
    np.testing.assert_array_equal(np.asarray(value(w, p)), np.asarray(value(w, None)))
    t = jax.random.normal(jax.random.PRNGKey(3), w.shape)
    _, dz_probe = jax.jvp(lambda w: value(w, p), (w,), (t,))
    _, dz = jax.jvp(lambda w: value(w, None), (w,), (t,))
    np.testing.assert_allclose(np.asarray(dz_probe), np.asarray(dz), rtol=1e-12)


def test_probe_is_checked():
    with pytest.raises(ValueError, match="shape"):
        eqp.fixed_point(lambda z, _: 0.5 * z, jnp.ones(2), None, probe=jnp.zeros(2))


# -- dtype-aware default tolerances ------------------------------------------------


def test_default_tolerances():
    assert eqp.default_tol(jnp.float64) == 1e-12
    assert eqp.default_tol(jnp.float32) == 1e-6
    assert eqp.default_tol(jnp.complex128) == 1e-12
    assert eqp.default_tol(jnp.bfloat16) == 1e-2
    assert eqp.Picard().tolerances(jnp.float64) == (1e-12, 1e-12)
    assert eqp.Picard(tol=1e-3, rtol=0.0).tolerances(jnp.float64) == (1e-3, 0.0)


_DENSE = {}


def _dense_ift_grad(cell, w, xs):
    """d/dw Σ_x Σ z*(x)² by a dense float64 solve of (I - Jᵀ) u = g at a tight z*."""
    if cell in _DENSE:
        return _DENSE[cell]
    tight = eqp.Picard(tol=1e-15, max_steps=20000)

    def one(x):
        z = eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=tight).value
        jac = jax.jacfwd(lambda z: cell(z, (w, x)))(z)
        u = jnp.linalg.solve((jnp.eye(D) - jac).T, 2 * z)
        _, vjp = jax.vjp(lambda w: cell(z, (w, x)), w)
        return vjp(u)[0]

    _DENSE[cell] = jnp.sum(jax.jit(jax.vmap(one))(xs), axis=0)
    return _DENSE[cell]


@pytest.mark.parametrize("cell", [_tanh_cell, _sigmoid_cell], ids=["tanh", "sigmoid"])
def test_float64_defaults_are_exact(cell):
    w, xs = _deq_problem()

    @eqx.filter_jit
    def grad(w, adjoint):
        def loss(w):
            solve = lambda x: eqp.fixed_point(cell, jnp.zeros(D), (w, x), adjoint=adjoint)
            return jnp.sum(jax.vmap(solve)(xs).value ** 2)

        return jax.grad(loss)(w)

    ref = _dense_ift_grad(cell, w, xs)
    for adjoint in [eqp.Implicit(), eqp.AlmeidaPineda(), eqp.Implicit(eqp.GMRES())]:
        g = grad(w, adjoint)
        assert float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref)) <= 1e-10, adjoint


def test_adjoint_tolerance_follows_a_tight_forward_solve():
    # A forward solve to 1e-13 with Implicit() defaults: the adjoint solves to 1e-13 too.
    w, xs = _deq_problem()

    def loss(w):
        sol = jax.vmap(lambda x: eqp.fixed_point(
            _tanh_cell, jnp.zeros(D), (w, x), solver=eqp.Picard(tol=1e-13, max_steps=5000)
        ))(xs)
        return jnp.sum(sol.value**2)

    g = jax.grad(loss)(w)
    ref = _dense_ift_grad(_tanh_cell, w, xs)
    assert float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref)) <= 1e-10


def test_recurrent_backprop_defaults_are_exact_in_float64():
    # RecurrentBackprop() is the autodiff reference of every alignment report: with its
    # defaults it must match a dense IFT solve on the model's own dynamics.
    model = eqp.HopfieldMLP((6, 8, 3), key=jax.random.PRNGKey(0))
    model = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model
    )
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 6), jnp.float64)
    y = jnp.arange(4) % 3
    _, grads, aux = eqp.RecurrentBackprop()(model, x, y)

    def dense(model):
        def per_example(xi, yi):
            s = model.relax(xi, yi, 0.0, solver=eqp.Picard(tol=1e-15, max_steps=20000)).value
            flat, unravel = jax.flatten_util.ravel_pytree(s)
            step = lambda f, m: jax.flatten_util.ravel_pytree(m.step(unravel(f), xi, yi, 0.0))[0]
            jac = jax.jacfwd(lambda f: step(f, model))(flat)
            g = jax.grad(lambda f: model.loss(unravel(f), yi))(flat)
            u = jnp.linalg.solve((jnp.eye(flat.size) - jac).T, g)
            direct = eqx.filter_grad(lambda m: m.loss(s, yi))(model)
            implicit = eqx.filter_grad(lambda m: jnp.dot(u, step(flat, m)))(model)
            return jax.tree_util.tree_map(jnp.add, direct, implicit)

        gs = [per_example(xi, yi) for xi, yi in zip(x, y, strict=True)]
        return jax.tree_util.tree_map(lambda *a: sum(a) / len(a), *gs)

    ref = dense(model)
    flat_g = jax.flatten_util.ravel_pytree(grads)[0]
    flat_r = jax.flatten_util.ravel_pytree(ref)[0]
    assert float(jnp.linalg.norm(flat_g - flat_r) / jnp.linalg.norm(flat_r)) <= 1e-10
    assert bool(jnp.all(aux["result"] == eqp.Result.converged))


# -- settings are validated when built ---------------------------------------------


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: eqp.Implicit(on_failure="rasie"), ValueError),
        (lambda: eqp.AlmeidaPineda(on_failure="warning"), ValueError),
        (lambda: eqp.Neumann(3, on_failure=None), ValueError),
        (lambda: eqp.Implicit(tol=float("inf")), ValueError),
        (lambda: eqp.Implicit(tol=-1e-6), ValueError),
        (lambda: eqp.Implicit("gmres"), TypeError),
        (lambda: eqp.Implicit(linear_solver=eqp.GMRES), TypeError),
        (lambda: eqp.GMRES(restart=0), ValueError),
        (lambda: eqp.BiCGStab(max_steps=0), ValueError),
        (lambda: eqp.NormalCG(max_steps=1.5), TypeError),
        (lambda: eqp.Richardson(damping=0.0), ValueError),
        (lambda: eqp.Richardson(damping=float("nan")), ValueError),
        (lambda: eqp.Richardson(damping=jnp.array(0.5)), TypeError),
        (lambda: eqp.Richardson(truncated=1), TypeError),
        (lambda: eqp.Implicit(callback=3), TypeError),
        (lambda: eqp.Picard(tol=float("inf")), ValueError),
        (lambda: eqp.Picard(tol=float("nan")), ValueError),
        (lambda: eqp.Picard(tol=jnp.array(-1.0)), TypeError),
        (lambda: eqp.Picard(tol=np.array([1e-6, 1e-6])), TypeError),
        (lambda: eqp.Picard(rtol=-1.0), ValueError),
        (lambda: eqp.Picard(divergence=float("nan")), ValueError),
        (lambda: eqp.Picard(max_steps=0), ValueError),
        (lambda: eqp.Picard(max_steps=2.5), TypeError),
        (lambda: eqp.Anderson(ridge=float("inf")), ValueError),
        (lambda: eqp.Neumann(-1), ValueError),
    ],
)
def test_bad_settings_are_refused(build, error):
    with pytest.raises(error):
        build()


# -- the other defects ---------------------------------------------------------------


def test_normal_cg_uses_the_conjugate_transpose():
    # A complex contraction: z <- A z + b with complex A. The derivative of Re Σ z* w.r.t.
    # b is checked against the dense complex solve.
    k = jax.random.split(jax.random.PRNGKey(4), 3)
    a = (jax.random.normal(k[0], (D, D)) + 1j * jax.random.normal(k[1], (D, D))) / (3 * np.sqrt(D))
    b = jax.random.normal(k[2], (D,)).astype(jnp.complex128)

    def z_star(b, adjoint):
        return eqp.fixed_point(lambda z, b: a @ z + b, jnp.zeros(D, jnp.complex128), b,
                               adjoint=adjoint).value

    t = jnp.ones(D, jnp.complex128) * (1 + 2j)
    dense = jnp.linalg.solve(jnp.eye(D) - a, t)
    for adjoint in [eqp.Implicit(eqp.NormalCG()), eqp.Implicit()]:
        _, dz = jax.jvp(lambda b, adjoint=adjoint: z_star(b, adjoint), (b,), (t,))
        assert float(jnp.linalg.norm(dz - dense) / jnp.linalg.norm(dense)) <= 1e-9


def test_unrolled_takes_one_step_and_differentiates_z0():
    # optimistix's case: f(z) = c with z0 = c already converged; dz*/dc = 1.
    g = jax.grad(lambda c: eqp.fixed_point(lambda z, c: c + 0 * z, jnp.full(1, 2.0), c,
                                           adjoint=eqp.Unrolled()).value.sum())(jnp.array(2.0))
    assert float(g) == 1.0
    # Three steps of z <- z/2 + 1 from z0: dz_3/dz0 = 1/8.
    g0 = jax.grad(lambda z0: eqp.fixed_point(
        lambda z, c: 0.5 * z + c, z0, 1.0,
        solver=eqp.Picard(tol=0.0, max_steps=3), adjoint=eqp.Unrolled(),
    ).value.sum())(jnp.ones(1))
    assert float(g0[0]) == 0.125


def test_forward_mode_through_unrolled_names_the_alternatives():
    with pytest.raises(TypeError, match="Implicit"):
        jax.jvp(
            lambda c: eqp.fixed_point(lambda z, c: 0.5 * z + c, jnp.ones(1), c,
                                      adjoint=eqp.Unrolled()).value,
            (jnp.array(2.0),), (jnp.array(1.0),),
        )


def test_python_float_args_under_eager_grad():
    # jaxopt's tests differentiate with respect to a Python float passed in args.
    g = jax.grad(lambda c: eqp.fixed_point(lambda z, c: 0.5 * z + c, jnp.zeros(2), c)
                 .value.sum())(1.0)
    np.testing.assert_allclose(float(g), 4.0, rtol=1e-9)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_anderson_in_half_precision(dtype):
    w, xs = _deq_problem(jnp.float32)
    sol = eqp.fixed_point(_tanh_cell, jnp.zeros(D, dtype), (w.astype(dtype), xs[0].astype(dtype)),
                          solver=eqp.Anderson())
    assert sol.value.dtype == dtype
    ref = eqp.fixed_point(_tanh_cell, jnp.zeros(D, jnp.float64),
                          (w.astype(jnp.float64), xs[0].astype(jnp.float64))).value
    assert int(sol.result) == eqp.Result.converged
    assert float(jnp.max(jnp.abs(sol.value.astype(jnp.float64) - ref))) <= 0.1


def test_anderson_under_strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        w, xs = _deq_problem()
        sol = eqp.fixed_point(_tanh_cell, jnp.zeros(D), (w, xs[0]), solver=eqp.Anderson())
        assert int(sol.result) == eqp.Result.converged
