"""The linear solvers (BiCGStab, GMRES, NormalCG, Richardson: the objects `Implicit`
solves with) against dense float64 solves and the truncated series they define."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqprop_jax as eqp

N = 48
BUCKETS = 4  # the default batch_buckets, which the adjoints pass on


def system(seed, radius=0.95, complex_=False):
    """A = I - J with spectral radius ρ(J) = radius: the systems `Implicit` solves."""
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((N, N))
    b = rng.standard_normal(N)
    if complex_:
        j = j + 1j * rng.standard_normal((N, N))
        b = b + 1j * rng.standard_normal(N)
    j = radius * j / np.abs(np.linalg.eigvals(j)).max()
    return jnp.asarray(np.eye(N) - j), jnp.asarray(b)


SOLVERS = {
    "gmres-restart5": eqp.GMRES(max_steps=500, restart=5),
    "gmres-restart20": eqp.GMRES(max_steps=500, restart=20),
    "gmres-full": eqp.GMRES(max_steps=5, restart=N),
    "bicgstab": eqp.BiCGStab(max_steps=2000),
    "normal_cg": eqp.NormalCG(max_steps=2000),
    "richardson": eqp.Richardson(max_steps=20000),
}


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_matches_dense_solve(name, complex_):
    # Richardson needs ρ(J) well below 1 to get there in a few thousand steps (its
    # error shrinks as ρ(J)^k, after a transient of size ‖J^k‖ for this non-normal J).
    a, b = system(0, radius=0.8 if name == "richardson" else 0.95, complex_=complex_)
    solver = SOLVERS[name]
    x, steps = jax.jit(lambda b: solver.solve(lambda v: a @ v, b, 1e-12, BUCKETS))(b)
    ref = np.linalg.solve(np.asarray(a), np.asarray(b))
    # κ(A) ≈ 15–17 here: a relative residual of 1e-12 bounds the error by ~2e-11.
    # (NormalCG stops on the residual of A Aᴴ y = b, which is that of A x = b.)
    assert np.linalg.norm(np.asarray(a @ x - b)) <= 1e-12 * np.linalg.norm(b) * 1.01
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    assert 0 < int(steps) <= solver.max_steps * getattr(solver, "restart", 1)
    # A tolerance solve fails above max(10 tol, 100 ε).
    assert solver.failure_threshold(1e-12, jnp.float64) == 1e-11
    assert solver.failure_threshold(1e-9, jnp.float32) == pytest.approx(
        100 * float(jnp.finfo(jnp.float32).eps)
    )


def test_full_gmres_is_exact_in_n_steps():
    # Without restarts GMRES minimises over the whole Krylov space: at most N steps.
    a, b = system(1, radius=0.99)
    x, steps = eqp.GMRES(max_steps=1, restart=N).solve(lambda v: a @ v, b, 1e-13, BUCKETS)
    assert int(steps) <= N
    np.testing.assert_allclose(a @ x, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_truncated_richardson_is_the_damped_series(damping, complex_):
    """k steps from 0 give ω Σ_{t<k} (I - ωA)^t b exactly (Neumann(k-1) at ω = 1);
    the solve fails when the series grows, not on a tolerance."""
    a, b = system(2, radius=0.9, complex_=complex_)
    k = 7
    solver = eqp.Richardson(max_steps=k, damping=damping, truncated=True)
    x, steps = solver.solve(lambda v: a @ v, b, 0.0, BUCKETS)
    a_np, b_np = np.asarray(a), np.asarray(b)
    step = np.eye(N) - damping * a_np
    ref = damping * sum(np.linalg.matrix_power(step, t) @ b_np for t in range(k))
    np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    assert int(steps) == k
    assert solver.failure_threshold(1e-12, jnp.float64) == 1.0


def test_richardson_to_tolerance_stops_on_its_residual():
    # J = ρ I: the residual after k steps is ρ^k b, so the solve stops at the first k
    # with ρ^k <= tol, and takes max_steps when that is fewer.
    rho, tol = 0.5, 1e-6
    b = jnp.asarray(np.random.default_rng(3).standard_normal(N))
    op = lambda v: (1 - rho) * v
    x, steps = eqp.Richardson().solve(op, b, tol, BUCKETS)
    want = int(np.ceil(np.log(tol) / np.log(rho)))  # 20
    assert int(steps) == want
    np.testing.assert_allclose(np.asarray(x), np.asarray(b) * (1 - rho**want) / (1 - rho))
    _, steps = eqp.Richardson(max_steps=5).solve(op, b, tol, BUCKETS)
    assert int(steps) == 5


@pytest.mark.parametrize("name", ["gmres-restart5", "bicgstab", "richardson"])
def test_vmapped_examples_keep_their_own_step_counts(name):
    rng = np.random.default_rng(2)
    j = rng.standard_normal((N, N))
    j = jnp.asarray(j / np.abs(np.linalg.eigvals(j)).max())
    bs = jnp.asarray(rng.standard_normal((20, N)))
    top = 0.8 if name == "richardson" else 0.97
    scales = jnp.linspace(0.05, top, 20)  # ρ(sJ) = s: easy to hard
    solver = SOLVERS[name]

    def one(b, s):
        return solver.solve(lambda v: v - s * (j @ v), b, 1e-10, BUCKETS)

    xs, steps = jax.jit(jax.vmap(one))(bs, scales)
    steps = np.asarray(steps)
    assert steps[0] < steps[-1] and len(set(steps.tolist())) > 5
    for i in (0, 9, 19):
        x, k = one(bs[i], scales[i])
        assert int(k) == steps[i]
        # Round-off differs between a batch and a single solve (BiCGStab amplifies it
        # to ~1e-11); both stop at residual 1e-10 ‖b‖, so with κ(A) ≤ 68 and
        # ‖b‖ ≤ 8.2 they are each within 5.6e-8 of the solution.
        np.testing.assert_allclose(xs[i], x, rtol=0, atol=1.2e-7)
        a = np.eye(N) - float(scales[i]) * np.asarray(j)
        assert np.linalg.norm(a @ np.asarray(x) - np.asarray(bs[i])) <= 1.01e-10 * np.linalg.norm(
            bs[i]
        )
