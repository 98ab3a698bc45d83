"""diagnostics.compare_estimators: each estimator's alignment with a reference, as data."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqprop_jax as eqp
from eqprop_jax.diagnostics import compare_estimators, gradient_alignment
from eqprop_jax.models.layered import LayeredNet

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def setup():
    net = LayeredNet.mlp([5, 7, 6, 3], key=KEY)
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x, y = jax.random.normal(kx, (12, 5)), jax.random.randint(ky, (12,), 0, 3)
    return net, x, y


def test_reports_equal_gradient_alignment_computed_by_hand(setup):
    net, x, y = setup
    k = jax.random.PRNGKey(3)
    ests = {
        "dtp": eqp.DTP(beta=0.1, feedback_steps=4),
        "dtp-small-beta": eqp.DTP(variant=eqp.Lee(), beta=1e-3),
    }
    found = compare_estimators(net, ests, x, y, reference=eqp.Backprop(), key=k)
    ref_loss, ref, _ = eqp.Backprop()(net, x, y, key=k)
    assert found.reference_loss == pytest.approx(float(ref_loss), rel=1e-12)
    for name, est in ests.items():
        # By hand: what a training step does (pre_step, then the estimate).
        m = est.pre_step(net, x, y, key=k)
        loss, g, _ = est(m, x, y, key=k)
        want = gradient_alignment(g, ref)
        got = found.reports[name]
        assert set(got.per_leaf) == set(want.per_leaf) and found.losses[name] == float(loss)
        for leaf in want.per_leaf:
            for field in ("cosine", "angle", "rel_error"):
                a, b = getattr(got.per_leaf[leaf], field), getattr(want.per_leaf[leaf], field)
                assert a == pytest.approx(b, rel=1e-9, abs=1e-12, nan_ok=True), (leaf, field)
        assert got.overall.angle == pytest.approx(want.overall.angle, rel=1e-9, abs=1e-12)
    # The top layer's DTP update is backprop's exactly (t_N − s_N = −β∇L).
    top = found.reports["dtp"].per_leaf[".forward[2].weight"]
    assert top.angle < 1e-4 and top.rel_error < 1e-9
    # A gradient passed as the reference gives the same reports.
    again = compare_estimators(net, ests, x, y, reference=found.reference_grads, key=k)
    assert again.reference_loss is None
    assert again.reports["dtp"].overall.angle == found.reports["dtp"].overall.angle
    assert "dtp-small-beta" in found.table() and "angle" in found.table()
    data = found.as_dict()
    assert set(data) == set(ests) and data["dtp"]["time_s"] == found.seconds["dtp"]
    assert data["dtp"]["overall"]["angle"] == found.reports["dtp"].overall.angle
    leaf = ".forward[0].weight"
    want = found.reports["dtp"].per_leaf[leaf].rel_error
    assert data["dtp"]["per_leaf"][leaf]["rel_error"] == want


def test_nonfinite_reference_and_non_estimators_are_refused(setup):
    net, x, y = setup
    bad = jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), eqx.filter(net, eqx.is_array))
    with pytest.raises(ValueError, match="reference gradient has NaN"):
        compare_estimators(net, {"dtp": eqp.DTP()}, x, y, reference=bad)
    with pytest.raises(TypeError, match="'f' is not an Estimator"):
        compare_estimators(net, {"f": lambda *a: None}, x, y, reference=eqp.Backprop())
    assert np.isfinite(compare_estimators(net, {}, x, y, reference=eqp.Backprop()).reference_loss)
