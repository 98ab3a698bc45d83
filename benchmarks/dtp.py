"""Time one L-DRL (DTP) training step against one backprop step.

A training step is, for DTP, `pre_step` (K_n L-DRL SGD steps per feedback layer) then
the DTP estimate and an SGD update of the forward weights; for backprop, autodiff of
the loss and the same SGD update. Compilation (first call minus a steady call) and
the steady-state time (median over `--repeats` calls, `block_until_ready`) are
reported apart. Synthetic data of the right shape.

    python benchmarks/dtp.py --models mlp lenet vgg --out benchmarks/results/dtp.md
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqprop_jax as eqp
from eqprop_jax.diagnostics.dtp import backprop_gradients
from eqprop_jax.models.layered import LayeredNet

# Ernoult et al. 2022, CIFAR-10 SimpleVGG (feedback layers bottom to top).
VGG_STEPS = (20, 30, 35, 55, 20)
VGG_NOISE = (0.4, 0.4, 0.2, 0.2, 0.08)
VGG_LR = (1e-4, 3.5e-4, 8e-3, 8e-3, 0.18)


def setups(names, batch, vgg_batch, key):
    kx, ky, km = jax.random.split(key, 3)
    for name in names:
        if name == "mlp":
            model, shape, b = (
                LayeredNet.mlp([784, 256, 256, 10], key=km, activation=jax.nn.elu),
                (784,),
                batch,
            )
            est = eqp.DTP(beta=0.7, feedback_steps=5, noise=0.1, feedback_lr=0.5)
        elif name == "lenet":
            model, shape, b = LayeredNet.lenet(key=km), (1, 28, 28), batch
            est = eqp.DTP(beta=0.7, feedback_steps=5, noise=0.1, feedback_lr=(0.5 / 196, 0.5, 0.5))
        else:
            model, shape, b = LayeredNet.simple_vgg(key=km), (3, 32, 32), vgg_batch
            est = eqp.DTP(beta=0.7, feedback_steps=VGG_STEPS, noise=VGG_NOISE, feedback_lr=VGG_LR)
        x = jax.random.normal(kx, (b, *shape), jnp.float32)
        y = jax.random.randint(ky, (b,), 0, 10)
        yield name, model, x, y, est


def _sgd(model, grads, lr=0.05):
    new_fwd = jax.tree.map(
        lambda p, g: p - lr * g, eqx.filter(model.forward, eqx.is_inexact_array), grads.forward
    )
    return eqx.tree_at(lambda m: m.forward, model, eqx.combine(new_fwd, model.forward))


def make_steps(est):
    @eqx.filter_jit
    def dtp_step(model, x, y, key):
        model = est.pre_step(model, x, y, key=key)
        loss, grads, _ = est(model, x, y)
        return _sgd(model, grads), loss

    @eqx.filter_jit
    def bp_step(model, x, y, key):
        loss, grads = backprop_gradients(model, x, y)
        return _sgd(model, grads), loss

    return {"ldrl": dtp_step, "bp": bp_step}


def time_step(step, model, x, y, repeats):
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    jax.block_until_ready(step(model, x, y, key))
    first = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(model, x, y, jax.random.fold_in(key, i)))
        times.append(time.perf_counter() - t0)
    steady = float(np.median(times))
    return max(first - steady, 0.0), steady


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--models", nargs="+", default=["mlp", "lenet", "vgg"], choices=["mlp", "lenet", "vgg"]
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--vgg-batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cli = sys.argv[1:] if argv is None else list(argv)
    rows = []
    for name, model, x, y, est in setups(
        args.models, args.batch, args.vgg_batch, jax.random.PRNGKey(0)
    ):
        steps = make_steps(est)
        res = {m: time_step(steps[m], model, x, y, args.repeats) for m in ("bp", "ldrl")}
        ratio = res["ldrl"][1] / res["bp"][1]
        rows.append((name, x.shape[0], est.feedback_steps, res, ratio))
        print(
            f"{name} batch {x.shape[0]}: bp compile {res['bp'][0]:.2f}s "
            f"step {res['bp'][1] * 1e3:.1f}ms | L-DRL compile {res['ldrl'][0]:.2f}s "
            f"step {res['ldrl'][1] * 1e3:.1f}ms | ratio {ratio:.1f}x",
            flush=True,
        )
    if args.out:
        now = datetime.datetime.now(datetime.UTC)
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        lines = [
            f"\n## Step time: L-DRL vs backprop ({now:%Y-%m-%d %H:%M} UTC)\n",
            f"Machine: 2-core CPU container, jax {jax.__version__}, float32; "
            f"load at the end: `{load}`.",
            "Command: `python benchmarks/dtp.py " + " ".join(cli) + "`",
            "Synthetic data. One step = (DTP: L-DRL feedback training with K_n steps per "
            "layer + DTP estimate) + SGD on the forward weights; median of "
            f"{args.repeats} calls; compile = first call minus steady call. MLP "
            "784-256-256-10 and LeNet (conv16-conv32-fc128-10): K = 5; SimpleVGG: the "
            "paper's K = (20, 30, 35, 55, 20).\n",
            "| net | batch | K | BP compile (s) | BP step (ms) | L-DRL compile (s) "
            "| L-DRL step (ms) | L-DRL/BP |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, b, k, res, ratio in rows:
            lines.append(
                f"| {name} | {b} | {k} | {res['bp'][0]:.1f} | {res['bp'][1] * 1e3:.1f} | "
                f"{res['ldrl'][0]:.1f} | {res['ldrl'][1] * 1e3:.1f} | {ratio:.1f}x |"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
