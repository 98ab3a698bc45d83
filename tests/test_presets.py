"""The paper presets carry the authors' settings: initialisation, per-layer rates, BPTT
truncation and the resistive estimator."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqprop_jax.estimators.bptt import BPTT
from eqprop_jax.presets import cast_floats, get_preset
from eqprop_jax.train.optim import layer_indices, make_optimizer, trainable


def _one_sgd_step_on_unit_gradients(preset, model):
    """The update each parameter gets from a gradient of ones under the preset's rates."""
    params = trainable(model)
    tx = make_optimizer(params, lr=preset.train.lr)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    return updates


def test_p1h_starts_from_pytorch_linear_initialisation():
    # nn.Linear: weights and biases U(±1/√fan_in); 784→512 and 512→10 here.
    p = get_preset("ernoult2019-p1h")
    m = p.model(jax.random.PRNGKey(0), (784,), 10)
    for w, b in zip(m.weights, m.biases, strict=True):
        bound = 1 / np.sqrt(w.shape[1])
        # 400k (resp. 5k) uniform draws come within 2% of the bound.
        assert 0.98 * bound < float(jnp.max(jnp.abs(w))) <= bound
        assert 0.9 * bound < float(jnp.max(jnp.abs(b))) <= bound
        assert float(jnp.std(w)) == pytest.approx(bound / np.sqrt(3), rel=0.05)
    # The same seed gives the same net: EP and BPTT runs start from one initialisation.
    m2 = p.model(jax.random.PRNGKey(0), (784,), 10)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(m), jax.tree_util.tree_leaves(m2), strict=True)
    )


@pytest.mark.parametrize(
    "name, shape, rates",
    [
        # Authors' --lr_tab runs from the output layer down; ours from the input up.
        ("ernoult2019-p1h", (784,), {"weights[0]": 0.08, "biases[0]": 0.08, "weights[1]": 0.04}),
        (
            "ernoult2019-pconv",
            (1, 28, 28),
            {"conv_weights[0]": 0.15, "conv_weights[1]": 0.035, "fc_weight": 0.015},
        ),
        # Scellier & Bengio's alphas 0.1/0.05 for C = ‖s−y‖², doubled for ½‖s−y‖².
        ("scellier2017-1h", (784,), {"weights[0]": 0.2, "weights[1]": 0.1, "biases[1]": 0.1}),
    ],
)
def test_paper_rates_reach_the_layers_the_authors_gave_them_to(name, shape, rates):
    p = get_preset(name)
    updates = _one_sgd_step_on_unit_gradients(p, p.model(jax.random.PRNGKey(0), shape, 10))
    found = {
        jax.tree_util.keystr(path).lstrip("."): float(-leaf.ravel()[0])
        for path, leaf in jax.tree_util.tree_leaves_with_path(updates)
    }
    for leaf, rate in rates.items():
        assert found[leaf] == pytest.approx(rate), (leaf, found)


def test_p1h_bptt_differentiates_the_last_k_plus_one_steps():
    # The authors detach the state at t = T − 1 − K: 16 of the 40 steps carry gradient.
    p = get_preset("ernoult2019-p1h")
    model = p.model(jax.random.PRNGKey(1), (784,), 10)
    # Weights ×3 slow the relaxation enough that the first 24 steps still change the
    # gradient (at ×1 the net settles in fewer than 24 steps, at ×5 it saturates).
    model = eqx.tree_at(lambda m: m.weights, model, tuple(3 * w for w in model.weights))
    x = jax.random.uniform(jax.random.PRNGKey(2), (3, 784))
    y = jnp.array([1, 4, 7])

    def by_hand(m, n_grad):
        def one(xi, yi):
            s = m.init_state(xi)
            for t in range(40):
                if t == 40 - n_grad:
                    s = jax.lax.stop_gradient(s)
                s = m.step(s, xi, yi, 0.0)
            return m.loss(s, yi)

        return jnp.mean(jax.vmap(one)(x, y))

    est = p.make_estimator("bptt")
    _, g, _ = est(model, x, y)
    g16 = eqx.filter_grad(lambda m: by_hand(m, 16))(model)
    g40 = eqx.filter_grad(lambda m: by_hand(m, 40))(model)
    leaves = lambda t: jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(t)])
    err16 = float(jnp.linalg.norm(leaves(g) - leaves(g16)) / jnp.linalg.norm(leaves(g16)))
    err40 = float(jnp.linalg.norm(leaves(g) - leaves(g40)) / jnp.linalg.norm(leaves(g40)))
    assert isinstance(est, BPTT) and err16 < 1e-6, err16
    assert err40 > 1e-3, err40


def test_drn_preset_trains_with_the_exact_local_rule():
    # ResistiveEP's factored rule keeps float32 within 1e-3 of the float64 estimate; the
    # generic autodiff estimate subtracts ½ΔV² of hundreds of volts and does not.
    from eqprop_jax.estimators.resistive_ep import ResistiveEP

    p = get_preset("scellier2024-drn-xs")
    est = p.make_estimator()
    assert isinstance(est, ResistiveEP) and est.variant == "centered" and est.beta == 1.0
    model = p.model(jax.random.PRNGKey(0), (784,), 10)
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 784))
    y = jnp.eye(10)[jnp.array([0, 3, 5, 9])]
    grads = {}
    for dtype in (jnp.float32, jnp.float64):  # tests run with x64 enabled (conftest)
        m, xd, yd = cast_floats((model, x, y), dtype)
        g = jax.tree_util.tree_leaves(eqx.filter_jit(est)(m, xd, yd)[1])
        assert all(a.dtype == dtype for a in g)
        grads[dtype] = np.concatenate([np.asarray(a, np.float64).ravel() for a in g])
    err = np.linalg.norm(grads[jnp.float32] - grads[jnp.float64])
    err /= np.linalg.norm(grads[jnp.float64])
    assert err < 1e-3, err


