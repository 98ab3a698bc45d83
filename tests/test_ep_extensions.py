"""EP extensions checked against autodiff: GDU (EP = BPTT step by step), EP <-> RBP traces,
continual EP, vector-field EP, convolutional EP, and bad input. float64 (conftest)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_estimator as _run

import eqprop_jax as eqp
from eqprop_jax.models.conv_hopfield import _conv, _max_pool

KEY = jax.random.PRNGKey(0)
X = jax.random.uniform(jax.random.PRNGKey(1), (3, 6))
Y = jnp.array([0, 1, 2])
# A converged reference: Picard to 1e-12 then an exact (GMRES) implicit solve.
RBP = eqp.RecurrentBackprop(solver=eqp.Picard(tol=1e-12, max_steps=3000))


def _hopfield(**kw):
    # tanh gradient flow: step = ∂Φ'/∂s with Φ' = ½‖s‖² − εF, so GDU and the EP–RBP
    # equivalence hold exactly in the β → 0 limit (no clipping, smooth ρ).
    return eqp.HopfieldMLP(
        (6, 5, 4, 3), key=KEY, dynamics="gradient", activation="tanh", weight_scale=0.5, **kw
    )


def _slope(betas, errors):
    return np.polyfit(np.log(betas), np.log(errors), 1)[0]


# -- GDU: EP's increments equal BPTT's gradients step by step ------------------------


@pytest.mark.parametrize(
    "model",
    [
        _hopfield(),
        # Linear prototypical map s ← ∂Φ/∂s: the setting of Ernoult et al.'s theorem.
        eqp.HopfieldMLP(
            (6, 5, 4, 3), key=KEY, dynamics="prototypical", activation="identity", weight_scale=0.5
        ),
    ],
    ids=["gradient-tanh", "prototypical-linear"],
)
def test_gdu_ep_equals_bptt_step_by_step(model):
    errs = {}
    for beta in (1e-2, 1e-3):
        trace = eqp.diagnostics.gdu_trace(model, X, Y, beta, free_steps=300, nudged_steps=8)
        s = trace.summary()
        errs[beta] = (s["state_rel_error"].max(), s["param_rel_error"].max())
        assert len(s["state_rel_error"]) == 8
    # The theorem is an O(β) limit: a 10x smaller β gives a ~10x smaller error at every
    # step (measured slope 1.00); 0.2 leaves room for the converged-state error (~1e-12).
    for k in range(2):
        assert errs[1e-3][k] < 0.2 * errs[1e-2][k]
        assert errs[1e-3][k] < 1e-2
    assert s["state_sign"].min() >= 0.99 and s["param_sign"].min() >= 0.99
    # Summed over the K steps, BPTT's per-step weight gradients are truncated BPTT's
    # gradient: compare with the library's BPTT (T = K steps from the free state is the
    # same as BPTT through T = free + K steps, since the first phase has converged).
    total = jax.tree_util.tree_map(lambda g: g.sum(0), trace.bptt_param)
    _, ref, _ = _run(eqp.BPTT(steps=308, truncate=8), model, X, Y)
    assert eqp.gradient_alignment(total, ref).overall.rel_error < 1e-9


def test_gdu_nonzero_beta_required():
    with pytest.raises(ValueError, match="beta"):
        eqp.diagnostics.gdu_trace(_hopfield(), X, Y, 0.0, 10, 4)


# -- EP <-> recurrent backprop (Scellier & Bengio 2019) -------------------------------


def test_rbp_equivalence_trace_slope_one():
    model = _hopfield()
    betas = np.array([1e-2, 1e-3, 1e-4])
    state_err, param_err = [], []
    for beta in betas:
        trace = eqp.diagnostics.rbp_equivalence_trace(model, X, Y, beta, 300, 60)
        se, pe = trace.max_rel_error()
        state_err.append(se)
        param_err.append(pe)
    # A first-order limit: log-log slope 1 (measured 1.00 for both); ±0.1 allows the
    # curvature of the error over two decades.
    assert abs(_slope(betas, state_err) - 1) < 0.1
    assert abs(_slope(betas, param_err) - 1) < 0.1
    assert param_err[-1] < 1e-3
    # The AP side is recurrent backprop itself: after 60 iterations its running gradient
    # is near the exact implicit one (contraction ~0.9/step here; measured 5e-3).
    _, exact, _ = _run(RBP, model, X, Y)
    last = jax.tree_util.tree_map(lambda a: a[-1], trace.rbp_param)
    assert eqp.gradient_alignment(last, exact).overall.rel_error < 2e-2
    # And the AP iterates converge (monotonically here) towards it.
    first = jax.tree_util.tree_map(lambda a: a[5], trace.rbp_param)
    assert (
        eqp.gradient_alignment(last, exact).overall.rel_error
        < eqp.gradient_alignment(first, exact).overall.rel_error
    )


# -- Continual EP --------------------------------------------------------------------


def test_continual_ep_sgd_equivalence_and_one_step():
    model = _hopfield()
    est = eqp.ContinualEP(beta=0.1, learning_rate=0.05, free_steps=200, nudged_steps=20)
    _, grads, aux = _run(est, model, X, Y)
    # grads = −(θ_K − θ_0)/η: one SGD step with η lands on C-EP's final weights.
    stepped = eqx.apply_updates(model, jax.tree_util.tree_map(lambda g: -0.05 * g, grads))
    report = eqp.gradient_alignment(eqx.filter(stepped, eqx.is_inexact_array), aux["model"])
    assert report.overall.rel_error < 1e-12
    # With one nudged step the weights have not moved yet, so C-EP is EP exactly.
    one = eqp.ContinualEP(beta=0.1, learning_rate=0.05, free_steps=200, nudged_steps=1)
    ep = eqp.EquilibriumProp(beta=0.1, free_steps=200, nudged_steps=1)
    _, g1, _ = _run(one, model, X, Y)
    _, g2, _ = _run(ep, model, X, Y)
    assert eqp.gradient_alignment(g1, g2).overall.rel_error < 1e-12


def test_continual_ep_approaches_ep_and_gradient():
    model = _hopfield()
    _, exact, _ = _run(RBP, model, X, Y)

    def cep(beta, lr):
        est = eqp.ContinualEP(
            beta=jnp.asarray(beta), learning_rate=jnp.asarray(lr), free_steps=200, nudged_steps=100
        )
        return _run(est, model, X, Y)[1]

    _, ep, _ = _run(
        eqp.EquilibriumProp(beta=jnp.asarray(0.05), free_steps=200, nudged_steps=100),
        model,
        X,
        Y,
    )
    # Weight drift during the nudged phase is first order in η: 10x smaller η, ~10x
    # closer to EP at the same β.
    e1 = eqp.gradient_alignment(cep(0.05, 1e-3), ep).overall.rel_error
    e2 = eqp.gradient_alignment(cep(0.05, 1e-4), ep).overall.rel_error
    assert e2 < 0.2 * e1
    # Shrinking β and η together (η/β → 0) brings C-EP to the true gradient.
    errs = [
        eqp.gradient_alignment(cep(b, lr), exact).overall.rel_error
        for b, lr in ((0.1, 1e-3), (0.01, 1e-5))
    ]
    assert errs[1] < 0.2 * errs[0] and errs[1] < 5e-2


def test_continual_ep_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        eqp.ContinualEP(beta=0.0)
    with pytest.raises(ValueError, match="learning_rate"):
        eqp.ContinualEP(learning_rate=-0.1)


# -- Vector-field EP -------------------------------------------------------------------


def _tied(g):
    """The gradient of a tied weight W (= W_ff = B_fbᵀ) from separate W_ff, B gradients."""
    return (
        [g.weights[0]]
        + [w + b.T for w, b in zip(g.weights[1:], g.feedback, strict=True)]
        + list(g.biases)
    )


def test_vector_field_ep_symmetric_equals_ep():
    model = eqp.VectorFieldMLP((6, 5, 4, 3), key=KEY, feedback_angle=0.0)
    assert max(model.feedback_angles()) < 1e-4
    kw = dict(beta=jnp.asarray(1e-3), variant="centered", free_steps=300, nudged_steps=300)
    _, g_vf, _ = _run(eqp.VectorFieldEP(**kw), model, X, Y)
    _, g_ep, _ = _run(eqp.EquilibriumProp(**kw), model, X, Y)
    _, exact, _ = _run(RBP, model, X, Y)
    # Symmetric feedback: step descends the energy, so both estimate the gradient with a
    # centered O(β²) = 1e-6 bias (measured 3e-7 apart).
    assert eqp.gradient_alignment(_tied(g_vf), _tied(g_ep)).overall.rel_error < 1e-5
    # Per parameter (W_ff and B separately) vector-field EP is the true gradient itself.
    assert eqp.gradient_alignment(g_vf, exact).overall.rel_error < 1e-5


def test_vector_field_ep_angle_grows_with_asymmetry():
    angles = []
    est = eqp.VectorFieldEP(
        beta=jnp.asarray(1e-3), variant="centered", free_steps=300, nudged_steps=300
    )
    for tilt in (0.0, 45.0, 90.0):
        model = eqp.VectorFieldMLP((6, 5, 4, 3), key=KEY, feedback_angle=tilt)
        np.testing.assert_allclose(model.feedback_angles(), tilt, atol=1e-4)
        _, g, _ = _run(est, model, X, Y)
        _, exact, _ = _run(RBP, model, X, Y)
        angles.append(eqp.gradient_alignment(g, exact).overall.angle)
    # ν = −dL/dθ iff ∂μ/∂s is symmetric: 0° when it is (up to O(β²)), growing with the
    # tilt of the feedback weights (measured 0.00°, 29°, 124° for this net).
    assert angles[0] < 0.01
    assert angles[0] < angles[1] < angles[2]


def test_vector_field_ep_needs_vector_field():
    with pytest.raises(TypeError, match="vector_field"):
        eqp.VectorFieldEP(beta=0.1)(_hopfield(), X, Y)
    with pytest.raises(ValueError, match="beta"):
        eqp.VectorFieldEP(beta=0.0)


# -- Convolutional EP ------------------------------------------------------------------


def _tiny_conv(update="sync", cost="mse", activation="sigmoid4"):
    # 1x6x6 input, 3x3 convs 2-3 (padding 1) with 2x2 max-pool: 2x3x3, 3x1x1, fc 3→4.
    return eqp.ConvHopfield(
        (1, 6, 6),
        (2, 3),
        3,
        4,
        paddings=1,
        pools=2,
        activation=activation,
        cost=cost,
        update=update,
        key=jax.random.PRNGKey(3),
    )


XC = jax.random.uniform(jax.random.PRNGKey(4), (2, 1, 6, 6))
YC = jnp.array([1, 3])


def test_conv_step_is_pooled_conv_up_and_transpose_down():
    model = _tiny_conv()
    x, y, beta = XC[0], YC[0], 0.3
    keys = jax.random.split(KEY, 3)
    s = tuple(jax.random.uniform(k, sh) for k, sh in zip(keys, model.layer_shapes, strict=True))
    rho = eqp.models.activations.sigmoid4

    @jax.jit
    def by_hand_and_step(s):
        # Layer 1: bottom-up pooled conv of x, plus the top-down term written as the
        # transpose of the dense Jacobian of s_1 ↦ P(W_2 ⋆ s_1 + b_2) applied to s_2.
        def pooled(below, i):
            conv = _conv(below, model.conv_weights[i], 1)
            return _max_pool(conv + model.conv_biases[i][:, None, None], 2)

        jac = jax.jacfwd(lambda s1: pooled(s1, 1))(s[0]).reshape(s[1].size, s[0].size)
        down1 = (jac.T @ s[1].reshape(-1)).reshape(s[0].shape)
        # Layer 2: up from layer 1, down from the output through fc.
        down2 = (model.fc_weight.T @ s[2]).reshape(s[1].shape)
        # Output: fc of layer 2, nudged by −β ∂C/∂s_out = −β (s_out − onehot(y)).
        out = model.fc_weight @ s[1].reshape(-1) + model.fc_bias
        nudge = beta * (s[2] - jax.nn.one_hot(y, 4))
        hand = (
            rho(pooled(x, 0) + down1),
            rho(pooled(s[0], 1) + down2),
            rho(out - nudge),
        )
        return hand, model.step(s, x, y, beta)

    hand, stepped = by_hand_and_step(s)
    for a, b in zip(hand, stepped, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12)


def test_conv_sync_and_async_share_fixed_points():
    sync, asyn = _tiny_conv("sync"), _tiny_conv("async")
    solver = eqp.Picard(tol=1e-13, max_steps=2000)
    relax = eqx.filter_jit(lambda m: m.relax(XC[0], YC[0], 0.2, solver=solver))
    a, b = relax(sync), relax(asyn)
    assert int(a.result) == 0 and int(b.result) == 0
    for u, v in zip(a.value, b.value, strict=True):
        np.testing.assert_allclose(u, v, atol=1e-10)
    # Async relaxation is a block coordinate update: it needs fewer steps.
    assert int(b.stats.steps) <= int(a.stats.steps)


@pytest.mark.parametrize("cost", ["mse", "ce"])
def test_conv_centered_ep_matches_recurrent_backprop(cost):
    model = _tiny_conv(cost=cost)
    _, exact, _ = _run(RBP, model, XC, YC)
    errs = []
    betas = (1e-2, 1e-3) if cost == "mse" else (1e-3,)
    for beta in betas:
        est = eqp.EquilibriumProp(
            beta=jnp.asarray(beta), variant="centered", free_steps=200, nudged_steps=200
        )
        _, g, _ = _run(est, model, XC, YC)
        errs.append(eqp.gradient_alignment(g, exact).overall.rel_error)
    # Centered EP's bias is O(β²): 100x smaller for 10x smaller β (the error floor of
    # the 200-step relaxations is far lower); at β = 1e-3 it is ~1e-6.
    if len(errs) == 2:
        assert errs[1] < 0.05 * errs[0]
    assert errs[-1] < 1e-4


def test_conv_paper_shapes():
    # Shapes only (eval_shape): no need to draw 4.7M random weights in a unit test.
    def shapes(make):
        return jax.eval_shape(lambda k: make(key=k), KEY)

    ernoult = shapes(eqp.ConvHopfield.ernoult2019)
    assert ernoult.layer_shapes == ((64, 12, 12), (32, 4, 4), (10,))
    assert [w.shape for w in ernoult.conv_weights] == [(64, 1, 5, 5), (32, 64, 5, 5)]
    dchn = shapes(lambda key: eqp.ConvHopfield.dchn(key=key, dtype=jnp.float32))
    assert dchn.layer_shapes == ((128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2), (10,))
    assert dchn.fc_weight.shape == (10, 2048) and dchn.fc_weight.dtype == jnp.float32
    assert dchn.update == "async" and dchn.activation == "clip_half"
    ce = shapes(lambda key: eqp.ConvHopfield.dchn(key=key, cost="ce"))
    assert ce.layer_shapes[-1] == (512, 2, 2)


# -- bad input -------------------------------------------------------------------------


def test_conv_bad_input():
    model = _tiny_conv()
    est = eqp.EquilibriumProp(beta=0.1, free_steps=5, nudged_steps=2)
    with pytest.raises(ValueError, match="shape"):
        est(model, jnp.zeros((2, 1, 5, 6)), YC)
    with pytest.raises(ValueError, match="shape"):
        model.init_state(jnp.zeros((1, 6, 7)))
    with pytest.raises(ValueError, match="out of range"):
        est(model, XC, jnp.array([0, 4]))
    with pytest.raises(ValueError, match="NaN"):
        est(model, XC.at[0, 0, 0, 0].set(jnp.nan), YC)
    with pytest.raises(ValueError, match="too small"):
        eqp.ConvHopfield((1, 4, 4), (2, 2), 3, 4, pools=2, key=KEY)
    with pytest.raises(ValueError, match="activation"):
        eqp.ConvHopfield((1, 6, 6), (2,), 3, 4, activation="relu6", key=KEY)


def test_vector_field_bad_input():
    model = eqp.VectorFieldMLP((6, 5, 3), key=KEY)
    est = eqp.VectorFieldEP(beta=0.1, free_steps=5, nudged_steps=2)
    with pytest.raises(ValueError, match="n_in"):
        est(model, jnp.zeros((3, 7)), Y)
    with pytest.raises(ValueError, match="out of range"):
        est(model, X, jnp.array([0, 1, 3]))
    with pytest.raises(ValueError, match="feedback_angle"):
        eqp.VectorFieldMLP((6, 5, 3), key=KEY, feedback_angle=200.0)
