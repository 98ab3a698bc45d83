r"""A deep equilibrium classifier on MNIST and Fashion-MNIST, trained with each backward.

Model: an equinox MLP encoder u = MLP(x), a DEQ layer z* = tanh(W z* + u)
(`eqp.DEQ`, solved by Anderson acceleration per example), and a linear head
logits = V z*. The same model (same initial weights, batches and Adam) is trained
with each backward pass, all of which approximate the implicit gradient
∂L/∂θ = uᵀ ∂f/∂θ with u = (I − Jᵀ)⁻¹ ∂L/∂z*, J = ∂f/∂z at z*:

- `implicit`: `eqp.Implicit()`, the implicit function theorem (BiCGStab);
- `almeida_pineda`: `eqp.AlmeidaPineda()`, recurrent backprop to tolerance;
- `jfb`: `eqp.JacobianFree()`, Jacobian-free backprop, u ≈ ∂L/∂z* (Fung et al. 2022);
- `phantom`: `eqp.PhantomGradient(k=5, damping=0.5)` (Geng et al. 2021);
- `shine`: `eqp.SHINE()` (Ramzi et al. 2022, "SHINE: SHaring the INverse Estimate
  from the forward pass for bi-level optimization and implicit models", ICLR). Its
  forward solve is `eqp.Broyden` (same tol, max_steps and batch compaction as the
  Anderson solve of the others; history = max_steps, so that no memory restart
  discards the estimate), which keeps B ≈ (J − I)⁻¹ as −I + Σᵢ uᵢ vᵢᵀ; SHINE takes
  u ≈ −Bᵀ ∂L/∂z* (2 · history dot products, no product with J), and where the
  relative residual ‖(I − Jᵀ) u − ∂L/∂z*‖ / ‖∂L/∂z*‖ exceeds 0.1 it falls back to a
  BiCGStab correction started from that u. How often the fallback fired is counted
  through SHINE's `callback` (SHINE takes no adjoint probe) on every
  `--shine-count-every`-th angle batch (the callback runs per example on the host);
- `shine_plain`: `eqp.SHINE(fallback=False)`, the paper's plain estimate −Bᵀ ∂L/∂z*,
  unchecked (same Broyden forward).

Each runs without and with Jacobian regularisation, γ ‖∂f/∂z‖_F² / d at z*
(`eqp.jacobian_frobenius`, Bai et al. 2021, one Gaussian probe per example), and
`implicit` once more with warm starts: each training example's solve starts from
its own equilibrium of the previous epoch (z0 = z*_prev), and every warm-started
batch is also solved from zeros at the same parameters to count the iterations
saved.

optimistix and jaxopt (`--peers`, the `bench` extra; skipped with a note when not
importable) train the `implicit` configuration (cold, no penalty) with their own
DEQ solve and implicit differentiation, per example under `vmap` as in
`benchmarks/deq_train.py`: `optx.fixed_point(f, optx.FixedPointIteration(rtol=tol,
atol=tol), z0, adjoint=optx.ImplicitAdjoint(), throw=False)` (optimistix has no
Anderson acceleration: plain iteration, with `--peer-max-steps`; the same stopping
rule as ours; LU on each example's dense Jacobian) and
`jaxopt.AndersonAcceleration(f, history_size=5, beta=1, tol=tol,
maxiter=max_steps, implicit_diff=True)` (our Anderson's history and mixing; it stops
at ‖f(z) − z‖₂ ≤ tol, which implies our rule; its ridge is absolute, ours relative;
its default normal-equation CG backward; `--jaxopt-tol √d·tol` asks it for at most
our accuracy instead). Their z* are compared with ours on the
same final weights.

Recorded per run: test accuracy after each epoch and `--evals-per-epoch` times per
epoch against the cumulative training time (train steps only), for time to
accuracy; time per epoch (wall and process CPU, with the load average); forward
iterations per batch; the angle between each inexact backward's gradient (and the
optimistix and jaxopt gradients) and `Implicit`'s at the same parameters, batch and
forward solver (`eqp.gradient_alignment`, every `--angle-every` steps); the backward
solves' failure count (an `eqp.adjoint_probe`; adjoints run with
`on_failure="ignore"` so a failed check is counted rather than turned into NaN);
and the spectral radius of ∂f/∂z at z* on test examples (`eqp.spectral_radius`).
Test accuracy is always measured with the run's eqprop_jax forward solve (Anderson,
or Broyden for SHINE), so it compares trained weights. The configurations are
interleaved epoch by epoch, so load from other jobs is shared among them; after
training, one step of each configuration is timed from the same weights and batch,
round-robin (`--time-rounds`), for a cleaner ms/step. Outputs in `--out`:
`results.json`, `table.md` (the table, SHINE's fallback counts, warm starts, and
time to accuracy), `iterations.png`, `angles.png`, `accuracy.png` (per epoch) and
`time_to_accuracy.png` (test accuracy against cumulative training seconds).

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
    python scripts/deq_mnist.py --backwards implicit shine --peers   # no peers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from datetime import UTC, datetime
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import DATA_ROOT, load_images, machine, random_images

import eqprop_jax as eqp
from eqprop_jax.data import Dataset

BACKWARDS = ("implicit", "almeida_pineda", "jfb", "phantom", "shine", "shine_plain")
PEERS = ("optimistix", "jaxopt")
EVAL_ADJOINT = eqp.Implicit(on_failure="ignore")


class FallbackCounter:
    """Counts SHINE's fallbacks from its `callback` (the only place SHINE reports them).

    SHINE runs its Krylov correction on every example with a zero right-hand side
    where the Broyden estimate was good (stopping at step 0), so an example's solve
    took steps > 0 exactly when the fallback fired for it.
    """

    def __init__(self):
        self.examples = self.fired = self.failed = 0

    def __call__(self, stats: eqp.AdjointStats):
        steps = np.atleast_1d(np.asarray(stats.steps))
        converged = np.atleast_1d(np.asarray(stats.converged))
        self.examples += steps.size
        self.fired += int(np.sum(steps > 0))
        self.failed += int(np.sum(~converged))


# One counter, one adjoint: a jitted function is cached on its static parts, the
# callback included.
SHINE_FALLBACKS = FallbackCounter()
SHINE_COUNTING = eqp.SHINE(on_failure="ignore", callback=SHINE_FALLBACKS)


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
    if name == "shine":
        return eqp.SHINE(on_failure="ignore")
    if name == "shine_plain":
        return eqp.SHINE(fallback=False, on_failure="ignore")
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


def make_solver(backward: str, args):
    """The forward solver: Anderson, or Broyden for SHINE (which reuses its inverse
    estimate), with the same tolerance, step limit and batch compaction."""
    if backward.startswith("shine"):
        # history >= max_steps: a memory restart would discard SHINE's estimate.
        return eqp.Broyden(tol=args.tol, max_steps=args.max_steps, batch_buckets=args.buckets,
                           history=args.broyden_history or args.max_steps)
    return eqp.Anderson(tol=args.tol, max_steps=args.max_steps, batch_buckets=args.buckets)


class PeerStats(NamedTuple):
    steps: jax.Array


class PeerSolution(NamedTuple):
    value: jax.Array
    stats: PeerStats


def _cell_fn(z, args):
    cell, u = args
    return cell(z, {"u": u})


def _jaxopt_cell_fn(z, cell, u):
    return cell(z, {"u": u})


class PeerDEQ(eqx.Module):
    """The DEQ layer solved by optimistix or jaxopt (training only).

    It stands in `Classifier.deq` with the same cell and starting state; `solver` is
    the eqprop_jax solver `with_adjoint` puts back for evaluation and for the
    reference gradient, so test accuracy and angles come from one forward solve for
    every configuration.

    - optimistix: `optx.fixed_point(f, optx.FixedPointIteration(rtol=tol, atol=tol),
      z0, max_steps=peer_max_steps, adjoint=optx.ImplicitAdjoint(), throw=False)`;
      its stopping rule max_j |f(z)_j − z_j| / (tol + tol |z_j|) ≤ 1 is ours, but
      optimistix has no Anderson acceleration (plain iteration needs more steps:
      hence its own step limit), and its adjoint LU-solves each example's dense
      d × d Jacobian.
    - jaxopt: `jaxopt.AndersonAcceleration(f, history_size=m, beta=β, tol=tol,
      maxiter=max_steps, implicit_diff=True)`, our Anderson's history and mixing;
      its ridge is absolute (jaxopt's default 1e-5 on the residual Gram matrix; ours
      is relative), it stops when ‖f(z) − z‖₂ ≤ tol (which implies our rule: it is
      asked for at least our accuracy; `jaxopt_tol`, `--jaxopt-tol`, sets another),
      and its implicit solve is its default (CG on the normal equations).
    """

    cell: Cell
    z_init: object
    solver: eqp.Anderson = eqx.field(static=True)
    library: str = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    jaxopt_tol: float | None = eqx.field(static=True, default=None)

    def solve(self, inp, probe=None):
        z0 = self.z_init(inp)
        tol = self.solver.tol
        if self.library == "optimistix":
            import optimistix as optx

            sol = optx.fixed_point(
                _cell_fn, optx.FixedPointIteration(rtol=tol, atol=tol), z0,
                (self.cell, inp["u"]), max_steps=self.max_steps,
                adjoint=optx.ImplicitAdjoint(), throw=False,
            )
            return PeerSolution(sol.value, PeerStats(sol.stats["num_steps"]))
        if self.library == "jaxopt":
            import jaxopt

            aa = jaxopt.AndersonAcceleration(
                _jaxopt_cell_fn, history_size=self.solver.history, beta=self.solver.mixing,
                maxiter=self.max_steps, implicit_diff=True,
                tol=tol if self.jaxopt_tol is None else self.jaxopt_tol,
            )
            z, state = aa.run(z0, self.cell, inp["u"])
            return PeerSolution(z, PeerStats(state.iter_num))
        raise ValueError(f"unknown library {self.library!r}; choose from {PEERS}.")


def peer_available(library: str) -> str | None:
    """None when `library` imports, else the reason it does not."""
    try:
        __import__(library)
    except ImportError as e:
        return f"{library} is not importable ({e}); install the `bench` extra"
    return None


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
        if isinstance(getattr(self.deq, "adjoint", None), eqp.SHINE):
            probe = None  # SHINE takes no probe (its fallback reports through `callback`)
        return self.deq.solve(inp, probe=probe), inp


def with_peer(model: Classifier, library: str, max_steps: int,
              jaxopt_tol: float | None = None) -> Classifier:
    """The same weights with the DEQ layer solved by optimistix or jaxopt."""
    deq = model.deq
    peer = PeerDEQ(deq.cell, deq.z_init, deq.solver, library, max_steps, jaxopt_tol)
    return eqx.tree_at(lambda m: m.deq, model, peer)


def with_adjoint(model: Classifier, adjoint) -> Classifier:
    # The DEQ's adjoint is a static setting: build the layer anew around the same cell
    # (an optimistix or jaxopt layer becomes an eqprop_jax one with its `solver`).
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


@eqx.filter_jit
def test_correct(model, x, y):
    def one(x, y):
        sol, _ = model.solve(x, jnp.zeros(model.head.in_features, x.dtype))
        return jnp.argmax(model.head(sol.value)) == y

    return jax.vmap(one)(x, y)


def accuracy(model, x, y, block=1000):
    """Test accuracy alone (the evaluations within an epoch, for time to accuracy)."""
    model = with_adjoint(model, EVAL_ADJOINT)
    return float(np.mean(np.concatenate([
        np.asarray(test_correct(model, x[i : i + block], y[i : i + block]))
        for i in range(0, len(x), block)
    ])))


def forward_agreement(model, x, block=1000):
    """The largest |z_j| difference between the fixed points of the model's own forward
    solve (optimistix or jaxopt) and of eqprop_jax's `solver` on the same weights, over
    the examples `x`."""
    ours = with_adjoint(model, EVAL_ADJOINT)
    worst = 0.0
    for i in range(0, len(x), block):
        xb = jnp.asarray(x[i : i + block])
        z0 = jnp.zeros((len(xb), model.head.in_features), xb.dtype)
        worst = max(worst, float(jnp.max(jnp.abs(fixed_points(model, xb, z0)
                                                 - fixed_points(ours, xb, z0)))))
    return worst


@eqx.filter_jit
def fixed_points(model, x, z0):
    return jax.vmap(lambda x, z0: model.solve(x, z0)[0].value)(x, z0)


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
    library: str = "eqprop_jax"
    history: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self):
        if self.library != "eqprop_jax":
            return f"{self.library} ({PEER_SOLVES[self.library]})"
        name = self.backward + (" [Broyden fwd]" if self.backward.startswith("shine") else "")
        return name + (" +JR" if self.jac_weight else "") + (" +warm" if self.warm_start else "")


# The forward solve and backward of each library's configuration, for labels.
PEER_SOLVES = {
    "optimistix": "FixedPointIteration + ImplicitAdjoint",
    "jaxopt": "AndersonAcceleration + implicit_diff",
}


def load(name: str, args) -> Dataset:
    if args.smoke:
        return random_images(name, 64, 32)
    data = load_images(name, os.path.join(args.data, name), train=args.train_size,
                       test=args.test_size)
    return data.standardized().flat()


def flat_images(x):
    return x if x.ndim == 2 else x.reshape(len(x), -1)


def run_epoch(run: Run, data: Dataset, epoch: int, args, angle_fns):
    x_all = flat_images(data.x_train)
    x_test = flat_images(data.x_test)
    n = len(x_all) // args.batch * args.batch
    perm = np.random.default_rng(args.seed * 1000 + epoch).permutation(len(x_all))[:n]
    h = run.history
    wall = cpu = 0.0
    key = jax.random.key(args.seed + 7919 * epoch)
    n_steps = n // args.batch
    # Accuracy-only evaluations inside the epoch (the epoch's end has the full one).
    evals_at = {round(n_steps * j / args.evals_per_epoch) for j in range(1, args.evals_per_epoch)}
    for i in range(0, n, args.batch):
        idx = perm[i : i + args.batch]
        x, y = jnp.asarray(x_all[idx]), jnp.asarray(data.y_train[idx])
        if run.warm_start and run.z_prev is not None:
            z0 = jnp.asarray(run.z_prev[idx])
        else:
            z0 = jnp.zeros((len(idx), args.hidden), jnp.float32)
        global_step = len(h["steps"])
        measure_angle = run.backward != "implicit" or run.library != "eqprop_jax"
        if measure_angle and global_step % args.angle_every == 0:
            g_ref = angle_fns(with_adjoint(run.model, EVAL_ADJOINT), x, y, z0)
            count = global_step % (args.angle_every * args.shine_count_every) == 0
            if run.backward == "shine" and count:  # the same SHINE, counting its fallbacks
                before = (SHINE_FALLBACKS.examples, SHINE_FALLBACKS.fired,
                          SHINE_FALLBACKS.failed)
                g_est = jax.block_until_ready(
                    angle_fns(with_adjoint(run.model, SHINE_COUNTING), x, y, z0))
                jax.effects_barrier()  # the callbacks have run
                for k, b in zip(("examples", "fired", "failed"), before, strict=True):
                    h["shine_fallback"][k] += getattr(SHINE_FALLBACKS, k) - b
            else:
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
        if i // args.batch + 1 in evals_at:
            test_acc = accuracy(run.model, x_test, data.y_test, block=args.eval_block)
            h["evals"].append((len(h["steps"]), h["train_wall"] + wall, h["train_cpu"] + cpu,
                               test_acc))
    if run.warm_start:
        run.z_prev = h.pop("_z_next")
        h["warm_epochs"].append(epoch)
    h["train_wall"] += wall
    h["train_cpu"] += cpu
    h["epoch_wall"].append(wall)
    h["epoch_cpu"].append(cpu)
    h["epoch_load"].append(os.getloadavg()[0])
    h["epoch_end_step"].append(len(h["steps"]))


def train_all(args):
    key = jax.random.key(args.seed)
    optimizer = optax.adam(args.lr)
    runs, datasets, train_steps = [], {}, {}
    args.skipped = {}
    for lib in args.peers:
        why = peer_available(lib)
        if why:
            args.skipped[lib] = why
            print(f"skipping {lib}: {why}", flush=True)
    peers = [lib for lib in args.peers if lib not in args.skipped]
    for name in args.datasets:
        data = load(name, args)
        datasets[name] = data
        n_in = int(np.prod(data.x_train.shape[1:]))
        configs = [(b, w, False, "eqprop_jax") for b in args.backwards for w in args.jac_weights]
        if args.warm_start:
            configs.append(("implicit", args.jac_weights[0], True, "eqprop_jax"))
        # optimistix and jaxopt: the eqprop_jax implicit configuration's cold, unregularised
        # training, solved by their fixed-point solvers and implicit differentiation.
        configs += [("implicit", 0.0, False, lib) for lib in peers]
        for backward, jw, warm, lib in configs:
            adjoint = make_adjoint(backward, args.phantom_k, args.phantom_damping)
            # The same key: every configuration starts from the same weights.
            model = Classifier(n_in, args.hidden, data.num_classes,
                               make_solver(backward, args), adjoint, key=key)
            if lib != "eqprop_jax":
                model = with_peer(model, lib, args.peer_max_steps if lib == "optimistix"
                                  else args.max_steps, args.jaxopt_tol)
            if jw not in train_steps:  # one jitted step per γ, shared by datasets and adjoints
                train_steps[jw] = make_train_step(optimizer, jw)
            run = Run(name, backward, jw, warm, model,
                      optimizer.init(eqx.filter(model, eqx.is_array)), train_steps[jw], None,
                      library=lib)
            run.history = {k: [] for k in ("steps", "cold_steps", "loss", "reg", "angles",
                                           "epoch_wall", "epoch_cpu", "epoch_load",
                                           "epoch_end_step", "test_acc", "rho_mean",
                                           "rho_max", "test_steps", "warm_epochs", "evals")}
            run.history.update(failures=0, train_wall=0.0, train_cpu=0.0)
            if backward == "shine":
                run.history["shine_fallback"] = {"examples": 0, "fired": 0, "failed": 0}
            runs.append(run)
    print(f"{len(runs)} runs on {machine()}", flush=True)
    for epoch in range(1, args.epochs + 1):
        for run in runs:  # interleaved: every configuration runs its epoch in turn
            data = datasets[run.dataset]
            run_epoch(run, data, epoch, args, ce_grad)
            acc, rho_mean, rho_max, test_steps = evaluate(
                run.model, flat_images(data.x_test), data.y_test,
                jax.random.key(1), block=args.eval_block,
            )
            h = run.history
            h["test_acc"].append(acc)
            h["evals"].append((len(h["steps"]), h["train_wall"], h["train_cpu"], acc))
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
    for run in runs:
        if run.library != "eqprop_jax":
            data = datasets[run.dataset]
            run.history["fwd_agreement"] = forward_agreement(
                run.model, flat_images(data.x_test)[: args.eval_block], block=args.eval_block)
    return runs, datasets


def transplant(src: Classifier, like: Classifier) -> Classifier:
    """src's weights in like's DEQ layer (its solver, adjoint or library)."""
    deq = like.deq
    if isinstance(deq, PeerDEQ):
        new = PeerDEQ(src.deq.cell, deq.z_init, deq.solver, deq.library, deq.max_steps,
                      deq.jaxopt_tol)
    else:
        new = eqp.DEQ(src.deq.cell, z_init=deq.z_init, solver=deq.solver, adjoint=deq.adjoint)
    return eqx.tree_at(lambda m: m.deq, src, new)


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
        base = next((r for r in group if r.backward == "implicit" and not r.jac_weight
                     and r.library == "eqprop_jax"), group[0])
        x = jnp.asarray(data.x_train[: args.batch].reshape(args.batch, -1))
        y = jnp.asarray(data.y_train[: args.batch])
        z0 = jnp.zeros((args.batch, args.hidden), jnp.float32)
        calls = []
        for r in group:
            model = transplant(base.model, r.model)
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
            "library": run.library,
            "train_wall_s": h["train_wall"],
            "train_cpu_s": h["train_cpu"],
            "shine_fallback": h.get("shine_fallback"),
            "fwd_agreement": h.get("fwd_agreement"),
            "history": {k: v for k, v in h.items()},
        }
        if run.warm_start and h["cold_steps"]:
            n_cold = len(h["cold_steps"])
            row["warm_iters"] = statistics.mean(h["steps"][-n_cold:])
            row["cold_iters_same_params"] = statistics.mean(h["cold_steps"])
        rows.append(row)
    for name in {r["dataset"] for r in rows}:
        group = [r for r in rows if r["dataset"] == name]
        targets = tta_targets(group, args.tta_levels)
        for r in group:
            r["tta_targets"] = targets
            r["time_to_acc_s"] = [time_to(r["history"]["evals"], t) for t in targets]
    return rows


def compared(rows):
    """The time-to-accuracy comparison: eqprop_jax's `implicit` (cold, no Jacobian
    penalty) and the optimistix and jaxopt runs of the same configuration."""
    return [r for r in rows if r["backward"] == "implicit" and not r["jac_weight"]
            and not r["warm_start"]]


def tta_targets(group, levels):
    """Accuracy targets: `levels` (fractions) of the lowest final test accuracy among
    the compared runs, so that every compared run reaches the last (level 1)."""
    base = min((r["test_acc"] for r in compared(group)), default=None)
    if base is None:
        base = min(r["test_acc"] for r in group)
    return [np.floor(1000 * lvl * base) / 1000 for lvl in levels]


def time_to(evals, target):
    """(training wall s, training CPU s, step) at the first evaluation reaching
    `target`, or None. Evaluation time is not training time."""
    for step, wall, cpu, acc in evals:
        if acc >= target:
            return wall, cpu, step
    return None


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
        # SHINE takes no adjoint probe, and optimistix and jaxopt have none.
        failures = r["backward_failures"]
        if r["backward"].startswith("shine") or r["library"] != "eqprop_jax":
            failures = "—"
        lines.append(
            f"| {r['dataset']} | {r['label']} | {100 * r['test_acc']:.2f}% "
            f"| {r['epoch_wall_s']:.1f} ({r['epoch_cpu_s']:.1f}) | {step} "
            f"| {r['fwd_iters_first_epoch']:.1f} → {r['fwd_iters_last_epoch']:.1f} "
            f"| {angle} | {r['rho_mean']:.3f} ({r['rho_max']:.3f}) | {failures} |"
        )
    for r in rows:
        fb = r["shine_fallback"]
        if fb:
            share = f"{100 * fb['fired'] / fb['examples']:.0f}%" if fb["examples"] else "—"
            lines += ["", (
                f"SHINE ({r['dataset']}, {r['label']}; forward: Broyden, history "
                f"{args.broyden_history or args.max_steps}): the Krylov fallback fired for "
                f"{fb['fired']} of {fb['examples']} examples ({share}) on one batch every "
                f"{args.angle_every * args.shine_count_every} steps (counted by SHINE's "
                f"`callback`), and "
                f"{fb['failed']} fallback solves failed their check."
            )]
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
    lines += ["", time_to_accuracy_table(rows, args)]
    return "\n".join(lines)


def time_to_accuracy_table(rows, args) -> str:
    """Seconds of training (train steps only, wall, CPU in brackets) to the first
    evaluation at or above each target accuracy."""
    out = [
        f"Time to accuracy: seconds of training (wall, process CPU in brackets; train steps "
        f"only) until the test accuracy, evaluated {args.evals_per_epoch}× per epoch, first "
        f"reaches each target. Targets: {', '.join(f'{v:g}' for v in args.tta_levels)} × the "
        f"lowest final accuracy of eqprop_jax `implicit` and the optimistix and jaxopt runs "
        f"(cold, no Jacobian penalty, the same weights, batches and optimiser)."
    ]
    for r in rows:
        if r.get("fwd_agreement") is not None:
            out.append(f"- {r['dataset']}, {r['label']}: its z* and eqprop_jax's on the same "
                       f"final weights differ by at most {r['fwd_agreement']:.1e} "
                       f"(first {args.eval_block} test images).")
    for lib, why in getattr(args, "skipped", {}).items():
        out.append(f"- {lib} skipped: {why}.")
    for name in sorted({r["dataset"] for r in rows}):
        group = [r for r in rows if r["dataset"] == name]
        targets = group[0]["tta_targets"]
        out += ["", "| " + name + " | final acc | train s (all epochs) | "
                + " | ".join(f"s to {100 * t:.1f}%" for t in targets) + " |",
                "|---|---|---|" + "---|" * len(targets)]
        ids = {id(r) for r in compared(group)}
        for r in sorted(group, key=lambda r: (id(r) not in ids, r["library"] != "eqprop_jax")):
            cells = ["—" if t is None else f"{t[0]:.1f} ({t[1]:.1f})"
                     for t in r["time_to_acc_s"]]
            out.append(f"| {r['label']} | {100 * r['test_acc']:.2f}% | "
                       f"{r['train_wall_s']:.1f} ({r['train_cpu_s']:.1f}) | "
                       + " | ".join(cells) + " |")
    return "\n".join(out)


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

    # Time to accuracy: test accuracy against cumulative training seconds (wall).
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        group = [r for r in rows if r["dataset"] == name]
        ids = {id(r) for r in compared(group)}
        for r in group:
            _, wall, _, acc = zip(*r["history"]["evals"], strict=True)
            main_row = id(r) in ids
            ax.plot(wall, acc, marker="o" if main_row else ".", lw=2 if main_row else 0.8,
                    alpha=1 if main_row else 0.5, label=r["label"])
        for t in group[0]["tta_targets"]:
            ax.axhline(t, color="grey", lw=0.5, ls=":")
        ax.set_title(f"{name}: accuracy against training time")
        ax.set_xlabel("cumulative training seconds (wall, train steps only)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "time_to_accuracy.png"), dpi=100)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    p.add_argument("--backwards", nargs="+", default=list(BACKWARDS), choices=BACKWARDS)
    p.add_argument("--peers", "--libraries", nargs="*", default=list(PEERS), choices=PEERS,
                   help="optimistix and jaxopt runs of the implicit configuration (skipped "
                        "with a note when not importable); give none to leave them out")
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
    p.add_argument("--max-steps", type=int, default=50,
                   help="forward Anderson (Broyden for shine, jaxopt Anderson) steps at most")
    p.add_argument("--broyden-history", type=int, default=None,
                   help="shine's Broyden memory (default: --max-steps, no restart)")
    p.add_argument("--peer-max-steps", type=int, default=500,
                   help="optimistix's FixedPointIteration steps at most (plain iteration)")
    p.add_argument("--jaxopt-tol", type=float, default=None,
                   help="jaxopt's tolerance on ‖f(z) − z‖₂ (default --tol: at least our "
                        "accuracy; √hidden · tol: at most)")
    p.add_argument("--evals-per-epoch", type=int, default=4,
                   help="test accuracy evaluations per epoch, for time to accuracy")
    p.add_argument("--tta-levels", nargs="+", type=float, default=[0.95, 0.98, 0.99, 1.0],
                   help="time-to-accuracy targets, as fractions of the compared runs' lowest "
                        "final accuracy")
    p.add_argument("--buckets", type=int, default=4,
                   help="batch sizes of the forward solve's compaction (1: lockstep)")
    p.add_argument("--phantom-k", type=int, default=5)
    p.add_argument("--phantom-damping", type=float, default=0.5)
    p.add_argument("--angle-every", type=int, default=10, help="training steps between angles")
    p.add_argument("--shine-count-every", type=int, default=5,
                   help="count SHINE's fallbacks on every k-th angle batch (its callback "
                        "runs once per example on the host: slow)")
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
        args.evals_per_epoch, args.peer_max_steps, args.shine_count_every = 2, 200, 1
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
