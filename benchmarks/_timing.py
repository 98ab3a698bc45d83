"""What every benchmark shares: compile time apart from steady state, interleaved
calls, process CPU time, the load average, and the training step they time.

Each benchmark imports this module from its own folder (`python benchmarks/x.py`, and
`eqprop-jax bench` and the tests, put benchmarks/ on sys.path).

`time_jitted(fn, *args)` compiles `jax.jit(fn)` ahead of time (trace + lower +
XLA compile, timed together) and then times the compiled executable alone, each
call ended by `jax.block_until_ready`, reporting the median of the repeats. The
CPU is shared, so the median (not the mean) is the figure to quote, together
with the load average that `machine_info()` records.

`interleaved(calls, rounds)` times several compiled calls round-robin, which is
fairer than one after the other when other jobs come and go on the machine.

`compile_timed_cpu` is `compile_timed` with the process CPU seconds of the compile
too; `train_step(model, estimator, optimizer)` is the jit-able step (estimate, optax
update) that the training benchmarks time.

`matmul_gflops(m, k, n)` measures this machine's float32 matmul rate at one
shape, so a benchmark can say how far a solver is from being matmul-bound.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclass(frozen=True)
class Timing:
    """Compile time (s); steady-state wall-clock median and min (s); process CPU time
    median (s, all threads: what the call cost, whatever else ran on the machine);
    number of timed runs."""

    compile_s: float
    median_s: float
    min_s: float
    cpu_median_s: float
    runs: int

    def __str__(self) -> str:
        return (
            f"compile {self.compile_s:.3f} s, wall median {self.median_s * 1e3:.2f} ms "
            f"(min {self.min_s * 1e3:.2f} ms), CPU median {self.cpu_median_s * 1e3:.2f} ms, "
            f"{self.runs} runs"
        )


def compile_timed(fn: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], float]:
    """`jax.jit(fn)` compiled ahead of time for `args`, and the seconds that took
    (trace + lower + XLA compile)."""
    compiled, wall, _ = compile_timed_cpu(fn, *args)
    return compiled, wall


def compile_timed_cpu(
    fn: Callable[..., Any], *args: Any
) -> tuple[Callable[..., Any], float, float]:
    """`compile_timed`, with the process CPU seconds (all threads) of the compile:
    (executable, wall s, CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0, time.process_time() - c0


def train_step(model: Any, estimator: Any, optimizer: Any) -> tuple[Callable[..., Any], tuple]:
    """`step(params, opt_state, x, y) -> (params, opt_state, loss)`: the estimator's
    gradient and an optax update of the model's inexact arrays (the rest of the model
    closed over, so `jax.jit(step)` takes only arrays), and its first (params, opt_state)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(params, opt_state, x, y):
        loss, grads, _ = estimator(eqx.combine(params, static), x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, (params, optimizer.init(params))


def run_once(compiled: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """Wall-clock and process-CPU seconds of one call of `compiled(*args)`, ended by
    `jax.block_until_ready`."""
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t, time.process_time() - c


def interleaved(
    calls: dict[Any, tuple[Callable[..., Any], tuple]], rounds: int
) -> dict[Any, list[tuple[float, float]]]:
    """Time several compiled calls round-robin, `rounds` times each (after one
    untimed warm-up call each), so that a change in the load of a shared machine
    hits every call alike rather than whichever happened to run then."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times: dict[Any, list[tuple[float, float]]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, (fn, args) in calls.items():
            times[k].append(run_once(fn, *args))
    return times


def summarize(compile_s: float, times: list[tuple[float, float]]) -> Timing:
    """A `Timing` from (wall, cpu) pairs as returned by `run_once`."""
    wall = [w for w, _ in times]
    cpu = [c for _, c in times]
    return Timing(compile_s, statistics.median(wall), min(wall), statistics.median(cpu), len(times))


def time_jitted(
    fn: Callable[..., Any],
    *args: Any,
    min_runs: int = 3,
    max_runs: int = 50,
    min_time: float = 1.0,
) -> tuple[Timing, Any]:
    """Time `jax.jit(fn)(*args)`: compile once, then repeat until `min_time` seconds.

    Runs at least `min_runs` and at most `max_runs` timed calls after one untimed
    warm-up call. Returns the `Timing` and the output of the last call.
    """
    compiled, compile_s = compile_timed(fn, *args)
    out = jax.block_until_ready(compiled(*args))  # warm-up: first-touch allocations
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (
        len(times) < min_runs or time.perf_counter() - start < min_time
    ):
        times.append(run_once(compiled, *args))
    return summarize(compile_s, times), out


def matmul_gflops(
    m: int, k: int, n: int, *, chain: int = 100, min_time: float = 0.5
) -> tuple[float, float]:
    """Measured float32 GFLOP/s of an (m, k) @ (k, n) matmul on the default device:
    (per wall-clock second at the fastest run, per CPU second at the median run).

    `chain` dependent matmuls run inside one `lax.fori_loop` (x <- x @ Q with Q
    orthogonal, so values stay bounded and XLA cannot hoist the product out of the
    loop): this is the rate a jitted solver loop can reach, without the per-call
    dispatch cost that dominates a single small matmul. Needs k == n.
    """
    if k != n:
        raise ValueError(f"matmul_gflops chains x <- x @ Q, so k must equal n; got {k}, {n}.")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q = jnp.asarray(np.linalg.qr(rng.standard_normal((k, n)))[0], jnp.float32)

    def chained(a, q):
        return jax.lax.fori_loop(0, chain, lambda _, x: x @ q, a)

    timing, _ = time_jitted(chained, a, q, min_runs=5, max_runs=200, min_time=min_time)
    # Wall: the minimum, since on a shared CPU load only ever adds time.
    flop = 2.0 * m * k * n * chain
    return flop / timing.min_s / 1e9, flop / timing.cpu_median_s / 1e9


def load_average() -> str:
    """The `uptime` line (the CPU is shared, so say how loaded it was)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict[str, str]:
    """Platform, CPU count, JAX version and device, and the load average now."""
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "device": f"{dev.platform} ({dev.device_kind})",
        "uptime": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
