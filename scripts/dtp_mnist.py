"""Train an MLP and a LeNet-sized conv net on MNIST with L-DRL (DTP) and with backprop.

Reads the IDX files from /work/shared/data/mnist (never copied into the repo), trains
with SGD + momentum on the forward weights (feedback weights trained by
`DTP.pre_step` before each DTP step), and appends test error, time per epoch and the
per-layer angles of `eqprop_jax.diagnostics.dtp_alignment` to a markdown file.

    python scripts/dtp_mnist.py --arch mlp lenet --epochs 2 --out benchmarks/results/dtp.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqprop_jax as eqp
from eqprop_jax.data.folder import read_idx
from eqprop_jax.diagnostics.dtp import backprop_gradients, dtp_alignment
from eqprop_jax.models.layered import LayeredNet

DATA = Path("/work/shared/data/mnist")


def load_mnist(folder: Path = DATA):
    def part(split, kind):
        return read_idx(folder / f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz")

    xtr = part("train", "images").astype(np.float32) / 255.0
    xte = part("t10k", "images").astype(np.float32) / 255.0
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return (
        xtr,
        part("train", "labels").astype(np.int32),
        xte,
        part("t10k", "labels").astype(np.int32),
    )


def build(arch: str, key):
    if arch == "mlp":
        return LayeredNet.mlp([784, 256, 256, 10], key=key, activation=jax.nn.elu)
    return LayeredNet.lenet(key=key)


def shape_inputs(arch, x):
    return x.reshape(len(x), 784) if arch == "mlp" else x.reshape(len(x), 1, 28, 28)


def make_step(method: str, est, opt):
    @eqx.filter_jit
    def step(model, opt_state, x, y, key):
        if method == "ldrl":
            model = est.pre_step(model, x, y, key=key)
            loss, grads, _ = est(model, x, y)
        else:
            loss, grads = backprop_gradients(model, x, y)
        fwd = eqx.filter(model.forward, eqx.is_inexact_array)
        updates, opt_state = opt.update(grads.forward, opt_state, fwd)
        model = eqx.tree_at(lambda m: m.forward, model, eqx.apply_updates(model.forward, updates))
        return model, opt_state, loss

    return step


@eqx.filter_jit
def _predict(model, x):
    return jnp.argmax(jax.vmap(model)(x), -1)


def test_error(model, x, y, batch=1000):
    wrong = 0
    for i in range(0, len(x), batch):
        wrong += int(jnp.sum(_predict(model, jnp.asarray(x[i : i + batch])) != y[i : i + batch]))
    return wrong / len(x)


def run(
    arch,
    method,
    epochs,
    batch,
    data,
    *,
    train_size,
    fb_steps=5,
    fb_lr=0.5,
    lr=0.05,
    seed=0,
    log=print,
):
    xtr, ytr, xte, yte = data
    xtr, ytr = xtr[:train_size], ytr[:train_size]
    xtr, xte = shape_inputs(arch, xtr), shape_inputs(arch, xte)
    key = jax.random.PRNGKey(seed)
    model = build(arch, key)
    # Feedback settings in the spirit of Ernoult et al. 2022 (σ larger at the bottom,
    # more steps for wider layers is theirs; here one K for all to keep CPU time low).
    # L-DRL gradients of a conv kernel sum over the H·W output positions of G, so its
    # learning rate is divided by H·W (the paper's bottom layers also use tiny lrs).
    shapes = model.shapes
    lrs = tuple(
        fb_lr / (math.prod(shapes[n - 1][1:]) if len(shapes[n - 1]) == 3 else 1.0)
        for n in range(2, model.num_layers + 1)
    )
    est = eqp.DTP(variant=eqp.LDRL(), beta=0.7, feedback_steps=fb_steps, noise=0.1, feedback_lr=lrs)
    steps_per_epoch = len(xtr) // batch
    sched = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
    opt = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(sched, momentum=0.9))
    opt_state = opt.init(eqx.filter(model.forward, eqx.is_inexact_array))
    step = make_step(method, est, opt)
    diag_x, diag_y = jnp.asarray(xte[:256]), jnp.asarray(yte[:256])
    if method == "ldrl":
        # Warm up the feedback weights on a few batches before forward training starts.
        for i in range(20):
            xb, yb = (
                jnp.asarray(xtr[i * batch : (i + 1) * batch]),
                jnp.asarray(ytr[i * batch : (i + 1) * batch]),
            )
            model = est.pre_step(model, xb, yb, key=jax.random.fold_in(key, 10_000 + i))
    history, times = [], []
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(xtr))
        t0 = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            model, opt_state, loss = step(
                model,
                opt_state,
                jnp.asarray(xtr[idx]),
                jnp.asarray(ytr[idx]),
                jax.random.fold_in(key, epoch * 100_000 + i),
            )
        jax.block_until_ready(model)
        times.append(time.perf_counter() - t0)
        err = test_error(model, xte, yte)
        diag = dtp_alignment(model, diag_x, diag_y, beta=1e-2)
        history.append({"epoch": epoch + 1, "test_error": err, "time": times[-1], **diag})
        log(
            f"{arch} {method} epoch {epoch + 1}: test error {100 * err:.2f}% "
            f"loss {float(loss):.3f} "
            f"time {times[-1]:.1f}s weight∠ {np.round(diag['weight_angle'], 1)} "
            f"update∠ {np.round(diag['update_angle'], 1)}"
        )
    return history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", nargs="+", default=["mlp", "lenet"], choices=["mlp", "lenet"])
    p.add_argument("--method", nargs="+", default=["ldrl", "bp"], choices=["ldrl", "bp"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-size", type=int, default=60_000)
    p.add_argument("--fb-steps", type=int, default=5)
    p.add_argument("--fb-lr", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cli = sys.argv[1:] if argv is None else list(argv)
    data = load_mnist()
    rows, lines = [], []
    for arch in args.arch:
        for method in args.method:
            h = run(
                arch,
                method,
                args.epochs,
                args.batch,
                data,
                train_size=args.train_size,
                fb_steps=args.fb_steps,
                fb_lr=args.fb_lr,
                lr=args.lr,
            )
            rows.append((arch, method, h))
    if args.out:
        now = datetime.datetime.now(datetime.UTC)
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        lines += [
            f"\n## MNIST: L-DRL vs backprop ({now:%Y-%m-%d %H:%M} UTC)\n",
            f"Machine: 2-core CPU container, jax {jax.__version__} ({platform.machine()}, "
            f"{os.cpu_count()} CPUs); load at the end: `{load}`.",
            "Command: `python scripts/dtp_mnist.py " + " ".join(cli) + "`",
            f"Train size {args.train_size}, batch {args.batch}, {args.epochs} epoch(s); "
            f"forward SGD lr {args.lr} momentum 0.9 wd 1e-4 cosine; L-DRL β 0.7, "
            f"K = {args.fb_steps} feedback SGD steps/batch/layer, σ 0.1, feedback lr "
            f"{args.fb_lr} (divided by H·W for conv feedback), 20 warm-up feedback batches. "
            "Angles (degrees) per layer "
            "F_1..F_N on 256 test images, DTP update at β = 0.01 vs backprop; weight∠ is W_n vs "
            "V_nᵀ (conv: kernel vs transposed kernel; '-' for layer 1, which has no feedback).\n",
            "| net | method | test error | time/epoch (s) | weight∠ W vs Vᵀ | update∠ vs BP "
            "| GN∠ |",
            "|---|---|---|---|---|---|---|",
        ]
        for arch, method, h in rows:
            last = h[-1]
            fmt = lambda a: " / ".join("-" if np.isnan(v) else f"{v:.1f}" for v in a)
            t = np.mean([e["time"] for e in h[1:]]) if len(h) > 1 else h[0]["time"]
            lines.append(
                f"| {arch} | {method} | {100 * last['test_error']:.2f}% | {t:.1f} | "
                + (
                    f"{fmt(last['weight_angle'])} | {fmt(last['update_angle'])} | "
                    f"{fmt(last['gn_angle'])} |"
                    if method == "ldrl"
                    else "n/a (feedback untrained) | | |"
                )
            )
        lines.append(
            "\nTime/epoch is training only (evaluation excluded); the first epoch includes "
            "compilation (the mean over epochs 2.. is given when there are several)."
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
