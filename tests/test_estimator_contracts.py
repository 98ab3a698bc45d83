"""What every estimator promises: statuses in `aux`, NaN never hidden, settings and
labels checked (issue 11). Tiny models, one compile per estimator."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_batch

import eqprop_jax as eqp
from eqprop_jax import Result
from eqprop_jax.estimators import ResistiveEP, phase_results
from eqprop_jax.models.layered import LayeredNet
from eqprop_jax.models.resistive import ResistiveNetwork
from eqprop_jax.presets import Backprop

KEY = jax.random.PRNGKey(0)
B = 3


def _hopfield(**kw):
    # identity activation: unbounded states, so huge weights really overflow
    kw.setdefault("activation", "identity")
    return eqp.HopfieldMLP((4, 5, 3), key=KEY, weight_scale=0.5, **kw)


def _conv():
    return eqp.ConvHopfield((1, 6, 6), (2,), 3, 4, paddings=1, pools=2, key=KEY)


def _resistive():
    # max_negative_nudge() = 0.46: centered EP at β = 0.2 stays convex
    return ResistiveNetwork((4, 3, 2), key=KEY, input_gain=2.0, dtype=jnp.float64)


def _data(x_shape, n_out, seed=1):
    return random_batch(x_shape, n_out, B, seed)


SHORT = dict(free_steps=8, nudged_steps=4)

# name -> (estimator, model builder, input shape, number of nudged phases or None)
CASES = {
    "bptt": (lambda: eqp.BPTT(steps=6), _hopfield, (4,), None),
    "rbp": (lambda: eqp.RecurrentBackprop(), _hopfield, (4,), None),
    "ep-positive": (lambda: eqp.EquilibriumProp(0.1, **SHORT), _hopfield, (4,), 1),
    "ep-negative": (
        lambda: eqp.EquilibriumProp(0.1, variant="negative", **SHORT),
        _hopfield,
        (4,),
        1,
    ),
    "ep-holomorphic": (
        lambda: eqp.EquilibriumProp(0.1, variant="holomorphic", n_points=4, **SHORT),
        _hopfield,
        (4,),
        3,
    ),
    "ep-conv": (
        lambda: eqp.EquilibriumProp(0.1, variant="centered", **SHORT),
        _conv,
        (1, 6, 6),
        2,
    ),
    "continual-ep": (lambda: eqp.ContinualEP(0.1, 0.01, **SHORT), _hopfield, (4,), 1),
    "contrastive-hebbian": (
        lambda: eqp.ContrastiveHebbian(free_steps=8, clamped_steps=4),
        _hopfield,
        (4,),
        1,
    ),
    "vector-field-ep": (
        lambda: eqp.VectorFieldEP(0.1, variant="centered", **SHORT),
        lambda: eqp.VectorFieldMLP((4, 5, 3), key=KEY),
        (4,),
        2,
    ),
    "resistive-ep": (lambda: ResistiveEP(0.2, free_steps=3, nudged_steps=3), _resistive, (4,), 2),
    "dtp": (lambda: eqp.DTP(), lambda: LayeredNet.mlp([4, 5, 3], key=KEY), (4,), None),
    "backprop": (lambda: Backprop(), lambda: LayeredNet.mlp([4, 5, 3], key=KEY), (4,), None),
}
NO_SOLVE = ("dtp", "backprop")


_COMPILED = {}


def _setup(name):
    """The estimator, model, a batch and `run(model, x, y)` under `jax.jit` (cached)."""
    make_est, make_model, x_shape, n_nudged = CASES[name]
    est, model = make_est(), make_model()
    x, y = _data(x_shape, model.n_outputs)
    if name not in _COMPILED:
        params, static = eqx.partition(model, eqx.is_array)

        @jax.jit
        def run(params, x, y):
            loss, grads, aux = est(eqx.combine(params, static), x, y)
            return loss, grads, eqx.filter(aux, eqx.is_array), phase_results(aux)

        _COMPILED[name] = lambda m, x, y: run(eqx.filter(m, eqx.is_array), x, y)
    return est, model, x, y, n_nudged, _COMPILED[name]


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(tree))


def _all_nan(tree):
    return all(bool(jnp.all(jnp.isnan(a))) for a in jax.tree_util.tree_leaves(tree))


def _poison_first_weight(model):
    def first(m):
        if isinstance(m, LayeredNet):
            return m.forward[0].weight
        if isinstance(m, eqp.ConvHopfield):
            return m.conv_weights[0]
        return m.weights[0]

    return eqx.tree_at(first, model, first(model).at[(0,) * first(model).ndim].set(jnp.nan))


# -- statuses ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_every_phase_status_reaches_aux_and_labels_are_checked_under_jit(name):
    est, model, x, y, n_nudged, run = _setup(name)
    loss, grads, aux, results = run(model, x, y)
    assert jnp.isfinite(loss) and _all_finite(grads)
    if name in NO_SOLVE:
        assert results.shape == (0, 0)
    else:
        assert results.shape == (B, 1 + (n_nudged or 0)) and results.dtype == jnp.int32
        assert aux["result"].shape == (B,) and aux["stats"].steps.shape == (B,)
        assert jnp.array_equal(results[:, 0], aux["result"])
        if n_nudged is None:
            assert "nudged_result" not in aux
        else:
            assert aux["nudged_result"].shape == (B, n_nudged)
            assert aux["nudged_stats"].steps.shape == (B, n_nudged)
            assert aux["nudged_stats"].residual.shape == (B, n_nudged)
            assert jnp.array_equal(results[:, 1:], aux["nudged_result"])
        # the default phases run a fixed number of steps (RBP's solve has a tolerance)
        want = Result.converged if name == "rbp" else Result.max_steps
        if name == "contrastive-hebbian":
            # One hidden layer between clamped ends: a step lands exactly on the clamped
            # equilibrium s₁ = W₀x + W₁ᵀt + b₁, so even a tol = 0 phase sees residual 0.
            want = jnp.array([Result.max_steps, Result.converged])
        assert bool(jnp.all(results == want)), results
    # labels are checked against model.n_outputs: at run time under jit, else at once
    for bad in (model.n_outputs, -1):
        y_bad = y.at[1].set(bad)
        with pytest.raises(Exception, match="labels out of range"):
            jax.block_until_ready(run(model, x, y_bad))
        with pytest.raises(ValueError, match="labels out of range"):
            est(model, x, y_bad)
        with pytest.raises(ValueError, match="labels out of range"):  # concrete under jit
            eqx.filter_jit(lambda m, y_bad=y_bad: est(m, x, y_bad))(model)


def test_statuses_are_per_phase_and_in_order():
    # A converging free phase and nudged phases cut off at 2 steps: the columns differ.
    model, (x, y) = _hopfield(), _data((4,), 3)
    est = eqp.EquilibriumProp(
        0.1,
        variant="centered",
        free_solver=eqp.Picard(tol=1e-10, max_steps=2000),
        nudged_solver=eqp.Picard(tol=1e-10, max_steps=2),
    )
    _, _, aux = eqx.filter_jit(est)(model, x, y)
    results = phase_results(aux)
    assert results.shape == (B, 3)
    assert bool(jnp.all(results[:, 0] == Result.converged))
    assert bool(jnp.all(results[:, 1:] == Result.max_steps))
    assert bool(jnp.all(aux["nudged_stats"].steps == 2))
    assert bool(jnp.all(aux["stats"].steps > 2))


# -- NaN is never hidden ------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_nan_model_or_input_gives_nan_or_an_error(name):
    _, model, x, y, _, run = _setup(name)
    cases = {
        "weight": (_poison_first_weight(model), x),
        "input": (model, x.at[(0,) * x.ndim].set(jnp.nan)),
    }
    for what, (m, xx) in cases.items():
        try:
            loss, grads, _, results = jax.block_until_ready(run(m, xx, y))
        except Exception as e:  # a run-time check that names the problem is fine too
            assert "NaN" in str(e), (what, e)
            continue
        assert jnp.isnan(loss), (what, loss)
        if name in NO_SOLVE:
            assert not _all_finite(grads), what
        else:
            assert _all_nan(grads), what
            assert bool(jnp.any(results == Result.nonfinite)), (what, results)


@pytest.mark.parametrize("name", ["bptt", "rbp", "ep-positive", "ep-holomorphic", "continual-ep"])
def test_blown_up_state_gives_nan_or_says_diverged(name):
    _, model, x, y, _, run = _setup(name)

    def scaled(c):
        return eqx.tree_at(lambda m: m.weights, model, tuple(c * w for w in model.weights))

    # Finite weights and input, but so large that the second step overflows.
    loss, grads, _, results = run(scaled(1e300), x, y)
    assert jnp.isnan(loss) and _all_nan(grads)
    assert bool(jnp.any(results == Result.nonfinite))
    # Growing ~1e100-fold per step: a `fixed_point` phase stops as `diverged` before
    # it overflows (its last finite state is returned); a fixed unrolled phase runs on
    # into NaN. Either way no phase passes for a valid one.
    loss, grads, _, results = run(scaled(1e100), x, y)
    assert bool(jnp.all((results == Result.diverged) | (results == Result.nonfinite))), results
    if name != "bptt":
        assert bool(jnp.all(results[:, 0] == Result.diverged))


def test_nan_model_used_to_give_loss_half_and_zero_gradient():
    # The case of issue 11: sigmoid4 states start at 0; one NaN weight.
    model = eqp.HopfieldMLP((4, 5, 3), key=KEY)
    bad = eqx.tree_at(lambda m: m.weights[0], model, model.weights[0].at[0, 0].set(jnp.nan))
    x, y = _data((4,), 3)
    loss, grads, aux = eqx.filter_jit(eqp.EquilibriumProp())(bad, x, y)
    assert jnp.isnan(loss) and _all_nan(grads)
    assert bool(jnp.all(aux["result"] == Result.nonfinite))


# -- settings -------------------------------------------------------------------------

BETA_ESTIMATORS = {
    "EquilibriumProp": eqp.EquilibriumProp,
    "ContinualEP": eqp.ContinualEP,
    "VectorFieldEP": eqp.VectorFieldEP,
    "ResistiveEP": ResistiveEP,
    "DTP": lambda beta, **kw: eqp.DTP(beta=beta, **kw),
}


@pytest.mark.parametrize("who", list(BETA_ESTIMATORS))
def test_beta_and_steps_validated_when_built(who):
    make = BETA_ESTIMATORS[who]
    bad = [0.0, float("inf"), -float("inf"), float("nan")]
    if who != "DTP":  # DTP's β is a static Python float
        bad.append(jnp.asarray(jnp.nan))
        with pytest.raises(ValueError, match="scalar"):
            make(jnp.ones(2))
    for beta in bad:
        with pytest.raises(ValueError, match=f"{who}: `beta` must be finite"):
            make(beta)
    if who in ("ResistiveEP", "DTP"):
        with pytest.raises(ValueError, match="> 0"):
            make(-0.5)
    else:
        make(-0.5)  # a negative nudge is allowed where the estimator divides by it
        with pytest.raises(TypeError, match="real"):
            make(0.1 + 0.1j)
    steps = {"DTP": ("feedback_steps", (-1, 1.5, True, (1, -1)))}.get(
        who, ("free_steps", (0, -3, 2.5, True, None))
    )
    for bad in steps[1]:
        with pytest.raises(ValueError, match=f"{who}: `{steps[0]}` must be"):
            make(0.5, **{steps[0]: bad})
    if who != "DTP":
        with pytest.raises(ValueError, match="nudged_steps"):
            make(0.5, nudged_steps=0)


def test_bptt_steps_validated():
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="BPTT: `steps`"):
            eqp.BPTT(steps=bad)
    with pytest.raises(ValueError, match="truncate"):
        eqp.BPTT(steps=5, truncate=2.0)


def test_traced_beta_is_checked_at_run_time():
    model, (x, y) = _hopfield(), _data((4,), 3)

    @jax.jit
    def loss(beta):
        return eqp.EquilibriumProp(beta, free_steps=4, nudged_steps=2)(model, x, y)[0]

    assert jnp.isfinite(loss(0.1))
    for bad in (0.0, jnp.inf, jnp.nan):
        with pytest.raises(Exception, match="`beta` must be finite and nonzero"):
            jax.block_until_ready(loss(bad))


# -- Continual EP with per-layer learning rates ----------------------------------------


def _rates(model, **by_leaf):
    """A learning-rate pytree with the trainable structure: 0.02 except `by_leaf`."""
    lr = jax.tree_util.tree_map(
        lambda _: jnp.asarray(0.02), eqx.filter(model, eqx.is_inexact_array)
    )
    for path, value in by_leaf.items():
        field, i = path.split("_")
        lr = eqx.tree_at(lambda t, f=field, i=int(i): getattr(t, f)[i], lr, jnp.asarray(value))
    return lr


def _reference_cep(model, x, y, beta, lr, steps):
    """C-EP written out step by step, with the rate of each leaf named explicitly."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    s = jax.vmap(lambda xi, yi: model.relax(xi, yi, 0.0, solver=eqp.Picard(tol=0.0, max_steps=8)))(
        x, y
    ).value

    def d_f(p, s, b):
        return jax.grad(
            lambda p: jnp.mean(
                jax.vmap(lambda si, xi, yi: eqx.combine(p, static).total_energy(si, xi, yi, b))(
                    s, x, y
                )
            )
        )(p)

    total, b_prev = None, 0.0
    for _ in range(steps):
        m = eqx.combine(params, static)
        s_new = jax.vmap(lambda si, xi, yi, m=m: m.step(si, xi, yi, beta))(s, x, y)
        g = jax.tree_util.tree_map(
            lambda a, c: (a - c) / beta, d_f(params, s_new, beta), d_f(params, s, b_prev)
        )
        params = eqx.tree_at(
            lambda p: (p.weights[0], p.weights[1], p.biases[0], p.biases[1]),
            params,
            (
                params.weights[0] - lr["weights_0"] * g.weights[0],
                params.weights[1] - lr["weights_1"] * g.weights[1],
                params.biases[0] - lr["biases_0"] * g.biases[0],
                params.biases[1] - lr["biases_1"] * g.biases[1],
            ),
        )
        total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
        s, b_prev = s_new, beta
    return total, params


