"""Difference target propagation: LayeredNet, DTP estimator (lee/drl/ldrl), diagnostics."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqprop_jax as eqp
from eqprop_jax.diagnostics.dtp import (
    backprop_gradients,
    dtp_alignment,
    gauss_newton_targets,
    weight_alignment,
)
from eqprop_jax.estimators.dtp import feedback_mask, ldrl_loss, lee_loss
from eqprop_jax.models.layered import (
    ConvFeedback,
    DenseFeedback,
    LayeredNet,
    _conv,
    max_pool,
    max_unpool,
    transpose_kernel,
)

KEY = jax.random.PRNGKey(0)


def _identity(z):
    return z


def _with_transposed_feedback(model):
    """Feedback weights set to the exact transposes of the forward weights (J_G = J_Fᵀ)."""
    fb = []
    for f, g in zip(model.forward[1:], model.feedback, strict=True):
        if isinstance(g, DenseFeedback):
            fb.append(eqx.tree_at(lambda g: g.weight, g, f.weight.T))
        else:
            fb.append(eqx.tree_at(lambda g: g.weight, g, transpose_kernel(f.weight)))
    return eqx.tree_at(lambda m: m.feedback, model, tuple(fb))


def _data(key, n, shape, classes):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, *shape)), jax.random.randint(ky, (n,), 0, classes)


# --- building blocks -------------------------------------------------------------------


@jax.jit
def _adjoint_pairs(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x, y = jax.random.normal(k1, (3, 6, 6)), jax.random.normal(k2, (4, 6, 6))
    w = jax.random.normal(k3, (4, 3, 3, 3))
    pooled, idx = max_pool(x)
    z = jax.random.normal(k4, pooled.shape)
    jac_t = jax.vjp(lambda a: max_pool(a)[0], x)[1](z)[0]
    return (
        (jnp.vdot(_conv(x, w), y), jnp.vdot(x, _conv(y, transpose_kernel(w)))),
        (pooled, x.reshape(3, 3, 2, 3, 2).max(axis=(2, 4))),
        (max_unpool(z, idx), jac_t),
    )


def test_conv_transpose_and_unpool_are_adjoints():
    conv, pool, unpool = _adjoint_pairs(KEY)
    # ⟨conv_W x, y⟩ = ⟨x, conv_{Wᵀ} y⟩ up to float64 rounding (~1e-15 relative).
    np.testing.assert_allclose(*conv, rtol=1e-12)
    np.testing.assert_array_equal(*pool)
    # Unpool at the forward argmax is the transpose of the (locally linear) max-pool.
    np.testing.assert_array_equal(*unpool)


def test_constructors_shapes():
    # eval_shape: the shape bookkeeping needs no weights (and no time).
    assert eqx.filter_eval_shape(lambda: LayeredNet.simple_vgg(key=KEY)).shapes == [
        (3, 32, 32), (128, 16, 16), (128, 8, 8), (256, 4, 4), (256, 2, 2), (512, 1, 1), (10,)
    ]  # fmt: skip
    net = LayeredNet.lenet(key=KEY)
    assert net.shapes[-1] == (10,) and len(net.feedback) == len(net.forward) - 1
    assert eqx.filter_eval_shape(net, jnp.ones((1, 28, 28))).shape == (10,)


# --- the estimator ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_linear_net_with_transposed_feedback_matches_backprop(kind):
    # Linear layers (max-pool is linear at a fixed argmax) and G_n = F_nᵀ make the
    # difference rule exact: t_{n-1} - s_{n-1} = J_nᵀ(t_n - s_n), so (1/β)·DTP equals
    # the backprop gradient for every β, up to float64 rounding amplified by 1/β.
    if kind == "mlp":
        net = LayeredNet.mlp([6, 8, 7, 4], key=KEY, activation=_identity)
        x, y = _data(KEY, 16, (6,), 4)
    else:
        net = LayeredNet.convnet((2, 8, 8), (3, 4), (), 3, key=KEY, activation=_identity)
        x, y = _data(KEY, 8, (2, 8, 8), 3)
    net = _with_transposed_feedback(net)
    _, g_bp = backprop_gradients(net, x, y)
    for beta in (0.5, 1e-2, 1e-4):
        loss, g, aux = eqp.DTP(beta=beta)(net, x, y)
        report = eqp.gradient_alignment(g.forward, g_bp.forward)
        assert report.overall.rel_error < 1e-9
        assert report.overall.angle < 1e-4  # degrees; arccos turns 1e-16 into ~1e-6°
        assert jnp.isfinite(loss) and aux["target_distance"].shape == (net.num_layers,)


def test_gradient_structure_and_top_layer_exact():
    net = LayeredNet.mlp([5, 7, 3], key=KEY)
    x, y = _data(KEY, 10, (5,), 3)
    _, g, _ = eqp.DTP(beta=0.3)(net, x, y)
    assert jax.tree.structure(g) == jax.tree.structure(eqx.filter(net, eqx.is_inexact_array))
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(g.feedback))
    # t_N - s_N = -β∇L exactly, so the top layer's update is the backprop gradient even
    # with random feedback weights.
    _, g_bp = backprop_gradients(net, x, y)
    np.testing.assert_allclose(
        g.forward[-1].weight, g_bp.forward[-1].weight, rtol=1e-10, atol=1e-14
    )


@pytest.fixture(scope="module")
def trained():
    """A small tanh MLP whose random feedback weights are trained by L-DRL and by Lee's DTP."""
    net = LayeredNet.mlp([10, 16, 16, 16, 5], key=KEY)
    x, y = _data(jax.random.PRNGKey(1), 64, (10,), 5)
    out = {}
    for name, variant in (("ldrl", eqp.LDRL()), ("lee", eqp.Lee())):
        est = eqp.DTP(variant=variant, beta=1e-3, feedback_steps=1000, noise=0.1, feedback_lr=0.3)
        new = est.pre_step(net, x, y, key=jax.random.PRNGKey(2))
        out[name] = (est, new, dtp_alignment(new, x, y, beta=1e-3))
    return net, x, y, out


