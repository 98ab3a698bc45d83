"""The library's own Krylov solvers (used by `Implicit`) against dense float64 solves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqprop_jax.equilibrium._krylov import bicgstab, gmres

N = 48


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
    "gmres-restart5": lambda op, b, tol: gmres(op, b, tol, 500, 5),
    "gmres-restart20": lambda op, b, tol: gmres(op, b, tol, 500, 20),
    "gmres-full": lambda op, b, tol: gmres(op, b, tol, 5, N),
    "bicgstab": lambda op, b, tol: bicgstab(op, b, tol, 2000),
}


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_matches_dense_solve(name, complex_):
    a, b = system(0, complex_=complex_)
    x, steps = jax.jit(lambda b: SOLVERS[name](lambda v: a @ v, b, 1e-12))(b)
    ref = np.linalg.solve(np.asarray(a), np.asarray(b))
    # κ(A) ≈ 15–17 here: a relative residual of 1e-12 bounds the error by ~2e-11.
    assert np.linalg.norm(np.asarray(a @ x - b)) <= 1e-12 * np.linalg.norm(b) * 1.01
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    assert 0 < int(steps) < 2000


def test_full_gmres_is_exact_in_n_steps():
    # Without restarts GMRES minimises over the whole Krylov space: at most N steps.
    a, b = system(1, radius=0.99)
    x, steps = gmres(lambda v: a @ v, b, 1e-13, 1, N)
    assert int(steps) <= N
    np.testing.assert_allclose(a @ x, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["gmres-restart5", "bicgstab"])
def test_vmapped_examples_keep_their_own_step_counts(name):
    rng = np.random.default_rng(2)
    j = rng.standard_normal((N, N))
    j = jnp.asarray(j / np.abs(np.linalg.eigvals(j)).max())
    bs = jnp.asarray(rng.standard_normal((20, N)))
    scales = jnp.linspace(0.05, 0.97, 20)  # ρ(sJ) = s: easy to hard

    def one(b, s):
        return SOLVERS[name](lambda v: v - s * (j @ v), b, 1e-10)

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
