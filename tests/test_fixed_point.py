"""The solver core against dense float64 linear algebra, autodiff and finite differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

import eqprop_jax as eqp

D = 64
TIGHT = eqp.Picard(tol=1e-14, max_steps=5000)


def make_deq(seed, d=D, radius=0.8):
    """z = tanh(W z + U x + b) with ‖W‖₂ = radius < 1: a contraction (tanh is 1-Lipschitz)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    w = jax.random.normal(k[0], (d, d))
    w = radius * w / jnp.linalg.norm(w, 2)
    u = jax.random.normal(k[1], (d, d)) / jnp.sqrt(d)
    b = 0.1 * jax.random.normal(k[2], (d,))
    x = jax.random.normal(k[3], (d,))
    return (w, u, b), x


def cell(z, args):
    (w, u, b), x = args
    return jnp.tanh(w @ z + u @ x + b)


def loss_fn(params, x, solver=TIGHT, adjoint=None):
    sol = eqp.fixed_point(cell, jnp.zeros(D), (params, x), solver=solver, adjoint=adjoint)
    z = sol.value
    return jnp.sum(jnp.sin(z)) + 0.5 * jnp.sum(z**2), sol


def dense_ift_grad(params, x):
    """dL/dθ from the implicit function theorem with a dense float64 solve."""
    w, u, b = params
    z = loss_fn(params, x)[1].value
    a = 1 - z**2  # tanh'
    jac = a[:, None] * w
    g = jnp.cos(z) + z
    lam = jnp.linalg.solve((jnp.eye(D) - jac).T, g)  # (I - Jᵀ) λ = g
    v = lam * a  # λᵀ diag(a)
    return (jnp.outer(v, z), jnp.outer(v, x), v)


@eqx.filter_jit
def _grad(params, x, adjoint):
    # Module-level and filter_jit-ed: one compilation per adjoint, shared by the seeds.
    return jax.grad(lambda p: loss_fn(p, x, adjoint=adjoint)[0])(params)


ADJOINTS = [
    eqp.Implicit(eqp.GMRES(max_steps=200), tol=1e-13),
    eqp.Implicit(eqp.BiCGStab(max_steps=500), tol=1e-13),
    eqp.Implicit(eqp.NormalCG(max_steps=2000), tol=1e-13),
    eqp.AlmeidaPineda(tol=1e-13, max_steps=5000),
    eqp.Neumann(k=400),  # ‖J‖ ≤ 0.8: truncation error 0.8^401 ≈ 1e-39
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "adjoint", ADJOINTS, ids=lambda a: type(a).__name__ + type(a.linear_solver).__name__
)
def test_gradients_match_dense_ift(seed, adjoint):
    params, x = make_deq(seed)
    ref = dense_ift_grad(params, x)
    grad = _grad(params, x, adjoint)
    # Both sides are float64 solves of a system with condition number ≤ 1.8/0.2 = 9,
    # so they should agree to ~1e-13; 1e-8 is the bar.
    assert rel_err(grad, ref) <= 1e-8


@pytest.mark.parametrize(
    "solver", [eqp.Anderson(tol=1e-13, max_steps=500), eqp.Broyden(tol=1e-13, max_steps=500)]
)
def test_accelerated_solvers_same_gradient(solver):
    params, x = make_deq(3)
    ref = dense_ift_grad(params, x)
    loss, sol = loss_fn(params, x, solver=solver)
    assert int(sol.result) == eqp.Result.converged
    grad = jax.grad(lambda p: loss_fn(p, x, solver=solver, adjoint=eqp.Implicit(tol=1e-13))[0])(
        params
    )
    assert rel_err(grad, ref) <= 1e-8


def test_unrolled_equals_python_loop():
    params, x = make_deq(4)
    solver = eqp.Picard(tol=1e-10, max_steps=1000)
    sol = loss_fn(params, x, solver=solver)[1]
    n = int(sol.stats.steps)
    assert 10 < n < 1000

    def python_loop(p):
        z = jnp.zeros(D)
        for _ in range(n):
            z = cell(z, (p, x))
        return z

    def loop_loss(p):
        z = python_loop(p)
        return jnp.sum(jnp.sin(z)) + 0.5 * jnp.sum(z**2)

    ref = jax.grad(loop_loss)(params)
    grad = jax.grad(lambda p: loss_fn(p, x, solver=solver, adjoint=eqp.Unrolled())[0])(params)
    assert rel_err(grad, ref) <= 1e-12
    # The solve returns the n-th iterate, exactly what the loop computes.
    assert jnp.allclose(sol.value, python_loop(params), rtol=0, atol=1e-14)


