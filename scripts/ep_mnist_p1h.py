"""Train the P-1h network of Ernoult et al. 2019 on MNIST with EP and with BPTT.

784-512-10, prototypical dynamics s <- σ(∂Φ/∂s − β∂C/∂s) with
σ(x) = 1/(1 + e^{−4(x − 1/2)}), T = 40 free steps, K = 15 nudged steps, β = 0.1,
per-layer learning rates 0.08 (input → hidden) and 0.04 (hidden → output), batch 20,
plain SGD, MSE cost (the authors' `--lr_tab 0.04 0.08`, given from the output layer
down). BPTT uses the same net and initialisation and differentiates the last K = 15
of its T = 40 steps, as in the authors' `--benchmark` comparison. The paper trains
30 epochs for ~2% test error; pass as many epochs as your time allows.

    python scripts/ep_mnist_p1h.py --epochs 2 --methods ep bptt \
        --out benchmarks/results/ep.md

Data through `eqprop_jax.data` (the IDX files of /work/shared/data/mnist, checked
against their MD5SUMS); training through `eqprop_jax.train.fit` (SGD with one rate
per layer), one epoch at a time so that `--budget-min` can stop a method between
epochs. The first epoch's time includes compilation.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from _common import fit_by_epoch, load_images, machine, random_images

import eqprop_jax as eqp
from eqprop_jax.train import TrainConfig


def train(name, estimator, model, data, args, log):
    """Train one method; log a markdown row per epoch; return fit's rows."""
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        seed=args.seed,
        lr=(args.lr_in, args.lr_out),  # layer 0: W_0, b_0 (input → hidden); layer 1 above
        eval_solver=eqp.Picard(tol=0.0, max_steps=args.free),
        eval_batch_size=min(1000, len(data.x_test)),
        progress=False,
    )
    log(f"\n{name}\n")
    log("| epoch | test error | train loss | train time (s) | epoch time (s) |")
    log("|---|---|---|---|---|")

    def row(result):
        r = result.history[-1]
        log(
            f"| {r['epoch']} | {100 * (1 - r['test_accuracy']):.2f}% | {r['train_loss']:.4f} | "
            f"{r['train_time_s']:.1f} | {r['epoch_time_s']:.1f} |"
        )
        return {}

    budget = None if args.budget_min is None else 60 * args.budget_min

    def budget_note(line):  # fit's own lines would break the table
        if line.startswith("stopped after"):
            log(f"({line})")

    _, rows = fit_by_epoch(
        model, estimator, data, cfg, after_epoch=row, budget_s=budget, log=budget_note
    )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["ep", "bptt"], choices=["ep", "bptt"])
    p.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="stop a method after the epoch at which the next one would pass this many minutes",
    )
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--free", type=int, default=40)
    p.add_argument("--nudged", type=int, default=15)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr-in", type=float, default=0.08)
    p.add_argument("--lr-out", type=float, default=0.04)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--test-limit", type=int, default=None, help="test on the first N examples")
    p.add_argument("--data-dir", default=None, help="the MNIST IDX folder")
    p.add_argument("--smoke", action="store_true", help="random 8x8 data (the test)")
    p.add_argument("--out", type=Path, default=None, help="append the results to this file")
    args = p.parse_args(argv)

    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    if args.smoke:
        data = random_images("mnist", args.train_limit or 40, args.test_limit or 20).flat()
    else:
        data = load_images("mnist", args.data_dir, train=args.train_limit, test=args.test_limit)
        data = data.flat()
    n_in = data.x_train.shape[1]
    model = eqp.HopfieldMLP(
        (n_in, args.hidden, 10),
        key=jax.random.PRNGKey(args.seed),
        dynamics="prototypical",
        activation="sigmoid4",
        cost="mse",
        dtype=jnp.float32,
    )
    log(f"\n### P-1h on MNIST, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n")
    log(f"machine: {machine()} at start; float32")
    cli = sys.argv[1:] if argv is None else argv
    log(f"command: python scripts/ep_mnist_p1h.py {' '.join(cli)}".rstrip())
    log(
        f"settings: {n_in}-{args.hidden}-10, σ(x)=1/(1+e^(-4(x-0.5))), T {args.free}/"
        f"{args.nudged}, β {args.beta}, lrs {args.lr_in}/{args.lr_out}, batch {args.batch}, "
        f"SGD, {len(data.x_train)} train / {len(data.x_test)} test ({data.name})"
    )
    estimators = {
        "ep": (
            "EP (positive β)",
            eqp.EquilibriumProp(args.beta, free_steps=args.free, nudged_steps=args.nudged),
        ),
        "bptt": (
            f"BPTT (last {args.nudged} of {args.free} steps)",
            eqp.BPTT(args.free, truncate=args.nudged),
        ),
    }
    results = {}
    for method in args.methods:
        name, est = estimators[method]
        results[method] = train(name, est, model, data, args, log)
    log(f"\nload average at end {os.getloadavg()}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
