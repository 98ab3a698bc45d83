"""Train an MLP and a LeNet-sized conv net on MNIST with L-DRL (DTP) and with backprop.

Data through `eqprop_jax.data` (the IDX files of /work/shared/data/mnist, never copied
into the repo; standardised with the training split's mean and std); training through
`eqprop_jax.train.fit`: SGD 0.05 with momentum 0.9, weight decay 1e-4 and a cosine
schedule on the forward weights, the feedback weights frozen in that optimiser (they are
trained by `DTP.pre_step` before each DTP step). Appends test error, time per epoch and
the per-layer angles of `eqprop_jax.diagnostics.dtp_alignment` to a markdown file.

One part stays outside `fit`: before forward training starts, the feedback weights are
warmed up by `pre_step` on the first 20 batches (as Ernoult et al. 2022 train the
feedback alone first), a phase `fit` has no place for.

    python scripts/dtp_mnist.py --arch mlp lenet --epochs 2 --out benchmarks/results/dtp.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import channels_first, fit_by_epoch, load_images, machine, random_images

import eqprop_jax as eqp
from eqprop_jax.diagnostics.dtp import dtp_alignment
from eqprop_jax.estimators import Backprop
from eqprop_jax.estimators.dtp import feedback_mask
from eqprop_jax.models.layered import LayeredNet
from eqprop_jax.train import TrainConfig

WARMUP_BATCHES = 20


def build(arch: str, key):
    if arch == "mlp":
        return LayeredNet.mlp([784, 256, 256, 10], key=key, activation=jax.nn.elu)
    return LayeredNet.lenet(key=key)


def shaped(arch, data):
    """Flat vectors for the MLP, NCHW images for LeNet."""
    return data.flat() if arch == "mlp" else channels_first(data)


def warm_up_feedback(est, model, data, batch, key):
    """`pre_step` alone on the first WARMUP_BATCHES batches: the feedback weights learn
    before the forward weights move."""
    for i in range(WARMUP_BATCHES):
        xb = jnp.asarray(data.x_train[i * batch : (i + 1) * batch])
        yb = jnp.asarray(data.y_train[i * batch : (i + 1) * batch])
        if len(xb) < batch:
            break
        model = est.pre_step(model, xb, yb, key=jax.random.fold_in(key, 10_000 + i))
    return model


def run(
    arch,
    method,
    epochs,
    batch,
    data,
    *,
    fb_steps=5,
    fb_lr=0.5,
    lr=0.05,
    seed=0,
    log=print,
):
    data = shaped(arch, data)
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
    est = (
        eqp.DTP(variant=eqp.LDRL(), beta=0.7, feedback_steps=fb_steps, noise=0.1, feedback_lr=lrs)
        if method == "ldrl"
        else Backprop()
    )
    if method == "ldrl":
        model = warm_up_feedback(est, model, data, batch, key)
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch,
        seed=seed,
        lr=lr,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="cosine",
        frozen=feedback_mask,  # trained by DTP.pre_step, not by this optimiser
        eval_batch_size=min(1000, len(data.x_test)),
        progress=False,
    )
    diag_x, diag_y = jnp.asarray(data.x_test[:256]), jnp.asarray(data.y_test[:256])

    def after_epoch(result):
        diag = dtp_alignment(result.model, diag_x, diag_y, beta=1e-2)
        r = result.history[-1]
        log(
            f"{arch} {method} epoch {r['epoch']}: test error {100 * (1 - r['test_accuracy']):.2f}% "
            f"loss {r['train_loss']:.3f} time {r['train_time_s']:.1f}s "
            f"weight∠ {np.round(diag['weight_angle'], 1)} "
            f"update∠ {np.round(diag['update_angle'], 1)}"
        )
        return {"test_error": 1 - r["test_accuracy"], "time": r["train_time_s"], **diag}

    _, history = fit_by_epoch(model, est, data, cfg, after_epoch=after_epoch, log=lambda _: None)
    return history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", nargs="+", default=["mlp", "lenet"], choices=["mlp", "lenet"])
    p.add_argument("--method", nargs="+", default=["ldrl", "bp"], choices=["ldrl", "bp"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-size", type=int, default=60_000)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--fb-steps", type=int, default=5)
    p.add_argument("--fb-lr", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--data-dir", default=None, help="the MNIST IDX folder")
    p.add_argument("--smoke", action="store_true", help="random 28x28 data (the test)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cli = sys.argv[1:] if argv is None else list(argv)
    if args.smoke:
        data = random_images("mnist", args.train_size, args.test_size, shape=(28, 28, 1))
    else:
        data = load_images("mnist", args.data_dir, train=args.train_size, test=args.test_size)
    data = data.standardized()
    rows = []
    for arch in args.arch:
        for method in args.method:
            h = run(
                arch,
                method,
                args.epochs,
                args.batch,
                data,
                fb_steps=args.fb_steps,
                fb_lr=args.fb_lr,
                lr=args.lr,
            )
            rows.append((arch, method, h))
    if args.out:
        write_table(args, cli, rows)
    return rows


def write_table(args, cli, rows):
    now = datetime.datetime.now(datetime.UTC)
    lines = [
        f"\n## MNIST: L-DRL vs backprop ({now:%Y-%m-%d %H:%M} UTC)\n",
        f"Machine: {machine()} (at the end).",
        "Command: `python scripts/dtp_mnist.py " + " ".join(cli) + "`",
        f"Train size {args.train_size}, batch {args.batch}, {args.epochs} epoch(s); "
        f"forward SGD lr {args.lr} momentum 0.9 wd 1e-4 cosine (`eqprop_jax.train.fit`); "
        f"L-DRL β 0.7, K = {args.fb_steps} feedback SGD steps/batch/layer, σ 0.1, feedback lr "
        f"{args.fb_lr} (divided by H·W for conv feedback), {WARMUP_BATCHES} warm-up feedback "
        "batches. Angles (degrees) per layer "
        "F_1..F_N on 256 test images, DTP update at β = 0.01 vs backprop; weight∠ is W_n vs "
        "V_nᵀ (conv: kernel vs transposed kernel; '-' for layer 1, which has no feedback).\n",
        "| net | method | test error | time/epoch (s) | weight∠ W vs Vᵀ | update∠ vs BP | GN∠ |",
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


if __name__ == "__main__":
    main()