def test_ldrl_aligns_feedback_and_updates(trained):
    net, x, y, out = trained
    est, new, diag = out["ldrl"]
    before = dtp_alignment(net, x, y, beta=1e-3)
    # Random feedback starts near 90° from Wᵀ; Jacobian matching drives V_n towards
    # Wᵀ·E[diag φ'], which for these small tanh pre-activations is within a few degrees.
    assert np.all(before["weight_angle"][1:] > 60)
    assert np.all(diag["weight_angle"][1:] < 15)
    assert np.all(diag["update_angle"] < 20)
    # Forward weights untouched by feedback training.
    for f0, f1 in zip(net.forward, new.forward, strict=True):
        np.testing.assert_array_equal(f0.weight, f1.weight)


def test_lee_dtp_is_worse_than_ldrl(trained):
    _, _, _, out = trained
    ldrl, lee = out["ldrl"][2], out["lee"][2]
    assert np.all(np.isfinite(lee["weight_angle"][1:]))
    # Lee's inverse-learning loss makes G_n ≈ F_n⁻¹ (not F_nᵀ): tens of degrees worse.
    assert np.all(lee["weight_angle"][1:] > ldrl["weight_angle"][1:] + 20)
    assert np.all(lee["update_angle"][:-1] > ldrl["update_angle"][:-1] + 20)


