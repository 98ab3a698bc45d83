"""The DEQ training kit: inexact-gradient adjoints and Jacobian regularisation.

References: the papers' definitions written out with dense float64 matrices
(matrix powers, `jnp.linalg.solve`, `jnp.linalg.eigvals`), autodiff through the
paper's own unrolling, exact enumeration of sign vectors, and finite differences.
"""

import itertools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err as _rel

import eqprop_jax as eqp
from eqprop_jax.regularisation import hutchinson_frobenius

D = 8
TIGHT = eqp.Picard(tol=1e-15, max_steps=20000)


def _problem(scale=0.8, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    w = jax.random.normal(k[0], (D, D))
    w = scale * w / jnp.linalg.norm(w, 2)
    xs = jax.random.normal(k[1], (4, D))
    return w, xs


def cell(z, args):
    w, x = args
    return jnp.tanh(w @ z + x)


@jax.jit
def _dense_parts(w, x):
    """z*, J = ∂f/∂z at z*, and the VJP of f with respect to w at z*."""
    z = eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=TIGHT).value
    jac = jax.jacfwd(lambda z: cell(z, (w, x)))(z)
    _, vjp_w = jax.vjp(lambda w: cell(z, (w, x)), w)
    return z, jac, vjp_w


def _grad(adjoint, w, xs):
    """d/dw Σ_x Σ z*(x)², jitted and vmapped over the batch."""

    @jax.jit
    def grad(w):
        def loss(w):
            solve = lambda x: eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=TIGHT,
                                              adjoint=adjoint)
            return jnp.sum(jax.vmap(solve)(xs).value ** 2)

        return jax.grad(loss)(w)

    return grad(w)


def _phantom_dense(w, xs, k, lam):
    """λ Σ_{t<k} (Bᵀ)^t g with B = λ J + (1 - λ) I, pushed through ∂f/∂w, summed over xs."""
    total = jnp.zeros_like(w)
    for x in xs:
        z, jac, vjp_w = _dense_parts(w, x)
        b = lam * jac + (1 - lam) * jnp.eye(D)
        u = lam * sum(jnp.linalg.matrix_power(b.T, t) @ (2 * z) for t in range(k))
        total = total + vjp_w(u)[0]
    return total


# -- Jacobian-free backprop ----------------------------------------------------------


def test_jacobian_free_is_neumann_zero_and_its_definition():
    w, xs = _problem()
    g_jfb = _grad(eqp.JacobianFree(), w, xs)
    # The definition: u = g = 2 z*, pushed through ∂f/∂w at z*.
    ref = sum(vjp(2 * z)[0] for z, _, vjp in (_dense_parts(w, x) for x in xs))
    assert _rel(g_jfb, ref) <= 1e-12
    np.testing.assert_allclose(np.asarray(g_jfb), np.asarray(_grad(eqp.Neumann(0), w, xs)),
                               rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(
        np.asarray(g_jfb), np.asarray(_grad(eqp.PhantomGradient(k=1, damping=1.0), w, xs)),
        rtol=1e-13, atol=1e-15,
    )
    # It is not the implicit gradient (J ≠ 0 here), so the comparison above can fail.
    assert _rel(g_jfb, _grad(eqp.Implicit(), w, xs)) > 1e-2


def test_jacobian_free_forward_mode():
    # x = b = ∂f/∂w · ẇ at z*.
    w, xs = _problem()
    t = jax.random.normal(jax.random.PRNGKey(5), w.shape)
    x = xs[0]
    z, _, _ = _dense_parts(w, x)
    _, dz = jax.jvp(
        lambda w: eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=TIGHT,
                                  adjoint=eqp.JacobianFree()).value,
        (w,), (t,),
    )
    _, ref = jax.jvp(lambda w: cell(z, (w, x)), (w,), (t,))
    np.testing.assert_allclose(np.asarray(dz), np.asarray(ref), rtol=1e-12, atol=1e-14)


