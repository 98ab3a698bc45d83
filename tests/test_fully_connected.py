"""FullyConnectedHopfield (Scellier & Bengio 2017): a new energy model in one file, used
by the existing estimators unchanged. float64 (conftest)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqprop_jax as eqp
from eqprop_jax.data import load_digits
from eqprop_jax.train import TrainConfig, fit

KEY = jax.random.PRNGKey(0)
# Tight solves: a converged state's residual (~1e-13) enters EP's estimate divided by
# β, so at β >= 1e-3 it stays below 1e-9, far under the errors compared.
TIGHT = eqp.Picard(tol=1e-13, max_steps=5000)
RBP = eqp.RecurrentBackprop(adjoint=eqp.Implicit(eqp.BiCGStab(200), tol=1e-13), solver=TIGHT)


def _model(activation="sigmoid", **kw):
    return eqp.FullyConnectedHopfield(6, 5, 3, key=KEY, activation=activation, **kw)


def _data(batch=4):
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    return jax.random.uniform(kx, (batch, 6)), jax.random.randint(ky, (batch,), 0, 3)


@eqx.filter_jit
def _run(estimator, model, x, y):
    return estimator(model, x, y)


def _ep(beta, variant="centered", **kw):
    # β as an array: one compilation serves every β.
    return eqp.EquilibriumProp(
        jnp.asarray(beta), variant=variant, free_solver=TIGHT, nudged_solver=TIGHT, **kw
    )


def _flat(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# -- the model --------------------------------------------------------------------


def test_contract_and_parametrisation():
    model = _model(weight_scale=1.0)
    assert isinstance(model, eqp.AbstractEnergyModel)
    assert model.n_outputs == 3 and model.n_in == 6 and model.flow_step_size == 0.5
    assert model.holomorphic and not _model("hard_sigmoid").holomorphic
    w = model.coupling()
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_array_equal(jnp.diag(w), 0.0)
    np.testing.assert_array_equal(model.weights, w)  # the initial W is already admissible
    # Any stored W gives the energy of its symmetric, zero-diagonal part; project()
    # stores that part and leaves the energy unchanged.
    a = jax.random.normal(jax.random.PRNGKey(3), model.weights.shape)
    raw = eqx.tree_at(lambda m: m.weights, model, a)
    x, _ = _data()
    s = jax.random.uniform(jax.random.PRNGKey(4), (8,))
    proj = raw.project()
    np.testing.assert_allclose(proj.energy(s, x[0]), raw.energy(s, x[0]), rtol=1e-14)
    np.testing.assert_allclose(proj.weights, 0.5 * (a + a.T) * (1 - jnp.eye(8)), rtol=1e-15)


@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid"])
def test_step_is_an_euler_step_of_the_total_energy(activation):
    """step(s) = s − ε ∂F/∂s with ∂F/∂s by autodiff, clipped to [0, 1] for the hard
    sigmoid (states strictly inside its range, where ρ is differentiable)."""
    model = _model(activation)
    x, y = _data()
    s = jax.random.uniform(jax.random.PRNGKey(5), (8,), minval=0.1, maxval=0.9)
    for beta in (0.0, 0.7):
        grad = jax.grad(model.total_energy)(s, x[0], y[0], beta)
        want = s - model.step_size * grad
        if activation == "hard_sigmoid":
            want = jnp.clip(want, 0, 1)
        np.testing.assert_allclose(model.step(s, x[0], y[0], beta), want, rtol=1e-13, atol=1e-15)
    # A complex β (holomorphic EP): the step is the holomorphic derivative's Euler step.
    if activation == "sigmoid":
        sc, beta = s.astype(jnp.complex128), 0.3 + 0.4j
        out, vjp = jax.vjp(lambda v: model.total_energy(v, x[0], y[0], beta), sc)
        want = sc - model.step_size * vjp(jnp.ones_like(out))[0]
        np.testing.assert_allclose(model.step(sc, x[0], y[0], beta), want, rtol=1e-13)


def test_bad_input_raises_clear_errors():
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match=r"expected input x of shape \('batch', 6\)"):
        model.check_input(x[:, :5], y)
    with pytest.raises(TypeError, match="real floating point"):
        model.check_input(jnp.ones((4, 6), jnp.int32), y)
    with pytest.raises(ValueError, match="NaN"):
        model.check_input(x.at[0, 0].set(jnp.nan), y)
    with pytest.raises(ValueError, match="labels out of range"):
        model.check_input(x, y.at[0].set(3))
    with pytest.raises(ValueError, match="one input of shape"):
        model.init_state(x)
    with pytest.raises(ValueError, match="n_hidden >= 0"):
        eqp.FullyConnectedHopfield(4, -1, 2, key=KEY)
    with pytest.raises(ValueError, match="step_size"):
        eqp.FullyConnectedHopfield(4, 2, 2, key=KEY, step_size=1.5)
    with pytest.raises(ValueError, match="unknown activation"):
        eqp.FullyConnectedHopfield(4, 2, 2, key=KEY, activation="relu6")


# -- the existing estimators, unchanged ---------------------------------------------


def _dense_ift_gradient(model, x, y):
    """dL/dθ by the implicit function theorem with dense float64 linear algebra, from the
    energy alone (no estimator, no fixed-point solver): at s* with ∂E/∂s = 0,
    ds*/dθ = −H⁻¹ ∂²E/∂s∂θ (H the Hessian ∂²E/∂s²), so dL/dθ = −∂/∂θ ⟨λ, ∂E/∂s⟩ with
    λ = H⁻¹ ∂L/∂s held fixed."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def per_example(xi, yi):
        s = model.relax(xi, yi, 0.0, solver=TIGHT).value
        h = jax.hessian(model.energy)(s, xi)
        lam = jnp.linalg.solve(h, jax.grad(model.loss)(s, yi))

        def inner(p):
            m = eqx.combine(p, static)
            return -jnp.vdot(lam, jax.grad(m.energy)(s, xi))

        return jax.grad(inner)(params)

    grads = jax.vmap(per_example)(x, y)
    return jax.tree_util.tree_map(lambda g: jnp.mean(g, 0), grads)


