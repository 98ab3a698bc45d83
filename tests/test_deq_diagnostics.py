"""The DEQ kit's second part: the convergence trace, ρ(J) in the statistics, the
fixed-point correction loss and SHINE.

References: the solver run by hand in a Python loop (its own `init`/`update`, the
same stopping rule), dense float64 Jacobians (`jnp.linalg.eigvals`), the Broyden
inverse estimate assembled as a dense matrix, central finite differences, and the
exact implicit gradient (`Implicit`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqprop_jax as eqp
from eqprop_jax.equilibrium.solvers.base import residuals

D = 6


def _problem(scale=0.7, seed=0, n=4):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    w = jax.random.normal(k[0], (D, D))
    w = scale * w / jnp.linalg.norm(w, 2)
    xs = jax.random.normal(k[1], (n, D))
    return w, xs


def cell(z, args):
    w, x = args
    return jnp.tanh(w @ z + x)


def linear(z, args):
    w, x = args
    return w @ z + x


def _by_hand(solver, f, z0, args):
    """`solver` run in a Python loop with fixed_point's stopping rule: the iterates
    z_1, z_2, ..., their scaled residuals and the final solver state."""
    atol, rtol = solver.tolerances(z0.dtype)
    fn = lambda z: f(z, args)
    z, fz = z0, fn(z0)
    state = solver.init(z, fz)
    zs, res = [], []
    r = residuals(z, fz, atol, rtol)[0]
    while r > 1 and len(zs) < solver.max_steps:
        z, state = solver.update(fn, z, fz, state)
        fz = fn(z)
        r = residuals(z, fz, atol, rtol)[0]
        zs.append(z)
        res.append(float(r))
    return zs, np.array(res), state


# -- the trace ----------------------------------------------------------------------


@pytest.mark.parametrize("solver", [eqp.Anderson(tol=1e-10), eqp.Broyden(tol=1e-10)])
def test_trace_is_the_hand_written_loop(solver):
    w, xs = _problem(n=3)
    k = 12

    @jax.jit
    def solve(w, xs):
        return jax.vmap(
            lambda x: eqp.fixed_point(
                cell, jnp.zeros(D), (w, x), solver=solver, trace=eqp.Trace(k, iterates=True)
            )
        )(xs)

    sol = solve(w, xs)
    assert sol.stats.trace.shape == (len(xs), k)
    assert sol.iterates.shape == (len(xs), k, D)
    for i, x in enumerate(xs):
        zs, res, _ = _by_hand(solver, cell, jnp.zeros(D), (w, x))
        n = len(zs)
        assert int(sol.stats.steps[i]) == n
        m = min(n, k)
        # atol: the residual is scaled by 1/tol = 1e10, so a rounding difference of
        # 1e-14 in |f(z) - z| (batched vs single-example arithmetic) shows as 1e-4.
        np.testing.assert_allclose(sol.stats.trace[i, :m], res[:m], rtol=1e-6, atol=1e-4)
        # NaN after the solve stopped; the iterates repeat the last one there.
        assert np.all(np.isnan(sol.stats.trace[i, m:]))
        np.testing.assert_allclose(sol.iterates[i, :m], np.stack(zs[:m]), rtol=1e-8, atol=1e-12)
        np.testing.assert_array_equal(
            sol.iterates[i, m:], np.broadcast_to(sol.value[i], (k - m, D))
        )
    # The last recorded residual of a finished solve is stats.residual.
    done = np.asarray(sol.stats.steps) <= k
    last = np.asarray(sol.stats.trace)[np.arange(len(xs)), np.asarray(sol.stats.steps) - 1]
    np.testing.assert_allclose(last[done], np.asarray(sol.stats.residual)[done], rtol=1e-12)


def test_trace_costs_no_gradient_and_changes_nothing():
    w, xs = _problem(n=2)

    def loss(w, adjoint, trace):
        solve = lambda x: eqp.fixed_point(
            cell, jnp.zeros(D), (w, x), solver=eqp.Picard(tol=1e-10), adjoint=adjoint,
            trace=trace,
        )
        return jnp.sum(jax.vmap(solve)(xs).value ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
    for adjoint in (eqp.Implicit(), eqp.Unrolled()):
        g0 = grad(w, adjoint, None)
        g1 = grad(w, adjoint, eqp.Trace(5, True))
        np.testing.assert_allclose(g1, g0, rtol=1e-10, atol=1e-14)
    # forward mode too
    jvp = jax.jit(
        lambda w, t: jax.jvp(lambda w: loss(w, eqp.Implicit(), t), (w,), (jnp.ones_like(w),))[1],
        static_argnums=1,
    )
    np.testing.assert_allclose(jvp(w, 7), jvp(w, None), rtol=1e-10)


def test_trace_argument_is_checked():
    with pytest.raises(TypeError, match="trace"):
        eqp.fixed_point(cell, jnp.zeros(D), _problem()[0:1] + (jnp.zeros(D),), trace=2.5)
    with pytest.raises(ValueError, match="steps"):
        eqp.Trace(0)


# -- ρ(J) in the statistics -----------------------------------------------------------


def test_spectral_radius_in_stats_matches_dense_eigenvalues():
    k = jax.random.split(jax.random.PRNGKey(3), 2)
    a = jax.random.normal(k[0], (D, D))
    w = 0.6 * (a @ a.T) / jnp.linalg.norm(a @ a.T, 2)  # J = diag(1 - z²) W: real spectrum
    xs = 0.5 * jax.random.normal(k[1], (3, D))
    sol = jax.jit(
        jax.vmap(lambda x: eqp.fixed_point(cell, jnp.zeros(D), (w, x), spectral_radius=True))
    )(xs)
    assert sol.stats.spectral_radius.shape == (3,)
    for i, x in enumerate(xs):
        jac = jax.jacfwd(lambda z, x=x: cell(z, (w, x)))(sol.value[i])
        rho = float(jnp.max(jnp.abs(jnp.linalg.eigvals(jac))))
        np.testing.assert_allclose(sol.stats.spectral_radius[i], rho, rtol=2e-3)
    assert eqp.fixed_point(cell, jnp.zeros(D), (w, xs[0])).stats.spectral_radius is None


def test_spectral_radius_in_stats_under_grad():
    w, xs = _problem()

    def loss(w):
        sol = eqp.fixed_point(cell, jnp.zeros(D), (w, xs[0]), spectral_radius=True)
        return jnp.sum(sol.value**2), sol.stats.spectral_radius

    g, rho = jax.grad(loss, has_aux=True)(w)
    g0 = jax.grad(lambda w: loss(w)[0])(w)
    assert np.isfinite(rho) and 0 < rho < 1
    np.testing.assert_allclose(g, g0)


# -- fixed-point correction -------------------------------------------------------------


def _correction_reference(w, x, zs, m, gamma, k, lam):
    """Σ_j γ^{m-j} ℓ(φ^k(z_{k_j})), k_j = ⌈j n / m⌉, with the iterates as constants."""
    n = len(zs)
    target = jnp.linspace(-0.5, 0.5, D)
    total = 0.0
    for j in range(1, m + 1):
        h = zs[max(math.ceil(j * n / m), 1) - 1]
        for _ in range(k):
            h = lam * cell(h, (w, x)) + (1 - lam) * h
        total = total + gamma ** (m - j) * jnp.sum((h - target) ** 2)
    return total


@pytest.mark.parametrize("k,lam", [(1, 1.0), (3, 0.5)])
def test_fixed_point_correction_is_its_definition(k, lam):
    w, xs = _problem(scale=0.9)
    x = xs[0]
    target = jnp.linspace(-0.5, 0.5, D)
    task = lambda z: jnp.sum((z - target) ** 2)
    solver = eqp.Picard(tol=1e-8)
    zs, _, _ = _by_hand(solver, cell, jnp.zeros(D), (w, x))
    n_trace = len(zs) + 5

    def corr(w):
        sol = eqp.fixed_point(
            cell, jnp.zeros(D), (w, x), solver=solver, trace=eqp.Trace(n_trace, iterates=True)
        )
        return eqp.fixed_point_correction(
            cell, sol.iterates, sol.stats.steps, (w, x), task, n_states=4, gamma=0.8, k=k,
            damping=lam,
        )

    val, grad = jax.jit(jax.value_and_grad(corr))(w)
    ref = lambda w: _correction_reference(w, x, zs, 4, 0.8, k, lam)
    np.testing.assert_allclose(val, ref(w), rtol=1e-10)
    # Central differences with the iterates held fixed: the phantom gradient.
    eps = 1e-6
    fd = np.zeros((D, D))
    for a in range(D):
        for b in range(D):
            e = jnp.zeros((D, D)).at[a, b].set(eps)
            fd[a, b] = (ref(w + e) - ref(w - e)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_correction_indices_spread_and_end_at_the_last_update():
    from eqprop_jax.correction import correction_indices

    np.testing.assert_array_equal(correction_indices(jnp.array(12), 20, 3), [3, 7, 11])
    np.testing.assert_array_equal(correction_indices(jnp.array(2), 20, 3), [0, 1, 1])
    np.testing.assert_array_equal(correction_indices(jnp.array(50), 20, 4), [4, 9, 14, 19])
    np.testing.assert_array_equal(correction_indices(jnp.array(0), 20, 2), [0, 0])


def test_deq_correction_loss_is_the_function():
    import equinox as eqx

    w, xs = _problem()

    class Cell(eqx.Module):
        w: jax.Array

        def __call__(self, z, x):
            return jnp.tanh(self.w @ z + x)

    deq = eqp.DEQ(Cell(w), state_shape=(D,), solver=eqp.Anderson(tol=1e-8))
    task = lambda z: jnp.sum(z**2)
    xs = xs[:2]
    z, corr = eqx.filter_jit(
        lambda d, xs: jax.vmap(lambda x: d.correction_loss(x, task, trace_steps=30, n_states=3))(xs)
    )(deq, xs)

    @jax.jit
    def reference(x):
        sol = eqp.fixed_point(
            cell, jnp.zeros(D), (w, x), solver=deq.solver, trace=eqp.Trace(30, iterates=True)
        )
        return sol, eqp.fixed_point_correction(cell, sol.iterates, sol.stats.steps, (w, x), task)

    for i, x in enumerate(xs):
        sol, ref = reference(x)
        np.testing.assert_allclose(corr[i], ref, rtol=1e-6)
        np.testing.assert_allclose(z[i], sol.value, rtol=1e-6)
    g = eqx.filter_jit(eqx.filter_grad(
        lambda d: jnp.sum(jax.vmap(lambda x: d.correction_loss(x, task, trace_steps=30)[1])(xs))
    ))(deq)
    assert np.all(np.isfinite(g.cell.w)) and float(jnp.linalg.norm(g.cell.w)) > 0


# -- SHINE --------------------------------------------------------------------------------


def _grad(adjoint, solver, f, w, xs):
    @jax.jit
    def grad(w):
        def loss(w):
            solve = lambda x: eqp.fixed_point(f, jnp.zeros(D), (w, x), solver=solver,
                                              adjoint=adjoint)
            return jnp.sum(jax.vmap(solve)(xs).value ** 2)

        return jax.grad(loss)(w)

    return grad(w)


@pytest.mark.parametrize("f", [linear, cell])
def test_shine_is_minus_broyden_inverse_transposed(f):
    """Without fallback: u = -Bᵀ g with B = -I + Σ u_i v_iᵀ from the forward solve."""
    w, xs = _problem()
    solver = eqp.Broyden(tol=1e-10, history=30)
    got = _grad(eqp.SHINE(fallback=False), solver, f, w, xs)
    ref = jnp.zeros_like(w)
    for x in xs:
        zs, _, state = _by_hand(solver, f, jnp.zeros(D), (w, x))
        z = zs[-1]
        b = -jnp.eye(D) + state.us.T @ state.vs
        u = -b.T @ (2 * z)
        _, vjp_w = jax.vjp(lambda w, z=z, x=x: f(z, (w, x)), w)
        ref = ref + vjp_w(u)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-10)


def test_shine_exact_inverse_equals_implicit():
    """A linear map in one dimension: Broyden's secant is the exact derivative after
    one update, so -B = (I - J)⁻¹ and SHINE (no fallback) is the implicit gradient."""
    a, x = jnp.array([[0.6]]), jnp.array([0.3])
    f = lambda z, a: a @ z + x
    solver = eqp.Broyden(tol=1e-12)

    def g(adjoint):
        loss = lambda a: jnp.sum(
            eqp.fixed_point(f, jnp.zeros(1), a, solver=solver, adjoint=adjoint).value ** 2
        )
        return jax.grad(loss)(a)

    exact = (2 * x**2 / 0.4**3)[None]  # d/da (x / (1 - a))² = 2 x² / (1 - a)³
    np.testing.assert_allclose(g(eqp.Implicit()), exact, rtol=1e-10)
    np.testing.assert_allclose(g(eqp.SHINE(fallback=False)), exact, rtol=1e-10)


def test_shine_fallback_reaches_implicit_on_linear_and_is_close_on_tanh():
    w, xs = _problem(n=2)
    solver = eqp.Broyden(tol=1e-10, history=30)
    # Linear f: Broyden's inverse estimate at convergence is not exact in d > 1 (good
    # Broyden keeps only the latest secant condition), the residual test sees it and
    # the Krylov correction reaches the implicit gradient.
    g_imp = _grad(eqp.Implicit(), solver, linear, w, xs)
    g_shine = _grad(eqp.SHINE(), solver, linear, w, xs)
    np.testing.assert_allclose(g_shine, g_imp, rtol=1e-8, atol=1e-10)
    # tanh DEQ: the plain estimate is within a small angle; the fallback with a
    # tight threshold is the implicit gradient.
    g_imp = _grad(eqp.Implicit(), solver, cell, w, xs)
    cos = lambda a, b: float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    for adjoint in (eqp.SHINE(fallback=False), eqp.SHINE()):
        assert cos(_grad(adjoint, solver, cell, w, xs), g_imp) > 0.99
    g_tight = _grad(eqp.SHINE(threshold=1e-9), solver, cell, w, xs)
    np.testing.assert_allclose(g_tight, g_imp, rtol=1e-7, atol=1e-10)


def test_shine_forward_mode_and_errors():
    w, xs = _problem()
    solver = eqp.Broyden(tol=1e-10, history=30)

    def z_of(w, adjoint):
        return eqp.fixed_point(cell, jnp.zeros(D), (w, xs[0]), solver=solver,
                               adjoint=adjoint).value

    t = jnp.ones_like(w)
    ref = jax.jvp(lambda w: z_of(w, eqp.Implicit()), (w,), (t,))[1]
    got = jax.jvp(lambda w: z_of(w, eqp.SHINE(threshold=1e-9)), (w,), (t,))[1]
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-10)
    with pytest.raises(TypeError, match="Broyden"):
        eqp.fixed_point(cell, jnp.zeros(D), (w, xs[0]), adjoint=eqp.SHINE())
    with pytest.raises(ValueError, match="threshold"):
        eqp.SHINE(threshold=-1.0)


def test_trace_of_a_pytree_state_and_a_fixed_step_solve():
    w, xs = _problem()
    x = xs[0]

    def f_tree(z, args):
        out = cell(jnp.concatenate([z["a"], z["b"]]), args)
        return {"a": out[:2], "b": out[2:]}

    solver = eqp.Anderson(tol=1e-10)
    flat = eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=solver,
                           trace=eqp.Trace(9, iterates=True))
    tree = eqp.fixed_point(f_tree, {"a": jnp.zeros(2), "b": jnp.zeros(D - 2)}, (w, x),
                           solver=solver, trace=eqp.Trace(9, iterates=True))
    assert tree.iterates["a"].shape == (9, 2) and tree.iterates["b"].shape == (9, D - 2)
    np.testing.assert_allclose(
        jnp.concatenate([tree.iterates["a"], tree.iterates["b"]], axis=1), flat.iterates,
        rtol=1e-12,
    )
    np.testing.assert_allclose(tree.stats.trace, flat.stats.trace, rtol=1e-9, atol=1e-4)
    # A fixed-step solve records the unscaled residual |f(z) - z|, as stats.residual.
    fixed = eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=eqp.Picard(tol=0, max_steps=4),
                            trace=6)
    zs, _, _ = _by_hand(eqp.Picard(tol=1e-300, max_steps=4), cell, jnp.zeros(D), (w, x))
    ref = [float(jnp.max(jnp.abs(cell(z, (w, x)) - z))) for z in zs]
    np.testing.assert_allclose(fixed.stats.trace[:4], ref, rtol=1e-12)
    assert np.all(np.isnan(fixed.stats.trace[4:]))