# -- phantom gradients ---------------------------------------------------------------


@pytest.mark.parametrize("k, lam", [(1, 0.5), (3, 0.7), (5, 0.5), (4, 1.0)])
def test_phantom_matches_dense_definition(k, lam):
    w, xs = _problem()
    g = _grad(eqp.PhantomGradient(k=k, damping=lam), w, xs)
    assert _rel(g, _phantom_dense(w, xs, k, lam)) <= 1e-12


def test_phantom_is_autodiff_through_the_papers_damped_unrolling():
    # Geng et al.'s definition: k steps h <- λ f(h) + (1 - λ) h from h_0 = stop_gradient(z*),
    # differentiated by autodiff. At a fixed point solved to 1e-15, h_k = z*.
    w, xs = _problem()
    k, lam = 6, 0.6

    def unrolled(w):
        def one(x):
            h = jax.lax.stop_gradient(
                eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=TIGHT).value
            )
            for _ in range(k):
                h = lam * cell(h, (w, x)) + (1 - lam) * h
            return jnp.sum(h**2)

        return sum(one(x) for x in xs)

    ref = jax.grad(unrolled)(w)
    assert _rel(_grad(eqp.PhantomGradient(k=k, damping=lam), w, xs), ref) <= 1e-10


@pytest.mark.parametrize("k", [1, 2, 6])
def test_phantom_at_damping_one_is_neumann(k):
    w, xs = _problem()
    np.testing.assert_allclose(
        np.asarray(_grad(eqp.PhantomGradient(k=k, damping=1.0), w, xs)),
        np.asarray(_grad(eqp.Neumann(k - 1), w, xs)),
        rtol=1e-12, atol=1e-14,
    )


def test_phantom_converges_to_the_implicit_gradient():
    # ρ(B) <= 1 - λ + λ ρ(J) < 1 - 0.5 (1 - 0.8) = 0.9: 400 steps leave 0.9^400 ~ 5e-19.
    w, xs = _problem()
    ift = _grad(eqp.Implicit(), w, xs)
    assert _rel(_grad(eqp.PhantomGradient(k=400, damping=0.5), w, xs), ift) <= 1e-10
    # Fewer steps are further away, monotonically in k here.
    errs = [_rel(_grad(eqp.PhantomGradient(k=k, damping=0.5), w, xs), ift) for k in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2]


def test_phantom_forward_mode_matches_dense():
    w, xs = _problem()
    x, k, lam = xs[1], 4, 0.5
    t = jax.random.normal(jax.random.PRNGKey(6), w.shape)
    z, jac, _ = _dense_parts(w, x)
    _, b = jax.jvp(lambda w: cell(z, (w, x)), (w,), (t,))
    bmat = lam * jac + (1 - lam) * jnp.eye(D)
    ref = lam * sum(jnp.linalg.matrix_power(bmat, i) @ b for i in range(k))
    _, dz = jax.jvp(
        lambda w: eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=TIGHT,
                                  adjoint=eqp.PhantomGradient(k=k, damping=lam)).value,
        (w,), (t,),
    )
    assert _rel(dz, ref) <= 1e-12


def _expanding(c, adjoint):
    # The root z* = c/6 of z = -5 z + c, seen through f(z) = -5 z + c itself: J = -5,
    # so the Neumann series Σ (-5)^i grows. The implicit derivative is dz*/dc = 1/6.
    z = jax.lax.stop_gradient(c / 6)
    return jnp.sum(eqp.fixed_point(
        lambda z, c: -5 * z + c, z, c, solver=eqp.Picard(tol=0.0, max_steps=1), adjoint=adjoint
    ).value)


