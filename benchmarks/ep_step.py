"""Time one EP training step and one BPTT step on the P-1h net (784-512-10).

Free phase T = 30, nudged phase K = 10 (EP) or T = 30 unrolled steps (BPTT),
batch 50, float32. Compile time and steady-state time are measured apart with
`block_until_ready`; the steady-state throughput is compared with the machine's
float32 matmul rate measured in the same run (a jitted 1024 x 1024 matmul).

    python benchmarks/ep_step.py [--repeats 20] [--batch 50] [--free 30] [--nudged 10]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqprop_jax as eqp


def _time(fn, *args, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


def matmul_rate(n: int = 1024, repeats: int = 20) -> float:
    """Measured float32 matmul rate of this machine in FLOP/s (2 n³ per product)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    _, t = _time(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * n**3 / t


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
    args = p.parse_args(argv)

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
    lr = 0.05

    def make_step(estimator):
        @eqx.filter_jit
        def train_step(model, x, y):
            loss, grads, _ = estimator(model, x, y)
            return eqx.apply_updates(model, jax.tree_util.tree_map(lambda g: -lr * g, grads)), loss

        return train_step

    ep = eqp.EquilibriumProp(0.1, free_steps=args.free, nudged_steps=args.nudged)
    bptt = eqp.BPTT(args.free)
    rate = matmul_rate()
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"backend {jax.default_backend()}"
    )
    print(f"load average: {os.getloadavg()}")
    print(f"float32 1024^2 matmul: {rate / 1e9:.1f} GFLOP/s")
    print(f"net {sizes}, batch {args.batch}, T {args.free}/{args.nudged}, update {args.update}")
    print(
        f"{'estimator':<10} {'compile s':>10} {'step ms':>9} {'examples/s':>11} "
        f"{'GFLOP/s':>8} {'% matmul':>9}"
    )
    work = matmul_flops(sizes, args.batch, args.free, args.nudged)
    for name, est in (("EP", ep), ("BPTT", bptt)):
        compile_s, t = _time(make_step(est), model, x, y, repeats=args.repeats)
        flops = work[name] / t
        print(
            f"{name:<10} {compile_s:>10.2f} {t * 1e3:>9.2f} {args.batch / t:>11.0f} "
            f"{flops / 1e9:>8.2f} {100 * flops / rate:>8.1f}%"
        )


if __name__ == "__main__":
    main()
