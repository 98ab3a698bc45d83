"""Smoke test of scripts/deq_mnist.py on random 8x8 data (JFB, SHINE, warm start, and the
optimistix and jaxopt runs; float32)."""

import importlib.util
import json

import jax
import numpy as np
import pytest
from helpers import load_source


@pytest.fixture
def float32():
    # The script trains in float32 (as on real data); the suite's conftest turns x64 on.
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", True)


def test_deq_mnist_smoke(tmp_path, float32, monkeypatch):
    script = load_source("scripts", "deq_mnist", monkeypatch)
    rows = script.main(["--smoke", "--datasets", "mnist", "--backwards", "jfb", "shine",
                        "--jac-weights", "1.0", "--out", str(tmp_path)])
    for name in ("table.md", "results.json", "iterations.png", "angles.png", "accuracy.png",
                 "time_to_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    by_label = {r["label"]: r for r in rows}
    peers = [lib for lib in ("optimistix", "jaxopt") if importlib.util.find_spec(lib)]
    assert {r["library"] for r in rows} == {"eqprop_jax", *peers}
    assert {"jfb +JR", "shine [Broyden fwd] +JR", "implicit +JR +warm"} <= set(by_label)
    jfb = by_label["jfb +JR"]
    # JFB is not the implicit gradient: its angle to it is positive, and below 90°
    # on this contractive cell (Fung et al.'s descent condition).
    assert 0 < jfb["angle_median"] < 90
    assert jfb["history"]["reg"][0] > 0  # the Jacobian penalty is in the loss
    assert jfb["step_ms_cpu"] > 0  # the interleaved step timing
    shine = by_label["shine [Broyden fwd] +JR"]
    # SHINE's estimate, checked at relative residual 0.1 and corrected by BiCGStab to
    # tol = 1e-4 where it fails, solves (I - Jᵀ) u = g to within 0.1 relative; on
    # this cell (ρ(J) < 0.3, so κ(I - Jᵀ) ≲ 2) that moves the gradient by well under
    # 10°, while JFB's angle (u = g) is an order of magnitude larger.
    assert np.isfinite(shine["angle_median"]) and shine["angle_max"] < 5
    fb = shine["shine_fallback"]
    # Angle batches at steps 0, 2, 4, 6 of 16 examples: 64 examples through the callback.
    assert fb["examples"] == 64 and 0 <= fb["fired"] <= 64 and fb["failed"] == 0
    assert shine["step_ms_cpu"] > 0
    warm = by_label["implicit +JR +warm"]
    # Epoch 2 starts each example at its epoch-1 equilibrium and counts the cold start too.
    assert warm["history"]["cold_steps"] and warm["warm_iters"] < warm["cold_iters_same_params"]
    assert warm["step_ms_cpu"] is None
    for r in rows:
        assert 0 <= r["test_acc"] <= 1 and 0 < r["rho_mean"] < 1 and r["epoch_cpu_s"] > 0
        # Accuracy after each half epoch against cumulative training seconds (rising).
        evals = r["history"]["evals"]
        assert len(evals) == 4 and np.all(np.diff([e[1] for e in evals]) > 0)
        assert len(r["time_to_acc_s"]) == 4
    table = (tmp_path / "table.md").read_text()
    assert "| mnist | jfb +JR |" in table and "Warm start (mnist" in table
    assert "Time to accuracy" in table and "the Krylov fallback fired for" in table
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["dataset"] == "mnist"

    tol, d = 1e-4, 8
    for lib in peers:
        r = next(r for r in rows if r["library"] == lib)
        # Same weights, same cold start, same batches: the peer's gradient is the
        # implicit gradient too (its forward stops within tol of ours).
        assert r["angle_max"] < 1, lib
        # Their z* and ours on the same final weights: both meet
        # ‖f(z) - z‖∞ <= tol (1 + |z|) <= 2 tol (jaxopt: ‖f(z) - z‖₂ <= tol), so each is
        # within ‖z - z*‖₂ <= 2 √d tol / (1 - L) of z*, L <= ‖W‖₂ the cell's Lipschitz
        # constant. ‖W‖₂ starts at 0.5, and 8 Adam steps at lr 1e-3 (each entry moving
        # < 3.2e-3 a step) change the 8 x 8 W by < 8 · 8 · 3.2e-3 = 0.2 in Frobenius norm.
        lip = 0.75
        assert 0 < r["fwd_agreement"] <= 2 * 2 * np.sqrt(d) * tol / (1 - lip), lib
        assert r["time_to_acc_s"][-1] is not None  # compared runs reach the last target
        assert f"| {r['label']} |" in table
    if len(peers) < 2:
        assert "skipped" in table
