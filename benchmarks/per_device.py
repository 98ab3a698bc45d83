r"""Per-device compaction under `shard_map` against lockstep GSPMD sharding.

The uneven batched tanh DEQ of `benchmarks/solvers.py` (d 256, batch 128, 3 … 174
Picard iterations per example) is solved forward and differentiated (Implicit,
BiCGStab) with its batch split over n host devices in two ways:

- "lockstep (GSPMD)": `jax.jit` with the batch axis sharded and compaction off
  (`eqp.batch_compaction(False)`, what `train.fit` does when it shards): each
  device steps its slice until the slowest example of the *whole* batch stops;
- "per device (shard_map)": the vmapped solve runs under `jax.shard_map`, so each
  device's ragged loops compact its own slice and it stops when its own examples
  have converged ([`eqprop_jax.train.PerDevice`][] does this for estimators);

plus the one-device compacted solve for reference. Examples are in their natural
order (difficulty increasing along the batch: the last device gets the hardest
slice) and in a random order. Every row's gradient is checked against the
one-device gradient.

Run: `python benchmarks/per_device.py` (sets 8 host devices itself when
XLA_FLAGS does not) or `--quick`. On a 2-core machine 8 host devices share the 2
cores, so this measures the work each scheme does, not a speed-up from parallel
hardware.
"""

from __future__ import annotations

import argparse
import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import compile_timed, interleaved, machine_info, summarize  # noqa: E402
from solvers import f_one, make_problem  # noqa: E402

import eqprop_jax as eqp  # noqa: E402


def _loss_fn(prob, solve):
    def loss(W, U, inj_scale, X, T, gain):
        inj = inj_scale[:, None] * (X @ U.T) + prob.b
        Z, steps = solve(W, inj, gain)
        return 0.5 * jnp.mean(jnp.sum((Z - T) ** 2, axis=-1)), steps

    return loss


def _vmapped(W, inj, gain):
    def one(i, g):
        sol = eqp.fixed_point(f_one, jnp.zeros_like(i), (W, i, g))
        return sol.value, sol.stats.steps

    return jax.vmap(one)(inj, gain)


def build(prob, mesh, n: int):
    loss = _loss_fn(prob, _vmapped)
    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    batched = PartitionSpec("batch")

    def lockstep(W, U, s, X, T, gain):
        with eqp.batch_compaction(False):
            return grad(W, U, s, X, T, gain)

    def per_device(W, U, s, X, T, gain):
        def local(W, U, s, X, T, gain):
            (value, steps), g = grad(W, U, s, X, T, gain)
            return (lax.pmean(value, "batch"), steps), lax.pmean(g, "batch")

        rep = PartitionSpec()
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(rep, rep, batched, batched, batched, batched),
            out_specs=((rep, batched), rep),
            # The solver loops start their counters from constants (device-invariant)
            # that the body makes device-varying: skip the varying-axes type check.
            check_vma=False,
        )(W, U, s, X, T, gain)

    return {"one device, compacted": grad, "lockstep (GSPMD)": lockstep,
            "per device (shard_map)": per_device}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    d, batch = (32, 32) if args.quick else (256, 128)
    rounds = 2 if args.quick else args.rounds
    n = jax.device_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    prob = make_problem(d, batch)
    info = machine_info()
    lines = [
        f"# Per-device compaction vs lockstep sharding ({info['date']})",
        "",
        f"{n} {info['device']} devices; d {d}, batch {batch}; {info['uptime']}; "
        f"jax {info['jax']}; command: `python benchmarks/per_device.py"
        f"{' --quick' if args.quick else ''}`",
        "",
        "| order | scheme | fwd+grad CPU ms (median) | wall ms (min) | compile s "
        "| rel. error of grad vs one device |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rng = np.random.default_rng(0)
    for order_name, order in [("by difficulty", np.arange(batch)),
                              ("random", rng.permutation(batch))]:
        sharded = NamedSharding(mesh, PartitionSpec("batch"))
        data = [prob.W, prob.U, prob.scale[order], prob.X[order], prob.T[order], prob.gain[order]]
        data = [jnp.asarray(a) for a in data]
        on_mesh = [jax.device_put(a, NamedSharding(mesh, PartitionSpec())) for a in data[:2]]
        on_mesh += [jax.device_put(a, sharded) for a in data[2:]]
        calls, compile_s, outs = {}, {}, {}
        for name, fn in build(prob, mesh, n).items():
            inputs = data if name.startswith("one") else on_mesh
            compiled, compile_s[name] = compile_timed(fn, *inputs)
            calls[name] = (compiled, inputs)
            outs[name] = compiled(*inputs)
        times = interleaved(calls, rounds)
        ref = outs["one device, compacted"][1]
        for name in calls:
            t = summarize(compile_s[name], times[name])
            g = outs[name][1]
            err = max(
                float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                for a, b in zip(g, ref, strict=True)
            )
            lines.append(
                f"| {order_name} | {name} | {1e3 * t.cpu_median_s:.1f} | {1e3 * t.min_s:.1f} "
                f"| {t.compile_s:.1f} | {err:.1e} |"
            )
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