def test_damping_rescues_an_expanding_map_and_failures_are_nan():
    c = jnp.array([1.0, 2.0])
    # B = 1 - λ + λ(-5) = 1 - 6 λ = 0.4 at λ = 0.1: the damped series converges to 1/6.
    g = jax.grad(_expanding)(c, eqp.PhantomGradient(k=200, damping=0.1))
    np.testing.assert_allclose(np.asarray(g), 1 / 6, rtol=1e-12)
    # Undamped the series grows; JFB's check sees ‖Jᵀ g‖ = 5 ‖g‖. Both are NaN, not wrong.
    for adjoint in [eqp.PhantomGradient(k=5, damping=1.0), eqp.JacobianFree(),
                    eqp.PhantomGradient(k=5, damping=0.5)]:  # |1 - 6 · 0.5| = 2
        assert bool(jnp.all(jnp.isnan(jax.grad(_expanding)(c, adjoint)))), adjoint
    # "ignore" returns the truncated series (JFB: u = g = 1 per entry).
    g = jax.grad(_expanding)(c, eqp.JacobianFree(on_failure="ignore"))
    np.testing.assert_allclose(np.asarray(g), 1.0)


def test_probe_counts_failures_of_inexact_adjoints():
    c = jnp.array([1.0, 2.0])

    def loss(c, p, adjoint):
        z = jax.lax.stop_gradient(c / 6)
        return jnp.sum(eqp.fixed_point(lambda z, c: -5 * z + c, z, c, probe=p, adjoint=adjoint,
                                       solver=eqp.Picard(tol=0.0, max_steps=1)).value)

    p = eqp.adjoint_probe(jnp.float64)
    _, gp = jax.grad(loss, argnums=(0, 1))(c, p, eqp.JacobianFree())
    stats = eqp.AdjointStats.from_probe(gp)
    assert float(stats.failures) == 1 and float(stats.steps) == 0
    np.testing.assert_allclose(float(stats.residual), 5.0, rtol=1e-12)  # ‖Jᵀ g‖ / ‖g‖
    _, gp = jax.grad(loss, argnums=(0, 1))(c, p, eqp.PhantomGradient(k=10, damping=0.1))
    stats = eqp.AdjointStats.from_probe(gp)
    assert float(stats.failures) == 0 and float(stats.steps) == 10
    np.testing.assert_allclose(float(stats.residual), 0.4**10, rtol=1e-9)  # |B|^k


def _lowered(adjoint):
    w, xs = _problem()

    def loss(w):
        sol = jax.vmap(lambda x: eqp.fixed_point(cell, jnp.zeros(D), (w, x), adjoint=adjoint))(xs)
        return jnp.sum(sol.value**2)

    return jax.jit(jax.grad(loss)).lower(w)


@pytest.mark.parametrize("adjoint", [eqp.JacobianFree(), eqp.PhantomGradient()])
def test_inexact_adjoints_add_no_host_callback(adjoint):
    assert len(re.findall("callback", _lowered(adjoint).as_text())) == 0
    warn = eqx.tree_at(lambda a: a.on_failure, adjoint, "warn")
    assert len(re.findall("callback", _lowered(warn).as_text())) > 0


def test_unchecked_jacobian_free_compiles_to_fewer_products():
    # With on_failure="ignore" nothing reads the check's product Jᵀ g, so XLA drops it.
    def dots(adjoint):
        return len(re.findall(r"\bdot\(", _lowered(adjoint).compile().as_text()))

    assert dots(eqp.JacobianFree(on_failure="ignore")) < dots(eqp.JacobianFree())


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: eqp.PhantomGradient(k=0), ValueError),
        (lambda: eqp.PhantomGradient(damping=0.0), ValueError),
        (lambda: eqp.PhantomGradient(damping=1.5), ValueError),
        (lambda: eqp.PhantomGradient(damping="0.5"), TypeError),
        (lambda: eqp.PhantomGradient(damping=jnp.array(0.5)), TypeError),
        (lambda: eqp.PhantomGradient(on_failure="rasie"), ValueError),
        (lambda: eqp.JacobianFree(on_failure="warning"), ValueError),
        (lambda: eqp.JacobianFree(callback=1), TypeError),
    ],
)
def test_bad_settings_are_refused(build, error):
    with pytest.raises(error):
        build()


