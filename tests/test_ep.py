"""HopfieldMLP and the EP / BPTT / recurrent-backprop estimators against autodiff (float64)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flat as _flat
from helpers import random_batch
from helpers import rel_err as _rel
from helpers import run_estimator as _run

import eqprop_jax as eqp
from eqprop_jax.models import activations
from eqprop_jax.models.hopfield import HopfieldMLP

# Tight solves: the residual of a converged state (~1e-13) enters EP's estimate
# divided by β, so at β >= 1e-3 it stays below 1e-9, well under what we compare.
TIGHT = eqp.Picard(tol=1e-13, max_steps=5000)
RBP = eqp.RecurrentBackprop(adjoint=eqp.Implicit(eqp.BiCGStab(200), tol=1e-13), solver=TIGHT)


def _ep(beta, variant, **kw):
    # β as an array, so that a β sweep reuses one compiled function.
    return eqp.EquilibriumProp(
        jnp.asarray(beta), variant=variant, free_solver=TIGHT, nudged_solver=TIGHT, **kw
    )


def _data(n_in=6, n_out=3, batch=3, seed=1):
    return random_batch((n_in,), n_out, batch, seed)


def _model(**kw):
    kw.setdefault("weight_scale", 0.7)  # a contraction, so every solve converges
    return HopfieldMLP((6, 5, 4, 3), key=jax.random.PRNGKey(0), **kw)


MODELS = {
    "proto-tanh-mse": dict(dynamics="prototypical", activation="tanh", update="async"),
    "grad-sigmoid-ce": dict(dynamics="gradient", activation="sigmoid", cost="ce"),
}


# -- the model ------------------------------------------------------------------


@pytest.mark.parametrize("cost", ["mse", "ce"])
@pytest.mark.parametrize("dynamics", ["gradient", "prototypical"])
def test_step_follows_the_energy(dynamics, cost):
    """The hand-written layer updates equal the definitions through jax.grad of F = E + βC.

    gradient: s ← s − ε ∂F/∂s; prototypical: s ← σ(−∂F/∂s) since F = −Φ + βC.
    """
    model = _model(dynamics=dynamics, activation="tanh", cost=cost)
    x, y = _data(batch=1)
    x, y = x[0], y[0]
    s = tuple(
        0.3 * jax.random.normal(jax.random.PRNGKey(i), a.shape)
        for i, a in enumerate(model.init_state(x))
    )
    beta = 0.7

    @jax.jit
    def both(s):
        dF = jax.grad(lambda s: model.total_energy(s, x, y, beta))(s)
        if dynamics == "gradient":
            want = jax.tree_util.tree_map(lambda a, g: a - model.step_size * g, s, dF)
        else:
            want = jax.tree_util.tree_map(lambda g: jnp.tanh(-g), dF)
        return model.step(s, x, y, beta), want

    got, want = both(s)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dynamics", ["gradient", "prototypical"])
def test_async_reaches_the_sync_fixed_point_in_fewer_steps(dynamics):
    x, y = _data(batch=1)
    relax = eqx.filter_jit(
        lambda m: m.relax(x[0], y[0], 0.3, solver=eqp.Picard(tol=1e-12, max_steps=5000))
    )
    sols = {
        u: relax(_model(dynamics=dynamics, activation="sigmoid4", update=u))
        for u in ("sync", "async")
    }
    assert all(bool(s.converged) for s in sols.values())
    # Both stop at a scaled residual <= 1e-12; the fixed point is unique (contraction).
    np.testing.assert_allclose(
        _flat(sols["async"].value), _flat(sols["sync"].value), rtol=0, atol=1e-10
    )
    assert int(sols["async"].stats.steps) < int(sols["sync"].stats.steps)


def test_activations():
    x = jnp.linspace(-2.0, 3.0, 11)
    np.testing.assert_allclose(activations.hard_sigmoid(x), np.clip(x, 0, 1))
    np.testing.assert_allclose(activations.clip_half(x), np.clip(x / 2, 0, 1))
    assert float(activations.sigmoid4(0.5)) == 0.5
    # Ernoult's sigmoid has slope 1 at x = 1/2, like the hard sigmoid it replaces.
    np.testing.assert_allclose(jax.grad(activations.sigmoid4)(0.5), 1.0, rtol=1e-14)
    # Holomorphic ones take complex input and agree with the complex-analytic function.
    z = jnp.array([0.3 + 0.2j, -0.1 + 0.5j])
    np.testing.assert_allclose(activations.tanh(z), np.tanh(np.asarray(z)), rtol=1e-14)
    np.testing.assert_allclose(
        activations.sigmoid4(z), 1 / (1 + np.exp(-4 * (np.asarray(z) - 0.5))), rtol=1e-14
    )
    with pytest.raises(TypeError, match="not holomorphic"):
        activations.hard_sigmoid(z)
    with pytest.raises(ValueError, match="unknown activation"):
        HopfieldMLP((3, 2), key=jax.random.PRNGKey(0), activation="relu6")


# -- the references -------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_rbp_matches_finite_differences(name):
    model = _model(**MODELS[name])
    x, y = _data()
    _, grads, aux = _run(RBP, model, x, y)
    assert bool(jnp.all(aux["result"] == eqp.Result.converged))

    params, static = eqx.partition(model, eqx.is_inexact_array)
    direction = jax.tree_util.tree_map(
        lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params
    )

    @jax.jit
    def loss_at(t):
        m = eqx.combine(jax.tree_util.tree_map(lambda p, d: p + t * d, params, direction), static)
        s = jax.vmap(lambda xi, yi: m.relax(xi, yi, 0.0, solver=TIGHT).value)(x, y)
        return jnp.mean(jax.vmap(m.loss)(s, y))

    h = 1e-5  # central differences: O(h²) ≈ 1e-10 truncation, 1e-13/h roundoff
    fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    ad = jnp.vdot(_flat(grads), _flat(direction))
    np.testing.assert_allclose(ad, fd, rtol=1e-6)


def test_bptt_with_many_steps_equals_rbp():
    """At a converged state the unrolled gradient converges to the implicit one.

    The model is a contraction, so BPTT's error decays like ρ^T; 400 steps put it far
    below 1e-9.
    """
    model = _model(**MODELS["proto-tanh-mse"])
    x, y = _data()
    loss_r, g_rbp, _ = _run(RBP, model, x, y)
    loss_b, g_bptt, aux = _run(eqp.BPTT(400), model, x, y)
    np.testing.assert_allclose(loss_b, loss_r, rtol=1e-12)
    assert _rel(g_bptt, g_rbp) < 1e-9
    # Too few steps is a different (truncated) gradient: the comparison can fail.
    _, g_short, _ = _run(eqp.BPTT(3), model, x, y)
    assert _rel(g_short, g_rbp) > 1e-3
    # Truncation differentiates only the last K steps; with K = T it changes nothing.
    _, g_trunc, _ = _run(eqp.BPTT(400, truncate=400), model, x, y)
    assert _rel(g_trunc, g_bptt) < 1e-14


# -- Equilibrium Propagation --------------------------------------------------------


def test_ep_bias_slopes():
    """EP → RBP as β → 0 with bias O(β) one-sided and O(β²) centered (Laborieux 2021).

    Slope of log relative error against log β over β = 2e-3..1.6e-2: about 1 for
    positive/negative and 2 for centered (±0.15: the next Taylor term shifts it by
    O(β) relative).
    """
    model = _model(**MODELS["proto-tanh-mse"])
    x, y = _data()
    _, g_ref, _ = _run(RBP, model, x, y)
    betas = 2e-3 * 2.0 ** np.arange(4)
    for variant, slope in (("positive", 1), ("negative", 1), ("centered", 2)):
        errs = [_rel(_run(_ep(b, variant), model, x, y)[1], g_ref) for b in betas]
        fit = np.polyfit(np.log(betas), np.log(errs), 1)[0]
        assert abs(fit - slope) < 0.15, (variant, fit, errs)


def test_holomorphic_ep_is_exact_up_to_geometric_error():
    """Holomorphic EP (Laborieux & Zenke 2022) on a small tanh net with converged states.

    The N-point rule for the Cauchy integral of d/dβ ∂F/∂θ(s^β) aliases the Taylor
    coefficients of order N+1, 2N+1, ..., so its error falls like (|β|/R)^N with R the
    analytic radius of β ↦ s^β: geometric in N at fixed β.
    """
    model = _model(**MODELS["proto-tanh-mse"])
    x, y = _data()
    _, g_ref, _ = _run(RBP, model, x, y)

    # At β = 0.1 the error is visible (N = 2 is the centered estimate) and falls by
    # more than 5x for every two points added; measured 1.8e-2, 6e-4, 4e-5, 3.5e-6.
    errs = [
        _rel(_run(_ep(0.1, "holomorphic", n_points=n), model, x, y)[1], g_ref) for n in (2, 4, 6, 8)
    ]
    assert all(b < a / 5 for a, b in zip(errs, errs[1:], strict=False)), errs

    one_sided = _rel(_run(_ep(0.01, "positive"), model, x, y)[1], g_ref)
    holo = _rel(_run(_ep(0.01, "holomorphic", n_points=8), model, x, y)[1], g_ref)
    assert holo <= 1e-6, holo
    assert holo < one_sided / 1e3, (holo, one_sided)


def test_holomorphic_ep_with_ce_readout():
    """The CE readout's parameters sit in C: their estimate is the mean of ∂C/∂θ."""
    model = _model(**MODELS["grad-sigmoid-ce"])
    x, y = _data()
    _, g_ref, _ = _run(RBP, model, x, y)
    _, g, _ = _run(_ep(0.05, "holomorphic", n_points=6), model, x, y)
    assert _rel(g, g_ref) < 1e-6
    assert _rel(g.readout, g_ref.readout) < 1e-6


