"""A deep equilibrium classifier on MNIST and Fashion-MNIST, trained with each backward.

Model: an equinox MLP encoder u = MLP(x), a DEQ layer z* = tanh(W z* + u)
(`eqp.DEQ`, solved by Anderson acceleration per example), and a linear head
logits = V z*. The same model is trained with each backward pass:

- `implicit`: `eqp.Implicit()`, the implicit function theorem (BiCGStab);
- `almeida_pineda`: `eqp.AlmeidaPineda()`, recurrent backprop to tolerance;
- `jfb`: `eqp.JacobianFree()`, Jacobian-free backprop (Fung et al. 2022);
- `phantom`: `eqp.PhantomGradient(k=5, damping=0.5)` (Geng et al. 2021);

each without and with Jacobian regularisation, γ ‖∂f/∂z‖_F² / d at z*
(`eqp.jacobian_frobenius`, Bai et al. 2021, one Gaussian probe per example), and
`implicit` once more with warm starts: each training example's solve starts from
its own equilibrium of the previous epoch (z0 = z*_prev), and every warm-started
batch is also solved from zeros at the same parameters to count the iterations
saved.

Recorded per run: test accuracy after each epoch, time per epoch (train steps only,
wall and process CPU, with the load average), forward iterations per batch, the
angle between each inexact backward's gradient and `Implicit`'s at the same
parameters and batch (`eqp.gradient_alignment`, every `--angle-every` steps), the
backward solves' failure count (an `eqp.adjoint_probe`; adjoints run with
`on_failure="ignore"` so a failed check is counted rather than turned into NaN),
and the spectral radius of ∂f/∂z at z* on test examples (`eqp.spectral_radius`).
The configurations are interleaved epoch by epoch, so load from other jobs is
shared among them; after training, one step of each configuration is timed from the
same weights and batch, round-robin (`--time-rounds`), for a cleaner ms/step.
Outputs in `--out`: `results.json`, `table.md`, `iterations.png`, `angles.png`,
`accuracy.png`.

Data come from `eqprop_jax.data`. The training loop is this script's own, not
`eqprop_jax.train.fit`: what it measures lives inside the step and between the runs,
where `fit` has no place for it: each step passes adjoint probes through the solve
and returns z* (for the next epoch's warm start, started from a per-example z0 that
`fit`'s estimators cannot take), the inexact backwards are compared with `Implicit`
on the same batch before their update, and the configurations are interleaved epoch
by epoch so that the machine's load falls on all of them alike.

    python scripts/deq_mnist.py --quick          # a short run on subsets (minutes)
    python scripts/deq_mnist.py --smoke          # random data, seconds (the test)
    python scripts/deq_mnist.py --epochs 5 --train-size 60000 --test-size 10000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from datetime import UTC, datetime

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import DATA_ROOT, load_images, machine, random_images

import eqprop_jax as eqp
from eqprop_jax.data import Dataset

BACKWARDS = ("implicit", "almeida_pineda", "jfb", "phantom")
EVAL_ADJOINT = eqp.Implicit(on_failure="ignore")


def make_adjoint(name: str, phantom_k: int = 5, phantom_damping: float = 0.5):
    # Training counts failed backward checks through the probe instead of turning them
    # into NaN gradients (which would end the run at the first one).
    if name == "implicit":
        return eqp.Implicit(on_failure="ignore")
    if name == "almeida_pineda":
        return eqp.AlmeidaPineda(on_failure="ignore")
    if name == "jfb":
        return eqp.JacobianFree(on_failure="ignore")
    if name == "phantom":
        return eqp.PhantomGradient(k=phantom_k, damping=phantom_damping, on_failure="ignore")
    raise ValueError(f"unknown backward {name!r}; choose from {BACKWARDS}.")


class Cell(eqx.Module):
    """f(z, u) = tanh(W z + u); the input carries u and the starting state z0."""

    w: eqx.nn.Linear

    def __call__(self, z, inp):
        return jnp.tanh(self.w(z) + inp["u"])


def start_at_z0(inp):
    # A module-level function, not a lambda per model: jitted functions are cached on
    # the model's static parts, and a new lambda per model would recompile every run.
    return inp["z0"]


class Classifier(eqx.Module):
    encoder: eqx.nn.MLP
    deq: eqp.DEQ
    head: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, solver, adjoint, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.encoder = eqx.nn.MLP(n_in, hidden, hidden, 1, activation=jax.nn.relu, key=k1)
        w = eqx.nn.Linear(hidden, hidden, use_bias=False, key=k2)
        # Start well inside the contraction regime: ‖W‖₂ = 0.5.
        w = eqx.tree_at(lambda lin: lin.weight, w, 0.5 * w.weight / jnp.linalg.norm(w.weight, 2))
        self.deq = eqp.DEQ(Cell(w), z_init=start_at_z0, solver=solver, adjoint=adjoint)
        self.head = eqx.nn.Linear(hidden, n_out, key=k3)

    def solve(self, x, z0, probe=None):
        """The Solution and the DEQ's input, for one example started at z0."""
        inp = {"u": self.encoder(x), "z0": z0}
        return self.deq.solve(inp, probe=probe), inp