@pytest.mark.parametrize("variant", [eqp.LDRL(), eqp.Lee(), eqp.DRL(lam=0.1)])
def test_feedback_training_lowers_its_loss(variant):
    net = LayeredNet.mlp([4, 6, 5, 3], key=KEY)
    x, y = _data(KEY, 32, (4,), 3)
    est = eqp.DTP(variant=variant, feedback_steps=200, noise=0.1, feedback_lr=0.2)
    k = jax.random.PRNGKey(5)

    # Fresh noise per step makes single-draw losses noisy; average over draws.
    def mean_loss(m):
        return np.mean([est.feedback_losses(m, x, key=kk) for kk in jax.random.split(k, 20)], 0)

    before = mean_loss(net)
    after = mean_loss(est.pre_step(net, x, y, key=jax.random.PRNGKey(6)))
    assert np.all(after < before)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb, strict=True))


def test_feedback_optimizer_is_an_optax_transformation():
    net = LayeredNet.mlp([4, 6, 5, 3], key=KEY)
    x, y = _data(KEY, 16, (4,), 3)
    k = jax.random.PRNGKey(7)
    settings = dict(variant=eqp.DRL(lam=0.1), feedback_steps=(3, 5), noise=(0.1, 0.2))
    default = eqp.DTP(feedback_lr=(0.2, 0.05), **settings).pre_step(net, x, y, key=k)
    # Plain SGD passed in is the default, bit for bit (θ + (−η g) = θ − η g exactly).
    sgd = (optax.sgd(0.2), optax.sgd(0.05))
    same = eqp.DTP(feedback_optimizer=sgd, **settings).pre_step(net, x, y, key=k)
    assert _leaves_equal(default, same)
    # Adam moves the feedback weights elsewhere, and only them.
    adam = eqp.DTP(feedback_optimizer=optax.adam(1e-2), **settings).pre_step(net, x, y, key=k)
    assert _leaves_equal(adam.forward, net.forward)
    for g0, g_sgd, g_adam in zip(net.feedback, default.feedback, adam.feedback, strict=True):
        assert not np.allclose(g_adam.weight, g0.weight)
        assert not np.allclose(g_adam.weight, g_sgd.weight)
    # One Adam step moves every weight by about its rate (|m̂/√v̂| = 1 at the first step).
    one = eqp.DTP(variant=eqp.LDRL(), feedback_steps=1, feedback_optimizer=optax.adam(1e-3))
    moved = one.pre_step(net, x, y, key=k)
    for g0, g1 in zip(net.feedback, moved.feedback, strict=True):
        step = np.abs(np.asarray(g1.weight - g0.weight))
        np.testing.assert_allclose(step[step > 0], 1e-3, rtol=1e-3)


