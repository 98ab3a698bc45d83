r"""A while loop whose `vmap` spends work only on the examples still running.

`jax.lax.while_loop` under `jax.vmap` steps every lane until the slowest one
stops: a batch where most examples converge in 5 steps and one needs 200 costs
B · 200 evaluations of the body. [`eqprop_jax.ragged_while_loop`][] has the same
semantics (each example stops exactly when its own `cond_fun` turns false, and its
carry is then frozen), but its batching rule *compacts* the batch: it gathers the
running examples into a bucket of static size s ∈ {B, ⌈B/2⌉, ⌈B/4⌉, …}, steps only
that bucket until at most half of it is still running, puts it back and moves
down to the next bucket; the smallest bucket runs until every example has stopped.
With enough buckets the work is at most 2 Σ_i steps_i evaluations of the body
(plus two gathers per bucket; no sort and no scatter, which XLA:CPU runs slowly)
instead of B · max_i steps_i; the price is one compiled copy of the body per
bucket size (`max_buckets` of them).

Nested `vmap`s are merged into one batch axis of size B₁ · B₂ · … and compacted
together, so `vmap(vmap(...))` costs what one `vmap` over all examples costs.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax
from jax.custom_batching import custom_vmap

Carry = TypeVar("Carry")

# The default number of bucket sizes: `AbstractSolver.batch_buckets`, which the
# implicit adjoints' linear solves follow; custom_root/custom_fixed_point (no solver)
# and ragged_while_loop itself use it directly.
BATCH_BUCKETS = 4

# The trace-time switch of `batch_compaction`: not a second bucket setting but an
# override of every one, for code (train.fit when it shards the batch) that cannot
# reach the solvers inside the estimators it traces.
_COMPACTION = contextvars.ContextVar("eqprop_jax_batch_compaction", default=True)


@contextlib.contextmanager
def batch_compaction(enabled: bool) -> Iterator[None]:
    """Turn the batch compaction of every [`eqprop_jax.ragged_while_loop`][] (and so
    of `fixed_point`'s loops) on or off for the code *traced* inside the block.

    Off, a vmapped loop steps the whole batch until its slowest example stops, as
    `lax.while_loop` does. Use it when the batch axis is sharded over several
    devices by `jit` (GSPMD): the gathered buckets are not split over the devices
    but replicated (8 host devices, batch 128: the bucket of 64 runs as a 64-row
    matmul on every device), so compaction would multiply the per-device work.
    [`eqprop_jax.train.fit`][] does this itself when it shards. (Under `shard_map`
    each device compacts its own shard and compaction is worth keeping.) The
    setting is read when a function is traced: a function jitted and traced
    before the block keeps the setting it was traced with.
    """
    token = _COMPACTION.set(bool(enabled))
    try:
        yield
    finally:
        _COMPACTION.reset(token)


def _bucket_sizes(n: int, max_buckets: int, min_bucket: int) -> tuple[int, ...]:
    sizes = [n]
    while len(sizes) < max_buckets and math.ceil(sizes[-1] / 2) >= min_bucket:
        sizes.append(math.ceil(sizes[-1] / 2))
    return tuple(sizes)


def _where(pred, new, old):
    return jtu.tree_map(
        lambda a, b: jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b), new, old
    )


def _take(tree, idx):
    return jtu.tree_map(lambda x: x[idx], tree)


def _running_first(active):
    """A stable permutation putting the running examples first: `argsort(~active,
    stable=True)` without a sort (XLA:CPU's sort calls its comparator n log n times)."""
    n = active.shape[0]
    ones = active.astype(jnp.int32)
    pos = jnp.where(active, jnp.cumsum(ones) - 1, jnp.sum(ones) + jnp.cumsum(1 - ones) - 1)
    order = jnp.zeros(n, jnp.int32).at[pos].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)
    return order, pos


def _compacted(cond, body, carry, ops, op_batched, buckets):
    """The batched loop on a leading batch axis of every carry leaf."""
    n = jtu.tree_leaves(carry)[0].shape[0]
    op_axes = jtu.tree_map(lambda b: 0 if b else None, op_batched)
    vcond = jax.vmap(cond, in_axes=(0, op_axes))
    vbody = jax.vmap(body, in_axes=(0, op_axes))
    sizes = _bucket_sizes(n, *buckets)

    def step_bucket(sub, sub_ops, active, floor):
        # Exactly lax.while_loop's batched semantics inside the bucket.
        def icond(c):
            return jnp.sum(c[1]) > floor

        def ibody(c):
            sub, active = c
            sub = _where(active, vbody(sub, sub_ops), sub)
            return sub, active & vcond(sub, sub_ops)

        return lax.while_loop(icond, ibody, (sub, active))

    def branch(i):
        size = sizes[i]
        floor = sizes[i + 1] if i + 1 < len(sizes) else 0

        def run(carry, active):
            if size == n:
                return step_bucket(carry, ops, active, floor)
            # Running examples first; stable so the bucket's order is deterministic.
            order, pos = _running_first(active)
            idx = order[:size]
            sub_ops = jtu.tree_map(lambda x, b: x[idx] if b else x, ops, op_batched)
            sub, sub_active = step_bucket(_take(carry, idx), sub_ops, active[idx], floor)
            # Back in place by a gather (example i sits at pos[i] of the bucket).
            inside, src = pos < size, jnp.minimum(pos, size - 1)
            put = lambda x, s: _where(inside, s[src], x)  # noqa: E731
            return jtu.tree_map(put, carry, sub), put(active, sub_active)

        return run

    active = vcond(carry, ops)
    if len(sizes) == 1:  # lockstep: one batched while loop, as lax.while_loop's vmap
        return step_bucket(carry, ops, active, 0)[0]
    branches = [branch(i) for i in range(len(sizes))]
    size_arr = jnp.asarray(sizes)

    def outer_body(state):
        carry, active = state
        k = jnp.sum(size_arr >= jnp.sum(active)) - 1
        return lax.switch(k, branches, carry, active)

    carry, _ = lax.while_loop(lambda s: jnp.any(s[1]), outer_body, (carry, active))
    return carry


def _batched_loop(cond, body, op_batched, buckets):
    """`_compacted` as a function whose own vmap merges the new axis into the batch."""

    @custom_vmap
    def loop(carry, ops):
        return _compacted(cond, body, carry, ops, op_batched, buckets)

    @loop.def_vmap
    def rule(axis_size, in_batched, carry, ops):
        carry_b, ops_b = in_batched
        a = axis_size
        n = jtu.tree_leaves(carry)[0].shape[1 if jtu.tree_leaves(carry_b)[0] else 0]

        def merge_carry(x, b):
            x = x if b else jnp.broadcast_to(x, (a,) + x.shape)
            return x.reshape((a * n,) + x.shape[2:])

        def merge_op(x, outer, inner):
            if not outer and not inner:
                return x
            if outer and not inner:  # (a, ...) -> each row repeated n times
                x = jnp.broadcast_to(x[:, None], (a, n) + x.shape[1:])
            elif inner and not outer:  # (n, ...) -> tiled a times
                x = jnp.broadcast_to(x, (a,) + x.shape)
            return x.reshape((a * n,) + x.shape[2:])

        carry = jtu.tree_map(merge_carry, carry, carry_b)
        merged_b = jtu.tree_map(lambda o, i: o or i, ops_b, op_batched)
        ops = jtu.tree_map(merge_op, ops, ops_b, op_batched)
        out = _batched_loop(cond, body, merged_b, buckets)(carry, ops)
        out = jtu.tree_map(lambda x: x.reshape((a, n) + x.shape[1:]), out)
        return out, jtu.tree_map(lambda _: True, out)

    return loop


def ragged_while_loop(
    cond_fun: Callable[[Carry], Any],
    body_fun: Callable[[Carry], Carry],
    init_val: Carry,
    *,
    max_buckets: int = BATCH_BUCKETS,
    min_bucket: int = 8,
) -> Carry:
    """`jax.lax.while_loop(cond_fun, body_fun, init_val)`, with a batching rule that
    steps only the examples still running (see the module docstring).

    Unbatched it *is* `lax.while_loop`. Under `jax.vmap` the answer is the one
    `lax.while_loop` gives (each example's carry is frozen once its `cond_fun` is
    false) up to floating-point reassociation in the body, since the body sees
    the running examples gathered into smaller batches. `cond_fun` and `body_fun`
    may close over arrays, batched or not. The carry's leaves must be arrays.

    Args:
        cond_fun, body_fun, init_val: as for `jax.lax.while_loop`.
        max_buckets: at most this many bucket sizes B, ⌈B/2⌉, …; each one compiles a
            copy of `body_fun` (XLA:CPU spends ~0.1–0.2 s per copy of even a small
            body), and once the smallest bucket is reached the loop runs it in
            lockstep until every example stops. 1 gives plain lockstep batching.
        min_bucket: no bucket is smaller than this (unless the batch itself is), so
            by default batches under 16 examples run in lockstep: there compaction
            saves little, and each bucket is one more compiled copy of the body.
    """
    if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
        raise ValueError(f"`max_buckets` must be a positive int, got {max_buckets!r}.")
    if isinstance(min_bucket, bool) or not isinstance(min_bucket, int) or min_bucket < 1:
        raise ValueError(f"`min_bucket` must be a positive int, got {min_bucket!r}.")
    if not _COMPACTION.get():
        max_buckets = 1
    init_val = jtu.tree_map(jnp.asarray, init_val)
    cond_c = eqx.filter_closure_convert(cond_fun, init_val)
    body_c = eqx.filter_closure_convert(body_fun, init_val)
    ops, static = eqx.partition((cond_c, body_c), eqx.is_array)

    def cond(c, ops):
        return eqx.combine(ops, static)[0](c)

    def body(c, ops):
        return eqx.combine(ops, static)[1](c)

    @custom_vmap
    def loop(carry, ops):
        return lax.while_loop(lambda c: cond(c, ops), lambda c: body(c, ops), carry)

    @loop.def_vmap
    def rule(axis_size, in_batched, carry, ops):
        carry_b, ops_b = in_batched
        carry = jtu.tree_map(
            lambda x, b: x if b else jnp.broadcast_to(x, (axis_size,) + x.shape), carry, carry_b
        )
        out = _batched_loop(cond, body, ops_b, (max_buckets, min_bucket))(carry, ops)
        return out, jtu.tree_map(lambda _: True, out)

    return loop(init_val, ops)