def test_ep_rbp_bptt_and_the_dense_ift_gradient_agree():
    """EquilibriumProp, RecurrentBackprop and BPTT on the new model, against the dense
    implicit-function-theorem gradient.

    - RBP solves the same IFT system iteratively to 1e-13 (measured 4e-14): 1e-11.
    - BPTT over 400 steps of a contracting flow: its truncation error decays
      geometrically (measured 2e-13): 1e-11.
    - Centered EP's bias is O(β²) (Laborieux et al. 2021): halving β divides the error
      by 4 (3.6–4.4 allows the next Taylor term, O(β) relative; measured 9.7e-5,
      2.4e-5), and at β = 1e-3 the error is c·β² with c ≈ 1 (measured 9.7e-7): below
      2e-6.
    """
    model = _model()
    x, y = _data()
    ref = jax.jit(_dense_ift_gradient)(model, x, y)
    _, g_rbp, aux = _run(RBP, model, x, y)
    assert bool(jnp.all(aux["result"] == eqp.Result.converged))
    assert _rel(g_rbp, ref) < 1e-11
    _, g_bptt, _ = _run(eqp.BPTT(400), model, x, y)
    assert _rel(g_bptt, ref) < 1e-11
    errs = [_rel(_run(_ep(b), model, x, y)[1], ref) for b in (1e-2, 5e-3, 1e-3)]
    assert 3.6 < errs[0] / errs[1] < 4.4, errs
    assert errs[2] < 2e-6, errs
    # The gradient of W is symmetric with a zero diagonal: updates keep W admissible.
    gw = _run(_ep(1e-3), model, x, y)[1].weights
    np.testing.assert_allclose(gw, gw.T, atol=1e-15)
    np.testing.assert_array_equal(jnp.diag(gw), 0.0)


def test_holomorphic_ep_on_the_new_model():
    """Holomorphic EP (Laborieux & Zenke 2022) with a holomorphic activation: its error
    falls geometrically with the number of points N (like (|β|/R)^N); at |β| = 0.05 with
    8 points it is far below centered EP's at the same β (measured 3e-11 against
    2.4e-3)."""
    model = _model()
    x, y = _data()
    _, g_rbp, _ = _run(RBP, model, x, y)
    holo = _rel(_run(_ep(0.05, "holomorphic", n_points=8), model, x, y)[1], g_rbp)
    centered = _rel(_run(_ep(0.05), model, x, y)[1], g_rbp)
    assert holo < 1e-9 and holo < centered / 1e6, (holo, centered)


def test_trains_on_digits_with_ep():
    """EP with `fit` on 256 digits (8x8, 10 classes): the test accuracy climbs far above
    chance (10%) in 10 epochs (measured 20% after one epoch, 80% after ten) and W
    stays symmetric with a zero diagonal."""
    data = load_digits(seed=0).flat().subset(train=256, test=200)
    model = eqp.FullyConnectedHopfield(64, 16, 10, key=KEY, activation="sigmoid")
    est = eqp.EquilibriumProp(beta=0.5, variant="centered", free_steps=50, nudged_steps=10)
    cfg = TrainConfig(epochs=10, batch_size=16, lr=0.2, progress=False)
    res = fit(model, est, data, cfg, log=lambda s: None)
    acc = [h["test_accuracy"] for h in res.history]
    assert acc[-1] > 0.6 and acc[-1] > acc[0] + 0.3, acc
    w = res.model.weights
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_array_equal(jnp.diag(w), 0.0)