def test_continual_ep_per_layer_learning_rates():
    model, (x, y) = _hopfield(activation="sigmoid4"), _data((4,), 3)
    named = {"weights_0": 0.05, "weights_1": 0.003, "biases_0": 0.01, "biases_1": 0.2}
    lr = _rates(model, **named)
    run = eqx.filter_jit(lambda est, m: est(m, x, y))
    theta0 = eqx.filter(model, eqx.is_inexact_array)

    # K = 1: the weights move once, after the estimate, so the per-layer result is the
    # scalar-rate one with each layer's step rescaled by its own rate.
    _, g_scalar, aux_scalar = run(
        eqp.ContinualEP(0.1, jnp.asarray(0.02), **SHORT | {"nudged_steps": 1}), model
    )
    _, g_layer, aux_layer = run(eqp.ContinualEP(0.1, lr, **SHORT | {"nudged_steps": 1}), model)
    assert eqp.gradient_alignment(g_layer, g_scalar).overall.rel_error < 1e-14
    step_scalar = jax.tree_util.tree_map(
        jnp.subtract, theta0, eqx.filter(aux_scalar["model"], eqx.is_inexact_array)
    )
    want = jax.tree_util.tree_map(lambda t, d, eta: t - d * eta / 0.02, theta0, step_scalar, lr)
    got = eqx.filter(aux_layer["model"], eqx.is_inexact_array)
    assert eqp.gradient_alignment(got, want).overall.rel_error < 1e-13
    # a swapped assignment would not pass: the rates differ by up to 70x between leaves
    assert not np.allclose(got.weights[0], theta0.weights[0] - 0.003 * g_scalar.weights[0])

    # K = 3: the moving weights feed back into the states; against the written-out rule.
    _, grads, aux = run(eqp.ContinualEP(0.1, lr, **SHORT | {"nudged_steps": 3}), model)
    ref_grads, ref_params = eqx.filter_jit(_reference_cep)(model, x, y, 0.1, named, 3)
    assert eqp.gradient_alignment(grads, ref_grads).overall.rel_error < 1e-12
    got = eqx.filter(aux["model"], eqx.is_inexact_array)
    assert eqp.gradient_alignment(got, ref_params).overall.rel_error < 1e-13

    # a prefix pytree: one rate for every weight matrix
    prefix = eqx.tree_at(lambda t: t.weights, _rates(model), jnp.asarray(0.05))
    full = _rates(model, weights_0=0.05, weights_1=0.05)
    _, g_prefix, _ = run(eqp.ContinualEP(0.1, prefix, **SHORT | {"nudged_steps": 3}), model)
    _, g_full, _ = run(eqp.ContinualEP(0.1, full, **SHORT | {"nudged_steps": 3}), model)
    assert eqp.gradient_alignment(g_prefix, g_full).overall.rel_error == 0.0

    with pytest.raises(ValueError, match="structure of the model's trainable"):
        eqp.ContinualEP(0.1, {"w": 0.1, "b": 0.2})(model, x, y)
    with pytest.raises(ValueError, match="finite and positive"):
        eqp.ContinualEP(0.1, _rates(model, biases_1=-0.1))
    with pytest.raises(ValueError, match="finite and positive"):
        eqp.ContinualEP(0.1, float("inf"))