def test_feedback_mask_keeps_the_main_optimiser_off_the_feedback_weights():
    from eqprop_jax.train.optim import make_optimizer, trainable

    net = LayeredNet.mlp([4, 6, 5, 3], key=KEY)
    params = trainable(net)
    mask = feedback_mask(params)
    assert all(jax.tree.leaves(mask.feedback)) and not any(jax.tree.leaves(mask.forward))
    # Weight decay and momentum would move weights whose gradient is zero.
    tx = make_optimizer(params, lr=0.1, momentum=0.9, weight_decay=0.1, frozen=feedback_mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert all(np.all(u == 0) for u in jax.tree.leaves(updates.feedback))
    np.testing.assert_allclose(
        updates.forward[0].weight, -0.1 * 0.1 * params.forward[0].weight, rtol=1e-12
    )
    with pytest.raises(TypeError, match="LayeredNet"):
        feedback_mask({"w": jnp.zeros(3)})


def test_ldrl_gradient_linear_analytic():
    # F(s) = W s + b, G(s) = V s + c: L = -2εᵀVWε + ‖Vη‖², so
    # ∂L/∂V = -2 ε (Wε)ᵀ + 2 V η ηᵀ and ∂L/∂c = 0 (c cancels in both differences).
    k = jax.random.split(KEY, 6)
    net = LayeredNet.mlp([3, 5, 4], key=k[0], activation=_identity)
    f, g = net.forward[1], net.feedback[0]
    g = eqx.tree_at(lambda g: g.bias, g, jax.random.normal(k[1], (5,)))
    s_prev = jax.random.normal(k[2], (7, 5))
    eps, eta = 0.3 * jax.random.normal(k[3], (7, 5)), 0.3 * jax.random.normal(k[4], (7, 4))
    s = jax.vmap(lambda a: f(a)[0])(s_prev)

    def loss(g):
        return jnp.mean(
            jax.vmap(lambda a, b, e, h: ldrl_loss(f, g, a, b, None, e, h))(s_prev, s, eps, eta)
        )

    grad = jax.jit(jax.grad(loss))(g)
    w, v = f.weight, g.weight
    expected = (-2 * eps.T @ (eps @ w.T) + 2 * v @ eta.T @ eta) / 7
    np.testing.assert_allclose(grad.weight, expected, rtol=1e-12)
    np.testing.assert_allclose(grad.bias, 0.0, atol=1e-12)
    # Lee: r = V(W(s+ε)+b) + c - (s+ε), ∂/∂V = 2 r (W(s+ε)+b)ᵀ.
    grad_lee = jax.jit(
        jax.grad(lambda g: jnp.mean(jax.vmap(lambda a, e: lee_loss(f, g, a, None, e))(s_prev, eps)))
    )(g)
    h = (s_prev + eps) @ w.T + f.bias
    r = h @ v.T + g.bias - (s_prev + eps)
    np.testing.assert_allclose(grad_lee.weight, 2 * r.T @ h / 7, rtol=1e-12)


def test_ldrl_expected_gradient_is_jacobian_matching():
    # E[∂L/∂V] = 2σ²(V - Wᵀ) for linear layers: its minimiser is V = Wᵀ = J_Fᵀ.
    k = jax.random.split(KEY, 3)
    net = LayeredNet.mlp([3, 5, 4], key=k[0], activation=_identity)
    f, g = net.forward[1], net.feedback[0]
    n, sigma = 200_000, 0.5
    eps, eta = sigma * jax.random.normal(k[1], (n, 5)), sigma * jax.random.normal(k[2], (n, 4))
    s_prev = jnp.zeros((n, 5))
    s = jax.vmap(lambda a: f(a)[0])(s_prev)
    grad = jax.jit(
        jax.grad(
            lambda g: jnp.mean(
                jax.vmap(lambda a, b, e, h: ldrl_loss(f, g, a, b, None, e, h))(s_prev, s, eps, eta)
            )
        )
    )(g)
    expected = 2 * sigma**2 * (g.weight - f.weight.T)
    # Monte Carlo error ~ σ²·‖W‖/√n ≈ 1e-3 relative; 3% leaves a wide margin.
    assert np.linalg.norm(grad.weight - expected) < 0.03 * np.linalg.norm(expected)


# --- Gauss–Newton targets and diagnostics ----------------------------------------------


def test_gauss_newton_targets_are_damped_pseudoinverse():
    net = LayeredNet.mlp([4, 6, 5, 3], key=KEY)
    x, y = _data(KEY, 1, (4,), 3)
    states, ctxs = eqx.filter_jit(net.activations)(x[0])
    beta, lam = 0.1, 1e-3
    targets = eqx.filter_jit(gauss_newton_targets)(net, states, ctxs, y[0], beta, lam)
    logits = np.asarray(states[-1], np.float64)
    e = np.exp(logits - logits.max())
    e = e / e.sum() - np.eye(3)[int(y[0])]  # ∂CE/∂logits = softmax - onehot
    for n in (1, 2):
        # Central differences of s_n -> s_N (h = 1e-6: error ~1e-12, independent of autodiff).
        head = lambda s, n=n: _head_numpy(net, n, np.asarray(s))
        jac = np.stack(
            [
                (head(states[n] + 1e-6 * d) - head(states[n] - 1e-6 * d)) / 2e-6
                for d in np.eye(states[n].size)
            ],
            axis=1,
        )
        delta = jac.T @ np.linalg.solve(jac @ jac.T + lam * np.eye(3), e)
        np.testing.assert_allclose(
            targets[n - 1], np.asarray(states[n]) - beta * delta, rtol=1e-7, atol=1e-9
        )


def _head_numpy(net, n, s):
    """s_n -> s_N of a tanh MLP in plain numpy (last layer linear)."""
    for i, f in enumerate(net.forward[n:], start=n):
        s = np.asarray(f.weight) @ s + np.asarray(f.bias)
        s = s if i == net.num_layers - 1 else np.tanh(s)
    return s


def test_dtp_alignment_angles_against_a_direct_float64_computation():
    # Tanh MLP 4-6-5-3 (feedback G_n(s) = V_n s + c_n, random V), batch 5, in numpy:
    # BP gradient, DTP update (linear difference rule) and Gauss–Newton target update
    # ΔW_n = mean_b (Δs_n ⊙ f'(a_n)) s_{n−1}ᵀ with Δs_n = J_nᵀ(J_n J_nᵀ + λI)⁻¹ e,
    # J_n = ∂s_N/∂s_n by the chain rule, e = softmax(s_N) − onehot(y).
    net = LayeredNet.mlp([4, 6, 5, 3], key=KEY)
    x, y = _data(jax.random.PRNGKey(3), 5, (4,), 3)
    beta, lam = 0.1, 1e-3
    diag = dtp_alignment(net, x, y, beta=beta, gn_damping=lam)
    W = [np.asarray(f.weight, np.float64) for f in net.forward]
    b = [np.asarray(f.bias, np.float64) for f in net.forward]
    V = [np.asarray(g.weight, np.float64) for g in net.feedback]
    n_layers = len(W)
    grads = {"bp": [[0, 0] for _ in W], "dtp": [[0, 0] for _ in W], "gn": [[0, 0] for _ in W]}
    for xb, yb in zip(np.asarray(x, np.float64), np.asarray(y), strict=True):
        s, d = [xb], []  # states s_0..s_N, derivatives f'(a_n)
        for n in range(n_layers):
            a = W[n] @ s[-1] + b[n]
            last = n == n_layers - 1
            s.append(a if last else np.tanh(a))
            d.append(np.ones_like(a) if last else 1 - np.tanh(a) ** 2)
        p = np.exp(s[-1] - s[-1].max())
        e = p / p.sum() - np.eye(3)[yb]
        jac = [None] * (n_layers + 1)  # jac[n] = ∂s_N/∂s_n
        jac[n_layers] = np.eye(3)
        for n in range(n_layers - 1, 0, -1):
            jac[n] = jac[n + 1] @ (d[n][:, None] * W[n])
        t = [None] * (n_layers + 1)
        t[n_layers] = s[n_layers] - beta * e
        for n in range(n_layers, 1, -1):
            t[n - 1] = s[n - 1] + V[n - 2] @ (t[n] - s[n])
        for n in range(1, n_layers + 1):
            j = jac[n]
            deltas = {
                "bp": j.T @ e,
                "dtp": (s[n] - t[n]) / beta,
                "gn": j.T @ np.linalg.solve(j @ j.T + lam * np.eye(3), e),
            }
            for k, delta in deltas.items():
                u = delta * d[n - 1]
                grads[k][n - 1][0] = grads[k][n - 1][0] + np.outer(u, s[n - 1]) / len(x)
                grads[k][n - 1][1] = grads[k][n - 1][1] + u / len(x)

    def angle(k1, k2, n):
        a = np.concatenate([g.ravel() for g in grads[k1][n]])
        r = np.concatenate([g.ravel() for g in grads[k2][n]])
        return np.degrees(np.arccos(np.clip(a @ r / np.linalg.norm(a) / np.linalg.norm(r), -1, 1)))

    for key, (k1, k2) in {
        "update_angle": ("dtp", "bp"),
        "gn_angle": ("dtp", "gn"),
        "gn_bp_angle": ("gn", "bp"),
    }.items():
        want = [angle(k1, k2, n) for n in range(n_layers)]
        assert np.all(np.asarray(want[:-1]) > 1.0), (key, want)  # not a trivial 0 = 0
        np.testing.assert_allclose(diag[key], want, atol=1e-5, err_msg=key)


def test_dtp_alignment_diagnostics():
    net = _with_transposed_feedback(LayeredNet.mlp([5, 6, 6, 3], key=KEY, activation=_identity))
    x, y = _data(KEY, 8, (5,), 3)
    diag = dtp_alignment(net, x, y, beta=1e-2)
    assert set(diag) >= {"weight_angle", "weight_distance", "update_angle", "gn_angle", "loss"}
    assert np.isnan(diag["weight_angle"][0]) and diag["weight_angle"].shape == (3,)
    np.testing.assert_allclose(diag["weight_angle"][1:], 0.0, atol=1e-5)
    np.testing.assert_allclose(diag["weight_distance"][1:], 0.0, atol=1e-12)
    np.testing.assert_allclose(diag["update_angle"], 0.0, atol=1e-4)
    # conv vs conv-transpose: a feedback kernel equal to the transposed kernel gives 0°.
    conv = _with_transposed_feedback(LayeredNet.convnet((1, 4, 4), (2, 3), (), 2, key=KEY))
    assert isinstance(conv.feedback[0], ConvFeedback)
    assert weight_alignment(conv)[0].angle < 1e-5


# --- bad input -------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    net = LayeredNet.mlp([4, 6, 5, 3], key=KEY)
    bad_fb = DenseFeedback(jnp.zeros((6, 4)), jnp.zeros(6), (6,))  # should take s_2 of size 5
    with pytest.raises(ValueError, match="G_2"):
        LayeredNet(net.forward, (bad_fb, net.feedback[1]), (4,))
    wrong_out = DenseFeedback(jnp.zeros((7, 5)), jnp.zeros(7), (7,))  # should give s_1 of size 6
    with pytest.raises(ValueError, match=r"G_2 maps s_2 .* s_1"):
        LayeredNet(net.forward, (wrong_out, net.feedback[1]), (4,))
    with pytest.raises(ValueError, match="feedback layers"):
        LayeredNet(net.forward, net.feedback[:1], (4,))
    with pytest.raises(ValueError, match="noise"):
        eqp.DTP(noise=0.0)
    with pytest.raises(ValueError, match="noise"):
        eqp.DTP(noise=(0.1, -1.0))
    with pytest.raises(ValueError, match="beta"):
        eqp.DTP(beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        eqp.DTP(beta=-0.5)
    with pytest.raises(TypeError, match="variant must be a FeedbackLoss"):
        eqp.DTP(variant="ldrl")
    with pytest.raises(ValueError, match="lam"):
        eqp.DRL(lam=-1.0)
    with pytest.raises(ValueError, match="not both"):
        eqp.DTP(feedback_lr=0.1, feedback_optimizer=optax.sgd(0.1))
    with pytest.raises(TypeError, match="GradientTransformation"):
        eqp.DTP(feedback_optimizer="adam")
    x, y = _data(KEY, 4, (4,), 3)
    with pytest.raises(ValueError, match="x must be a batch"):
        eqp.DTP()(net, x[:, :3], y)
    with pytest.raises(ValueError, match="NaN"):
        eqp.DTP()(net, x.at[0, 0].set(jnp.nan), y)
    with pytest.raises(ValueError, match="labels"):
        eqp.DTP()(net, x, y[:2])
    with pytest.raises(ValueError, match="noise.*3 entries"):
        eqp.DTP(noise=(0.1, 0.1, 0.1)).pre_step(net, x, y, key=KEY)
    with pytest.raises(ValueError, match="key"):
        eqp.DTP().pre_step(net, x, y)
