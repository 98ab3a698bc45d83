"""ConvHopfield's hand-written relaxation field against autodiff of its energy.

`ConvHopfield.step` writes ∂(Φ - βC)/∂s out as forward convolutions (flipped kernel or
per-tap products for the transposed convolution, argmax unpooling) for speed on
XLA:CPU; `_autodiff_step` is the same update with `jax.grad`. They must agree to
rounding, ties in the max-pool included, and so must everything built on them
(relaxations, BPTT gradients). float64 is on (conftest); float32 cases say so.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqprop_jax as eqp
from eqprop_jax.models._conv import conv2d
from eqprop_jax.models.base import AbstractEnergyModel
from eqprop_jax.models.conv_hopfield import (
    _autodiff_step,
    _conv_hwc,
    _conv_transpose_hwc,
    _down_kernel,
    _flips,
    _pool_argmax,
    _unpool,
)

KEY = jax.random.PRNGKey(0)

# (in_shape, channels, kernel, padding, pools): the transposed convolution by a flipped
# kernel ('same' 3x3) and by per-tap products ('valid' 5x5 and 3x3), pooling that drops
# a trailing row (a 5x5 map pooled 2x2) and no pooling.
CONFIGS = {
    "same3x3": ((2, 8, 8), (3, 4), 3, 1, 2),
    "valid5x5": ((1, 16, 16), (3, 4), 5, 0, 2),
    "odd-pool": ((1, 9, 9), (2, 3), 3, 1, (2, 1)),
    "valid3x3-nopool": ((1, 7, 7), (2, 3), 3, 0, 1),
}


def _model(name, update="sync", cost="mse", dtype=jnp.float64, activation="hard_sigmoid"):
    in_shape, channels, k, pad, pools = CONFIGS[name]
    return eqp.ConvHopfield(
        in_shape,
        channels,
        k,
        4,
        paddings=pad,
        pools=pools,
        activation=activation,
        cost=cost,
        update=update,
        dtype=dtype,
        key=KEY,
    )


def _states(model, key, dtype):
    # Uniform on [-0.5, 1.5] clipped to [0, 1]: a quarter of the units sit exactly at
    # 0 and at 1, so pooled windows hold ties; one layer is all zeros (every window of
    # the conv above it is a tie, resolved by the first position).
    keys = jax.random.split(key, len(model.layer_shapes))
    s = [
        jnp.clip(jax.random.uniform(k, sh, dtype, -0.5, 1.5), 0, 1)
        for k, sh in zip(keys, model.layer_shapes, strict=True)
    ]
    s[0] = jnp.zeros_like(s[0])
    return tuple(s)


def _x(model, dtype):
    x = jax.random.uniform(jax.random.PRNGKey(5), model.in_shape, dtype)
    return x.at[:, : model.in_shape[1] // 2].set(0.0)  # a blank half, as in MNIST


@pytest.mark.parametrize(
    "name,update,cost",
    [
        ("same3x3", "async", "ce"),
        ("valid5x5", "sync", "mse"),
        ("odd-pool", "async", "mse"),
        ("valid3x3-nopool", "sync", "ce"),
    ],
)
def test_step_equals_autodiff_field_float64(name, update, cost):
    model = _model(name, update, cost)
    x, y = _x(model, jnp.float64), 2
    by_hand = jax.jit(lambda s, x: model.step(s, x, y, 0.3))
    ref = jax.jit(lambda s, x: _autodiff_step(model, s, x, y, 0.3))
    for k in range(2):
        s = _states(model, jax.random.PRNGKey(10 + k), jnp.float64)
        for a, b in zip(by_hand(s, x), ref(s, x), strict=True):
            assert a.shape == b.shape
            # Only the summation order differs: float64 rounding.
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


def test_step_equals_autodiff_field_float32_with_identity_activation():
    # Identity activation exposes the raw field (no clipping hides a difference); the
    # per-tap transposed convolution sums in an order of its own.
    model = _model("valid5x5", "async", "ce", jnp.float32, activation="identity")
    x = _x(model, jnp.float32)
    s = _states(model, jax.random.PRNGKey(3), jnp.float32)
    by_hand = jax.jit(lambda s, x: model.step(s, x, 1, 0.5))(s, x)
    ref = jax.jit(lambda s, x: _autodiff_step(model, s, x, 1, 0.5))(s, x)
    for a, b in zip(by_hand, ref, strict=True):
        # Sums of a few hundred float32 products of O(1): rounding ~1e-6 relative to
        # the field's scale.
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize(
    "in_hw,k,pad", [((6, 6), 3, 1), ((7, 5), 5, 0), ((6, 6), 3, 0), ((5, 5), 3, 3)]
)
def test_transposed_conv_is_the_input_vjp(in_hw, k, pad):
    kx, kw, kg = jax.random.split(KEY, 3)
    x = jax.random.normal(kx, (*in_hw, 3))
    w = jax.random.normal(kw, (k, k, 3, 4))
    out, vjp = jax.vjp(lambda x: _conv_hwc(x, w, pad), x)
    g = jax.random.normal(kg, out.shape)
    flips = _flips((k, k), pad, in_hw, out.shape[:2])
    # 'same' convs take the flipped kernel; shrinking ones and padding > k-1 the taps.
    assert flips == (in_hw == (6, 6) and pad == 1)
    got = _conv_transpose_hwc(g, _down_kernel(w, flips), pad, in_hw, flips)
    np.testing.assert_allclose(got, vjp(g)[0], rtol=1e-12, atol=1e-12)


def test_unpool_is_the_pool_vjp_with_first_index_ties():
    a = jnp.array(np.random.default_rng(0).integers(0, 2, (5, 7, 3)), jnp.float64)
    pooled, idx = _pool_argmax(a, 2)
    g = jax.random.normal(KEY, pooled.shape)
    ref_pool = jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (2, 2, 1), (2, 2, 1), "VALID")
    np.testing.assert_array_equal(pooled, ref_pool)
    _, vjp = jax.vjp(
        lambda a: jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (2, 2, 1), (2, 2, 1), "VALID"),
        a,
    )
    np.testing.assert_array_equal(_unpool(g, idx, 2, a.shape[:2]), vjp(g)[0])


class _AutodiffConv(eqp.ConvHopfield):
    """The same model relaxed with the autodiff field and the generic relax."""

    def step(self, s, x, y, beta):
        return _autodiff_step(self, s, x, y, beta)

    def relax(self, *args, **kwargs):
        return AbstractEnergyModel.relax(self, *args, **kwargs)


def _autodiff_twin(name, update, cost="mse"):
    in_shape, channels, k, pad, pools = CONFIGS[name]
    return _AutodiffConv(
        in_shape,
        channels,
        k,
        4,
        paddings=pad,
        pools=pools,
        activation="sigmoid4",
        cost=cost,
        update=update,
        key=KEY,
    )


def test_relax_and_bptt_match_the_autodiff_model():
    # Async: the sweep that reuses convolutions between its half-steps.
    fast = _model("odd-pool", "async", activation="sigmoid4")
    ref = _autodiff_twin("odd-pool", "async")
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, *fast.in_shape))
    y = jnp.array([0, 3])
    solver = eqp.Picard(tol=0.0, max_steps=8)
    relax = eqx.filter_jit(
        lambda m: jax.vmap(lambda xi, yi: m.relax(xi, yi, 0.2, solver=solver).value)(x, y)
    )
    for a, b in zip(relax(fast), relax(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    # BPTT differentiates through the hand-written step (argmax held fixed, as
    # autodiff of max-pool does).
    bptt = eqp.BPTT(4)
    _, g_fast, _ = eqx.filter_jit(bptt)(fast, x, y)
    _, g_ref, _ = eqx.filter_jit(bptt)(ref, x, y)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_relaxation_compiles_to_a_loop_whatever_the_step_count():
    model = _model("same3x3", "async", "ce", jnp.float32)
    x = jnp.zeros((2, *model.in_shape), jnp.float32)
    y = jnp.array([0, 1])

    def hlo(steps):
        est = eqp.EquilibriumProp(beta=0.5, free_steps=steps, nudged_steps=steps)
        f = jax.jit(lambda m, x, y: est(m, x, y)[1])
        return f.lower(model, x, y).as_text()

    short, long = hlo(3), hlo(300)
    # The step counts appear only as loop bounds: same program size.
    assert abs(len(short) - len(long)) < 0.01 * len(short)
    assert "while" in short


# -- conv2d: the convolution with hand-picked derivative forms -------------------------


@pytest.mark.parametrize("hw,k,pad", [((6, 5), 3, 1), ((8, 8), 5, 0), ((2, 2), 3, 1)])
def test_conv2d_value_and_derivatives_match_lax(hw, k, pad):
    # ((2, 2), 3, 1): a kernel wider than the map, computed by per-tap products.
    kx, kw, kt = jax.random.split(KEY, 3)
    x = jax.random.normal(kx, (3, *hw, 2))  # a batch of 3
    w = jax.random.normal(kw, (k, k, 2, 4))

    def ref(x, w):
        return jax.lax.conv_general_dilated(
            x[None], w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )[0]

    def loss(conv):
        # Batch mean under vmap, as the estimators call it.
        return lambda x, w: jnp.mean(jnp.sin(jax.vmap(lambda xi: conv(xi, w))(x)))

    mine = lambda x, w: conv2d(x, w, pad)  # noqa: E731
    np.testing.assert_allclose(jax.vmap(mine, (0, None))(x, w), jax.vmap(ref, (0, None))(x, w))
    for a, b in zip(
        jax.grad(loss(mine), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    tx, tw = jax.random.normal(kt, x.shape), jax.random.normal(kt, w.shape)
    np.testing.assert_allclose(
        jax.jvp(loss(mine), (x, w), (tx, tw))[1], jax.jvp(loss(ref), (x, w), (tx, tw))[1]
    )
