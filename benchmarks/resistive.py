"""Deep resistive networks: sweeps to converge and time per exact coordinate-descent sweep.

For DRN 784x2-H-10x2 (Scellier 2024's DRN-XS has H = 100, DRN-XL H = 32768) on the
first MNIST test images (random inputs if the data is absent), this measures

- sweeps to converge: Picard on `ResistiveNetwork.step` until max |ΔV| ≤ tol, for the
  free phase (β = 0, from zero volts) and the nudged phase (β = 1, from the free
  equilibrium), batch 4, per-example step counts (mean and max);
- time per sweep: a jitted `lax.scan` of `--sweeps` sweeps vmapped over the batch,
  timed by `benchmarks/_timing.py`: compile time (ahead of time: trace + lower + XLA
  compile) apart from the steady state (median wall and process CPU time of
  `--repeats` calls after one warm-up call, each ended by `block_until_ready`).

    python benchmarks/resistive.py --hidden 100 1024 4096 32768 --batch 4 64
    python benchmarks/resistive.py --quick     # H 100 and 1024, batch 4
"""

from __future__ import annotations

import argparse
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eqprop_jax.data import DataError, load_dataset
from eqprop_jax.equilibrium.solvers.picard import Picard
from eqprop_jax.models.resistive import ResistiveNetwork

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _timing, beside this file
from _timing import machine_info, time_jitted  # noqa: E402

MNIST = os.environ.get("EQPROP_DATA", "/work/shared/data") + "/mnist"


def inputs(n: int) -> np.ndarray:
    """The first n MNIST test images as 784-vectors in [0, 1] (uniform noise without
    the data)."""
    try:
        data = load_dataset("mnist", data_dir=MNIST).subset(test=n).flat()
    except DataError:
        return np.random.default_rng(0).uniform(size=(n, 784)).astype(np.float32)
    return data.x_test


def sweeps_to_converge(model, x, y, tol, max_steps):
    solver = Picard(tol=tol, rtol=0.0, max_steps=max_steps)

    # The model is an argument, not a closed-over constant, so XLA cannot fold its
    # conductances into the program (as in training, where they change every step).
    @eqx.filter_jit
    def run(model, x, y):
        def one(xi, yi):
            free = model.relax(xi, yi, 0.0, solver=solver)
            nudged = model.relax(xi, yi, 1.0, free.value, solver=solver)
            return free.stats.steps, nudged.stats.steps, free.result, nudged.result

        return jax.vmap(one)(x, y)

    return [np.asarray(a) for a in run(model, x, y)]


def time_sweeps(model, x, y, sweeps, repeats):
    """(compile s, wall s per sweep, CPU s per sweep)."""
    # The conductances are an argument, not closed-over constants, so XLA cannot fold
    # them into the program (as in training, where they change every step).
    params, static = eqx.partition(model, eqx.is_array)

    def run(params, x, y):
        m = eqx.combine(params, static)

        def one(xi, yi):
            def body(s, _):
                return m.step(s, xi, yi, 0.0), None

            return jax.lax.scan(body, m.init_state(xi), length=sweeps)[0]

        return jax.vmap(one)(x, y)

    timing, _ = time_jitted(run, params, x, y, min_runs=repeats, max_runs=repeats, min_time=0.0)
    return timing.compile_s, timing.median_s / sweeps, timing.cpu_median_s / sweeps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[100, 1024, 4096, 32768])
    p.add_argument("--batch", type=int, nargs="+", default=[4, 64])
    p.add_argument("--sweeps", type=int, default=5, help="sweeps per timed call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-4, help="volts, on max |ΔV| per sweep")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--input-gain", type=float, default=48.0)
    p.add_argument("--quick", action="store_true", help="H = 100 and 1024, batch 4, 3 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.batch, args.repeats = [100, 1024], [4], 3

    info = machine_info()
    print(
        f"{info['date']}, {info['platform']}, {info['cpus']} CPUs, jax {info['jax']} "
        f"{info['device']}, float32; {info['uptime']}"
    )
    x_all = inputs(max(args.batch))
    print(
        "| hidden | batch | free sweeps mean/max | nudged sweeps mean/max | compile s "
        "| ms per sweep | µs per sweep per example | CPU ms per sweep |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for hidden in args.hidden:
        model = ResistiveNetwork(
            (784, hidden, 10), key=jax.random.PRNGKey(0), input_gain=args.input_gain
        )
        conv = None
        for batch in args.batch:
            x = jnp.asarray(x_all[:batch])
            y = jnp.arange(batch) % 10
            if conv is None:
                free, nudged, r_free, r_nudged = sweeps_to_converge(
                    model, x[:4], y[:4], args.tol, args.max_steps
                )
                ok = bool(np.all(r_free == 0) and np.all(r_nudged == 0))
                conv = (
                    f"{free.mean():.1f}/{free.max()}",
                    f"{nudged.mean():.1f}/{nudged.max()}" + ("" if ok else " (not all)"),
                )
            compile_s, per_sweep, cpu = time_sweeps(model, x, y, args.sweeps, args.repeats)
            row = (
                hidden,
                batch,
                *conv,
                compile_s,
                1e3 * per_sweep,
                1e6 * per_sweep / batch,
                1e3 * cpu,
            )
            rows.append(row)
            print(
                f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]:.2f} | {row[5]:.3f} "
                f"| {row[6]:.1f} | {row[7]:.3f} |",
                flush=True,
            )
    print(f"load after: {machine_info()['uptime']}")
    return rows


if __name__ == "__main__":
    main()
