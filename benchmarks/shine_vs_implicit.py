"""SHINE against Implicit on a tanh DEQ: backward CPU time and gradient angle.

Interleaved in one process; median time.process_time() over repeats, with
/proc/loadavg printed beside it (CPU time is less sensitive than wall time to the
load of a shared machine, but not immune to it).

    python benchmarks/shine_vs_implicit.py [--d 64] [--batch 128] [--reps 9]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import eqprop_jax as eqp


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=9)
    a = p.parse_args()
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(k[0], (a.d, a.d))
    w = 0.9 * w / jnp.linalg.norm(w, 2)
    xs = jax.random.normal(k[1], (a.batch, a.d))
    solver = eqp.Broyden(tol=1e-5, history=40, max_steps=200)
    f = lambda z, args: jnp.tanh(args[0] @ z + args[1])

    def make(adjoint):
        def loss(w):
            sol = jax.vmap(
                lambda x: eqp.fixed_point(f, jnp.zeros(a.d), (w, x), solver=solver,
                                          adjoint=adjoint)
            )(xs)
            return jnp.sum(sol.value**2)

        return jax.jit(jax.grad(loss)), jax.jit(loss)

    adjoints = {
        "Implicit": eqp.Implicit(),
        "SHINE": eqp.SHINE(),
        "SHINE(fallback=False)": eqp.SHINE(fallback=False),
        "JacobianFree": eqp.JacobianFree(on_failure="ignore"),
    }
    fns = {n: make(adj) for n, adj in adjoints.items()}
    grads = {n: jax.block_until_ready(g(w)) for n, (g, _) in fns.items()}
    steps = jax.vmap(lambda x: eqp.fixed_point(f, jnp.zeros(a.d), (w, x), solver=solver))(xs)
    steps = steps.stats.steps
    for _, fwd in fns.values():
        jax.block_until_ready(fwd(w))
    times = {n: ([], []) for n in fns}
    for _ in range(a.reps):
        for n, (g, fwd) in fns.items():
            t0 = time.process_time()
            jax.block_until_ready(g(w))
            t1 = time.process_time()
            jax.block_until_ready(fwd(w))
            t2 = time.process_time()
            times[n][0].append(t1 - t0)
            times[n][1].append(t2 - t1)
    ref = grads["Implicit"]
    load = open("/proc/loadavg").read().split()[:3]
    print(
        f"d={a.d} batch={a.batch} float32 Broyden(tol=1e-5, history=40), forward steps "
        f"{int(steps.min())}-{int(steps.max())} (mean {float(steps.mean()):.1f}); loadavg {load}"
    )
    print(
        "| backward | grad CPU s (median) | forward CPU s | grad - forward "
        "| angle to Implicit (deg) |"
    )
    print("|---|---|---|---|---|")
    for n, (tg, tf) in times.items():
        g = grads[n]
        g, r = np.asarray(g, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
        cos = float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r)))
        ang = float(np.degrees(np.arccos(np.clip(cos, -1, 1))))
        mg, mf = np.median(tg), np.median(tf)
        print(f"| {n} | {mg:.4f} | {mf:.4f} | {mg - mf:.4f} | {ang:.2f} |")


if __name__ == "__main__":
    main()