def with_adjoint(model: Classifier, adjoint) -> Classifier:
    # The DEQ's adjoint is a static setting: build the layer anew around the same cell.
    deq = model.deq
    new = eqp.DEQ(deq.cell, z_init=deq.z_init, solver=deq.solver, adjoint=adjoint)
    return eqx.tree_at(lambda m: m.deq, model, new)


def cross_entropy(model, x, y, z0, probes, jac_weight, key):
    """Mean cross-entropy (+ γ · Hutchinson ‖J‖_F² / d) and the solves' statistics."""

    def one(x, y, z0, p, k):
        sol, inp = model.solve(x, z0, p)
        logits = model.head(sol.value)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        reg = jnp.zeros(())
        if jac_weight:
            reg = eqp.jacobian_frobenius(model.deq.cell, sol.value, inp, key=k) / z0.size
        return ce, reg, sol.value, sol.stats.steps, jnp.argmax(logits) == y

    keys = jax.random.split(key, x.shape[0])
    ce, reg, z, steps, correct = jax.vmap(one)(x, y, z0, probes, keys)
    loss = jnp.mean(ce) + jac_weight * jnp.mean(reg)
    return loss, (jnp.mean(ce), jnp.mean(reg), z, steps, jnp.mean(correct))


def make_train_step(optimizer, jac_weight):
    @eqx.filter_jit
    def train_step(model, opt_state, x, y, z0, key):
        probes = jnp.zeros((x.shape[0], 3), jnp.float32)
        (loss, aux), (grads, g_probe) = _grads(model, probes, x, y, z0, jac_weight, key)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        failures = jnp.sum(g_probe[:, 2])
        return model, opt_state, loss, aux, failures

    return train_step


def _grads(model, probes, x, y, z0, jac_weight, key):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, probes):
        return cross_entropy(eqx.combine(params, static), x, y, z0, probes, jac_weight, key)

    (value, aux), (g_params, g_probe) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, probes
    )
    return (value, aux), (g_params, g_probe)