def test_central_finite_differences():
    params, x = make_deq(5)
    # A tight backward solve, so the only errors left are the differences' own.
    tight = eqp.Implicit(tol=1e-13)
    grad = jax.grad(lambda p: loss_fn(p, x, adjoint=tight)[0])(params)
    key = jax.random.PRNGKey(9)
    direction = jax.tree_util.tree_map(lambda a: jax.random.normal(key, a.shape), params)
    h = 1e-5
    plus = jax.tree_util.tree_map(lambda a, d: a + h * d, params, direction)
    minus = jax.tree_util.tree_map(lambda a, d: a - h * d, params, direction)
    fd = (loss_fn(plus, x)[0] - loss_fn(minus, x)[0]) / (2 * h)
    an = sum(jnp.sum(g * d) for g, d in zip(grad, direction, strict=True))
    # Central differences: truncation O(h²) ≈ 1e-10 relative, round-off ≈ 1e-16/h ≈ 1e-11.
    assert abs(fd - an) <= 1e-7 * abs(an)


def test_forward_mode_matches_reverse_mode():
    params, x = make_deq(6)
    ref = dense_ift_grad(params, x)
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    for adjoint in [eqp.Implicit(tol=1e-13), eqp.AlmeidaPineda(tol=1e-13)]:
        _, jvp = jax.jvp(
            lambda p, adjoint=adjoint: loss_fn(p, x, adjoint=adjoint)[0], (params,), (tangent,)
        )
        expect = sum(jnp.sum(g) for g in ref)
        assert abs(jvp - expect) <= 1e-9 * abs(expect)


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_neumann_equals_truncated_bptt(k):
    params, x = make_deq(7)
    z_star = loss_fn(params, x)[1].value

    def truncated(p):
        z = jax.lax.stop_gradient(z_star)
        for _ in range(k + 1):
            z = cell(z, (p, x))
        return jnp.sum(jnp.sin(z)) + 0.5 * jnp.sum(z**2)

    ref = jax.grad(truncated)(params)
    grad = jax.grad(lambda p: loss_fn(p, x, adjoint=eqp.Neumann(k))[0])(params)
    # At a converged z* (residual ≤ 1e-14) the two sums of (Jᵀ)^i g are identical.
    assert rel_err(grad, ref) <= 1e-10


def test_gradient_through_closed_over_module():
    """Weights closed over by f (an eqx.Module) are differentiated like args."""

    class Cell(eqx.Module):
        w: jax.Array
        u: jax.Array

        def __call__(self, z, x):
            return jnp.tanh(self.w @ z + self.u @ x)

    (w, u, _), x = make_deq(8)
    model = Cell(w, u)

    def loss(m, adjoint):
        sol = eqp.fixed_point(lambda z, a: m(z, a), jnp.zeros(D), x, solver=TIGHT, adjoint=adjoint)
        return jnp.sum(sol.value**2)

    g_imp = jax.grad(loss)(model, eqp.Implicit(tol=1e-13))
    g_unr = jax.grad(loss)(model, eqp.Unrolled())
    assert rel_err((g_imp.w, g_imp.u), (g_unr.w, g_unr.u)) <= 1e-9


def test_deq_layer_in_a_model():
    (w, u, _), x = make_deq(9)

    class Cell(eqx.Module):
        w: jax.Array

        def __call__(self, z, x):
            return jnp.tanh(self.w @ z + x)

    class Net(eqx.Module):
        deq: eqp.DEQ
        head: jax.Array

        def __call__(self, x):
            return self.head @ self.deq(x)

    for adjoint in [eqp.Implicit(tol=1e-13), eqp.Unrolled()]:
        net = Net(eqp.DEQ(Cell(w), state_shape=(D,), solver=TIGHT, adjoint=adjoint), u[0])
        g = eqx.filter_grad(lambda n: n(x))(net)
        z = net.deq(x)
        a = 1 - z**2
        lam = jnp.linalg.solve((jnp.eye(D) - a[:, None] * w).T, u[0])
        assert rel_err(g.deq.cell.w, jnp.outer(lam * a, z)) <= 1e-9
        assert rel_err(g.head, z) <= 1e-12


def test_complex_states():
    """Complex states (holomorphic EP) solve and differentiate like real ones."""
    (w, u, b), x = make_deq(10, d=8)
    c = 0.3 + 0.2j

    def f(z, a):
        return jnp.tanh(a * (w @ z) + u @ x)

    sol = eqp.fixed_point(
        f, jnp.zeros(8, jnp.complex128), c, solver=eqp.Picard(tol=1e-13, max_steps=500)
    )
    assert int(sol.result) == eqp.Result.converged
    assert jnp.allclose(f(sol.value, c), sol.value, atol=1e-12)
    sol_a = eqp.fixed_point(f, jnp.zeros(8, jnp.complex128), c, solver=eqp.Anderson(tol=1e-13))
    assert jnp.allclose(sol_a.value, sol.value, atol=1e-11)


