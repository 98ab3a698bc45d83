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

Reads the IDX files from ../shared/data/mnist (checked against MD5SUMS).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import os
import platform
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqprop_jax as eqp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes.")
    return data.reshape(shape)


def load_mnist(folder: Path = DATA) -> dict[str, np.ndarray]:
    """The 60k/10k MNIST split, images as float32 in [0, 1] of shape (n, 784)."""
    sums = {}
    for line in (folder / "MD5SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name] = digest
    out = {}
    for key, name in FILES.items():
        path = folder / name
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if sums.get(name) != digest:
            raise ValueError(f"{path}: MD5 {digest} does not match MD5SUMS ({sums.get(name)}).")
        arr = _read_idx(path)
        if key.endswith("_x"):
            arr = arr.reshape(len(arr), -1).astype(np.float32) / 255.0
        else:
            arr = arr.astype(np.int32)
        out[key] = arr
    return out


def make_train_step(estimator, lrs):
    @eqx.filter_jit
    def train_step(model, x, y):
        loss, grads, aux = estimator(model, x, y)
        updates = jax.tree_util.tree_map(lambda g, lr: -lr * g, grads, lrs)
        errors = jnp.sum(jnp.argmax(aux["predictions"], -1) != y)
        return eqx.apply_updates(model, updates), loss, errors

    return train_step


def make_evaluate(steps):
    @eqx.filter_jit
    def errors(model, x, y):
        def one(xi):
            return model.predict(
                model.relax(xi, 0, 0.0, solver=eqp.Picard(0.0, max_steps=steps)).value
            )

        return jnp.sum(jnp.argmax(jax.vmap(one)(x), -1) != y)

    return errors


def test_error(evaluate, model, x, y, chunk=1000):
    wrong = sum(
        int(evaluate(model, x[i : i + chunk], y[i : i + chunk])) for i in range(0, len(x), chunk)
    )
    return wrong / len(x)


def layer_lrs(model, lr_in, lr_out):
    """Learning rates with the structure of the gradients: lr_in for W_0, b_0, lr_out above."""
    params = eqx.filter(model, eqx.is_inexact_array)
    n = len(model.weights)
    rates = [lr_in] + [lr_out] * (n - 1)
    return eqx.tree_at(
        lambda m: (m.weights, m.biases),
        params,
        (tuple(rates), tuple(rates)),
    )


def train(name, estimator, model, data, args, log):
    lrs = layer_lrs(model, args.lr_in, args.lr_out)
    step = make_train_step(estimator, lrs)
    evaluate = make_evaluate(args.free)
    x, y = data["train_x"], data["train_y"]
    n = (len(x) if args.train_limit is None else args.train_limit) // args.batch * args.batch
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    jax.block_until_ready(step(model, x[: args.batch], y[: args.batch]))
    compile_s = time.perf_counter() - t0
    log(f"\n{name}: compile {compile_s:.1f} s")
    log("| epoch | train error | test error | epoch time (s) | mean loss |")
    log("|---|---|---|---|---|")
    start = time.perf_counter()
    rows = []
    for epoch in range(1, args.epochs + 1):
        perm = rng.permutation(len(x))[:n]
        t0 = time.perf_counter()
        wrong, losses = 0, []
        for i in range(0, n, args.batch):
            idx = perm[i : i + args.batch]
            model, loss, errs = step(model, x[idx], y[idx])
            wrong += errs
            losses.append(loss)
        jax.block_until_ready(model)
        epoch_s = time.perf_counter() - t0
        train_err = int(wrong) / n
        test_err = test_error(evaluate, model, data["test_x"], data["test_y"])
        mean_loss = float(jnp.mean(jnp.stack(losses)))
        log(
            f"| {epoch} | {100 * train_err:.2f}% | {100 * test_err:.2f}% | {epoch_s:.1f} | "
            f"{mean_loss:.4f} |"
        )
        rows.append((epoch, train_err, test_err, epoch_s))
        if args.budget_min and time.perf_counter() - start > 60 * args.budget_min:
            log(f"(stopped after epoch {epoch}: time budget {args.budget_min} min reached)")
            break
    return model, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["ep", "bptt"], choices=["ep", "bptt"])
    p.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="stop a method after the epoch that passes this many minutes",
    )
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--free", type=int, default=40)
    p.add_argument("--nudged", type=int, default=15)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr-in", type=float, default=0.08)
    p.add_argument("--lr-out", type=float, default=0.04)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--out", type=Path, default=None, help="append the results to this file")
    args = p.parse_args(argv)

    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    data = load_mnist()
    model = eqp.HopfieldMLP(
        (784, 512, 10),
        key=jax.random.PRNGKey(args.seed),
        dynamics="prototypical",
        activation="sigmoid4",
        cost="mse",
        dtype=jnp.float32,
    )
    log(f"\n### P-1h on MNIST, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n")
    log(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"({jax.default_backend()}), float32; load average at start {os.getloadavg()}"
    )
    cli = sys.argv[1:] if argv is None else argv
    log(f"command: python scripts/ep_mnist_p1h.py {' '.join(cli)}".rstrip())
    log(
        f"settings: 784-512-10, σ(x)=1/(1+e^(-4(x-0.5))), T {args.free}/{args.nudged}, "
        f"β {args.beta}, lrs {args.lr_in}/{args.lr_out}, batch {args.batch}, SGD, "
        f"{'full 60k' if args.train_limit is None else args.train_limit} train / 10k test"
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
    for method in args.methods:
        name, est = estimators[method]
        train(name, est, model, data, args, log)
    log(f"load average at end {os.getloadavg()}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