def test_inexact_adjoints_in_a_deq_layer():
    # The DEQ layer takes them as any adjoint; a batch under jit + vmap + grad.
    w, xs = _problem()
    def direct(xs, adjoint):
        solve = lambda x: eqp.fixed_point(cell, jnp.zeros(D), (w, x), adjoint=adjoint)
        return jnp.sum(jax.vmap(solve)(xs).value ** 2)

    def layer(xs, deq):
        return jnp.sum(jax.vmap(deq)(xs) ** 2)

    for adjoint in [eqp.JacobianFree(), eqp.PhantomGradient(k=3, damping=0.5)]:
        deq = eqp.DEQ(lambda z, x: cell(z, (w, x)), state_shape=(D,), adjoint=adjoint)
        g = eqx.filter_jit(jax.grad(layer))(xs, deq)
        ref = jax.jit(jax.grad(direct), static_argnums=1)(xs, adjoint)
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-12, atol=1e-14)


# -- Jacobian regularisation: the Hutchinson estimate --------------------------------


def _jac_at(w, x, z):
    return jax.jacfwd(lambda z: cell(z, (w, x)))(z)


def test_rademacher_identity_is_exact_and_so_is_its_gradient():
    # Over all 2^d sign vectors, mean ‖εᵀ J‖² = ‖J‖_F² exactly; same for d/dw.
    d = 5
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    w = jax.random.normal(k[0], (d, d))
    x, z = jax.random.normal(k[1], (d,)), jax.random.normal(k[2], (d,))
    signs = jnp.array(list(itertools.product([-1.0, 1.0], repeat=d)))

    def estimate(w):
        _, vjp = jax.vjp(lambda z: cell(z, (w, x)), z)
        return hutchinson_frobenius(lambda v: vjp(v)[0], signs)

    def exact(w):
        return jnp.sum(_jac_at(w, x, z) ** 2)

    np.testing.assert_allclose(float(estimate(w)), float(exact(w)), rtol=1e-13)
    grads = jax.jit(lambda w: (jax.grad(estimate)(w), jax.grad(exact)(w)))(w)
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_hutchinson_mean_within_its_standard_error(distribution):
    w, xs = _problem(scale=1.5)
    x = xs[0]
    z = eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=TIGHT).value
    jac = _jac_at(w, x, z)
    m = jac @ jac.T
    exact = float(jnp.trace(m))
    # Var ‖Jᵀ ε‖² = Var εᵀ M ε: 2 ‖M‖_F² (Gaussian), 2 Σ_{a≠b} M_ab² (Rademacher).
    var = 2 * float(jnp.sum(m**2))
    if distribution == "rademacher":
        var -= 2 * float(jnp.sum(jnp.diag(m) ** 2))
    n = 20000
    est = jax.jit(lambda key: eqp.jacobian_frobenius(cell, z, (w, x), key=key, n_samples=n,
                                                     distribution=distribution))
    value = float(est(jax.random.key(3)))
    assert abs(value - exact) <= 5 * np.sqrt(var / n), (value, exact)
    # One sample is one draw of the estimator: not the exact value.
    one = float(eqp.jacobian_frobenius(cell, z, (w, x), key=jax.random.key(4)))
    assert one != pytest.approx(exact, rel=1e-6)