def test_scellier2017_dynamics_settle_on_the_box_minimum_of_the_energy():
    # Regression: the gradient dynamics took ρ'(s) of the hard sigmoid at the clipped
    # ends from jnp.clip (½ there), so a unit held at 1 by a drive d in (1, 2) stepped
    # to ½ + d/4 and back forever, and a trained net never settled. Relaxed for long,
    # every state must be a fixed point and satisfy the box-constrained optimality of
    # E = ½‖s‖² − Σ ρ(s_{l+1})ᵀW ρ(s_l) − bᵀρ(s): ∂E/∂s = s − d is 0 inside (0, 1),
    # ≤ 0 at 1 and ≥ 0 at 0.
    p = get_preset("scellier2017-1h")
    model = p.model(jax.random.PRNGKey(0), (784,), 10)
    # Larger weights and biases drive many units past 1, where the bug showed.
    model = eqx.tree_at(lambda m: m.weights, model, tuple(4 * w for w in model.weights))
    model = eqx.tree_at(
        lambda m: m.biases,
        model,
        tuple(0.5 + 0 * b for b in model.biases),
    )
    x = jax.random.uniform(jax.random.PRNGKey(4), (8, 784))

    @jax.jit
    def settle(x):
        def one(xi):
            s = jax.lax.fori_loop(
                0, 300, lambda t, s: model.step(s, xi, 0, 0.0), model.init_state(xi)
            )
            return s, model.step(s, xi, 0, 0.0)

        return jax.vmap(one)(x)

    s, s_next = settle(x)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(s, s_next, strict=True))
    assert moved < 1e-6, moved
    h, o = s
    drive_h = x @ model.weights[0].T + o @ model.weights[1] + model.biases[0]
    drive_o = h @ model.weights[1].T + model.biases[1]
    n_top = 0
    for si, di in ((h, drive_h), (o, drive_o)):
        g = si - di
        inner = (si > 1e-6) & (si < 1 - 1e-6)
        assert float(jnp.max(jnp.abs(jnp.where(inner, g, 0)))) < 1e-4
        assert float(jnp.max(jnp.where(si >= 1 - 1e-6, g, -1))) <= 1e-4
        assert float(jnp.min(jnp.where(si <= 1e-6, g, 1))) >= -1e-4
        n_top += int(jnp.sum((si >= 1 - 1e-6) & (di > 1) & (di < 2)))
    assert n_top > 0  # the case that used to oscillate is present


def test_continual_ep_takes_per_layer_rates():
    # Regression: ContinualEP broadcast `learning_rate` whenever jnp.ndim of it was 0,
    # which is also true of a model-shaped tree of per-layer rates, so such a tree
    # (the paper's per-layer η, used by scripts/cep_vf_curves.py) raised a TypeError.
    from eqprop_jax.estimators.continual_ep import ContinualEP
    from eqprop_jax.models.hopfield import HopfieldMLP

    model = HopfieldMLP((6, 5, 3), key=jax.random.PRNGKey(0), activation="sigmoid4")
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 6))
    y = jnp.array([0, 2, 1, 2])
    layers = layer_indices(trainable(model))
    eta = 0.05

    def run(lr):
        est = ContinualEP(beta=0.2, learning_rate=lr, free_steps=20, nudged_steps=5)
        return est(model, x, y)

    _, g_scalar, _ = run(eta)
    _, g_tree, _ = run(jax.tree_util.tree_map(lambda i: eta, layers))
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(g_scalar), leaves(g_tree), strict=True):
        np.testing.assert_array_equal(a, b)
    # Rates η (layer 0) and 3η (layer 1): each leaf moved by its own rate times its
    # summed increments, θ_K = θ_0 − η_l · grads.
    rates = jax.tree_util.tree_map(lambda i: (eta, 3 * eta)[i], layers)
    _, g, aux = run(rates)
    for t0, tk, gi, r in zip(
        leaves(trainable(model)),
        leaves(trainable(aux["model"])),
        leaves(g),
        leaves(rates),
        strict=True,
    ):
        np.testing.assert_allclose(tk, t0 - r * gi, rtol=1e-6, atol=1e-9)
    # Layer 1 took larger steps than under one rate, so its state-dependent increments differ.
    assert not np.allclose(g.weights[1], g_scalar.weights[1])


def test_dtp_preset_variants_are_objects_and_its_optimiser_leaves_feedback_alone():
    from eqprop_jax.estimators import DRL, DTP, LDRL, Backprop, Lee
    from eqprop_jax.models.layered import LayeredNet

    p = get_preset("ernoult2022-ldrl-cifar10")
    kinds = {n: type(p.make_estimator(n).variant) for n in ("dtp-ldrl", "dtp-drl", "dtp-lee")}
    assert kinds == {"dtp-ldrl": LDRL, "dtp-drl": DRL, "dtp-lee": Lee}
    assert isinstance(p.make_estimator(), DTP) and isinstance(
        p.make_estimator("backprop"), Backprop
    )
    net = LayeredNet.mlp([4, 6, 5, 3], key=jax.random.PRNGKey(0))
    params = trainable(net)
    tx = p.train.optimizer_settings(10)(params)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates.feedback))
    assert all(np.all(u != 0) for u in jax.tree_util.tree_leaves(updates.forward))
