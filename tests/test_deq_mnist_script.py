"""Smoke test of scripts/deq_mnist.py on random 8x8 data (two backwards, warm start, float32)."""

import json

import jax
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
    rows = script.main(["--smoke", "--datasets", "mnist", "--backwards", "jfb", "phantom",
                        "--jac-weights", "1.0", "--out", str(tmp_path)])
    for name in ("table.md", "results.json", "iterations.png", "angles.png", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    by_label = {r["label"]: r for r in rows}
    assert set(by_label) == {"jfb +JR", "phantom +JR", "implicit +JR +warm"}
    jfb = by_label["jfb +JR"]
    # JFB is not the implicit gradient: its angle to it is positive, and below 90°
    # on this contractive cell (Fung et al.'s descent condition).
    assert 0 < jfb["angle_median"] < 90
    assert jfb["history"]["reg"][0] > 0  # the Jacobian penalty is in the loss
    assert jfb["step_ms_cpu"] > 0  # the interleaved step timing
    warm = by_label["implicit +JR +warm"]
    # Epoch 2 starts each example at its epoch-1 equilibrium and counts the cold start too.
    assert warm["history"]["cold_steps"] and warm["warm_iters"] < warm["cold_iters_same_params"]
    assert warm["step_ms_cpu"] is None
    for r in rows:
        assert 0 <= r["test_acc"] <= 1 and 0 < r["rho_mean"] < 1 and r["epoch_cpu_s"] > 0
    table = (tmp_path / "table.md").read_text()
    assert "| mnist | jfb +JR |" in table and "Warm start (mnist" in table
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["dataset"] == "mnist"