def test_ep_aux_and_random_sign():
    model = _model(**MODELS["proto-tanh-mse"])
    x, y = _data()
    est = _ep(0.05, "positive", random_sign=True)
    with pytest.raises(ValueError, match="key"):
        est(model, x, y)
    signs = {
        float(jnp.sign(_run(est, model, x, y, jax.random.PRNGKey(k))[2]["beta"])) for k in range(8)
    }
    assert signs == {-1.0, 1.0}
    loss, _, aux = _run(_ep(0.05, "centered"), model, x, y)
    assert aux["predictions"].shape == (3, 3)
    assert aux["stats"].steps.shape == (3,)
    assert aux["nudged_stats"].steps.shape == (3, 2)
    s = aux["state"]
    np.testing.assert_allclose(loss, jnp.mean(jax.vmap(model.loss)(s, y)), rtol=1e-14)


# -- bad input ----------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    model = _model()
    x, y = _data()
    ep = eqp.EquilibriumProp(0.1)
    with pytest.raises(ValueError, match="n_in = 6"):
        ep(model, jnp.zeros((3, 7)), y)
    with pytest.raises(ValueError, match="labels out of range"):
        ep(model, x, jnp.array([0, 1, 3]))
    with pytest.raises(ValueError, match="labels out of range"):
        eqp.BPTT(5)(model, x, jnp.array([0, -1, 2]))
    with pytest.raises(Exception, match="labels out of range"):
        # Under jit label values are unknown in Python: a run-time check still fires.
        _run(eqp.BPTT(2), model, x, jnp.array([0, 1, 3]))
    with pytest.raises(ValueError, match="holomorphic activation"):
        eqp.EquilibriumProp(0.1, variant="holomorphic")(
            _model(dynamics="gradient", activation="hard_sigmoid"), x, y
        )
    with pytest.raises(ValueError, match="different numbers of examples"):
        eqp.RecurrentBackprop()(model, x, y[:2])
    with pytest.raises(TypeError, match="floating point"):
        ep(model, jnp.zeros((3, 6), jnp.int32), y)
    with pytest.raises(ValueError, match="NaN"):
        ep(model, x.at[0, 0].set(jnp.nan), y)
    with pytest.raises(ValueError, match="beta.*nonzero"):
        eqp.EquilibriumProp(0.0)
    with pytest.raises(ValueError, match="n_points"):
        eqp.EquilibriumProp(0.1, variant="holomorphic", n_points=1)
    with pytest.raises(ValueError, match="variant"):
        eqp.EquilibriumProp(0.1, variant="symmetric")
    with pytest.raises(ValueError, match="sizes"):
        HopfieldMLP((784, 10), key=jax.random.PRNGKey(0), cost="ce")
    with pytest.raises(ValueError, match="dynamics"):
        HopfieldMLP((4, 3), key=jax.random.PRNGKey(0), dynamics="continuous")