def test_bicgstab_on_a_layered_network_with_loss_on_the_outputs():
    """A feed-forward chain as a fixed point, z = (h1, h2, o) with h1 = tanh(W1 x),
    h2 = tanh(W2 h1), o = tanh(W3 h2): J is nilpotent and the loss touches o only,
    so textbook BiCGStab (shadow residual r̂ = g) breaks down exactly, with
    ⟨g, r₁⟩ = 0; the default Implicit solve must still give the dense answer."""
    k = jax.random.split(jax.random.PRNGKey(5), 4)
    w1 = jax.random.normal(k[0], (24, 16)) / 4
    w2 = jax.random.normal(k[1], (20, 24)) / 5
    w3 = jax.random.normal(k[2], (8, 20)) / 4
    x = jax.random.normal(k[3], (16,))
    sizes = (24, 20, 8)

    def f(z, params):
        w1, w2, w3 = params
        h1, h2, _ = z
        return jnp.tanh(w1 @ x), jnp.tanh(w2 @ h1), jnp.tanh(w3 @ h2)

    z0 = tuple(jnp.zeros(n) for n in sizes)

    def loss(params):
        sol = eqp.fixed_point(f, z0, params, solver=TIGHT, adjoint=eqp.Implicit(tol=1e-12))
        return jnp.sum(sol.value[2] ** 2)

    params = (w1, w2, w3)
    grad = jax.grad(loss)(params)

    # Dense float64 implicit function theorem on the flat state.
    zs = eqp.fixed_point(f, z0, params, solver=TIGHT).value
    flat = jnp.concatenate(zs)

    def f_flat(v, params):
        return jnp.concatenate(f(tuple(jnp.split(v, [24, 44])), params))

    jac = jax.jacfwd(f_flat)(flat, params)
    g = jnp.concatenate([jnp.zeros(44), 2 * zs[2]])
    lam = jnp.linalg.solve((jnp.eye(52) - jac).T, g)
    _, vjp = jax.vjp(lambda p: f_flat(flat, p), params)
    ref = vjp(lam)[0]
    assert rel_err(grad, ref) <= 1e-8


# -- linear solvers as objects; the adjoint owns differentiation ---------------------

B, DB = 32, 12  # a batch large enough to be compacted (buckets are >= 8 examples)


def _batch_problem(seed=5):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    w = jax.random.normal(k[0], (DB, DB))
    w = 0.7 * w / jnp.linalg.norm(w, 2)
    xs = jax.random.normal(k[1], (B, DB))
    scale = jnp.linspace(0.2, 1.4, B)  # per-example contraction: ragged step counts
    return w, xs, scale


