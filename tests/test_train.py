"""Training loop: optimiser settings, projection, exact resume, NaN stop, sharding."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import subprocess_env as _env

from eqprop_jax.data import epoch_order, load_digits
from eqprop_jax.estimators import EquilibriumProp, Estimator
from eqprop_jax.models.base import AbstractModel
from eqprop_jax.models.hopfield import HopfieldMLP
from eqprop_jax.models.layered import LayeredNet
from eqprop_jax.train import (
    Checkpointer,
    CheckpointError,
    Collapsed,
    Interrupted,
    NonFiniteLoss,
    NonFiniteWarning,
    OptimizerSettings,
    OutputError,
    TrainConfig,
    TrainingError,
    TrainingWarning,
    fit,
    layer_indices,
    load_checkpoint,
    make_optimizer,
    model_fingerprint,
    read_info,
    save_checkpoint,
)

KEY0 = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def digits():
    d = load_digits(seed=0).flat()
    return d.subset(train=96, test=40)


def small_net(seed=0, **kw):
    return HopfieldMLP((64, 12, 10), key=jax.random.PRNGKey(seed), weight_scale=0.5, **kw)


SMALL_EP = EquilibriumProp(beta=0.2, variant="centered", free_steps=6, nudged_steps=3)


def params_of(model):
    return eqx.filter(model, eqx.is_inexact_array)


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# -- optimiser --------------------------------------------------------------------------


def test_layer_indices_and_per_layer_rates():
    m = HopfieldMLP((6, 5, 3), key=jax.random.PRNGKey(0), cost="ce")
    p = params_of(m)
    idx = layer_indices(p)
    assert idx.weights == (0,) and idx.biases == (0,) and idx.readout == (1, 1)
    tx = make_optimizer(p, lr=(0.1, 0.01))
    g = jax.tree_util.tree_map(jnp.ones_like, p)
    updates, _ = tx.update(g, tx.init(p), p)
    # Plain SGD: update = -lr_layer * g, leaf by leaf.
    np.testing.assert_allclose(updates.weights[0], -0.1)
    np.testing.assert_allclose(updates.biases[0], -0.1)
    np.testing.assert_allclose(updates.readout[0], -0.01)
    np.testing.assert_allclose(updates.readout[1], -0.01)
    with pytest.raises(ValueError, match=r"3 per-layer learning rates.*2 layers.*readout"):
        make_optimizer(p, lr=(0.1, 0.01, 0.2))
    tx = make_optimizer(p, lr={r"\.readout": 0.5, "*": 0.2}, frozen=r"\.biases")
    updates, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(updates.weights[0], -0.2)
    np.testing.assert_allclose(updates.readout[0], -0.5)
    np.testing.assert_allclose(updates.biases[0], 0.0)


def test_readout_layers_are_declared_by_the_model_not_guessed():
    # HopfieldMLP declares `readout_fields = ("readout",)`; a module that declares
    # nothing has no readout, whatever its fields are called.
    assert HopfieldMLP.readout_fields == ("readout",)
    w = jnp.ones((2, 2))

    class Net(eqx.Module):
        weights: tuple
        readout: tuple
        head: jax.Array

    idx = layer_indices(Net((w, w, w), (w, w), w))
    assert idx.weights == (0, 1, 2) and idx.readout == (0, 1)
    assert idx.head == 3  # no index: after the last indexed layer


def test_frozen_takes_a_regex_or_a_mask_function():
    p = {"a": jnp.ones(3), "b": jnp.ones(2)}
    g = jax.tree_util.tree_map(jnp.ones_like, p)
    for frozen in (r"\['b'\]", lambda q: {"a": False, "b": True}):
        tx = make_optimizer(p, lr=0.5, frozen=frozen)
        u, _ = tx.update(g, tx.init(p), p)
        np.testing.assert_array_equal(u["a"], -0.5)
        np.testing.assert_array_equal(u["b"], 0.0)
    with pytest.raises(ValueError, match="regular expression or a function"):
        make_optimizer(p, lr=0.5, frozen=3)


def test_weight_decay_and_cosine_schedule():
    p = {"w": jnp.array([1.0, -2.0, 3.0])}
    g = {"w": jnp.array([0.5, 0.5, -1.0])}
    lr, wd, total = 0.1, 0.01, 4
    tx = make_optimizer(p, lr=lr, weight_decay=wd, schedule="cosine", total_steps=total)
    state = tx.init(p)
    for t in range(3):
        u, state = tx.update(g, state, p)
        # SGD with L2 decay: u = -η_t (g + λ p), η_t = η ½(1 + cos(π t / T)).
        eta = lr * 0.5 * (1 + np.cos(np.pi * t / total))
        np.testing.assert_allclose(u["w"], -eta * (g["w"] + wd * p["w"]), rtol=1e-6)
        p = optax.apply_updates(p, u)


# -- loop -------------------------------------------------------------------------------


class Clipped(AbstractModel):
    """A linear classifier whose weights must stay >= 0, with non-trainable fields."""

    w: jax.Array
    seen: jax.Array  # int counter, updated by the estimator's pre_step
    scale: float = eqx.field(static=True, default=1.0)

    @property
    def n_outputs(self):
        return self.w.shape[0]

    def __call__(self, x):
        return self.scale * (self.w @ x)

    def project(self):
        return eqx.tree_at(lambda m: m.w, self, jnp.maximum(self.w, 0.0))


class CountingCE(Estimator):
    def pre_step(self, model, x, y, *, key=None):
        return eqx.tree_at(lambda m: m.seen, model, model.seen + len(x))

    def __call__(self, model, x, y, *, key=None):
        def loss_fn(m):
            logp = jax.nn.log_softmax(jax.vmap(m)(x))
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        return loss, grads, {}


def test_projection_nontrainable_fields_and_metrics(digits, tmp_path):
    model = Clipped(jnp.full((10, 64), 0.01), jnp.array(0, jnp.int32))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.5, max_steps_per_epoch=3)
    res = fit(model, CountingCE(), digits, cfg, out_dir=tmp_path, log=lambda s: None)
    w = np.asarray(res.model.w)
    # Cross-entropy pushes the wrong classes' weights down: without projection many would
    # be negative; projected SGD keeps every conductance-like weight >= 0.
    assert w.min() == 0.0 and (w == 0).sum() > 0 and w.max() > 0.01
    assert int(res.model.seen) == 2 * 3 * 16
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 6
    assert 0.0 <= rows[-1]["test_accuracy"] <= 1.0
    assert res.summary.startswith("done: 2 epochs, 6 steps")


def test_signal_mid_epoch_then_resume_matches_uninterrupted(digits, tmp_path, caplog):
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.3, schedule="cosine", max_steps_per_epoch=3)
    caplog.set_level("WARNING")
    with jax.log_compiles(True):
        ref = fit(small_net(), SMALL_EP, digits, cfg, out_dir=tmp_path / "a", log=lambda s: None)

    def log(line):
        if line.startswith("epoch   1/"):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while epoch 2 starts

    with pytest.raises(Interrupted, match="SIGTERM.*`resume=True`") as e:
        fit(small_net(), SMALL_EP, digits, cfg, out_dir=tmp_path / "b", log=log)
    assert e.value.signum == signal.SIGTERM
    info = read_info(tmp_path / "b" / "checkpoint.npz")
    assert (info["epoch"], info["position"], info["step"]) == (1, 1, 4)
    with jax.log_compiles(True):
        res = fit(
            small_net(),
            SMALL_EP,
            digits,
            cfg,
            out_dir=tmp_path / "b",
            resume=True,
            log=lambda s: None,
        )
    # Equal settings, one compiled step for the three runs (no optimiser cache needed).
    compiles = [r for r in caplog.records if "Compiling jit(_train_step)" in r.getMessage()]
    assert len(compiles) <= 1
    assert_trees_equal(params_of(res.model), params_of(ref.model))
    assert_trees_equal(res.opt_state, ref.opt_state)
    assert res.history == [
        {
            **r,
            "train_time_s": res.history[i]["train_time_s"],
            "epoch_time_s": res.history[i]["epoch_time_s"],
        }
        for i, r in enumerate(ref.history)
    ]


def test_signal_during_evaluation_stops_then_resume_matches(digits, tmp_path, monkeypatch):
    import importlib

    ev = importlib.import_module("eqprop_jax.train.evaluate")  # the package exports a function
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.3, max_steps_per_epoch=3, eval_batch_size=8)
    ref = fit(small_net(), SMALL_EP, digits, cfg, out_dir=tmp_path / "a", log=lambda s: None)
    inner, calls = ev._eval_batch, []

    def signalled(*args):
        calls.append(1)
        if len(calls) == 2:  # in epoch 1's evaluation, of 40 / 8 = 5 batches
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(*args)

    n_eval = len(digits.x_test) // 8
    monkeypatch.setattr(ev, "_eval_batch", signalled)
    with pytest.raises(Interrupted, match="SIGTERM during the evaluation at epoch 1, step 3"):
        fit(small_net(), SMALL_EP, digits, cfg, out_dir=tmp_path / "b", log=lambda s: None)
    # Stopped after the batch the signal arrived in, not after the whole pass.
    assert len(calls) == 2 < n_eval
    info = read_info(tmp_path / "b" / "checkpoint.npz")
    assert (info["epoch"], info["position"], info["step"]) == (0, 3, 3)
    monkeypatch.setattr(ev, "_eval_batch", inner)
    res = fit(
        small_net(), SMALL_EP, digits, cfg, out_dir=tmp_path / "b", resume=True, log=lambda s: None
    )
    assert_trees_equal(params_of(res.model), params_of(ref.model))
    timing = ("train_time_s", "epoch_time_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(res.history) == strip(ref.history)


class Poisoned(Estimator):
    """EP whose loss turns NaN on batches holding an input value above 1.5."""

    inner: Estimator

    def __call__(self, model, x, y, *, key=None):
        loss, grads, aux = self.inner(model, x, y, key=key)
        return jnp.where(jnp.any(x > 1.5), jnp.nan, loss), grads, aux


def test_nan_loss_stops_and_keeps_last_good_checkpoint(digits, tmp_path):
    import dataclasses

    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.3, max_steps_per_epoch=2)
    n = len(digits.x_train)
    data_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0)
    used1 = set(epoch_order(data_key, 0, n)[:16].tolist())
    bad = next(i for i in epoch_order(data_key, 1, n)[:16].tolist() if i not in used1)
    x = digits.x_train.copy()
    x[bad, 0] = 2.0
    data = dataclasses.replace(digits, x_train=x)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss.*epoch 2.*last good checkpoint"):
        fit(small_net(), Poisoned(SMALL_EP), data, cfg, out_dir=tmp_path, log=lambda s: None)
    ckpt = tmp_path / "checkpoint.npz"
    assert read_info(ckpt)["epoch"] == 1
    template = (small_net(), None)
    (model, _), _ = load_checkpoint(ckpt, template, fingerprint=model_fingerprint(small_net())[0])
    assert all(
        np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(params_of(model))
    )
    # The stopped run's last good state is the state after epoch 1 of a clean run.
    clean = fit(
        small_net(), SMALL_EP, digits, dataclasses.replace(cfg, epochs=1), log=lambda s: None
    )
    assert_trees_equal(params_of(model), params_of(clean.model))


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, equinox as eqx
    jax.config.update("jax_enable_x64", True)
    from eqprop_jax.models.hopfield import HopfieldMLP
    from eqprop_jax.estimators import EquilibriumProp
    from eqprop_jax.data import epoch_order, load_digits
    from eqprop_jax.train import TrainConfig, fit, batch_mesh, replicate, shard_batch
    assert jax.device_count() == 8, jax.devices()
    d = load_digits().flat().subset(train=64, test=24)
    model = HopfieldMLP((64, 12, 10), key=jax.random.PRNGKey(0), weight_scale=0.5)
    est = EquilibriumProp(beta=0.2, variant="centered", free_steps=6, nudged_steps=3)
    x, y = jnp.asarray(d.x_train[:16]), jnp.asarray(d.y_train[:16])
    f = eqx.filter_jit(lambda m, x, y: est(m, x, y)[:2])
    one = jax.devices()[0]
    l1, g1 = f(jax.device_put(model, one), jax.device_put(x, one), jax.device_put(y, one))
    mesh = batch_mesh()
    xs, ys = shard_batch((x, y), mesh)
    assert len(xs.sharding.device_set) == 8
    l8, g8 = f(replicate(model, mesh), xs, ys)
    np.testing.assert_allclose(l8, l1, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g8), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    # One sharded training step through `fit` = one SGD step with the one-device gradient.
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.3, max_steps_per_epoch=1, eval_batch_size=8)
    r8 = fit(model, est, d, cfg, log=lambda s: None)
    order = epoch_order(jax.random.fold_in(jax.random.PRNGKey(0), 0), 0, 64)
    xb, yb = jnp.asarray(d.x_train[order[:16]]), jnp.asarray(d.y_train[order[:16]])
    _, gb = f(model, xb, yb)
    p0 = eqx.filter(model, eqx.is_inexact_array)
    want = jax.tree_util.tree_map(lambda p, g: p - 0.3 * g, p0, gb)
    got = eqx.filter(r8.model, eqx.is_inexact_array)
    assert len(got.weights[0].sharding.device_set) == 8
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    print("SHARDED-OK", float(l1), float(l8))
    """
)


