"""Compile each problem's cases once.

XLA:CPU spends about half a second on every compiled program, however small, and
most of these tests' time is compilation. So every problem's cases (all solvers,
all adjoints) are traced into one jitted function, run once and cached, and each
parametrized test reads its own entry: the tests stay one per case, and a problem
costs one compilation. The compilation runs with `jax_disable_most_optimizations`
(less LLVM work for these small programs; the arithmetic is the same IEEE
arithmetic, so only last-bit differences could appear, far below the tests'
tolerances).
"""

from __future__ import annotations

import contextlib
import functools

import jax


@contextlib.contextmanager
def fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


def once(build):
    """`build(*key)` returns (fn, args); the result of jit(fn)(*args), on the host,
    computed once per key."""

    @functools.cache
    def run(*key):
        fn, args = build(*key)
        with fast_compile():
            return jax.device_get(jax.jit(fn)(*args))

    return run