def test_jacobian_penalty_at_the_equilibrium_matches_finite_differences():
    # loss(w) = mean_x jacobian_frobenius(f, z*(w, x), ...) with a fixed key is a smooth
    # function of w; its gradient (through f and through z* by the implicit adjoint)
    # must match central differences.
    w, xs = _problem()
    keys = jax.random.split(jax.random.key(7), xs.shape[0])

    def loss(w):
        def one(x, key):
            z = eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=TIGHT).value
            return eqp.jacobian_frobenius(cell, z, (w, x), key=key, n_samples=3)

        return jnp.mean(jax.vmap(one)(xs, keys))

    loss = jax.jit(loss)
    g = jax.jit(jax.grad(loss))(w)
    direction = jax.random.normal(jax.random.PRNGKey(8), w.shape)
    h = 1e-5
    fd = (loss(w + h * direction) - loss(w - h * direction)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, direction)), float(fd), rtol=1e-7)
    # The gradient through z* is a real part of it: holding z* fixed changes the answer.
    def loss_fixed_z(w):
        def one(x, key):
            z = jax.lax.stop_gradient(
                eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=TIGHT).value)
            return eqp.jacobian_frobenius(cell, z, (w, x), key=key, n_samples=3)

        return jnp.mean(jax.vmap(one)(xs, keys))

    assert _rel(jax.jit(jax.grad(loss_fixed_z))(w), g) > 1e-3


def test_jacobian_frobenius_takes_pytrees_and_checks_input():
    # A pytree state gives the estimate of the flattened map's Jacobian.
    d = 3
    a = jax.random.normal(jax.random.PRNGKey(9), (2 * d, 2 * d))

    def f_tree(z, _):
        flat = jnp.concatenate([z["u"], z["v"]])
        out = jnp.tanh(a @ flat)
        return {"u": out[:d], "v": out[d:]}

    z = {"u": jnp.ones(d) * 0.1, "v": -jnp.ones(d) * 0.2}
    signs = jnp.array(list(itertools.product([-1.0, 1.0], repeat=2 * d)))
    flat_f = lambda f: jnp.tanh(a @ f)
    zf = jnp.concatenate([z["u"], z["v"]])
    exact = float(jnp.sum(jax.jacfwd(flat_f)(zf) ** 2))
    _, vjp = jax.vjp(flat_f, zf)
    np.testing.assert_allclose(float(hutchinson_frobenius(lambda v: vjp(v)[0], signs)), exact,
                               rtol=1e-13)
    n = 20000
    est = float(eqp.jacobian_frobenius(f_tree, z, key=jax.random.key(1), n_samples=n,
                                       distribution="rademacher"))
    assert abs(est - exact) <= 0.05 * exact
    args = (jnp.eye(D), jnp.zeros(D))
    with pytest.raises(ValueError, match="n_samples"):
        eqp.jacobian_frobenius(cell, jnp.zeros(D), args, key=jax.random.key(0), n_samples=0)
    with pytest.raises(ValueError, match="distribution"):
        eqp.jacobian_frobenius(cell, jnp.zeros(D), args, key=jax.random.key(0),
                               distribution="uniform")
    with pytest.raises(TypeError, match="key"):
        eqp.jacobian_frobenius(cell, jnp.zeros(D), args, key=0)


# -- the spectral radius by the power method -----------------------------------------


def _with_spectrum(eigs, seed, symmetric):
    """A dense matrix with the given spectrum (2x2 blocks (a, -b; b, a) for complex pairs)."""
    n = sum(2 if isinstance(e, complex) else 1 for e in eigs)
    blocks = np.zeros((n, n))
    i = 0
    for e in eigs:
        if isinstance(e, complex):
            blocks[i : i + 2, i : i + 2] = [[e.real, -e.imag], [e.imag, e.real]]
            i += 2
        else:
            blocks[i, i] = e
            i += 1
    rng = np.random.default_rng(seed)
    if symmetric:
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        return jnp.asarray(q @ blocks @ q.T)
    v = rng.normal(size=(n, n))
    return jnp.asarray(v @ blocks @ np.linalg.inv(v))


def _linear(z, a):
    return a @ z