def test_sharded_over_8_host_devices_matches_one_device():
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED-OK" in out.stdout


def _cli(out_dir, *extra):
    # Tiny epochs so that the run lasts a few seconds after compilation.
    return [
        sys.executable,
        "-m",
        "eqprop_jax.cli",
        "train",
        "--out",
        str(out_dir),
        "--epochs",
        "60",
        "--max-steps-per-epoch",
        "2",
        "--train-limit",
        "200",
        "--eval-limit",
        "16",
        "--no-progress",
        *extra,
    ]


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "__meta__"}


def test_kill_9_then_resume_gives_the_uninterrupted_parameters(tmp_path):
    # A persistent compilation cache lets the second and third processes skip compiling.
    env = _env(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    ref = subprocess.run(
        _cli(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.Popen(
        _cli(tmp_path / "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = tmp_path / "run" / "checkpoint.npz"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, no final checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_info(ckpt)["epoch"]
    assert 1 <= killed_at < 60
    res = subprocess.run(
        _cli(tmp_path / "run", "--resume"), env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {ckpt}: epoch {killed_at}" in res.stdout
    final, reference = _arrays(ckpt), _arrays(tmp_path / "ref" / "checkpoint.npz")
    assert final.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(final[k], reference[k])
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == list(range(1, 61))


def test_fingerprint_ignores_where_a_function_field_lives_in_memory():
    # An activation is a static field printed as "<function f at 0x...>": a new process
    # (a resumed run) has the same function at another address, so two distinct but
    # identically named functions must give one fingerprint; a different function or
    # a different shape must not.
    def make(name):
        def act(x):
            return jnp.tanh(x)

        act.__qualname__ = name
        return act

    build = lambda act, sizes=(4, 5, 3): LayeredNet.mlp(sizes, key=KEY0, activation=act)
    a, b = make("act"), make("act")
    assert a is not b
    assert model_fingerprint(build(a))[0] == model_fingerprint(build(b))[0]
    assert model_fingerprint(build(a))[0] != model_fingerprint(build(make("other")))[0]
    assert model_fingerprint(build(a))[0] != model_fingerprint(build(a, (4, 6, 3)))[0]


# -- nothing bad kept ---------------------------------------------------------------------


def _blow_up_at(step):
    """SGD whose update turns infinite from step `step` on (counting from 0)."""
    return optax.chain(
        optax.sgd(0.3), optax.scale_by_schedule(lambda n: jnp.where(n >= step, jnp.inf, 1.0))
    )


def test_nonfinite_update_is_refused_and_never_saved(digits, tmp_path):
    # The loss and gradients of step 3 are finite; only the updated parameters are not.
    # The update is refused, the run stops, and the checkpoint of epoch 2 stays.
    cfg = TrainConfig(epochs=4, batch_size=16, max_steps_per_epoch=1)
    with pytest.raises(NonFiniteLoss, match=r"update that makes the parameters.*epoch 3, step 3"):
        fit(small_net(), SMALL_EP, digits, cfg, optimizer=_blow_up_at(2), out_dir=tmp_path, log=str)
    ckpt = tmp_path / "checkpoint.npz"
    assert read_info(ckpt)["epoch"] == 2
    template = (small_net(), _blow_up_at(2).init(params_of(small_net())))
    (model, _), _ = load_checkpoint(ckpt, template)
    # The kept state is exactly that of a clean two-epoch run with the same optimiser.
    clean = fit(small_net(), SMALL_EP, digits, dataclasses.replace(cfg, epochs=2),
                optimizer=optax.sgd(0.3), log=str)  # fmt: skip
    assert_trees_equal(params_of(model), params_of(clean.model))
    # The message names the checkpoint left behind.
    with pytest.raises(NonFiniteLoss, match="no checkpoint was written"):
        fit(small_net(), SMALL_EP, digits, cfg, optimizer=_blow_up_at(0), out_dir=tmp_path / "b",
            log=str)  # fmt: skip
    assert not (tmp_path / "b" / "checkpoint.npz").exists()


def test_optax_transformation_matches_the_same_settings(digits):
    cfg = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2)
    a = fit(small_net(), SMALL_EP, digits, dataclasses.replace(cfg, lr=0.3), log=str)
    b = fit(small_net(), SMALL_EP, digits, cfg, optimizer=optax.sgd(0.3), log=str)
    assert_trees_equal(params_of(a.model), params_of(b.model))
    with pytest.raises(ValueError, match="either as `optimizer` or as TrainConfig.*lr"):
        fit(small_net(), SMALL_EP, digits, dataclasses.replace(cfg, lr=0.3),
            optimizer=optax.sgd(0.3), log=str)  # fmt: skip
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        fit(small_net(), SMALL_EP, digits, cfg, optimizer="adam", log=str)


def test_optimizer_settings_are_values():
    # Equal settings are equal and hash alike: a jitted step keyed on them compiles once
    # for a repeated or resumed run, with no module-level cache.
    a = TrainConfig(lr=[0.1, 0.05], schedule="cosine", epochs=3).optimizer_settings(4)
    b = TrainConfig(lr=(0.1, 0.05), schedule="cosine", epochs=3).optimizer_settings(4)
    assert a == b and hash(a) == hash(b) and a.total_steps == 12
    m = TrainConfig(lr={r"\.readout": 0.5, "*": 0.2}).optimizer_settings(4)
    assert m.lr == ((r"\.readout", 0.5), ("*", 0.2))
    p = params_of(HopfieldMLP((6, 5, 3), key=jax.random.PRNGKey(0), cost="ce"))
    g = jax.tree_util.tree_map(jnp.ones_like, p)
    tx = m(p)
    u, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(u.readout[0], -0.5)
    np.testing.assert_allclose(u.weights[0], -0.2)
    import eqprop_jax.train.loop as loop

    assert not [k for k in vars(loop) if "CACHE" in k.upper() and not k.startswith("__")]
    assert isinstance(a, OptimizerSettings)


class Linear(AbstractModel):
    w: jax.Array
    b: jax.Array
    seen: jax.Array

    @property
    def n_outputs(self):
        return self.w.shape[0]

    def __call__(self, x):
        return self.w @ x + self.b


class Sabotaged(Estimator):
    """Cross-entropy, until step `after`: then a huge push towards class 0."""

    after: int = eqx.field(static=True)

    def pre_step(self, model, x, y, *, key=None):
        return eqx.tree_at(lambda m: m.seen, model, model.seen + 1)

    def __call__(self, model, x, y, *, key=None):
        def loss_fn(m):
            logp = jax.nn.log_softmax(jax.vmap(m)(x))
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

        loss, g = eqx.filter_value_and_grad(loss_fn)(model)
        push = jnp.where(model.seen > self.after, -1e3, 0.0) * (jnp.arange(10) == 0)
        return loss, eqx.tree_at(lambda m: m.b, g, g.b + push), {}


def test_accuracy_collapse_to_chance_stops_the_run(tmp_path):
    data = load_digits(seed=0).flat().subset(train=96, test=200)
    model = Linear(jnp.zeros((10, 64)), jnp.zeros(10), jnp.array(0))
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.5)
    lines = []
    with pytest.raises(Collapsed, match=r"collapsed to chance at epoch 2.*\(epoch 1\) is kept"):
        fit(model, Sabotaged(6), data, cfg, out_dir=tmp_path, log=lines.append)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Epoch 1 clearly above chance (10% ± 2.1%), epoch 2 at it; the checkpoint is epoch 1's.
    assert rows[0]["test_accuracy"] > 0.3 and rows[1]["test_accuracy"] < 0.15
    assert read_info(tmp_path / "checkpoint.npz")["epoch"] == 1
    # A run that never leaves chance is not stopped, but warned about.
    with pytest.warns(TrainingWarning, match="stayed at chance level"):
        fit(model, Sabotaged(0), data, dataclasses.replace(cfg, epochs=2), log=str)


class Statused(Estimator):
    """Cross-entropy, reporting a free and a nudged phase with known statuses: the free
    phase of example i ends with status y_i mod 4, the nudged one converges."""

    def __call__(self, model, x, y, *, key=None):
        loss, grads, _ = CountingCE()(model, x, y)
        return loss, grads, {"result": y % 4, "nudged_result": jnp.zeros_like(y)}


def test_phase_statuses_per_epoch_in_metrics_and_a_warning_per_epoch(digits, tmp_path):
    model = Clipped(jnp.full((10, 64), 0.01), jnp.array(0, jnp.int32))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, max_steps_per_epoch=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, Statused(), digits, cfg, out_dir=tmp_path, log=str)
    nonfinite = [w for w in caught if issubclass(w.category, NonFiniteWarning)]
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    data_key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    for epoch, row in enumerate(rows):
        labels = digits.y_train[epoch_order(data_key, epoch, len(digits.y_train))[:48]]
        free = np.bincount(labels % 4, minlength=4)
        want = (free + np.array([48, 0, 0, 0])) / 96  # + the nudged phases, all converged
        got = [row[f"phase_{k}"] for k in ("converged", "max_steps", "diverged", "nonfinite")]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
        assert f"epoch {epoch + 1}: " in str(nonfinite[epoch].message)
    # One warning per epoch, each epoch had examples with label 3 mod 4.
    assert len(nonfinite) == 2
    # A real estimator: EP's free phase statuses are counted, fractions add up to one.
    res = fit(small_net(), SMALL_EP, digits, cfg, log=str)
    for row in res.history:
        assert sum(row[f"phase_{k}"] for k in ("converged", "max_steps", "diverged",
                                                "nonfinite")) == pytest.approx(1.0)  # fmt: skip


@pytest.mark.filterwarnings("ignore::eqprop_jax.train.NonFiniteWarning")
def test_curves_png_beside_the_metrics(digits, tmp_path):
    model = Clipped(jnp.full((10, 64), 0.01), jnp.array(0, jnp.int32))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, max_steps_per_epoch=2)
    fit(model, Statused(), digits, cfg, out_dir=tmp_path, log=str)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = np.frombuffer(png[16:24], ">u4")
    assert width >= 600 and height >= 200


def test_second_run_into_a_locked_folder_is_refused(digits, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=1)
    model = Clipped(jnp.full((10, 64), 0.01), jnp.array(0, jnp.int32))
    with Checkpointer(tmp_path):  # another live run holds the folder
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match=rf"another run \(process {os.getpid()}\)"):
            fit(model, CountingCE(), digits, cfg, out_dir=tmp_path, log=str)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    fit(model, CountingCE(), digits, cfg, out_dir=tmp_path, log=str)  # released: fine


@pytest.mark.parametrize("where", ["/proc/eqprop-x", "file/below", "/dev/null"])
def test_unusable_output_folder_is_refused(digits, tmp_path, where):
    (tmp_path / "file").write_text("")
    out = tmp_path / where if not where.startswith("/") else Path(where)
    cfg = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=1)
    model = Clipped(jnp.full((10, 64), 0.01), jnp.array(0, jnp.int32))
    with pytest.raises(OutputError, match="output folder"):
        fit(model, CountingCE(), digits, cfg, out_dir=out, log=str)


