"""Contrastive Hebbian learning (Movellan 1991) against closed forms, EP's β → ∞ limit,
and the training loop. float64 (conftest)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err as _rel
from jax.flatten_util import ravel_pytree

import eqprop_jax as eqp
from eqprop_jax.data import load_digits
from eqprop_jax.models.layered import LayeredNet
from eqprop_jax.models.resistive import ResistiveNetwork
from eqprop_jax.train import TrainConfig, fit

KEY = jax.random.PRNGKey(0)
X = jax.random.uniform(jax.random.PRNGKey(1), (3, 4))
Y = jnp.array([0, 1, 2])
CONVERGED = eqp.Picard(tol=1e-14, max_steps=5000)


MODELS = {
    # ρ = identity: E is quadratic in s, so both phases have closed forms.
    "layered": lambda: eqp.HopfieldMLP(
        (4, 5, 3), key=KEY, dynamics="gradient", activation="identity", weight_scale=0.5
    ),
    # one state vector (h, o): the outputs are its tail, not a layer of their own
    "fully-connected": lambda: eqp.FullyConnectedHopfield(
        4, 5, 3, key=KEY, activation="identity", weight_scale=0.5
    ),
}


def _dense_phases(model, x, y):
    """Free and clamped minima of a quadratic E(s) by dense solves: H s = −∇E(0), and with
    the outputs (the last n_outputs state entries for both models) held at one-hot(y)."""
    s0, unravel = ravel_pytree(model.init_state(x))
    energy = lambda v: model.energy(unravel(v), x)
    g, h = jax.grad(energy)(jnp.zeros_like(s0)), jax.hessian(energy)(jnp.zeros_like(s0))
    free = jnp.linalg.solve(h, -g)
    k = s0.size - model.n_outputs
    t = jax.nn.one_hot(y, model.n_outputs, dtype=s0.dtype)
    hidden = jnp.linalg.solve(h[:k, :k], -(g[:k] + h[:k, k:] @ t))
    return unravel(free), unravel(jnp.concatenate([hidden, t]))


@pytest.mark.parametrize("name", list(MODELS))
def test_chl_is_the_gradient_of_the_contrastive_loss_on_a_quadratic_energy(name):
    model = MODELS[name]()
    est = eqp.ContrastiveHebbian(free_solver=CONVERGED, clamped_solver=CONVERGED)
    loss, grads, aux = eqx.filter_jit(est)(model, X, Y)
    assert bool(jnp.all(aux["result"] == eqp.Result.converged))
    assert bool(jnp.all(aux["nudged_result"] == eqp.Result.converged))
    assert aux["nudged_result"].shape == (3, 1)

    # The phases reach the dense solves' states (tol 1e-14 of the scaled residual).
    free, clamped = jax.vmap(lambda x, y: _dense_phases(model, x, y))(X, Y)
    for got, want in ((aux["state"], free), (aux["clamped_state"], clamped)):
        leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
        for a, b in zip(*leaves, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)

    # ĝ = dJ/dθ for J(θ) = E(s⁺(θ)) − E(s⁻(θ)): autodiff through the dense solves, the
    # states moving with θ (the envelope theorem makes their motion drop out).
    def contrastive(m):
        def one(x, y):
            s_free, s_clamped = _dense_phases(m, x, y)
            return m.energy(s_clamped, x) - m.energy(s_free, x)

        return jnp.mean(jax.vmap(one)(X, Y))

    j, ref = eqx.filter_value_and_grad(contrastive)(model)
    # measured 1.2e-13 (layered), 1.5e-13 (fully connected): the phases' residual
    assert _rel(grads, ref) < 1e-10
    np.testing.assert_allclose(aux["contrastive_loss"], j, rtol=1e-10)
    assert float(j) > 0  # the clamped minimum lies above the free one
    np.testing.assert_allclose(loss, jnp.mean(jax.vmap(model.loss)(aux["state"], Y)))


def test_chl_is_eps_beta_to_infinity_limit_on_a_resistive_network():
    # Exact coordinate sweeps stay stable for any β > 0, and the outputs are swept
    # last, so the clamp is exact here too. With C free of parameters,
    # β·ĝ_EP(β) = ∂E/∂θ(s^β) − ∂E/∂θ(s⁰) → ĝ_CHL as s^β → s⁺ = lim s^β, with an O(1/β) gap.
    model = ResistiveNetwork((4, 3, 2), key=KEY, input_gain=2.0, dtype=jnp.float64)
    x = jax.random.uniform(jax.random.PRNGKey(2), (3, 4))
    y = jnp.array([0, 1, 1])
    steps = dict(free_steps=300)
    _, chl, aux = eqx.filter_jit(eqp.ContrastiveHebbian(clamped_steps=300, **steps))(model, x, y)
    assert bool(jnp.all(aux["nudged_result"] == eqp.Result.converged))
    targets = jax.vmap(model.targets)(y)
    np.testing.assert_array_equal(aux["clamped_state"][-1], targets)
    betas = np.array([1e2, 1e3, 1e4])
    errors = []
    for beta in betas:
        est = eqp.EquilibriumProp(beta=float(beta), nudged_steps=300, **steps)
        _, g, _ = eqx.filter_jit(est)(model, x, y)
        errors.append(_rel(jax.tree_util.tree_map(lambda a, b=beta: b * a, g), chl))
    slope = np.polyfit(np.log(betas), np.log(errors), 1)[0]
    # first order in 1/β (measured slope −1.00; gaps 1.6e-2, 1.6e-3, 1.6e-4)
    assert abs(slope + 1) < 0.1, (slope, errors)
    assert errors[-1] < 1e-3


def test_chl_trains_through_fit():
    data = load_digits(seed=0).flat().subset(train=64, test=32)
    model = eqp.HopfieldMLP((64, 12, 10), key=KEY, weight_scale=0.5)
    est = eqp.ContrastiveHebbian(free_steps=8, clamped_steps=4)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, max_steps_per_epoch=2, eval_batch_size=32)
    res = fit(model, est, data, cfg, log=lambda s: None)
    before = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    after = jax.tree_util.tree_leaves(eqx.filter(res.model, eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))
    assert np.isfinite(res.history[-1]["train_loss"])


def test_chl_refuses_what_it_cannot_clamp():
    # A cross-entropy readout sits outside the dynamics: no output layer to clamp.
    ce = eqp.HopfieldMLP((4, 5, 3), key=KEY, cost="ce")
    with pytest.raises(Exception, match="cannot be clamped"):
        eqp.ContrastiveHebbian(free_steps=2, clamped_steps=2)(ce, X, Y)
    with pytest.raises(TypeError, match="AbstractEnergyModel"):
        eqp.ContrastiveHebbian()(LayeredNet.mlp([4, 5, 3], key=KEY), X, Y)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="ContrastiveHebbian: `clamped_steps`"):
            eqp.ContrastiveHebbian(clamped_steps=bad)
