"""DRN-XS (784x2-100-10x2) on MNIST, trained by centered EP with the local conductance rule.

Setting of Scellier 2024 ("A fast algorithm to simulate nonlinear resistive networks",
DRN-XS, the size of Kendall et al. 2020): centered EP, β = 1, batch 4, SGD 0.006
(decayed ×0.99 per epoch), 4 exact coordinate-descent sweeps per phase, conductances
projected to g ≥ 0 after every update. Published: 3.46% test error after 10 epochs
(Kendall et al.: 3.43%).

Batch 4 makes the per-step overhead dominate, so each jitted call runs a `lax.scan`
over `--chunk` batches. Data: the IDX files in ../shared/data/mnist (read in place).

    python scripts/drn_mnist.py --epochs 10 --time-budget 1200
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import time
from datetime import UTC, datetime

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eqprop_jax.equilibrium.solvers.picard import Picard
from eqprop_jax.estimators.resistive_ep import ResistiveEP
from eqprop_jax.models.resistive import ResistiveNetwork

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    return x.reshape(len(x), -1).astype(np.float32) / 255.0, y.astype(np.int32)


def make_train_chunk(estimator: ResistiveEP):
    @eqx.filter_jit
    def train_chunk(model, xs, ys, lr):
        """`lax.scan` of projected-SGD steps over batches xs: (n_batches, batch, 784)."""
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def body(params, batch):
            m = eqx.combine(params, static)
            x, y = batch
            loss, grads, aux = estimator(m, x, jax.nn.one_hot(y, 10))
            m = eqx.apply_updates(m, jax.tree_util.tree_map(lambda g: -lr * g, grads))
            m = m.project()
            errors = jnp.sum(jnp.argmax(aux["predictions"], -1) != y)
            return eqx.filter(m, eqx.is_inexact_array), (loss, errors)

        params, (losses, errors) = jax.lax.scan(body, params, (xs, ys))
        return eqx.combine(params, static), jnp.mean(losses), jnp.sum(errors)

    return train_chunk


@eqx.filter_jit
def count_errors(model, xs, ys, sweeps):
    def one(x):
        return model.predict(model.relax(x, 0, 0.0, solver=Picard(tol=0.0, max_steps=sweeps)).value)

    return jnp.sum(jnp.argmax(jax.vmap(one)(xs), -1) != ys)


def evaluate(model, x, y, sweeps, block=1000):
    wrong = sum(
        int(count_errors(model, x[i : i + block], y[i : i + block], sweeps))
        for i in range(0, len(x), block)
    )
    return wrong / len(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop after the epoch that would overrun this many seconds of wall time",
    )
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.006)
    p.add_argument("--decay", type=float, default=0.99)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--sweeps", type=int, default=4, help="sweeps per phase (free, nudged)")
    p.add_argument(
        "--input-gain",
        type=float,
        default=100.0,
        help="g_in (the authors' code: 100 for DRN-XS, 480 for DRN-1H, 800 for DRN-XL)",
    )
    p.add_argument("--bias-voltage", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=1000, help="batches per jitted scan")
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--data", default=DATA)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    x_train, y_train = load(args.data, "train")
    x_test, y_test = load(args.data, "test")
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
    key = jax.random.PRNGKey(args.seed)
    kinit, kperm = jax.random.split(key)
    model = ResistiveNetwork(
        (784, args.hidden, 10),
        key=kinit,
        input_gain=args.input_gain,
        bias_voltage=args.bias_voltage,
    )
    estimator = ResistiveEP(
        beta=args.beta, variant="centered", free_steps=args.sweeps, nudged_steps=args.sweeps
    )
    train_chunk = make_train_chunk(estimator)
    per_chunk = args.chunk * args.batch
    n_chunks = len(x_train) // per_chunk
    print(
        f"DRN 784x2-{args.hidden}-10x2, centered EP beta={args.beta}, batch {args.batch}, "
        f"lr {args.lr}, {args.sweeps} sweeps/phase, input gain {args.input_gain}; "
        f"{n_chunks * per_chunk} training examples per epoch"
    )
    err0 = evaluate(model, x_test, y_test, args.sweeps)
    print(f"epoch 0: test error {100 * err0:.2f}%", flush=True)
    rows = []
    start = time.perf_counter()
    lr = args.lr
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(kperm, epoch), len(x_train)))
        losses, wrong = [], 0
        for c in range(n_chunks):
            idx = perm[c * per_chunk : (c + 1) * per_chunk]
            xs = x_train[idx].reshape(args.chunk, args.batch, 784)
            ys = y_train[idx].reshape(args.chunk, args.batch)
            model, loss, errs = train_chunk(model, xs, ys, jnp.float32(lr))
            losses.append(float(loss))
            wrong += int(errs)
        train_time = time.perf_counter() - t0
        test_err = evaluate(model, x_test, y_test, args.sweeps)
        epoch_time = time.perf_counter() - t0
        row = (
            epoch,
            100 * wrong / (n_chunks * per_chunk),
            100 * test_err,
            float(np.mean(losses)),
            train_time,
            epoch_time,
        )
        rows.append(row)
        print(
            f"epoch {epoch}: train error {row[1]:.2f}% (running), test error {row[2]:.2f}%, "
            f"loss {row[3]:.4f}, train {train_time:.1f}s, epoch incl. eval {epoch_time:.1f}s",
            flush=True,
        )
        lr *= args.decay
        elapsed = time.perf_counter() - start
        if args.time_budget is not None and elapsed + epoch_time > args.time_budget:
            print(f"stopping: {elapsed:.0f}s used of a {args.time_budget:.0f}s budget")
            break
    print()
    print(
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0].platform}"
    )
    print("| epoch | train error (running) | test error | train loss | train s | epoch s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f}% | {r[2]:.2f}% | {r[3]:.4f} | {r[4]:.0f} | {r[5]:.0f} |")
    return rows


if __name__ == "__main__":
    main()