def _checkpoint(tmp_path):
    state = {"w": jnp.arange(200.0).reshape(20, 10), "n": jnp.array(3)}
    save_checkpoint(tmp_path / "c.npz", state, {"epoch": 1})
    return tmp_path / "c.npz", state


def test_corrupt_or_nonfinite_checkpoints_are_refused_with_the_file_named(tmp_path):
    path, state = _checkpoint(tmp_path)
    raw = path.read_bytes()
    restored, _ = load_checkpoint(path, state)
    assert_trees_equal(restored, state)
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=f"{path}.*corrupt or truncated"):
        load_checkpoint(path, state)
    # Flipped bytes inside the array data: the zip CRC catches them.
    flipped = bytearray(raw)
    start = raw.index(np.asarray(state["w"]).tobytes()[:16])
    flipped[start + 100] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt"):
        load_checkpoint(path, state)
    # A state holding NaN is never written, and a file holding one is never loaded.
    bad = {"w": state["w"].at[3, 4].set(jnp.nan), "n": state["n"]}
    with pytest.raises(CheckpointError, match=r"refusing to write.*\['w'\].*NaN"):
        save_checkpoint(tmp_path / "d.npz", bad, {"epoch": 1})
    assert not (tmp_path / "d.npz").exists()
    _, good = _checkpoint(tmp_path)
    meta = json.dumps({"format": "eqprop_jax-checkpoint-1", "n_arrays": 2, "epoch": 1})
    np.savez(path, __meta__=np.frombuffer(meta.encode(), np.uint8), a0=np.asarray(3),
             a1=np.asarray(bad["w"]))  # fmt: skip
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_checkpoint(path, {"n": state["n"], "w": state["w"]})


