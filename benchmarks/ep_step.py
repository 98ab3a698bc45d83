"""Time one EP training step and one BPTT step on the P-1h net (784-512-10).

Free phase T = 30, nudged phase K = 10 (EP) or T = 30 unrolled steps (BPTT),
batch 50, float32. Timing (`benchmarks/_timing.py`): each step is compiled ahead of
time (trace + lower + XLA compile), then the EP and BPTT steps are called round-robin
`--repeats` times, each call ended by `block_until_ready`; median wall and process CPU
time. The steady-state throughput is compared with the machine's float32 matmul rate
measured in the same run (a jitted 1024 x 1024 matmul, median wall time).

    python benchmarks/ep_step.py [--repeats 20] [--batch 50] [--free 30] [--nudged 10]
    python benchmarks/ep_step.py --quick    # seconds: 5 rounds, T 10/4
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

import eqprop_jax as eqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _timing, beside this file
from _timing import (  # noqa: E402
    compile_timed,
    interleaved,
    machine_info,
    summarize,
    time_jitted,
    train_step,
)


def matmul_rate(n: int = 1024, repeats: int = 20) -> float:
    """Measured float32 matmul rate of this machine in FLOP/s (2 n³ per product)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    timing, _ = time_jitted(jnp.matmul, a, b, min_runs=repeats, max_runs=repeats, min_time=0.0)
    return 2 * n**3 / timing.median_s


def matmul_flops(sizes, batch, free, nudged):
    """The matmul FLOPs one EP step and one BPTT step need (a work model, per batch).

    The input projection W_0 x is loop-invariant: it is needed once (XLA hoists it
    out of the relaxation loops and shares it between the phases; the compiled HLO
    holds one 784-wide product, outside every while loop). Every relaxation step
    multiplies by the other W and Wᵀ. The input weight's gradient is one outer
    product in both methods (EP: (s^β_1 − s^0_1) xᵀ / β; BPTT: (Σ_t δ_t) xᵀ). EP forms
    the other weights' outer products for its two states; BPTT backpropagates
    through all T steps, the state cotangent through every W and Wᵀ and one outer
    product per use of a weight and step.
    """
    n0n1 = sizes[0] * sizes[1]
    inner = sum(a * b for a, b in zip(sizes[1:-1], sizes[2:], strict=True))
    ep = 2 * n0n1 + (free + nudged) * 4 * inner + 2 * n0n1 + 2 * 2 * inner
    bptt = 2 * n0n1 + free * 4 * inner + free * 8 * inner + 2 * n0n1
    return {"EP": ep * batch, "BPTT": bptt * batch}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--free", type=int, default=30)
    p.add_argument("--nudged", type=int, default=10)
    p.add_argument("--update", default="sync", choices=["sync", "async"])
    p.add_argument("--quick", action="store_true", help="5 rounds, T 10/4 (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.free, args.nudged = 5, 10, 4

    sizes = (784, 512, 10)
    model = eqp.HopfieldMLP(
        sizes,
        key=jax.random.PRNGKey(0),
        dynamics="prototypical",
        update=args.update,
        dtype=jnp.float32,
    )
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(kx, (args.batch, sizes[0]), jnp.float32)
    y = jax.random.randint(ky, (args.batch,), 0, sizes[-1])
    sgd = optax.sgd(0.05)  # plain SGD: the update is -lr · gradient

    ep = eqp.EquilibriumProp(0.1, free_steps=args.free, nudged_steps=args.nudged)
    bptt = eqp.BPTT(args.free)
    rate = matmul_rate()
    info = machine_info()
    print(f"date: {info['date']}")
    print(
        f"machine: {info['platform']}, {info['cpus']} CPUs, jax {info['jax']}, "
        f"device {info['device']}"
    )
    print(f"load: {info['uptime']}")
    print(f"float32 1024^2 matmul: {rate / 1e9:.1f} GFLOP/s")
    print(f"net {sizes}, batch {args.batch}, T {args.free}/{args.nudged}, update {args.update}")
    calls, compile_s = {}, {}
    for name, est in (("EP", ep), ("BPTT", bptt)):
        step, state = train_step(model, est, sgd)
        compiled, compile_s[name] = compile_timed(step, *state, x, y)
        calls[name] = (compiled, (*state, x, y))
    times = interleaved(calls, args.repeats)
    print(
        f"{'estimator':<10} {'compile s':>10} {'step ms':>9} {'CPU ms':>9} {'examples/s':>11} "
        f"{'GFLOP/s':>8} {'% matmul':>9}"
    )
    work = matmul_flops(sizes, args.batch, args.free, args.nudged)
    rows = {}
    for name in calls:
        timing = summarize(compile_s[name], times[name])
        t = timing.median_s
        flops = work[name] / t
        rows[name] = timing
        print(
            f"{name:<10} {timing.compile_s:>10.2f} {t * 1e3:>9.2f} "
            f"{timing.cpu_median_s * 1e3:>9.2f} {args.batch / t:>11.0f} "
            f"{flops / 1e9:>8.2f} {100 * flops / rate:>8.1f}%"
        )
    print(f"load after: {machine_info()['uptime']}")
    return rows


if __name__ == "__main__":
    main()
