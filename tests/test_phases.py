"""The phase engine of the EP-type estimators (estimators/phases.py) and the shared
checks (estimators/checks.py). float64 (conftest)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqprop_jax as eqp
from eqprop_jax.estimators.checks import check_batch, check_variant
from eqprop_jax.estimators.phases import (
    TWO_POINT,
    nudge_points,
    nudged_relaxations,
    random_sign,
    relax_phases,
)

KEY = jax.random.PRNGKey(0)


def _estimate(nudges, coeffs):
    """Re Σ_p c_p f(β_p) for the polynomial f(β) = Σ_m a_m β^m: the scheme's estimate
    of f'(0) = a_1 (as EP's estimate is of d/dβ ∂F/∂θ(s^β, β) at 0)."""
    f = sum(a * nudges.betas**m for m, a in enumerate(coeffs))
    return float(jnp.real(jnp.sum(nudges.weights * f)))


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_holomorphic_points_are_exact_for_polynomials_of_degree_n(n):
    # (1/N) Σ_k f(β_k)/β_k keeps the terms a_m with m ≡ 1 (mod N): a_1 alone for
    # deg f ≤ N, whatever the radius; the folded conjugate pairs must not change that.
    a = np.random.default_rng(n).normal(size=n + 1)
    for r in (0.5, 3.0):
        nudges = nudge_points(jnp.asarray(r), "holomorphic", n)
        assert nudges.betas.shape == (n // 2 + 1,) and nudges.free_point is None
        assert abs(_estimate(nudges, a) - a[1]) < 1e-13 * (1 + r**n)
    # degree N + 1: the aliased term a_{N+1} r^N appears, so the test can see a mistake
    b = np.zeros(n + 2)
    b[n + 1] = 1.0
    np.testing.assert_allclose(
        _estimate(nudge_points(jnp.asarray(0.5), "holomorphic", n), b), 0.5**n
    )


def test_two_point_schemes_bias_and_free_point():
    a = np.array([0.3, -1.2, 0.7, 2.0])  # f = a0 + a1 β + a2 β² + a3 β³
    beta = 1e-2
    # one-sided: a1 ± a2 β + a3 β²; centered: a1 + a3 β² (Laborieux et al. 2021)
    want = {
        "positive": a[1] + a[2] * beta + a[3] * beta**2,
        "negative": a[1] - a[2] * beta + a[3] * beta**2,
        "centered": a[1] + a[3] * beta**2,
    }
    relaxed = {"positive": [beta], "negative": [-beta], "centered": [-beta, beta]}
    for variant, (lo, hi) in TWO_POINT.items():
        nudges = nudge_points(jnp.asarray(beta), variant)
        np.testing.assert_allclose(nudges.betas, [lo * beta, hi * beta])
        np.testing.assert_allclose(_estimate(nudges, a), want[variant], rtol=1e-12)
        np.testing.assert_allclose(nudges.relaxed, relaxed[variant])
        assert nudges.free_point == {"positive": 0, "negative": 1}.get(variant)


def test_relax_phases_runs_each_nudge_from_the_free_state():
    model = eqp.HopfieldMLP((4, 5, 3), key=KEY, weight_scale=0.5)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 4))
    y = jnp.array([0, 2])
    free_solver, nudged_solver = eqp.Picard(tol=0.0, max_steps=7), eqp.Picard(tol=0.0, max_steps=3)
    for variant in TWO_POINT:
        nudges = nudge_points(jnp.asarray(0.3), variant)
        nudged = nudged_relaxations(model, nudges.relaxed, nudged_solver)
        phases = eqx.filter_jit(relax_phases)(model, x, y, nudged, free_solver)
        states = nudges.states(phases)
        assert phases.nudged.result.shape == (2, nudges.relaxed.shape[0])
        for i in range(2):
            s0 = model.relax(x[i], y[i], 0.0, solver=free_solver).value
            for p, b in enumerate(nudges.betas):
                want = (
                    s0
                    if p == nudges.free_point
                    else model.relax(x[i], y[i], b, s0, solver=nudged_solver).value
                )
                for got, ref in zip(states, want, strict=True):
                    np.testing.assert_allclose(got[i, p], ref, rtol=0, atol=1e-14)


def test_random_sign_and_checks():
    signs = {float(random_sign("t", jnp.asarray(0.5), jax.random.PRNGKey(k))) for k in range(20)}
    assert signs == {0.5, -0.5}
    with pytest.raises(ValueError, match="t: `random_sign=True` needs a PRNG `key`"):
        random_sign("t", jnp.asarray(0.5), None)
    with pytest.raises(ValueError, match=r"who: `variant` must be one of \('a', 'b'\), got 'c'"):
        check_variant("who", "c", ("a", "b"))
    x, y = jnp.zeros((2, 4)), jnp.array([0, 1])
    with pytest.raises(TypeError, match="who: the model must be an eqprop_jax AbstractEnergyModel"):
        check_batch("who", object(), x, y)
    model = eqp.HopfieldMLP((4, 5, 3), key=KEY)
    with pytest.raises(ValueError, match="labels out of range"):
        check_batch("who", model, x, jnp.array([0, 3]))
    for variant in ("centre", None):
        with pytest.raises(ValueError, match="EquilibriumProp: `variant` must be one of"):
            eqp.EquilibriumProp(variant=variant)
        with pytest.raises(ValueError, match="VectorFieldEP: `variant` must be one of"):
            eqp.VectorFieldEP(variant=variant)
