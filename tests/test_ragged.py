"""`ragged_while_loop`: lax.while_loop's answers under vmap, with less work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import eqprop_jax as eqp

D = 16


def problem(batch, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((D, D))
    w = 0.95 * w / np.linalg.norm(w, 2)
    # Input scales over two decades: from a few iterations to ~150.
    xs = rng.standard_normal((batch, D)) * np.geomspace(2.0, 0.02, batch)[:, None]
    gains = np.linspace(0.1, 1.0, batch)
    return jnp.asarray(w), jnp.asarray(xs), jnp.asarray(gains)


def solve(loop, w, x, gain, **kw):
    """z = tanh(g W z + x) until max|f(z) - z| <= 1e-12; closes over w (unbatched) and
    x, g (batched under vmap); the step counter starts as an unbatched scalar."""

    def f(z):
        return jnp.tanh(gain * (w @ z) + x)

    def cond(c):
        z, k = c
        return (k < 500) & (jnp.max(jnp.abs(f(z) - z)) > 1e-12)

    def body(c):
        z, k = c
        return f(z), k + 1

    return loop(cond, body, (jnp.zeros(D), jnp.array(0)), **kw)


@pytest.mark.parametrize("buckets", [1, 2, 4, 8])
def test_same_answer_as_lax_while_loop_under_vmap(buckets):
    w, xs, gains = problem(37)
    ref_z, ref_k = jax.vmap(lambda x, g: solve(lax.while_loop, w, x, g))(xs, gains)
    z, k = jax.jit(
        jax.vmap(
            lambda x, g: solve(eqp.ragged_while_loop, w, x, g, max_buckets=buckets, min_bucket=1)
        )
    )(xs, gains)
    assert len(set(np.asarray(ref_k).tolist())) > 10  # a genuinely ragged batch
    np.testing.assert_array_equal(k, ref_k)
    # The body sees the running examples regrouped: equal up to float64 round-off.
    np.testing.assert_allclose(z, ref_z, rtol=0, atol=1e-13)


def test_unbatched_is_lax_while_loop():
    w, xs, gains = problem(3)
    ref = solve(lax.while_loop, w, xs[1], gains[1])
    out = jax.jit(lambda x, g: solve(eqp.ragged_while_loop, w, x, g))(xs[1], gains[1])
    np.testing.assert_array_equal(out[0], ref[0])
    assert int(out[1]) == int(ref[1])


def _counting_loop(targets, max_buckets, rows, min_bucket=1):
    """Example i runs targets[i] steps; a callback records how many rows each body
    evaluation carries, i.e. the work done."""

    def record(k):
        rows.append(int(np.size(k)))
        return k

    def body(c):
        k, t = c
        k = jax.pure_callback(
            record, jax.ShapeDtypeStruct(k.shape, k.dtype), k, vmap_method="broadcast_all"
        )
        return k + 1, t

    def one(t):
        init = (jnp.array(0), t)
        return eqp.ragged_while_loop(
            lambda c: c[0] < c[1], body, init, max_buckets=max_buckets, min_bucket=min_bucket
        )

    return one


def test_finished_examples_cost_nothing():
    # 63 examples need 1 step, one needs 100: lockstep does 64 · 100 rows of work.
    targets = jnp.array([1] * 63 + [100])
    counts = {}
    for buckets in (1, 4, 7):
        rows = []
        k, _ = jax.jit(jax.vmap(_counting_loop(targets, buckets, rows)))(targets)
        jax.effects_barrier()
        np.testing.assert_array_equal(k, targets)
        counts[buckets] = sum(rows)
    needed = int(targets.sum())
    assert counts[1] == 64 * 100
    # Buckets 64, 32, 16, 8: one step of 64 rows, then the last example runs alone
    # in the smallest bucket.
    assert counts[4] == 64 + 99 * 8
    # With buckets down to 1 the work is within a factor 2 of what is needed.
    assert counts[7] <= 2 * needed
    # The default floor of 8 rows: buckets 64, 32, 16, 8 as with max_buckets = 4.
    rows = []
    jax.jit(jax.vmap(_counting_loop(targets, 7, rows, min_bucket=8)))(targets)
    jax.effects_barrier()
    assert sum(rows) == 64 + 99 * 8


def test_nested_vmaps_are_compacted_as_one_batch():
    w, xs, gains = problem(24, seed=1)
    xs2 = jnp.stack([xs, 0.3 * xs, -xs])  # (3, 24, D)
    ref = jax.vmap(jax.vmap(lambda x, g: solve(lax.while_loop, w, x, g)))(
        xs2, jnp.broadcast_to(gains, (3, 24))
    )
    # gains batched on the inner axis only, w on neither, x on both.
    out = jax.jit(
        jax.vmap(jax.vmap(lambda x, g: solve(eqp.ragged_while_loop, w, x, g)), in_axes=(0, None))
    )(xs2, gains)
    np.testing.assert_array_equal(out[1], ref[1])
    np.testing.assert_allclose(out[0], ref[0], rtol=0, atol=1e-13)

    # 47 examples need 1 step, one needs 100; lockstep would do 48 · 100 rows.
    targets = jnp.ones((3, 16), int).at[1, 5].set(100)
    rows = []
    k, _ = jax.jit(jax.vmap(jax.vmap(_counting_loop(targets, 6, rows))))(targets)
    jax.effects_barrier()
    np.testing.assert_array_equal(k, targets)
    # One merged batch of 48 (buckets 48, 24, 12, 6, 3, 2): one step of all 48 rows,
    # then the slow example alone in the smallest bucket.
    assert sum(rows) == 48 + 99 * 2


def test_batched_closure_and_forward_mode():
    w, xs, gains = problem(9, seed=2)
    ws = jnp.stack([w, 0.5 * w])

    def run(loop, w, x, g):
        return solve(loop, w, x, g)[0]

    def batched(loop):
        return jax.vmap(lambda w: jax.vmap(lambda x, g: run(loop, w, x, g))(xs, gains))

    np.testing.assert_allclose(
        batched(eqp.ragged_while_loop)(ws), batched(lax.while_loop)(ws), rtol=0, atol=1e-13
    )
    # Forward mode through the loop (the iterates' tangents) matches lax.while_loop's.
    tw = jnp.ones_like(ws)
    _, t_ragged = jax.jvp(batched(eqp.ragged_while_loop), (ws,), (tw,))
    _, t_ref = jax.jvp(batched(lax.while_loop), (ws,), (tw,))
    np.testing.assert_allclose(t_ragged, t_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["max_buckets", "min_bucket"])
@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_bucket_settings(name, bad):
    with pytest.raises(ValueError, match=name):
        eqp.ragged_while_loop(lambda c: c < 3, lambda c: c + 1, jnp.array(0), **{name: bad})


def test_batch_compaction_context_turns_compaction_off_at_trace_time():
    targets = jnp.array([1] * 63 + [100])
    rows = []
    with eqp.batch_compaction(False):
        stepped = jax.jit(jax.vmap(_counting_loop(targets, 7, rows)))
        k, _ = stepped(targets)  # traced inside the block: lockstep
    jax.effects_barrier()
    np.testing.assert_array_equal(k, targets)
    assert sum(rows) == 64 * 100
    rows.clear()
    jax.jit(jax.vmap(_counting_loop(targets, 7, rows)))(targets)  # back on afterwards
    jax.effects_barrier()
    assert sum(rows) < 64 * 100 / 10

    # Through fixed_point: the compacted program switches between bucket sizes,
    # the lockstep one has no conditional at all.
    w, xs, gains = problem(32)

    def make_solve_batch():
        # A new function each time: jit and make_jaxpr cache traces per function.
        def solve_batch(xs, gains):
            def cell(z, a):
                return jnp.tanh(a[1] * (w @ z) + a[0])

            return jax.vmap(lambda x, g: eqp.fixed_point(cell, jnp.zeros(D), (x, g)).value)(
                xs, gains
            )

        return solve_batch

    def has_cond(jaxpr):
        return "cond[" in str(jaxpr)

    assert has_cond(jax.make_jaxpr(make_solve_batch())(xs, gains))
    with eqp.batch_compaction(False):
        lockstep = jax.make_jaxpr(make_solve_batch())(xs, gains)
    assert not has_cond(lockstep)


@pytest.mark.parametrize("n", [1, 7, 128])
def test_running_first_is_a_stable_partition(n):
    from eqprop_jax.equilibrium._ragged import _running_first

    rng = np.random.default_rng(n)
    for p in (0.0, 0.3, 1.0):
        active = rng.random(n) < p
        order, pos = jax.jit(_running_first)(jnp.asarray(active))
        # What the sort it replaces gives, and `pos` its inverse permutation.
        np.testing.assert_array_equal(order, np.argsort(~active, kind="stable"))
        np.testing.assert_array_equal(np.asarray(order)[np.asarray(pos)], np.arange(n))