def _batch_grad(w, xs, scale, adjoint):
    def loss(w, probes):
        def one(x, s, p):
            f = lambda z, a: jnp.tanh(a[2] * (a[0] @ z) + a[1])
            return eqp.fixed_point(f, jnp.zeros(DB), (w, x, s), adjoint=adjoint, probe=p).value

        return jnp.sum(jax.vmap(one)(xs, scale, probes) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(w, jnp.zeros((B, 3)))


@pytest.mark.parametrize(
    "preset, richardson",
    [
        (eqp.AlmeidaPineda(), eqp.Implicit(eqp.Richardson())),
        (eqp.AlmeidaPineda(max_steps=4, on_failure="ignore"),
         eqp.Implicit(eqp.Richardson(4), on_failure="ignore")),
        (eqp.Neumann(6), eqp.Implicit(eqp.Richardson(7, truncated=True))),
        (eqp.PhantomGradient(k=5, damping=0.6),
         eqp.Implicit(eqp.Richardson(5, damping=0.6, truncated=True))),
    ],
    ids=["almeida_pineda", "almeida_pineda_short", "neumann", "phantom"],
)
def test_presets_are_richardson(preset, richardson):
    """A preset computes exactly what Implicit(Richardson(...)) computes: the same
    gradient and the same per-example statistics, bit for bit."""
    w, xs, scale = _batch_problem()
    g_preset, s_preset = _batch_grad(w, xs, scale, preset)
    g_rich, s_rich = _batch_grad(w, xs, scale, richardson)
    np.testing.assert_array_equal(np.asarray(g_preset), np.asarray(g_rich))
    np.testing.assert_array_equal(np.asarray(s_preset), np.asarray(s_rich))
    assert preset.linear_solver == richardson.linear_solver
    steps = np.asarray(eqp.AdjointStats.from_probe(s_preset).steps)
    if richardson.linear_solver.truncated or richardson.linear_solver.max_steps == 4:
        assert np.all(steps == richardson.linear_solver.max_steps)
    else:  # each example stops on its own
        assert len(set(steps.tolist())) > 1


def _compacted_loops(adjoint, solver):
    """How many compacted (bucketed) loops the compiled gradient holds: each bucket
    switch lowers to one `stablehlo.case`."""
    w, xs, scale = _batch_problem()

    def loss(w):
        f = lambda z, a: jnp.tanh(a[2] * (a[0] @ z) + a[1])
        sol = jax.vmap(lambda x, s: eqp.fixed_point(f, jnp.zeros(DB), (w, x, s), solver=solver,
                                                    adjoint=adjoint))(xs, scale)
        return jnp.sum(sol.value**2)

    return jax.jit(jax.grad(loss)).lower(w).as_text().count("stablehlo.case")


@pytest.mark.parametrize("adjoint", [eqp.Implicit(), eqp.AlmeidaPineda()],
                         ids=["bicgstab", "almeida_pineda"])
def test_backward_solve_follows_the_solvers_batch_buckets(adjoint):
    # A fixed-step forward solve is never compacted, so what remains is the backward's.
    fixed = eqp.Picard(tol=0.0, max_steps=40)
    assert _compacted_loops(adjoint, fixed) == 1
    assert _compacted_loops(adjoint, eqx.tree_at(lambda s: s.batch_buckets, fixed, 1)) == 0
    assert _compacted_loops(adjoint, eqp.Picard()) == 2  # forward and backward
    with eqp.batch_compaction(False):
        assert _compacted_loops(adjoint, eqp.Picard()) == 0


class DenseLU(eqp.AbstractLinearSolver):
    """A new linear solver is one class: materialise A and solve it densely."""

    def solve(self, op, b, tol, batch_buckets):
        a = jax.jacfwd(op)(b)
        return jnp.linalg.solve(a, b), jnp.array(1, jnp.int32)


class Detached(eqp.AbstractAdjoint):
    """A new adjoint is one class: run the solve in a plain loop, no derivative."""

    def apply(self, primal, fn, inputs, solver, *, probe=None, best_so_far=False):
        def loop(cond, body, init, *, max_steps, buckets):
            return jax.lax.while_loop(cond, body, init)

        return primal(jax.lax.stop_gradient(inputs), loop, 0)


def test_new_linear_solver_and_adjoint_plug_in():
    params, x = make_deq(6)
    ref = dense_ift_grad(params, x)
    grad = jax.grad(lambda p: loss_fn(p, x, adjoint=eqp.Implicit(DenseLU()))[0])(params)
    assert rel_err(grad, ref) <= 1e-10
    loss, sol = loss_fn(params, x, adjoint=Detached())
    np.testing.assert_array_equal(np.asarray(sol.value), np.asarray(loss_fn(params, x)[1].value))
    grad = jax.grad(lambda p: loss_fn(p, x, adjoint=Detached())[0])(params)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree_util.tree_leaves(grad))
    with pytest.raises(TypeError, match="abstract"):
        type("NoApply", (eqp.AbstractAdjoint,), {})()


@pytest.mark.parametrize("solver_cls", [eqp.Newton, eqp.Chord])
@pytest.mark.parametrize("linear_solver", [eqp.GMRES(max_steps=50), eqp.BiCGStab(max_steps=200)],
                         ids=["gmres", "bicgstab"])
def test_newton_takes_a_linear_solver_object(solver_cls, linear_solver):
    """Matrix-free (inexact) Newton/Chord reaches the dense-LU solution, the fixed
    point that tight Picard iteration finds."""
    params, x = make_deq(7, d=16)
    args = (params, x)
    ref = eqp.fixed_point(cell, jnp.zeros(16), args, solver=TIGHT).value
    dense = eqp.fixed_point(cell, jnp.zeros(16), args, solver=solver_cls(tol=1e-13)).value
    sol = eqp.fixed_point(
        cell, jnp.zeros(16), args,
        solver=solver_cls(tol=1e-13, linear_solver=linear_solver, linear_tol=1e-13),
    )
    assert int(sol.result) == eqp.Result.converged
    np.testing.assert_allclose(np.asarray(sol.value), np.asarray(ref), rtol=0, atol=1e-11)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(ref), rtol=0, atol=1e-11)
    with pytest.raises(TypeError, match="linear_solver"):
        solver_cls(linear_solver="gmres")
