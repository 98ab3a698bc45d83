"""Per-example convergence under vmap, statuses, and the errors bad input gets."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqprop_jax as eqp

D = 32


def problem(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    w = jax.random.normal(k[0], (D, D))
    w = w / jnp.linalg.norm(w, 2)
    x = jax.random.normal(k[1], (D,))
    return w, x


def cell(z, args):
    w, x, gain = args
    return jnp.tanh(gain * (w @ z) + x)


SOLVERS = [
    eqp.Picard(tol=1e-10, max_steps=2000),
    eqp.Anderson(tol=1e-10, max_steps=2000),
    eqp.Broyden(tol=1e-10, max_steps=2000),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_vmap_per_example_convergence(solver):
    w, x = problem()
    gains = jnp.array([0.05, 0.5, 0.9, 0.98])  # contraction rates from easy to hard
    xs = jnp.stack([x * (i + 1) / 4 for i in range(4)])

    def solve(x, g):
        return eqp.fixed_point(cell, jnp.zeros(D), (w, x, g), solver=solver)

    batch = jax.jit(jax.vmap(solve))(xs, gains)
    steps = np.asarray(batch.stats.steps)
    assert np.all(np.asarray(batch.result) == eqp.Result.converged)
    assert len(set(steps.tolist())) > 1, steps  # uneven difficulty, own step counts
    for i in range(4):
        alone = solve(xs[i], gains[i])
        assert int(alone.stats.steps) == steps[i]
        # Batched matmuls may reorder sums: agreement to float64 round-off.
        np.testing.assert_allclose(batch.value[i], alone.value, rtol=0, atol=1e-12)
        assert float(alone.stats.residual) <= 1.0


def test_grad_of_vmap_and_vmap_of_grad():
    w, x = problem(1)
    xs = jnp.stack([x, 0.5 * x, 2 * x])
    gains = jnp.array([0.3, 0.7, 0.9])
    solver = eqp.Picard(tol=1e-13, max_steps=3000)

    def loss(w, x, g):
        return jnp.sum(eqp.fixed_point(cell, jnp.zeros(D), (w, x, g), solver=solver).value ** 2)

    g1 = jax.jit(jax.grad(lambda w: jnp.sum(jax.vmap(loss, (None, 0, 0))(w, xs, gains))))(w)
    g2 = jnp.sum(jax.jit(jax.vmap(jax.grad(loss), (None, 0, 0)))(w, xs, gains), axis=0)
    single = jax.jit(jax.grad(loss))
    g3 = sum(single(w, xs[i], gains[i]) for i in range(3))
    np.testing.assert_allclose(g1, g3, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g2, g3, rtol=1e-10, atol=1e-12)


def test_unrolled_under_vmap_uses_each_examples_steps():
    w, x = problem(2)
    gains = jnp.array([0.2, 0.95])
    solver = eqp.Picard(tol=1e-9, max_steps=2000)

    def loss(w, g, adjoint):
        sol = eqp.fixed_point(cell, jnp.zeros(D), (w, x, g), solver=solver, adjoint=adjoint)
        return jnp.sum(sol.value**2)

    batched = jax.vmap(jax.grad(loss), (None, 0, None))(w, gains, eqp.Unrolled())
    for i in range(2):
        np.testing.assert_allclose(
            batched[i], jax.grad(loss)(w, gains[i], eqp.Unrolled()), atol=1e-12
        )


def linear(z, args):
    a, b = args
    return a @ z + b


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_unstable_maps_are_flagged_never_silently_wrong(solver):
    """ρ(A) = 1.5: plain iteration diverges; a root finder may find the (unstable)
    fixed point — then it must be a genuine one. Either way no silent wrong answer."""
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (8, 8)))
    b = jnp.ones(8)
    mats = jnp.stack([q @ jnp.diag(jnp.full(8, r)) @ q.T for r in (0.5, 1.5)])
    sols = jax.vmap(lambda a: eqp.fixed_point(linear, jnp.zeros(8), (a, b), solver=solver))(mats)
    results = np.asarray(sols.result)
    assert results[0] == eqp.Result.converged
    for i in range(2):
        exact = jnp.linalg.solve(jnp.eye(8) - mats[i], b)
        if results[i] == eqp.Result.converged:
            np.testing.assert_allclose(sols.value[i], exact, rtol=1e-8, atol=1e-8)
        else:
            assert results[i] in (eqp.Result.diverged, eqp.Result.max_steps, eqp.Result.nonfinite)
    if isinstance(solver, eqp.Picard):
        assert results[1] in (eqp.Result.diverged, eqp.Result.nonfinite)


def test_tanh_with_large_gain_is_not_reported_converged_wrongly():
    w, x = problem(4)
    sol = eqp.fixed_point(
        cell, jnp.zeros(D), (w * 3.0, x, 1.0), solver=eqp.Picard(tol=1e-10, max_steps=300)
    )
    if int(sol.result) == eqp.Result.converged:
        np.testing.assert_allclose(cell(sol.value, (w * 3.0, x, 1.0)), sol.value, atol=1e-8)
    else:
        assert int(sol.result) in (eqp.Result.max_steps, eqp.Result.diverged)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_nan_input_gives_nonfinite(solver):
    w, x = problem(5)
    xs = jnp.stack([x, x.at[3].set(jnp.nan)])
    sols = jax.vmap(lambda x: eqp.fixed_point(cell, jnp.zeros(D), (w, x, 0.5), solver=solver))(xs)
    assert Result_names(sols.result) == ["converged", "nonfinite"]


def Result_names(codes):
    return eqp.Result.name(codes)


def test_accelerated_solvers_take_fewer_steps_on_hard_problem():
    # Nearly linear (small input keeps tanh near its linear regime) with Jacobian
    # eigenvalues spread over [-0.98, 0.98]: Picard needs ~log(1e-10)/log(0.98) ≈ 1100
    # steps; a Krylov-like method (Anderson, Broyden) far fewer.
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(6), (D, D)))
    w = q @ jnp.diag(jnp.linspace(-0.98, 0.98, D)) @ q.T
    x = 0.01 * jax.random.normal(jax.random.PRNGKey(7), (D,))
    steps = {}
    for solver in SOLVERS:
        sol = eqp.fixed_point(cell, jnp.zeros(D), (w, x, 1.0), solver=solver)
        assert int(sol.result) == eqp.Result.converged
        steps[type(solver).__name__] = int(sol.stats.steps)
    assert steps["Anderson"] < steps["Picard"] / 4, steps
    assert steps["Broyden"] < steps["Picard"] / 4, steps


def test_damped_picard_converges_where_plain_oscillates():
    # f(z) = -0.99 z + 1 has fixed point 1/1.99; plain iteration contracts at 0.99,
    # damping 0.5 at 0.005.
    f = lambda z, _: -0.99 * z + 1.0
    plain = eqp.fixed_point(f, jnp.zeros(3), None, solver=eqp.Picard(tol=1e-10, max_steps=10000))
    damped = eqp.fixed_point(f, jnp.zeros(3), None, solver=eqp.Picard(damping=0.5, tol=1e-10))
    np.testing.assert_allclose(damped.value, 1 / 1.99, rtol=1e-9)
    assert int(damped.stats.steps) < int(plain.stats.steps) / 50


def test_pytree_state():
    def f(z, _):
        return {"a": 0.5 * z["b"][0] + 1.0, "b": (0.5 * z["a"], jnp.cos(z["b"][1]))}

    z0 = {"a": jnp.zeros(2), "b": (jnp.zeros(2), jnp.zeros(()))}
    sol = eqp.fixed_point(f, z0, None, solver=eqp.Anderson(tol=1e-12))
    out = f(sol.value, None)
    for a, b in zip(
        jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(sol.value), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-11)


def test_throw_raises_on_non_convergence():
    w, x = problem(7)
    with pytest.raises(Exception, match="max_steps"):
        eqp.fixed_point(
            cell, jnp.zeros(D), (w, x, 0.99), solver=eqp.Picard(max_steps=3), throw=True
        )
    eqp.fixed_point(cell, jnp.zeros(D), (w, x, 0.1), solver=eqp.Picard(), throw=True)


def test_backward_pass_reports_its_convergence():
    w, x = problem(8)
    seen = []

    def loss(w, adjoint):
        sol = eqp.fixed_point(
            cell,
            jnp.zeros(D),
            (w, x, 0.99),
            solver=eqp.Picard(tol=1e-12, max_steps=5000),
            adjoint=adjoint,
        )
        return jnp.sum(sol.value)

    ok = eqp.AlmeidaPineda(tol=1e-8, max_steps=10000, callback=seen.append)
    jax.grad(loss)(w, ok)
    jax.effects_barrier()
    assert len(seen) == 1 and bool(seen[0].converged) and 0 < int(seen[0].steps) < 10000
    assert float(seen[0].residual) <= 1e-7

    # The default, on_failure="nan": the failed solve shows as NaN in the gradient.
    assert bool(jnp.all(jnp.isnan(jax.grad(loss)(w, eqp.AlmeidaPineda(tol=1e-8, max_steps=3)))))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = jax.grad(loss)(w, eqp.AlmeidaPineda(tol=1e-8, max_steps=3, on_failure="warn"))
        jax.effects_barrier()
    assert any("did not converge" in str(c.message) for c in caught)
    assert bool(jnp.all(jnp.isfinite(g)))

    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(
            jax.grad(loss)(w, eqp.AlmeidaPineda(tol=1e-8, max_steps=3, on_failure="raise"))
        )


# -- bad input ---------------------------------------------------------------------


def test_structure_mismatch():
    with pytest.raises(ValueError, match="structure"):
        eqp.fixed_point(lambda z, _: (z, z), jnp.zeros(3), None)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"shape.*\(3,\).*\(4,\)"):
        eqp.fixed_point(lambda z, _: jnp.zeros(4), jnp.zeros(3), None)


def test_dtype_change():
    with pytest.raises(TypeError, match="dtype"):
        eqp.fixed_point(lambda z, _: z.astype(jnp.float32), jnp.zeros(3, jnp.float64), None)


def test_integer_state():
    with pytest.raises(TypeError, match="int32|int64"):
        eqp.fixed_point(lambda z, _: z, jnp.zeros(3, jnp.int32), None)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: eqp.Picard(tol=-1.0), "tol"),
        (lambda: eqp.Picard(max_steps=0), "max_steps"),
        (lambda: eqp.Picard(damping=1.5), "damping"),
        (lambda: eqp.Anderson(history=0), "history"),
        (lambda: eqp.Broyden(history=0), "history"),
        (lambda: eqp.Anderson(ridge=-1.0), "ridge"),
        (lambda: eqp.AlmeidaPineda(max_steps=0), "max_steps"),
        (lambda: eqp.AlmeidaPineda(tol=-1e-3), "tol"),
        (lambda: eqp.Neumann(k=-1), "k"),
        (lambda: eqp.Implicit(method="lu"), "method"),
    ],
)
def test_bad_parameters(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_solver_and_adjoint_types():
    with pytest.raises(TypeError, match="solver"):
        eqp.fixed_point(lambda z, _: z, jnp.zeros(3), None, solver="anderson")
    with pytest.raises(TypeError, match="adjoint"):
        eqp.fixed_point(lambda z, _: z, jnp.zeros(3), None, adjoint=eqp.Picard())


def test_second_order_through_a_ragged_batch():
    """Hessian-vector products of a vmapped solve (forward mode over the implicit
    backward, through the compacting loop) match autodiff through a long fori_loop."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(0.5 * rng.standard_normal((D, D)) / np.sqrt(D))
    xs = jnp.asarray(rng.standard_normal((40, D)) * np.geomspace(2, 0.01, 40)[:, None])

    def f(z, a):
        return jnp.tanh(a[0] @ z + a[1])

    solver, adjoint = eqp.Picard(tol=1e-13, max_steps=3000), eqp.Implicit(tol=1e-13)

    def loss(w):
        sol = jax.vmap(
            lambda x: eqp.fixed_point(f, jnp.zeros(D), (w, x), solver=solver, adjoint=adjoint)
        )(xs)
        return jnp.sum(sol.value**2)

    def loss_unrolled(w):
        # ‖W‖₂ ≈ 0.90 (asserted below): 400 steps shrink the error, and its
        # derivatives, by ~0.9^400 ≈ 1e-18.
        z = jax.vmap(lambda x: jax.lax.fori_loop(0, 400, lambda _, z: f(z, (w, x)), jnp.zeros(D)))(
            xs
        )
        return jnp.sum(z**2)

    v = jnp.asarray(rng.standard_normal((D, D)))
    assert float(jnp.linalg.norm(w, 2)) < 0.95
    hvp = jax.jvp(jax.grad(loss), (w,), (v,))[1]
    ref = jax.jvp(jax.grad(loss_unrolled), (w,), (v,))[1]
    np.testing.assert_allclose(hvp, ref, rtol=0, atol=1e-9 * float(jnp.abs(ref).max()))