def test_spectral_radius_matches_eigvals_under_vmap_and_jit():
    mats = jnp.stack([
        _with_spectrum([0.9, -0.6, 0.5, 0.3, -0.1, 0.05], 0, symmetric=True),
        _with_spectrum([-0.95, 0.4, 0.3, -0.2, 0.1, 0.0], 1, symmetric=True),
        _with_spectrum([0.9, -0.9, 0.3, 0.2, -0.1, 0.1], 2, symmetric=True),  # a ± pair
        _with_spectrum([1.7, 0.5j + 0.6, -0.8, 0.2, 0.1], 3, symmetric=False),
        _with_spectrum([-0.8, 0.3 + 0.4j, 0.5, -0.1, 0.2], 4, symmetric=False),
    ])
    keys = jax.random.split(jax.random.key(0), mats.shape[0])

    @jax.jit
    def estimate(mats, keys):
        return jax.vmap(lambda a, k: eqp.spectral_radius(
            _linear, jnp.zeros(a.shape[0]), a, key=k, tol=1e-13, max_steps=5000))(mats, keys)

    out = estimate(mats, keys)
    exact = np.max(np.abs(np.linalg.eigvals(np.asarray(mats))), axis=-1)
    np.testing.assert_allclose(np.asarray(out.value), exact, rtol=1e-9)
    assert bool(jnp.all(out.converged))
    # Per-example stopping: of the symmetric ones, the smaller |λ₂/λ₁| (0.42 against
    # 0.67) converges in fewer steps.
    assert int(out.steps[1]) < int(out.steps[0])


def test_spectral_radius_of_a_nonlinear_map_at_its_equilibrium():
    # J = diag(1 - z*²) W with W symmetric is similar to a symmetric matrix, so its
    # spectrum is real, but J itself is not symmetric. Example 2 has ρ(J) = 1.11 > 1
    # (Anderson still finds z*; Picard and Neumann would not converge there).
    w, xs = _problem(seed=2)
    w = w + w.T
    w = 1.3 * w / jnp.linalg.norm(w, 2)

    @jax.jit
    def both(x):
        z = eqp.fixed_point(cell, jnp.zeros(D), (w, x), solver=eqp.Anderson(tol=1e-13)).value
        return eqp.spectral_radius(cell, z, (w, x), tol=1e-13, max_steps=5000), _jac_at(w, x, z)

    out, jacs = jax.vmap(both)(xs)
    exact = np.max(np.abs(np.linalg.eigvals(np.asarray(jacs))), axis=-1)
    assert np.max(np.abs(np.asarray(jacs - jnp.swapaxes(jacs, 1, 2)))) > 1e-2  # not symmetric
    assert exact.max() > 1.0
    np.testing.assert_allclose(np.asarray(out.value), exact, rtol=1e-9)
    assert bool(jnp.all(out.converged))


def test_spectral_radius_is_a_diagnostic_inside_grad():
    # Called inside a differentiated function it neither fails (reverse mode cannot
    # cross its while loop) nor contributes a gradient.
    w, xs = _problem()

    def loss(w):
        z = eqp.fixed_point(cell, jnp.zeros(D), (w, xs[0])).value
        rho = eqp.spectral_radius(cell, z, (w, xs[0]))
        return jnp.sum(z**2), rho.value

    (value, rho), g = jax.value_and_grad(loss, has_aux=True)(w)
    g_ref = jax.grad(lambda w: loss(w)[0])(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
    assert 0 < float(rho) < 0.8


def test_spectral_radius_edge_cases():
    zero = eqp.spectral_radius(lambda z, _: jnp.zeros_like(z), jnp.ones(3))
    assert float(zero.value) == 0.0 and bool(zero.converged) and int(zero.steps) == 1
    capped = eqp.spectral_radius(_linear, jnp.zeros(6),
                                 _with_spectrum([0.9, 0.89, 0.1, 0.1, 0.1, 0.1], 0, True),
                                 tol=1e-14, max_steps=5)
    assert int(capped.steps) == 5 and not bool(capped.converged)
    with pytest.raises(TypeError, match="real floating"):
        eqp.spectral_radius(_linear, jnp.zeros(2, jnp.complex128), jnp.eye(2))
    with pytest.raises(ValueError, match="max_steps"):
        eqp.spectral_radius(_linear, jnp.zeros(2), jnp.eye(2), max_steps=0)
