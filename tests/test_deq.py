"""The DEQ layer: static settings (plain jit, serialisation), state dtype, shape errors,
the vmap pattern, and the benchmark `benchmarks/deq_train.py` at tiny size."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import load_source

import eqprop_jax as eqp

D = 6
TIGHT = eqp.Picard(tol=1e-13, max_steps=2000)


class Cell(eqx.Module):
    w: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.w @ z + x)


class Net(eqx.Module):
    deq: eqp.DEQ
    head: jax.Array

    def __call__(self, xs):
        return jax.vmap(self.deq)(xs) @ self.head


def make(seed=0, dtype=jnp.float64, **deq_kw):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    w = jax.random.normal(k1, (D, D), dtype)
    w = 0.8 * w / jnp.linalg.norm(w, 2)  # a contraction: tanh' <= 1
    head = jax.random.normal(k2, (D,), dtype)
    xs = jax.random.normal(k3, (5, D), dtype)
    return Net(eqp.DEQ(Cell(w), state_shape=(D,), **deq_kw), head), xs


def dense_grad_w(w, head, xs):
    """dL/dw for L = Σ_i head · z_i* by the implicit function theorem, solved densely."""
    g = jnp.zeros_like(w)
    for x in xs:
        z = jnp.zeros(D)
        for _ in range(300):
            z = jnp.tanh(w @ z + x)
        a = 1 - z**2
        u = jnp.linalg.solve((jnp.eye(D) - a[:, None] * w).T, head)
        g = g + jnp.outer(u * a, z)
    return g


def test_plain_jit_of_a_model_holding_a_deq():
    """Default settings include a str ('bicgstab') and floats: as static fields they are
    no leaves, so plain jax.jit and jax.grad of a function taking the model work."""
    net, xs = make()
    leaves = jtu.tree_leaves(net)
    assert len(leaves) == 2 and all(isinstance(leaf, jax.Array) for leaf in leaves)

    grad = jax.jit(jax.grad(lambda n, x: jnp.sum(n(x))))(net, xs)
    expected = dense_grad_w(net.deq.cell.w, net.head, xs)
    # Float64 defaults: Picard's tol is 1e-12 and Implicit's follows it; the gradient
    # agrees to a few hundred times that (κ(I - J) ≤ 1 / (1 - 0.8) = 5, and the
    # adjoint counts as converged up to 10 tol).
    err = jnp.linalg.norm(grad.deq.cell.w - expected) / jnp.linalg.norm(expected)
    assert err < 1e-9


def test_equal_settings_share_a_compiled_program():
    """Static settings live in the treedef: equal settings compare equal (no
    recompilation), different ones do not."""
    net_a, _ = make(0, solver=eqp.Picard(tol=1e-4))
    net_b, _ = make(1, solver=eqp.Picard(tol=1e-4))
    net_c, _ = make(0, solver=eqp.Picard(tol=1e-5))
    assert jtu.tree_structure(net_a) == jtu.tree_structure(net_b)
    assert jtu.tree_structure(net_a) != jtu.tree_structure(net_c)


def test_every_solver_and_adjoint_is_hashable():
    settings = [
        eqp.Picard(),
        eqp.Picard(damping=0.5),
        eqp.Anderson(),
        eqp.Broyden(),
        eqp.Implicit(),
        eqp.Implicit(eqp.GMRES(), callback=print),
        eqp.AlmeidaPineda(),
        eqp.Neumann(),
        eqp.Unrolled(),
    ]
    for s in settings:
        assert hash(s) == hash(jtu.tree_map(lambda v: v, s))
        kw = {"solver": s} if isinstance(s, eqp.AbstractSolver) else {"adjoint": s}
        eqp.DEQ(Cell(jnp.eye(D)), state_shape=(D,), **kw)


def test_array_valued_setting_is_refused():
    with pytest.raises(TypeError, match="static"):
        eqp.DEQ(Cell(jnp.eye(D)), state_shape=(D,), solver=eqp.Picard(tol=jnp.array(1e-4)))
    with pytest.raises(TypeError, match="solver"):
        eqp.DEQ(Cell(jnp.eye(D)), state_shape=(D,), solver="picard")


def test_serialised_weights_load_under_other_settings(tmp_path):
    """Weights saved with one solver/adjoint load into a skeleton with others."""
    net, xs = make(0)
    path = tmp_path / "net.eqx"
    eqx.tree_serialise_leaves(path, net)

    skeleton, _ = make(
        7,
        solver=eqp.Anderson(history=3, tol=1e-10),
        adjoint=eqp.Implicit(eqp.GMRES(), on_failure="ignore"),
    )
    loaded = eqx.tree_deserialise_leaves(path, skeleton)
    np.testing.assert_array_equal(loaded.deq.cell.w, net.deq.cell.w)
    np.testing.assert_array_equal(loaded.head, net.head)
    assert loaded.deq.solver == eqp.Anderson(history=3, tol=1e-10)
    assert loaded.deq.adjoint.linear_solver == eqp.GMRES()
    # Same weights, different solver: the same fixed point.
    np.testing.assert_allclose(loaded(xs), net(xs), atol=1e-5)


def test_plain_functions_are_static():
    """A plain-function cell or z_init holds no leaf; a Module z_init keeps its arrays."""
    w = jnp.eye(D) * 0.5
    deq = eqp.DEQ(lambda z, x: jnp.tanh(w @ z + x), z_init=lambda x: jnp.zeros_like(x))
    assert jtu.tree_leaves(deq) == []
    x = jnp.linspace(-1, 1, D)
    z = jax.jit(lambda d, x: d(x))(deq, x)
    np.testing.assert_allclose(z, jnp.tanh(0.5 * z + x), atol=1e-5)

    class Init(eqx.Module):
        a: jax.Array

        def __call__(self, x):
            return self.a * x

    deq = eqp.DEQ(Cell(w), z_init=Init(jnp.array(0.1)))
    assert len(jtu.tree_leaves(deq)) == 2


def test_state_dtype_follows_the_cell_bfloat16_input():
    """bfloat16 x with float32 weights: the cell returns float32, so the state is
    float32, and the answer equals the float32 solve of the same (exactly
    representable) inputs."""
    net, xs = make(0, dtype=jnp.float32, solver=eqp.Picard(tol=1e-6))
    xs_bf16 = xs.astype(jnp.bfloat16)
    z_bf = jax.vmap(net.deq)(xs_bf16)
    assert z_bf.dtype == jnp.float32
    z_32 = jax.vmap(net.deq)(xs_bf16.astype(jnp.float32))
    np.testing.assert_array_equal(z_bf, z_32)

    sol = jax.vmap(net.deq.solve)(xs_bf16)
    assert bool(jnp.all(sol.result == eqp.Result.converged))
    g = jax.jit(jax.grad(lambda n, x: jnp.sum(n(x))))(net, xs_bf16)
    assert g.deq.cell.w.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(g.deq.cell.w)))

    # z_init's state is cast to the cell's dtype as well.
    deq = eqp.DEQ(net.deq.cell, z_init=lambda x: jnp.zeros(D, jnp.bfloat16))
    np.testing.assert_array_equal(jax.vmap(deq)(xs_bf16), z_32)


def test_state_dtype_float32_input_float64_weights():
    net, xs = make(0, dtype=jnp.float64)
    z = jax.vmap(net.deq)(xs.astype(jnp.float32))
    assert z.dtype == jnp.float64


def test_state_shape_disagreeing_with_the_cell_is_named():
    net, xs = make(0)
    deq = eqp.DEQ(net.deq.cell, state_shape=(D + 1,))
    with pytest.raises(ValueError, match=r"state_shape"):
        deq(xs[0])
    # A batch passed without vmap: the cell broadcasts to (5, D), which the error names.
    with pytest.raises(ValueError, match=r"returns shape \(5, 6\).*jax.vmap"):
        net.deq(xs)
    deq = eqp.DEQ(lambda z, x: (z, x), state_shape=(D,))
    with pytest.raises(ValueError, match="state_shape"):
        deq(xs[0])
    with pytest.raises(TypeError, match="state_shape"):
        eqp.DEQ(net.deq.cell, state_shape=(D, 2.0))


def test_the_docstring_vmap_pattern():
    """`jax.vmap(deq)(xs)` gives each example its own solve: the same answer as one
    example at a time, and per-example statuses and step counts."""
    net, xs = make(0, solver=TIGHT)
    deq = net.deq
    zs = jax.vmap(deq)(xs)
    for x, z in zip(xs, zs, strict=True):
        np.testing.assert_allclose(z, deq(x), atol=1e-12)
        np.testing.assert_allclose(z, jnp.tanh(deq.cell.w @ z + x), atol=1e-12)
    sol = jax.vmap(deq.solve)(xs)
    assert sol.stats.steps.shape == (len(xs),)
    assert bool(jnp.all(sol.result == eqp.Result.converged))
    assert "jax.vmap(deq)" in eqp.DEQ.__doc__


# --------------------------------------------------------------------- the benchmark


def _load_benchmark(monkeypatch):
    return load_source("benchmarks", "deq_train", monkeypatch)


def test_deq_train_benchmark_quick_gradients_agree(monkeypatch):
    """`benchmarks/deq_train.py --quick` runs, and every library's float32 gradient
    agrees with the float64 dense implicit-function-theorem reference."""
    bench = _load_benchmark(monkeypatch)
    with jax.enable_x64(False):  # a float32 benchmark, as it runs from the command line
        out = bench.main(["--quick", "--random", "--rounds", "2"])
    rows = out["rows"]
    assert {r.library for r in rows} >= {"eqprop_jax", "optimistix", "jaxopt"}
    for r in rows:
        # Forward tol 1e-4 (scaled), adjoint tolerances 1e-5..1e-6: the gradient is
        # off by about the forward tolerance over (1 - contraction).
        assert r.grad_rel_err < 5e-3, (r.name, r.grad_rel_err)
        assert r.grad_cos > 0.9999, (r.name, r.grad_cos)
        assert r.step.median_s > 0 and r.step.compile_s > 0


def test_probe_passes_through_the_layer():
    # The backward statistics of each example's solve reach the probe's cotangent.
    net, xs = make()

    def loss(net, probes):
        return jnp.sum(jax.vmap(lambda x, p: net.deq(x, probe=p))(xs, probes) @ net.head)

    g_net, g_probe = eqx.filter_grad(lambda args: loss(*args))((net, jnp.zeros((5, 3))))
    stats = eqp.AdjointStats.from_probe(g_probe)
    assert bool(jnp.all(stats.converged)) and bool(jnp.all(stats.steps >= 1))
    ref = dense_grad_w(net.deq.cell.w, net.head, xs)
    assert float(jnp.max(jnp.abs(g_net.deq.cell.w - ref))) <= 1e-9
