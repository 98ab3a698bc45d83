"""DRN-XS (784x2-100-10x2) on MNIST, trained by centered EP with the local conductance rule.

Setting of Scellier 2024 ("A fast algorithm to simulate nonlinear resistive networks",
DRN-XS, the size of Kendall et al. 2020): centered EP, β = 1, batch 4, SGD 0.006
(decayed ×0.99 per epoch), 4 exact coordinate-descent sweeps per phase, conductances
projected to g ≥ 0 after every update. Published: 3.46% test error after 10 epochs
(Kendall et al.: 3.43%).

Data through `eqprop_jax.data` (the IDX files of /work/shared/data/mnist, read in
place); training through `eqprop_jax.train.fit`, whose step projects the network
after every update. The authors' ×0.99 decay per epoch is no `TrainConfig` schedule:
it is given to `fit` as an optax transformation (SGD on a staircase exponential
decay, one stair per epoch).

    python scripts/drn_mnist.py --epochs 10 --time-budget 1200
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime

import jax
import optax
from _common import fit_by_epoch, load_images, machine, random_images

from eqprop_jax.data import steps_per_epoch
from eqprop_jax.equilibrium.solvers.picard import Picard
from eqprop_jax.estimators.resistive_ep import ResistiveEP
from eqprop_jax.models.resistive import ResistiveNetwork
from eqprop_jax.train import TrainConfig, evaluate


def decayed_sgd(lr: float, decay: float, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD at rate lr · decay^epoch (the authors' per-epoch decay, Scellier 2024)."""
    return optax.sgd(optax.exponential_decay(lr, steps_per_epoch, decay, staircase=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop after the epoch at which the next one would overrun this many seconds",
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
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--data", default=None, help="the MNIST IDX folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="random 8x8 data (the test)")
    args = p.parse_args(argv)

    if args.smoke:
        data = random_images("mnist", args.train_size, args.test_size).flat()
    else:
        data = load_images("mnist", args.data, train=args.train_size, test=args.test_size)
        data = data.flat()
    n_in = data.x_train.shape[1]
    model = ResistiveNetwork(
        (n_in, args.hidden, 10),
        key=jax.random.PRNGKey(args.seed),
        input_gain=args.input_gain,
        bias_voltage=args.bias_voltage,
    )
    estimator = ResistiveEP(
        beta=args.beta, variant="centered", free_steps=args.sweeps, nudged_steps=args.sweeps
    )
    solver = Picard(tol=0.0, max_steps=args.sweeps)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        seed=args.seed,
        eval_solver=solver,
        eval_batch_size=min(1000, len(data.x_test)),
        progress=False,
    )
    spe = steps_per_epoch(len(data.x_train), args.batch)
    tx = decayed_sgd(args.lr, args.decay, spe)
    print(
        f"DRN {n_in}x2-{args.hidden}-10x2, centered EP beta={args.beta}, batch {args.batch}, "
        f"lr {args.lr} (x{args.decay} per epoch), {args.sweeps} sweeps/phase, input gain "
        f"{args.input_gain}; {spe * args.batch} training examples per epoch ({data.name})"
    )
    err0 = 1 - evaluate(model, data.x_test, data.y_test, batch_size=1000, solver=solver)["accuracy"]
    print(f"epoch 0: test error {100 * err0:.2f}%", flush=True)
    _, history = fit_by_epoch(model, estimator, data, cfg, optimizer=tx, budget_s=args.time_budget)
    rows = [
        (
            r["epoch"],
            100 * (1 - r["test_accuracy"]),
            r["train_loss"],
            r["train_time_s"],
            r["epoch_time_s"],
        )
        for r in history
    ]
    print()
    print(f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.uname().nodename}, {machine()}")
    print("| epoch | test error | train loss | train s | epoch s (incl. test) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f}% | {r[2]:.4f} | {r[3]:.0f} | {r[4]:.0f} |")
    return rows


if __name__ == "__main__":
    main()
