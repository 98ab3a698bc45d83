"""What every model declares (models/base.py): its base class, `n_outputs`,
`check_input`, `project` and `holomorphic`; and that training relies on these alone."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import eqprop_jax as eqp
from eqprop_jax.estimators import Estimator
from eqprop_jax.models.layered import LayeredNet
from eqprop_jax.train.step import make_train_step

KEY = jax.random.PRNGKey(0)
B = 3

# name -> (builder, base class, one example's input shape, n_outputs)
MODELS = {
    "hopfield": (lambda: eqp.HopfieldMLP((4, 5, 3), key=KEY), eqp.AbstractEnergyModel, (4,), 3),
    "conv": (
        lambda: eqp.ConvHopfield((1, 6, 6), (2,), 3, 4, paddings=1, key=KEY),
        eqp.AbstractEnergyModel,
        (1, 6, 6),
        4,
    ),
    "resistive": (
        lambda: eqp.ResistiveNetwork((4, 3, 2), key=KEY, input_gain=2.0, dtype=jnp.float64),
        eqp.AbstractEnergyModel,
        (4,),
        2,
    ),
    "vector-field": (
        lambda: eqp.VectorFieldMLP((4, 5, 3), key=KEY),
        eqp.AbstractVectorFieldModel,
        (4,),
        3,
    ),
    "layered": (lambda: LayeredNet.mlp([4, 5, 3], key=KEY), eqp.AbstractModel, (4,), 3),
    "fully-connected": (
        lambda: eqp.FullyConnectedHopfield(4, 2, 3, key=KEY),
        eqp.AbstractEnergyModel,
        (4,),
        3,
    ),
}


def _batch(shape, n_out, seed=1):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.uniform(kx, (B, *shape)), jax.random.randint(ky, (B,), 0, n_out)


@pytest.mark.parametrize("name", list(MODELS))
def test_declared_base_class_and_output_count(name):
    build, base, shape, n_out = MODELS[name]
    model = build()
    assert isinstance(model, base)
    assert model.n_outputs == n_out and isinstance(model.n_outputs, int)
    # One name for the output count.
    assert not hasattr(model, "n_out") and not hasattr(model, "num_classes")


@pytest.mark.parametrize("name", list(MODELS))
def test_check_input_names_shape_dtype_nan_and_label_range(name):
    build, _, shape, n_out = MODELS[name]
    model = build()
    x, y = _batch(shape, n_out)
    model.check_input(x, y)
    model.check_input(x)
    model.check_input(x[0], y[0], batched=False)
    model.check_input(x, jax.nn.one_hot(y, n_out))  # float targets
    bad_shape = jnp.zeros((B, *shape[:-1], shape[-1] + 1))
    with pytest.raises(ValueError, match="expected input x of shape"):
        model.check_input(bad_shape, y)
    with pytest.raises(ValueError, match="expected input x of shape"):
        model.check_input(x[0], y)  # one example where a batch is expected
    with pytest.raises(TypeError, match="real floating point"):
        model.check_input(x.astype(jnp.int32), y)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.check_input(x.at[(0,) * x.ndim].set(jnp.inf), y)
    for bad in (n_out, -1):
        with pytest.raises(ValueError, match=f"labels out of range.*{n_out} classes"):
            model.check_input(x, y.at[1].set(bad))
    with pytest.raises(ValueError, match="integer labels y must have shape"):
        model.check_input(x, y[:2])
    with pytest.raises(ValueError, match="float targets y must have shape"):
        model.check_input(x, jax.nn.one_hot(y, n_out + 1))


@pytest.mark.parametrize("name", ["conv", "resistive"])
def test_out_of_range_label_under_jit_raises(name):
    """The traced label check reads `n_outputs`, which ConvHopfield and
    ResistiveNetwork now declare under that one name."""
    build, _, shape, n_out = MODELS[name]
    model = build()
    x, y = _batch(shape, n_out)
    est = eqp.EquilibriumProp(0.1, variant="centered", free_steps=3, nudged_steps=2)
    run = eqx.filter_jit(lambda m, x, y: est(m, x, y)[0])
    assert jnp.isfinite(run(model, x, y))
    for bad in (n_out, -1):
        with pytest.raises(Exception, match="labels out of range"):
            jax.block_until_ready(run(model, x, y.at[1].set(bad)))


def test_holomorphic_is_declared_where_true():
    assert eqp.HopfieldMLP((4, 3), key=KEY, activation="tanh").holomorphic
    assert not eqp.HopfieldMLP((4, 3), key=KEY, activation="hard_sigmoid").holomorphic
    assert not MODELS["conv"][0]().holomorphic  # max-pool has no complex form
    assert not MODELS["resistive"][0]().holomorphic  # diodes clip
    bounded = eqp.ResistiveNetwork((4, 3, 2), key=KEY, diodes=False, output_bounds=(-1.0, 1.0))
    assert not bounded.holomorphic


def test_linear_resistive_network_is_holomorphic():
    """Without diodes the power is a quadratic in the voltages and the sweep a rational
    map of (V, β), so holomorphic EP applies. Its error against recurrent backprop
    falls like (|β|/R)^N, R the analytic radius of β ↦ s^β, here the convexity bound
    λ_min(S) = 0.645 where F stops being convex: (0.645/0.05)² = 166 per two points
    added (measured 2.7e-3, 9.7e-6, 5.2e-8 for N = 2, 4, 6; factors 280 and 186)."""
    model = eqp.ResistiveNetwork(
        (4, 3, 2), key=KEY, diodes=False, input_gain=2.0, bias_gain=0.3, dtype=jnp.float64
    )
    assert model.holomorphic
    x, y = _batch((4,), 2)
    tight = eqp.Picard(tol=1e-13, max_steps=5000)
    rbp = eqp.RecurrentBackprop(adjoint=eqp.Implicit(eqp.BiCGStab(200), tol=1e-13), solver=tight)
    _, g_ref, _ = eqx.filter_jit(rbp)(model, x, y)
    flat = lambda t: jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(t)])
    errs = []
    for n in (2, 4, 6):
        holo = eqp.EquilibriumProp(
            0.05, variant="holomorphic", n_points=n, free_solver=tight, nudged_solver=tight
        )
        _, g, aux = eqx.filter_jit(holo)(model, x, y)
        assert bool(jnp.all(aux["nudged_result"] == eqp.Result.converged))
        errs.append(float(jnp.linalg.norm(flat(g) - flat(g_ref)) / jnp.linalg.norm(flat(g_ref))))
    assert errs[0] / errs[1] > 100 and errs[1] / errs[2] > 100 and errs[2] < 1e-7, errs


class _Descend(Estimator):
    """A constant gradient of +1 on every conductance: SGD drives them below zero."""

    def __call__(self, model, x, y, *, key=None):
        params = eqx.filter(model, eqx.is_inexact_array)
        return jnp.zeros(()), jax.tree_util.tree_map(jnp.ones_like, params), {}


def test_train_step_projects_with_the_declared_method():
    model = MODELS["resistive"][0]()
    assert min(float(jnp.min(a)) for a in jax.tree_util.tree_leaves(model)) > 0
    params = eqx.filter(model, eqx.is_inexact_array)
    tx = optax.sgd(10.0)
    step = make_train_step(_Descend(), tx)
    x, y = _batch((4,), 2)
    counts = jnp.zeros(4, jnp.int32)
    new, _, _, _, flag = step(model, tx.init(params), counts, x, y, KEY)
    assert int(flag) == 0
    leaves = jax.tree_util.tree_leaves(eqx.filter(new, eqx.is_inexact_array))
    assert all(bool(jnp.all(a == 0)) for a in leaves)  # every conductance clipped at 0