def test_resume_from_a_corrupt_checkpoint_names_it(digits, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=16, max_steps_per_epoch=1)
    model = Clipped(jnp.full((10, 64), 0.01), jnp.array(0, jnp.int32))
    fit(model, CountingCE(), digits, dataclasses.replace(cfg, epochs=1), out_dir=tmp_path, log=str)
    ckpt = tmp_path / "checkpoint.npz"
    ckpt.write_bytes(ckpt.read_bytes()[:-30])
    with pytest.raises(CheckpointError, match=f"{ckpt}"):
        fit(model, CountingCE(), digits, cfg, out_dir=tmp_path, resume=True, log=str)
    with pytest.raises(TrainingError, match="cannot be read.*corrupt.*Nothing was overwritten"):
        fit(model, CountingCE(), digits, cfg, out_dir=tmp_path, log=str)


def test_bad_settings_and_inputs_are_refused_before_training(digits):
    for kw, msg in [
        (dict(lr=-0.5), r"TrainConfig.lr must be a finite number > 0"),
        (dict(lr=float("nan")), r"TrainConfig.lr must be a finite"),
        (dict(lr=(0.1, float("inf"))), r"TrainConfig.lr\[1\]"),
        (dict(lr={"(": 0.1}), "not a regular expression"),
        (dict(eval_limit=0), "eval_limit.*nothing would be evaluated"),
        (dict(momentum=1.5), "momentum must lie in"),
        (dict(optimizer="sdg"), "unknown TrainConfig.optimizer 'sdg'"),
        (dict(seed=-1), "seed must be an integer"),
        (dict(warmup_epochs=20, epochs=3), "warmup_epochs"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**kw)
    cfg = TrainConfig(epochs=1, batch_size=16)
    nan_net = eqx.tree_at(
        lambda m: m.weights[0], small_net(), small_net().weights[0].at[0].set(jnp.nan)
    )
    with pytest.raises(ValueError, match=r"\.weights\[0\] holds NaN"):
        fit(nan_net, SMALL_EP, digits, cfg, log=str)
    with pytest.raises(TypeError, match="model must be an eqprop_jax model.*AbstractModel"):
        fit(eqx.nn.Linear(64, 10, key=jax.random.PRNGKey(0)), SMALL_EP, digits, cfg, log=str)
    with pytest.raises(TypeError, match="must be an eqprop_jax.data.Dataset"):
        fit(small_net(), SMALL_EP, (digits.x_train, digits.y_train), cfg, log=str)
    with pytest.raises(ValueError, match="larger than the 96 training examples"):
        fit(small_net(), SMALL_EP, digits, TrainConfig(batch_size=500), log=str)
    wide = dataclasses.replace(digits, num_classes=12)
    with pytest.raises(ValueError, match="12 classes but the model has 10 outputs"):
        fit(small_net(), SMALL_EP, wide, cfg, log=str)


def test_progress_bar_on_a_terminal_and_timed_lines_elsewhere(monkeypatch):
    import io

    from eqprop_jax.train.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock = iter(range(0, 1000, 7))  # seconds: 0, 7, 14, ...
    monkeypatch.setattr("eqprop_jax.train.progress.time.perf_counter", lambda: next(clock))
    tty, log, off = Tty(), io.StringIO(), io.StringIO()
    bars = [Progress(30, "ep", stream=s, enabled=e) for s, e in ((tty, None), (log, None))]
    bars.append(Progress(30, "ep", stream=off, enabled=False))
    for _ in range(30):
        for b in bars:
            b.update(loss=0.5)
    for b in bars:
        b.close()
    # Each bar read the clock once per update after its own start at 0, 7, 14 s.
    assert tty.getvalue().count("\r") >= 30 and "30/30" in tty.getvalue()
    lines = log.getvalue().splitlines()
    # A line once the loop had run a minute, then at most one a minute: the log bar
    # saw 7 s x 3 per update (three bars share the clock), 630 s in all.
    assert 8 <= len(lines) <= 11 and all(ln.startswith("ep [") and "it/s" in ln for ln in lines)
    assert "\r" not in log.getvalue() and off.getvalue() == ""
    # Resumed at item 20: the rate counts the items of this session only.
    clock = iter(range(0, 1000, 10))
    resumed = io.StringIO()
    bar = Progress(30, "ep", stream=resumed, initial=20, log_interval=60)
    for _ in range(10):
        bar.update()
    assert resumed.getvalue().splitlines() == ["ep [#####################---] 26/30  0.1 it/s"]
