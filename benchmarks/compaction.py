r"""What batch compaction costs and saves: eqprop_jax's defaults (`batch_buckets=4`)
against the same solve in lockstep (`batch_buckets=1`, as `lax.while_loop` under
`vmap`), on uniform and on heterogeneous batches.

The problem is `benchmarks/solvers.py`'s batched tanh DEQ, z_i* = tanh(γ_i W z_i* +
s_i U x_i + b) (float32, ‖W‖₂ = 0.9, tol 1e-6), timed as `jax.value_and_grad` of
the mean squared error w.r.t. (W, U) with the default `Picard` + `Implicit`
(BiCGStab) solve, per example under `jax.vmap`:

- heterogeneous: γ_i from 0.02 to 1.06 and s_i from 3 to 0.03 as in solvers.py
  (3 … ~170 Picard iterations, median 14);
- uniform: γ_i = 0.5, s_i = 1 (every example takes 10–13 iterations).

On a uniform batch compaction has nothing to save, so its rows show the overhead
of the bucket bookkeeping; on a heterogeneous one they show what it saves. Each
pair is compiled ahead of time and timed interleaved; CPU = median process CPU
time over the calls (all threads), compile = trace + lower + XLA, wall seconds.

Run: `python benchmarks/compaction.py` (about a minute on 2 CPU cores), or
`--d 64 --batch 32,128` for other sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import eqprop_jax as eqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import solvers  # noqa: E402  (the problem and its injection)
from _timing import compile_timed_cpu, interleaved, machine_info  # noqa: E402


def problem(d: int, batch: int, uniform: bool) -> solvers.Problem:
    prob = solvers.make_problem(d, batch)
    if uniform:
        ones = np.ones(batch, np.float32)
        prob = dataclasses.replace(prob, gain=0.5 * ones, scale=ones)
    return prob


def value_and_grad(prob: solvers.Problem, buckets: int, tol: float = 1e-6):
    solver = eqp.Picard(tol=tol, batch_buckets=buckets)
    d = prob.W.shape[0]

    def loss(W, U):
        def one(inj, gain):
            return eqp.fixed_point(solvers.f_one, jnp.zeros(d), (W, inj, gain), solver=solver)

        sol = jax.vmap(one)(solvers.injection(prob, U), prob.gain)
        err = 0.5 * jnp.mean(jnp.sum((sol.value - prob.T) ** 2, -1))
        return err, sol.stats.steps

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def measure(d: int, batch: int, uniform: bool, rounds: int) -> dict:
    prob = problem(d, batch, uniform)
    args = (jnp.asarray(prob.W), jnp.asarray(prob.U))
    calls, compile_s, out = {}, {}, {}
    for buckets in (4, 1):
        fn, wall, _ = compile_timed_cpu(value_and_grad(prob, buckets), *args)
        calls[buckets], compile_s[buckets] = (fn, args), wall
        out[buckets] = jax.device_get(fn(*args))
    (_, steps), grads = out[4]
    # The same answer both ways (up to float32 reassociation inside the buckets).
    ref = np.concatenate([np.ravel(g) for g in out[1][1]])
    diff = np.linalg.norm(np.concatenate([np.ravel(g) for g in grads]) - ref)
    times = interleaved(calls, rounds)
    cpu = {k: 1e3 * float(np.median([c for _, c in v])) for k, v in times.items()}
    return {
        "steps": np.asarray(steps),
        "same_steps": bool(np.array_equal(steps, out[1][0][1])),
        "grad_rel_diff": float(diff / np.linalg.norm(ref)),
        "cpu": cpu,
        "compile": compile_s,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", default="64,256", help="state sizes, comma-separated")
    p.add_argument("--batch", default="32,128", help="batch sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=15, help="timed calls per row")
    args = p.parse_args(argv)
    info = machine_info()
    print(f"Machine: {info['platform']}, {info['cpus']} CPUs, jax {info['jax']}, {info['date']}")
    print(f"Load before: {info['uptime']}")
    print(
        "\n| d | batch | batch kind | iterations min / median / max | defaults (4 buckets): "
        "CPU ms | lockstep: CPU ms | lockstep / defaults | compile s: defaults / lockstep | "
        "gradient rel. difference |"
    )
    print("|---:|---:|---|---|---:|---:|---:|---|---:|")
    for d in (int(v) for v in args.d.split(",")):
        for batch in (int(v) for v in args.batch.split(",")):
            for uniform in (False, True):
                r = measure(d, batch, uniform, args.rounds)
                s, cpu, comp = r["steps"], r["cpu"], r["compile"]
                print(
                    f"| {d} | {batch} | {'uniform' if uniform else 'heterogeneous'} | "
                    f"{s.min()} / {int(np.median(s))} / {s.max()} | {cpu[4]:.2f} | "
                    f"{cpu[1]:.2f} | {cpu[1] / cpu[4]:.2f}× | {comp[4]:.2f} / {comp[1]:.2f} | "
                    f"{r['grad_rel_diff']:.1e} |",
                    flush=True,
                )
    print(f"\nLoad after: {machine_info()['uptime']}")


if __name__ == "__main__":
    main()
