"""Angles between a preset's gradient estimators and the implicit gradient, on a trained net.

Loads the model of a `eqprop-jax train` run (its `checkpoint.npz`), draws training
batches, and for each estimator reports the angle between its estimate and the
reference `rbp-implicit` (recurrent backprop with a Krylov adjoint on a tight solve,
i.e. the gradient of the loss at the fixed point), plus the median CPU and wall time
of one call (the estimators are interleaved batch by batch, so a loaded machine
disturbs them alike):

    python scripts/grad_angles.py --preset ernoult2019-p1h --run /work/runs/p1h-ep-v2 \\
        --estimators ep-positive ep-centered ep-holomorphic bptt --batches 100

Angles are per batch (batch size of the preset); median, 90th percentile and maximum.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import angle_deg, load_images

from eqprop_jax.presets import get_preset, to_layout
from eqprop_jax.train.checkpoint import load_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--run", required=True, help="a train --out folder with checkpoint.npz")
    p.add_argument("--estimators", nargs="+", required=True)
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default=None, help="the IDX folder (default: shared data)")
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    preset = get_preset(args.preset)
    data = load_images(args.dataset or preset.dataset, args.data_dir)
    x = to_layout(data.x_train, preset.layout)
    template = preset.model(jax.random.PRNGKey(0), x.shape[1:], data.num_classes)
    (model, _), info = load_checkpoint(Path(args.run) / "checkpoint.npz", (template, None))
    bs = preset.train.batch_size
    rng = np.random.default_rng(args.seed)
    batches = rng.permutation(len(x))[: args.batches * bs].reshape(args.batches, bs)

    def compile_(name):
        est = preset.make_estimator(name)
        return eqx.filter_jit(lambda m, xb, yb, k: est(m, xb, yb, key=k)[1])

    ref_fn = compile_("rbp-implicit")
    fns = {name: compile_(name) for name in args.estimators}
    angles = {name: [] for name in fns}
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    key = jax.random.PRNGKey(args.seed)
    for i, b in enumerate(batches):
        xb, yb = jnp.asarray(x[b]), jnp.asarray(data.y_train[b])
        k = jax.random.fold_in(key, i)
        ref = ref_fn(model, xb, yb, k)
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            g = jax.block_until_ready(fn(model, xb, yb, k))
            if i > 0:  # the first call compiles
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            angles[name].append(angle_deg(g, ref))
    print(
        f"{args.preset}, run {args.run} (epoch {info['epoch']}), {args.batches} training "
        f"batches of {bs}; load {open('/proc/loadavg').read().split()[0]}"
    )
    print("| estimator | angle median | p90 | max | CPU ms per call | wall ms per call |")
    print("|---|---|---|---|---|---|")
    for name in fns:
        a = np.asarray(angles[name])
        print(
            f"| {name} | {np.median(a):.2f}° | {np.quantile(a, 0.9):.2f}° | {a.max():.2f}° "
            f"| {1e3 * np.median(cpu[name]):.1f} | {1e3 * np.median(times[name]):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
