"""Training loop: optimiser settings, projection, exact resume, NaN stop, sharding."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqprop_jax.data import epoch_order, load_digits
from eqprop_jax.estimators import EquilibriumProp, Estimator
from eqprop_jax.models.hopfield import HopfieldMLP
from eqprop_jax.train import (
    Interrupted,
    NonFiniteLoss,
    TrainConfig,
    fit,
    layer_indices,
    load_checkpoint,
    make_optimizer,
    model_fingerprint,
    read_info,
)

REPO = Path(__file__).resolve().parent.parent


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


class Clipped(eqx.Module):
    """A linear classifier whose weights must stay >= 0, with non-trainable fields."""

    w: jax.Array
    seen: jax.Array  # int counter, updated by the estimator's pre_step
    scale: float = eqx.field(static=True, default=1.0)

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


def test_signal_mid_epoch_then_resume_matches_uninterrupted(digits, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.3, schedule="cosine", max_steps_per_epoch=3)
    ref = fit(small_net(), SMALL_EP, digits, cfg, out_dir=tmp_path / "a", log=lambda s: None)

    def log(line):
        if line.startswith("epoch   1/"):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while epoch 2 starts

    with pytest.raises(Interrupted, match="SIGTERM.*`resume=True`") as e:
        fit(small_net(), SMALL_EP, digits, cfg, out_dir=tmp_path / "b", log=log)
    assert e.value.signum == signal.SIGTERM
    info = read_info(tmp_path / "b" / "checkpoint.npz")
    assert (info["epoch"], info["position"], info["step"]) == (1, 1, 4)
    res = fit(
        small_net(), SMALL_EP, digits, cfg, out_dir=tmp_path / "b", resume=True, log=lambda s: None
    )
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


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


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