@eqx.filter_jit
def ce_grad(model, x, y, z0):
    """The gradient of the plain cross-entropy (the backward alone, for the angles)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    probes = jnp.zeros((x.shape[0], 3), jnp.float32)
    key = jax.random.key(0)

    def loss(params):
        return cross_entropy(eqx.combine(params, static), x, y, z0, probes, 0.0, key)[0]

    return jax.grad(loss)(params)


@eqx.filter_jit
def forward_steps(model, x, z0):
    return jax.vmap(lambda x, z0: model.solve(x, z0)[0].stats.steps)(x, z0)


@eqx.filter_jit
def test_batch(model, x, y, key):
    def one(x, y):
        z0 = jnp.zeros(model.head.in_features, x.dtype)
        sol, inp = model.solve(x, z0)
        rho = eqp.spectral_radius(model.deq.cell, sol.value, inp, key=key, max_steps=200,
                                  tol=1e-3)
        return jnp.argmax(model.head(sol.value)) == y, rho.value, sol.stats.steps

    return jax.vmap(one)(x, y)


def evaluate(model, x, y, key, block=1000):
    model = with_adjoint(model, EVAL_ADJOINT)  # forward only: one compilation for every run
    correct, rho, steps = [], [], []
    for i in range(0, len(x), block):
        c, r, s = test_batch(model, x[i : i + block], y[i : i + block], key)
        correct.append(np.asarray(c))
        rho.append(np.asarray(r))
        steps.append(np.asarray(s))
    correct, rho, steps = map(np.concatenate, (correct, rho, steps))
    return float(correct.mean()), float(rho.mean()), float(rho.max()), float(steps.mean())


@dataclasses.dataclass
class Run:
    dataset: str
    backward: str
    jac_weight: float
    warm_start: bool
    model: Classifier
    opt_state: object
    step: object
    z_prev: np.ndarray | None
    history: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self):
        name = self.backward + (" +JR" if self.jac_weight else "") + (" +warm" if self.warm_start
                                                                      else "")
        return name


def load(name: str, args) -> Dataset:
    if args.smoke:
        return random_images(name, 64, 32)
    data = load_images(name, os.path.join(args.data, name), train=args.train_size,
                       test=args.test_size)
    return data.standardized().flat()


def run_epoch(run: Run, data: Dataset, epoch: int, args, angle_fns):
    x_all = data.x_train if data.x_train.ndim == 2 else data.x_train.reshape(len(data.x_train), -1)
    n = len(x_all) // args.batch * args.batch
    perm = np.random.default_rng(args.seed * 1000 + epoch).permutation(len(x_all))[:n]
    h = run.history
    wall = cpu = 0.0
    key = jax.random.key(args.seed + 7919 * epoch)
    for i in range(0, n, args.batch):
        idx = perm[i : i + args.batch]
        x, y = jnp.asarray(x_all[idx]), jnp.asarray(data.y_train[idx])
        if run.warm_start and run.z_prev is not None:
            z0 = jnp.asarray(run.z_prev[idx])
        else:
            z0 = jnp.zeros((len(idx), args.hidden), jnp.float32)
        global_step = len(h["steps"])
        measure_angle = run.backward != "implicit" and global_step % args.angle_every == 0
        if measure_angle:
            g_ref = angle_fns(with_adjoint(run.model, EVAL_ADJOINT), x, y, z0)
            g_est = angle_fns(run.model, x, y, z0)
            h["angles"].append((global_step, eqp.gradient_alignment(g_est, g_ref).overall.angle))
        if run.warm_start and run.z_prev is not None:
            cold = forward_steps(with_adjoint(run.model, EVAL_ADJOINT), x, jnp.zeros_like(z0))
            h["cold_steps"].append(float(jnp.mean(cold)))
        args_ = (run.model, run.opt_state, x, y, z0, jax.random.fold_in(key, i))
        if not h["steps"]:  # compile outside the timed region (the result is discarded)
            jax.block_until_ready(run.step(*args_))
        t0, c0 = time.perf_counter(), time.process_time()
        run.model, run.opt_state, loss, aux, failures = run.step(*args_)
        jax.block_until_ready(run.model)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        ce, reg, z, steps, acc = aux
        if run.warm_start:
            if run.z_prev is None:
                run.z_prev = np.zeros((len(x_all), args.hidden), np.float32)
            # Carried into the next epoch only: this epoch's later batches are other examples.
            h.setdefault("_z_next", np.zeros_like(run.z_prev))[idx] = np.asarray(z)
        h["steps"].append(float(jnp.mean(steps)))
        h["loss"].append(float(ce))
        h["reg"].append(float(reg))
        h["failures"] += int(failures)
    if run.warm_start:
        run.z_prev = h.pop("_z_next")
        h["warm_epochs"].append(epoch)
    h["epoch_wall"].append(wall)
    h["epoch_cpu"].append(cpu)
    h["epoch_load"].append(os.getloadavg()[0])
    h["epoch_end_step"].append(len(h["steps"]))


def train_all(args):
    key = jax.random.key(args.seed)
    solver = eqp.Anderson(tol=args.tol, max_steps=args.max_steps, batch_buckets=args.buckets)
    optimizer = optax.adam(args.lr)
    runs, datasets, train_steps = [], {}, {}
    for name in args.datasets:
        data = load(name, args)
        datasets[name] = data
        n_in = int(np.prod(data.x_train.shape[1:]))
        configs = [(b, w, False) for b in args.backwards for w in args.jac_weights]
        if args.warm_start:
            configs.append(("implicit", args.jac_weights[0], True))
        for backward, jw, warm in configs:
            adjoint = make_adjoint(backward, args.phantom_k, args.phantom_damping)
            model = Classifier(n_in, args.hidden, data.num_classes, solver, adjoint, key=key)
            if jw not in train_steps:  # one jitted step per γ, shared by datasets and adjoints
                train_steps[jw] = make_train_step(optimizer, jw)
            run = Run(name, backward, jw, warm, model,
                      optimizer.init(eqx.filter(model, eqx.is_array)), train_steps[jw], None)
            run.history = {k: [] for k in ("steps", "cold_steps", "loss", "reg", "angles",
                                           "epoch_wall", "epoch_cpu", "epoch_load",
                                           "epoch_end_step", "test_acc", "rho_mean",
                                           "rho_max", "test_steps", "warm_epochs")}
            run.history["failures"] = 0
            runs.append(run)
    print(f"{len(runs)} runs on {machine()}", flush=True)
    for epoch in range(1, args.epochs + 1):
        for run in runs:  # interleaved: every configuration runs its epoch in turn
            data = datasets[run.dataset]
            run_epoch(run, data, epoch, args, ce_grad)
            acc, rho_mean, rho_max, test_steps = evaluate(
                run.model, data.x_test.reshape(len(data.x_test), -1), data.y_test,
                jax.random.key(1), block=args.eval_block,
            )
            h = run.history
            h["test_acc"].append(acc)
            h["rho_mean"].append(rho_mean)
            h["rho_max"].append(rho_max)
            h["test_steps"].append(test_steps)
            ang = [a for _, a in h["angles"]]
            print(
                f"[{run.dataset}] {run.label:<22} epoch {epoch}: test acc {100 * acc:5.2f}%  "
                f"train steps {h['epoch_wall'][-1]:6.1f}s wall {h['epoch_cpu'][-1]:6.1f}s cpu  "
                f"fwd iters {statistics.mean(h['steps'][-5:]):5.1f}  rho(J) {rho_mean:.3f}"
                + (f"  angle {ang[-1]:5.1f} deg" if ang else ""),
                flush=True,
            )
    return runs, datasets


def time_steps(runs, datasets, args):
    """Median CPU time of one training step per configuration, interleaved.

    Every configuration of a dataset steps from the same weights (the end of the
    plain `implicit` run, or of the first run) on the same batch, round-robin for
    `--time-rounds` rounds, so that other jobs' load falls on all of them alike.
    Returns {(dataset, label): (median CPU ms, median wall ms)}; warm-start runs are
    not timed (their step is the implicit one from another z0).
    """
    out = {}
    for name, data in datasets.items():
        group = [r for r in runs if r.dataset == name and not r.warm_start]
        base = next((r for r in group if r.backward == "implicit" and not r.jac_weight), group[0])
        x = jnp.asarray(data.x_train[: args.batch].reshape(args.batch, -1))
        y = jnp.asarray(data.y_train[: args.batch])
        z0 = jnp.zeros((args.batch, args.hidden), jnp.float32)
        calls = []
        for r in group:
            model = with_adjoint(base.model, make_adjoint(r.backward, args.phantom_k,
                                                          args.phantom_damping))
            # The optimiser state mirrors the model, static adjoint included: base's
            # arrays in this run's structure.
            opt_state = jax.tree.unflatten(jax.tree.structure(r.opt_state),
                                           jax.tree.leaves(base.opt_state))
            call_args = (model, opt_state, x, y, z0, jax.random.key(0))
            jax.block_until_ready(r.step(*call_args))  # compiled already; warm the caches
            calls.append((r, call_args))
        times = {r.label: ([], []) for r, _ in calls}
        for _ in range(args.time_rounds):
            for r, call_args in calls:
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(r.step(*call_args))
                times[r.label][0].append(time.process_time() - c0)
                times[r.label][1].append(time.perf_counter() - t0)
        for label, (cpu, wall) in times.items():
            out[(name, label)] = (1e3 * statistics.median(cpu), 1e3 * statistics.median(wall))
    return out


def summarise(runs, args) -> list[dict]:
    rows = []
    for run in runs:
        h = run.history
        ends = [0] + h["epoch_end_step"]
        first = h["steps"][ends[0] : ends[1]]
        last = h["steps"][ends[-2] : ends[-1]]
        angles = [a for _, a in h["angles"]]
        row = {
            "dataset": run.dataset,
            "backward": run.backward,
            "jac_weight": run.jac_weight,
            "warm_start": run.warm_start,
            "label": run.label,
            "test_acc": h["test_acc"][-1],
            "epoch_wall_s": statistics.median(h["epoch_wall"]),
            "epoch_cpu_s": statistics.median(h["epoch_cpu"]),
            "load": statistics.mean(h["epoch_load"]),
            "fwd_iters_first_epoch": statistics.mean(first),
            "fwd_iters_last_epoch": statistics.mean(last),
            "angle_median": statistics.median(angles) if angles else None,
            "angle_max": max(angles) if angles else None,
            "rho_mean": h["rho_mean"][-1],
            "rho_max": h["rho_max"][-1],
            "backward_failures": h["failures"],
            "history": {k: v for k, v in h.items()},
        }
        if run.warm_start and h["cold_steps"]:
            n_cold = len(h["cold_steps"])
            row["warm_iters"] = statistics.mean(h["steps"][-n_cold:])
            row["cold_iters_same_params"] = statistics.mean(h["cold_steps"])
        rows.append(row)
    return rows


def table(rows, args) -> str:
    lines = [
        "| data | backward | test acc | s/epoch wall (cpu) | ms/step cpu (wall) "
        "| fwd iters ep 1 → last | angle vs Implicit median (max) | ρ(J) mean (max) "
        "| failed bwd checks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = "—"
        if r.get("step_ms_cpu") is not None:
            step = f"{r['step_ms_cpu']:.2f} ({r['step_ms_wall']:.2f})"
        angle = "—"
        if r["angle_median"] is not None:
            angle = f"{r['angle_median']:.1f}° ({r['angle_max']:.1f}°)"
        lines.append(
            f"| {r['dataset']} | {r['label']} | {100 * r['test_acc']:.2f}% "
            f"| {r['epoch_wall_s']:.1f} ({r['epoch_cpu_s']:.1f}) | {step} "
            f"| {r['fwd_iters_first_epoch']:.1f} → {r['fwd_iters_last_epoch']:.1f} "
            f"| {angle} | {r['rho_mean']:.3f} ({r['rho_max']:.3f}) | {r['backward_failures']} |"
        )
    warm = [r for r in rows if "warm_iters" in r]
    for r in warm:
        saved = 1 - r["warm_iters"] / r["cold_iters_same_params"]
        lines.append("")
        lines.append(
            f"Warm start ({r['dataset']}, epochs 2-{args.epochs}): {r['warm_iters']:.2f} forward "
            f"iterations per example from the previous epoch's z*, against "
            f"{r['cold_iters_same_params']:.2f} from zeros at the same parameters and batches "
            f"({100 * saved:.0f}% fewer)."
        )
    return "\n".join(lines)


def plots(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in rows})

    def smooth(v, k=5):
        v = np.asarray(v, float)
        if len(v) < k:
            return v
        return np.convolve(v, np.ones(k) / k, mode="valid")

    for what, fname, ylabel in [
        ("steps", "iterations.png", "forward iterations per example (batch mean, smoothed)"),
        ("angles", "angles.png", "angle to Implicit's gradient (degrees)"),
        ("test_acc", "accuracy.png", "test accuracy"),
    ]:
        fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for r in rows:
                if r["dataset"] != name:
                    continue
                h = r["history"]
                if what == "angles":
                    if not h["angles"]:
                        continue
                    xs, ys = zip(*h["angles"], strict=True)
                    ax.plot(xs, ys, marker=".", label=r["label"])
                elif what == "test_acc":
                    ax.plot(range(1, len(h["test_acc"]) + 1), h["test_acc"], marker="o",
                            label=r["label"])
                else:
                    ax.plot(smooth(h["steps"]), label=r["label"])
            ax.set_title(name)
            ax.set_xlabel("epoch" if what == "test_acc" else "training step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=100)
        plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    p.add_argument("--backwards", nargs="+", default=list(BACKWARDS), choices=BACKWARDS)
    p.add_argument("--jac-weights", nargs="+", type=float, default=[0.0, 1.0],
                   help="γ of the Jacobian penalty γ ‖J‖_F²/d; 0 turns it off")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=1e-4, help="forward (and adjoint) tolerance")
    p.add_argument("--max-steps", type=int, default=50, help="forward Anderson steps at most")
    p.add_argument("--buckets", type=int, default=4,
                   help="batch sizes of the forward solve's compaction (1: lockstep)")
    p.add_argument("--phantom-k", type=int, default=5)
    p.add_argument("--phantom-damping", type=float, default=0.5)
    p.add_argument("--angle-every", type=int, default=10, help="training steps between angles")
    p.add_argument("--eval-block", type=int, default=1000)
    p.add_argument("--time-rounds", type=int, default=50,
                   help="interleaved rounds of the per-step timing after training")
    p.add_argument("--data", default=str(DATA_ROOT),
                   help="folder holding mnist/ and fashion_mnist/")
    p.add_argument("--out", default="runs/deq_mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="2 epochs on 10000 training and 5000 test images per dataset, hidden 128")
    p.add_argument("--smoke", action="store_true", help="random 8x8 data, a few steps (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size, args.test_size, args.hidden = 2, 10000, 5000, 128
    if args.smoke:
        args.epochs, args.batch, args.hidden, args.angle_every = 2, 16, 8, 2
        args.max_steps, args.eval_block, args.buckets, args.time_rounds = 20, 32, 1, 3
    return args


def main(argv=None):
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    runs, datasets = train_all(args)
    rows = summarise(runs, args)
    write(rows, args, started, t0, None)  # kept should the timing below fail
    load_before = os.getloadavg()[0]
    step_times = time_steps(runs, datasets, args)
    for row in rows:
        row["step_ms_cpu"], row["step_ms_wall"] = step_times.get(
            (row["dataset"], row["label"]), (None, None))
        row["step_timing_load"] = load_before
    write(rows, args, started, t0, load_before)
    return rows


def write(rows, args, started, t0, load_before):
    md = table(rows, args)
    timing = (
        f" ms/step: median of {args.time_rounds} interleaved steps per configuration from the "
        f"same weights and batch (load average {load_before:.1f} when they started)."
        if load_before is not None else ""
    )
    head = (
        f"Measured {started} on {machine()} (at the end), {time.perf_counter() - t0:.0f} s in "
        f"all.{timing}\n"
        f"Settings: {json.dumps({k: v for k, v in vars(args).items() if k != 'data'})}\n"
    )
    print("\n" + head + "\n" + md, flush=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(head + "\n" + md + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "started": started, "rows": rows}, f, indent=1)
    plots(rows, args.out)


if __name__ == "__main__":
    main()
