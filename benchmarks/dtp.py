"""Time one L-DRL (DTP) training step against one backprop step.

A training step is, for DTP, `pre_step` (K_n L-DRL SGD steps per feedback layer) then
the DTP estimate and an SGD update of the forward weights; for backprop, autodiff of
the loss and the same SGD update. Compilation (trace + lower + XLA compile, wall and
process CPU time) and the steady state (median over `--repeats` calls, both steps
called round-robin, each call ended by `block_until_ready`; wall and process CPU
time, since the machine may be shared) are reported apart. Synthetic data of the
right shape. SimpleVGG uses the paper's K = (20, 30, 35, 55, 20).

    python benchmarks/dtp.py --models mlp lenet vgg --out benchmarks/results/dtp.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

import eqprop_jax as eqp
from eqprop_jax.diagnostics.dtp import backprop_gradients
from eqprop_jax.models.layered import LayeredNet

# Ernoult et al. 2022, CIFAR-10 SimpleVGG (feedback layers bottom to top).
VGG_STEPS = (20, 30, 35, 55, 20)
VGG_NOISE = (0.4, 0.4, 0.2, 0.2, 0.08)
VGG_LR = (1e-4, 3.5e-4, 8e-3, 8e-3, 0.18)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _timing, beside this file
from _timing import compile_timed_cpu, interleaved  # noqa: E402


def setups(names, batch, vgg_batch, key, *, dtype=jnp.float32, vgg_channels=None, vgg_steps=None):
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
            kw = {} if vgg_channels is None else {"channels": tuple(vgg_channels)}
            model, shape, b = (
                LayeredNet.simple_vgg(key=km, dtype=dtype, **kw),
                (3, 32, 32),
                vgg_batch,
            )
            steps = VGG_STEPS if vgg_steps is None else tuple(vgg_steps)
            est = eqp.DTP(beta=0.7, feedback_steps=steps, noise=VGG_NOISE, feedback_lr=VGG_LR)
        x = jax.random.normal(kx, (b, *shape), dtype)
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


def time_steps(steps, model, x, y, repeats):
    """{name: (compile wall s, compile CPU s, step wall s, step CPU s)}, the steady
    state timed round-robin (medians)."""
    params, static = eqx.partition(model, eqx.is_array)
    key = jax.random.PRNGKey(0)
    calls, compiled_s = {}, {}
    for name, step in steps.items():
        fn = lambda p, x, y, k, step=step: eqx.filter(
            step(eqx.combine(p, static), x, y, k), eqx.is_array
        )
        compiled, wall, cpu = compile_timed_cpu(fn, params, x, y, key)
        compiled_s[name] = (wall, cpu)
        calls[name] = (compiled, (params, x, y, key))
    times = interleaved(calls, repeats)
    return {
        name: (
            *compiled_s[name],
            statistics.median(t for t, _ in ts),
            statistics.median(c for _, c in ts),
        )
        for name, ts in times.items()
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--models", nargs="+", default=["mlp", "lenet", "vgg"], choices=["mlp", "lenet", "vgg"]
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--vgg-batch", type=int, default=128)
    p.add_argument("--vgg-channels", type=int, nargs=5, default=None, help="override widths")
    p.add_argument("--vgg-steps", type=int, nargs=5, default=None, help="override K_n")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cli = sys.argv[1:] if argv is None else list(argv)
    rows = []
    for name, model, x, y, est in setups(
        args.models,
        args.batch,
        args.vgg_batch,
        jax.random.PRNGKey(0),
        dtype=jnp.dtype(args.dtype),
        vgg_channels=args.vgg_channels,
        vgg_steps=args.vgg_steps,
    ):
        res = time_steps(make_steps(est), model, x, y, args.repeats)
        ratio = res["ldrl"][3] / res["bp"][3]
        rows.append((name, x.shape[0], est.feedback_steps, res, ratio))
        print(
            f"{name} batch {x.shape[0]}: bp compile {res['bp'][1]:.1f}s CPU, "
            f"step {res['bp'][2] * 1e3:.1f}ms wall {res['bp'][3] * 1e3:.1f}ms CPU | "
            f"L-DRL compile {res['ldrl'][1]:.1f}s CPU, step {res['ldrl'][2] * 1e3:.1f}ms wall "
            f"{res['ldrl'][3] * 1e3:.1f}ms CPU | ratio (CPU) {ratio:.1f}x",
            flush=True,
        )
    if args.out:
        now = datetime.datetime.now(datetime.UTC)
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        lines = [
            f"\n## Step time: L-DRL vs backprop ({now:%Y-%m-%d %H:%M} UTC)\n",
            f"Machine: 2-core CPU container, jax {jax.__version__}, {args.dtype}; "
            f"load at the end: `{load}`.",
            "Command: `python benchmarks/dtp.py " + " ".join(cli) + "`",
            "Synthetic data. One step = (DTP: L-DRL feedback training with K_n steps per "
            "layer + DTP estimate) + SGD on the forward weights; medians of "
            f"{args.repeats} round-robin calls (wall and process CPU time); compile = trace "
            "+ lower + XLA compile. MLP 784-256-256-10 and LeNet (conv16-conv32-fc128-10): "
            "K = 5; SimpleVGG: the paper's K = (20, 30, 35, 55, 20) unless overridden.\n",
            "| net | batch | K | BP compile s (wall / CPU) | BP step ms (wall / CPU) "
            "| L-DRL compile s (wall / CPU) | L-DRL step ms (wall / CPU) | L-DRL/BP (CPU) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, b, k, res, ratio in rows:
            bp, dtp = res["bp"], res["ldrl"]
            lines.append(
                f"| {name} | {b} | {k} | {bp[0]:.1f} / {bp[1]:.1f} | "
                f"{bp[2] * 1e3:.1f} / {bp[3] * 1e3:.1f} | {dtp[0]:.1f} / {dtp[1]:.1f} | "
                f"{dtp[2] * 1e3:.1f} / {dtp[3] * 1e3:.1f} | {ratio:.1f}x |"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
