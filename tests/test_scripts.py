"""The training scripts on `eqprop_jax.data` and `eqprop_jax.train.fit`: their shared
epoch-by-epoch driver (`scripts/_common.py`) against one `fit` call, and smoke runs of
`ep_mnist_p1h.py`, `drn_mnist.py` and `dtp_mnist.py` on random data at tiny sizes."""

import json
import math
import os
from pathlib import Path

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
    # Below float32's arccos resolution (~0.02°): 1e-5 rad = 5.73e-4°, from float32 inputs.
    tiny = common.angle_deg(np.array([1.0, 1e-5], np.float32), np.array([1.0, 0.0], np.float32))
    assert math.isclose(tiny, np.degrees(1e-5), rel_tol=1e-3)
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
    out, root = tmp_path / "dtp.md", tmp_path / "runs"
    argv = (
        "--smoke --arch mlp --epochs 1 --batch 8 --train-size 16 --test-size 8 --fb-steps 1"
        f" --out-root {root} --out {out}"
    ).split()
    with jax.enable_x64(False):
        folders = script.main(argv)
    assert [f.name for f in folders] == ["mnist-mlp-ldrl", "mnist-mlp-bp"]
    for folder in folders:
        assert {"metrics.jsonl", "curves.png", "angles.jsonl", "angles.png", "checkpoint.npz"} <= {
            p.name for p in folder.iterdir()
        }
        rows = [json.loads(line) for line in (folder / "angles.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1]  # before training, after epoch 1
        for r in rows:
            for key in ("update_to_bp", "update_to_gn", "gn_to_bp"):
                a = np.asarray(r[key], float)
                assert a.shape == (3,) and np.all(np.isfinite(a)), (key, a)
                assert np.all((a >= 0) & (a <= 180)), (key, a)
    ldrl = [json.loads(line) for line in (folders[0] / "angles.jsonl").read_text().splitlines()]
    # Layer 1 has no feedback weight; G_2, G_3 are compared with W_2ᵀ, W_3ᵀ.
    assert ldrl[-1]["weight_to_transpose"][0] is None
    w = np.asarray(ldrl[-1]["weight_to_transpose"][1:], float)
    assert np.all(np.isfinite(w)) and np.all((w >= 0) & (w <= 180))
    # The top layer's DTP update is backprop's gradient, at any β.
    assert ldrl[-1]["update_to_bp"][-1] < 1e-2 and ldrl[-1]["small_beta_to_bp"][-1] < 1e-2
    text = out.read_text()
    assert "| mnist | mlp | ldrl | 1/1 |" in text and "| mnist | mlp | bp | 1/1 |" in text
    # A finished run is not redone; without --resume an existing run is refused.
    with jax.enable_x64(False):
        script.main(argv + ["--resume", "--method", "ldrl"])
        with pytest.raises(SystemExit, match="--resume"):
            script.main(argv + ["--method", "bp"])


def test_dtp_mnist_resumes_without_a_second_warm_up(monkeypatch, tmp_path):
    script = load_source("scripts", "dtp_mnist", monkeypatch)
    argv = (
        "--smoke --arch mlp --method ldrl --epochs 2 --batch 8 --train-size 16 --test-size 8"
        f" --fb-steps 1 --out-root {tmp_path}"
    ).split()
    plot = script.plot_angles

    def killed_after_epoch_1(rows, path, title=""):
        plot(rows, path, title)
        if rows[-1]["epoch"] == 1:
            raise KeyboardInterrupt  # after epoch 1's checkpoint and angles

    monkeypatch.setattr(script, "plot_angles", killed_after_epoch_1)
    with jax.enable_x64(False), pytest.raises(KeyboardInterrupt):
        script.main(argv)
    monkeypatch.setattr(script, "plot_angles", plot)
    # As if killed between the checkpoint of epoch 1 and its angles row: the resumed run
    # measures the checkpointed model again, and finds the same angles.
    angles = tmp_path / "mnist-mlp-ldrl" / "angles.jsonl"
    lines = angles.read_text().splitlines()
    angles.write_text(lines[0] + "\n")

    def no_warm_up(*_, **__):
        raise AssertionError("the feedback warm-up ran again on resume")

    monkeypatch.setattr(script, "warm_up_feedback", no_warm_up)
    with jax.enable_x64(False):
        with pytest.raises(SystemExit, match="other settings"):
            script.main(argv[:-2] + ["--lr", "0.01", "--resume"] + argv[-2:])
        (folder,) = script.main(argv + ["--resume"])
    read = lambda name: [json.loads(s) for s in (folder / name).read_text().splitlines()]
    rows = read("angles.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    before = json.loads(lines[1])
    assert rows[1].keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, list):  # per-layer angles (None: layer 1 has no feedback)
            value = [np.nan if v is None else v for v in value]
            got = [np.nan if v is None else v for v in rows[1][key]]
            np.testing.assert_allclose(got, value, atol=1e-3, err_msg=key)
        else:
            assert rows[1][key] == pytest.approx(value, abs=1e-5), key
    assert [r["epoch"] for r in read("metrics.jsonl")] == [1, 2]


MNIST = Path(os.environ.get("EQPROP_DATA", "/work/shared/data")) / "mnist"


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST IDX files not found at {MNIST}")
def test_cep_vf_curves_smoke(monkeypatch, tmp_path):
    """Two C-EP steps on MNIST and the angle rows: finite, in [0, 180], none NaN (the
    float32 reference once asked for a 1e-8 adjoint tolerance and returned NaN)."""
    script = load_source("scripts", "cep_vf_curves", monkeypatch)
    argv = (
        "--method cep --epochs 1 --max-steps-per-epoch 2 --angle-batches 2 --T 5 --K 2"
        f" --out {tmp_path}"
    ).split()
    with jax.enable_x64(False):
        script.main(argv)
    rows = [json.loads(line) for line in (tmp_path / "angles.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert r["angle_nonfinite"] == 0 and 0 <= r["angle_median"] <= 180

    # --eta-scan on the run's checkpoint: C-EP → EP as η → 0, and the deviation is O(η)
    # (the weights move by O(η) during the nudged phase).
    with jax.enable_x64(False):
        script.main(argv + ["--eta-scan", "1", "0.1", "0.01"])
    scan = json.loads((tmp_path / "eta_scan.json").read_text())
    assert "epoch 1" in scan["net"]
    to_ep = {r["scale"]: r["to_ep_median"] for r in scan["rows"]}
    assert to_ep[1.0] > 1.0
    assert to_ep[0.1] < 0.2 * to_ep[1.0] and to_ep[0.01] < 0.2 * to_ep[0.1]
