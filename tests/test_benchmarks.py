"""The benchmarks' shared timing helper (`benchmarks/_timing.py`) and, at toy sizes on
the CPU, the benchmarks converted to it (`ep_step.py`, `resistive.py`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_source

import eqprop_jax as eqp


@pytest.fixture
def timing(monkeypatch):
    return load_source("benchmarks", "_timing", monkeypatch)


def test_summarize_takes_medians_and_the_fastest_run(timing):
    t = timing.summarize(0.5, [(3.0, 1.0), (1.0, 2.0), (2.0, 3.0), (4.0, 0.5)])
    assert (t.compile_s, t.median_s, t.min_s, t.cpu_median_s, t.runs) == (0.5, 2.5, 1.0, 1.5, 4)


def test_compile_timed_cpu_compiles_once_and_runs(timing):
    compiled, wall, cpu = timing.compile_timed_cpu(lambda a: a @ a.T, jnp.ones((3, 2)))
    assert wall > 0 and cpu > 0
    np.testing.assert_array_equal(np.asarray(compiled(jnp.ones((3, 2)))), np.full((3, 3), 2.0))
    times = timing.interleaved({"a": (compiled, (jnp.ones((3, 2)),))}, rounds=3)
    assert len(times["a"]) == 3 and all(w > 0 and c >= 0 for w, c in times["a"])


def test_train_step_is_one_optax_update_of_the_estimators_gradient(timing):
    model = eqp.HopfieldMLP((4, 3, 2), key=jax.random.PRNGKey(0), weight_scale=0.5)
    est = eqp.EquilibriumProp(0.1, variant="centered", free_steps=20, nudged_steps=10)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 4))
    y = jnp.array([0, 1, 1])
    step, (params, opt_state) = timing.train_step(model, est, optax.sgd(0.5))
    new, _, loss = jax.jit(step)(params, opt_state, x, y)
    want_loss, grads, _ = est(model, x, y)
    assert math.isclose(float(loss), float(want_loss), rel_tol=1e-12)
    for p, g, q in zip(*(jax.tree_util.tree_leaves(t) for t in (params, grads, new)), strict=True):
        np.testing.assert_allclose(q, p - 0.5 * g, rtol=1e-12, atol=1e-14)


def test_ep_step_benchmark_at_toy_size(monkeypatch, capsys):
    bench = load_source("benchmarks", "ep_step", monkeypatch)
    with jax.enable_x64(False):
        rows = bench.main(["--repeats", "2", "--batch", "2", "--free", "2", "--nudged", "1"])
    assert set(rows) == {"EP", "BPTT"}
    for t in rows.values():
        assert t.runs == 2 and t.compile_s > 0 and t.median_s > 0 and t.cpu_median_s > 0
    assert "% matmul" in capsys.readouterr().out


def test_resistive_benchmark_at_toy_size(monkeypatch):
    bench = load_source("benchmarks", "resistive", monkeypatch)
    with jax.enable_x64(False):
        rows = bench.main(["--hidden", "8", "--batch", "2", "--repeats", "2", "--sweeps", "2"])
    (row,) = rows
    hidden, batch, free, nudged, compile_s, ms, us_per_example, cpu_ms = row
    assert (hidden, batch) == (8, 2) and compile_s > 0 and ms > 0 and cpu_ms > 0
    assert math.isclose(us_per_example, 1e3 * ms / batch)
    assert "/" in free and "/" in nudged  # mean/max sweeps to converge


def test_walls_pmlp_floor_is_the_same_ep_update_as_the_library(monkeypatch):
    """The hand-written P-MLP step that `benchmarks/walls.py` times as XLA's floor must
    do the library's arithmetic: one step from the same weights gives the same weights."""
    walls = load_source("benchmarks", "walls", monkeypatch)
    timing = load_source("benchmarks", "_timing", monkeypatch)
    model = eqp.HopfieldMLP(
        (6, 5, 3), dynamics="prototypical", activation="sigmoid4", key=jax.random.PRNGKey(0)
    )
    est = eqp.EquilibriumProp(beta=0.1, variant="positive", free_steps=20, nudged_steps=5)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 6))
    y = jnp.array([0, 2, 1, 2])
    opt = optax.sgd(0.5)
    step, (params, opt_state) = timing.train_step(model, est, opt)
    new = jax.jit(step)(params, opt_state, x, y)[0]
    f_step, p, s = walls.pmlp_floor_step(model, 4, 20, 5, 0.1, opt)
    got = jax.jit(f_step)(p, s, x, y)[0]
    for a, b in zip(new.weights + new.biases, (got["w1"], got["w2"], got["b1"], got["b2"]),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_walls_runs_at_toy_size(monkeypatch):
    walls = load_source("benchmarks", "walls", monkeypatch)
    with jax.enable_x64(False):
        res = walls.main(["--quick", "--sections", "p-mlp", "conv", "--runs", "2"])
    assert res["p-mlp"]["library_ms"] > 0 and res["p-mlp"]["floor_ms"] > 0
    (row,) = res["conv"]["rows"]
    assert all(v > 0 for v in (*row["xla_nchw_ms"], *row["xla_nhwc_ms"], *row["library_ms"]))


def test_compaction_benchmark_compares_equal_solves(monkeypatch):
    bench = load_source("benchmarks", "compaction", monkeypatch)
    het = bench.measure(16, 16, uniform=False, rounds=1)
    uni = bench.measure(16, 16, uniform=True, rounds=1)
    # Heterogeneous really is: the slowest example takes many times the fastest's steps.
    assert het["steps"].max() >= 5 * het["steps"].min() and uni["steps"].max() <= 20
    for r in (het, uni):
        assert r["same_steps"] and r["grad_rel_diff"] < 1e-5
        assert set(r["cpu"]) == {1, 4} and all(v > 0 for v in r["cpu"].values())
