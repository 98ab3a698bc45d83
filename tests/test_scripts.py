"""The training scripts on `eqprop_jax.data` and `eqprop_jax.train.fit`: their shared
epoch-by-epoch driver (`scripts/_common.py`) against one `fit` call, and smoke runs of
`ep_mnist_p1h.py`, `drn_mnist.py` and `dtp_mnist.py` on random data at tiny sizes."""

import math

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import load_source

import eqprop_jax as eqp
from eqprop_jax.train import TrainConfig, fit


@pytest.fixture
def common(monkeypatch):
    return load_source("scripts", "_common", monkeypatch)


def _params(model):
    return jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))


def test_fit_by_epoch_follows_the_trajectory_of_one_fit_call(common):
    # One epoch per call, resumed from the checkpoint, with a cosine schedule: the
    # schedule must span all epochs (not restart per call), and every step must see
    # the batch and key of the uninterrupted run.
    data = common.random_images("mnist", 24, 12, shape=(4, 4, 1)).flat()
    model = eqp.HopfieldMLP((16, 6, 10), key=jax.random.PRNGKey(0), weight_scale=0.5)
    est = eqp.EquilibriumProp(0.2, variant="centered", free_steps=5, nudged_steps=3)
    cfg = TrainConfig(
        epochs=3, batch_size=8, lr=(0.2, 0.1), momentum=0.5, schedule="cosine", progress=False
    )
    whole = fit(model, est, data, cfg, log=lambda _: None)
    seen = []
    last, rows = common.fit_by_epoch(
        model,
        est,
        data,
        cfg,
        after_epoch=lambda r: seen.append(r.history[-1]["epoch"]) or {"marker": len(seen)},
        log=lambda _: None,
    )
    assert seen == [1, 2, 3] and [r["marker"] for r in rows] == [1, 2, 3]
    for a, b in zip(_params(last.model), _params(whole.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for r, w in zip(rows, whole.history, strict=True):
        assert math.isclose(r["train_loss"], w["train_loss"], rel_tol=1e-12)
        assert r["test_accuracy"] == w["test_accuracy"]
    # A budget that one epoch overruns: training stops after the first.
    _, short = common.fit_by_epoch(model, est, data, cfg, budget_s=0.0, log=lambda _: None)
    assert [r["epoch"] for r in short] == [1]


def test_angle_deg_of_known_vectors(common):
    assert common.angle_deg({"a": np.array([1.0, 0.0])}, {"a": np.array([0.0, 2.0])}) == 90.0
    assert common.angle_deg(np.array([1.0, 1.0]), np.array([2.0, 2.0])) < 1e-5
    assert abs(common.angle_deg(np.array([1.0, 0.0]), np.array([-1.0, 0.0])) - 180.0) < 1e-5


def test_ep_mnist_p1h_smoke(monkeypatch, tmp_path):
    script = load_source("scripts", "ep_mnist_p1h", monkeypatch)
    out = tmp_path / "ep.md"
    with jax.enable_x64(False):
        results = script.main(
            "--smoke --epochs 2 --hidden 8 --free 4 --nudged 2 --batch 10 --out".split()
            + [str(out)]
        )
    assert set(results) == {"ep", "bptt"}
    for rows in results.values():
        assert [r["epoch"] for r in rows] == [1, 2]
        assert all(np.isfinite(r["train_loss"]) and 0 <= r["test_accuracy"] <= 1 for r in rows)
    text = out.read_text()
    assert "EP (positive β)" in text and "BPTT (last 2 of 4 steps)" in text
    assert text.count("\n| 2 | ") == 2


def test_drn_mnist_smoke(monkeypatch):
    script = load_source("scripts", "drn_mnist", monkeypatch)
    with jax.enable_x64(False):
        rows = script.main("--smoke --epochs 2 --train-size 16 --test-size 8 --hidden 16".split())
    assert [r[0] for r in rows] == [1, 2]
    assert all(np.isfinite(r[2]) for r in rows)
    # The authors' decay, lr · decay^epoch: one stair per epoch of 4 steps.
    tx = script.decayed_sgd(1.0, 0.5, 4)
    state = tx.init(np.zeros(1))
    steps = []
    for _ in range(9):
        u, state = tx.update(np.ones(1), state)
        steps.append(-float(u[0]))
    np.testing.assert_allclose(steps, [1.0] * 4 + [0.5] * 4 + [0.25])


def test_dtp_mnist_smoke(monkeypatch, tmp_path):
    script = load_source("scripts", "dtp_mnist", monkeypatch)
    out = tmp_path / "dtp.md"
    with jax.enable_x64(False):
        rows = script.main(
            "--smoke --arch mlp --epochs 1 --batch 8 --train-size 16 --test-size 8 --fb-steps 1"
            " --out".split()
            + [str(out)]
        )
    assert [(a, m) for a, m, _ in rows] == [("mlp", "ldrl"), ("mlp", "bp")]
    ldrl = rows[0][2][-1]
    assert len(ldrl["weight_angle"]) == 3 and np.isnan(ldrl["weight_angle"][0])
    assert np.all(np.isfinite(ldrl["weight_angle"][1:]))
    text = out.read_text()
    assert "| mlp | ldrl |" in text and "| mlp | bp |" in text
