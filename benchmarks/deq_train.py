r"""MNIST training step of an MLP → DEQ → linear-head classifier: eqprop_jax with its
defaults against optimistix and jaxopt.

The model (float32; one example x ∈ ℝ⁷⁸⁴, batched with `jax.vmap`):

    e  = W₂ relu(W₁ x + b₁) + b₂                    (MLP injection, 784 → hidden → d)
    z* = tanh(W z* + e)                             (the DEQ, Bai, Kolter & Koltun 2019)
    ŷ  = W_h z* + b_h                               (linear head, d → 10)

with ‖W‖₂ = 0.9 by default (`--w-norm`; so the map is a contraction and every solver converges). One
training step is `jax.value_and_grad` of the mean cross-entropy over the batch and
a plain SGD update, jitted; it returns the new weights, the loss, the gradient and
the per-example iteration counts (the same outputs for every library). All
libraries get the same weights and the same batch (the first `batch` MNIST
training images, or random inputs with `--random` or when the data is absent).

The three solves, each per example under `jax.vmap`, all plain fixed-point
iteration z ← f(z) from z₀ = 0 with at most `max_steps` = 1000 steps:

- eqprop_jax defaults: `eqp.DEQ(cell, (d,), solver=eqp.Picard(tol=tol))` with the
  default adjoint `eqp.Implicit()` (BiCGStab; its default tolerance, on-failure
  policy and batch compaction). Stops when max_j |f(z)_j − z_j| / (tol + tol |z_j|) ≤ 1.
- optimistix: `optx.fixed_point(f, optx.FixedPointIteration(rtol=tol, atol=tol), …,
  adjoint=optx.ImplicitAdjoint())`. Its stopping rule is the same scaled infinity norm
  (`optx.max_norm`, scale atol + rtol |f(z)|), so `tol` is matched exactly. Its default
  adjoint materialises each example's d × d Jacobian and LU-solves it. Run with
  `throw=False` (like eqprop_jax's default: status returned, no run-time check) and
  with its default `throw=True`.
- jaxopt: `jaxopt.FixedPointIteration(tol=…, maxiter=1000, implicit_diff=True)`, whose
  default implicit solve is CG on the normal equations (tolerance 1e-5). It stops when
  ‖f(z) − z‖₂ ≤ tol_jaxopt, a 2-norm of the step rather than a scaled max norm. There
  is no exact translation, so two rows bracket ours: tol_jaxopt = tol (then
  ‖r‖∞ ≤ ‖r‖₂ ≤ tol, so jaxopt's stop implies ours: it is asked for at least our
  accuracy) and tol_jaxopt = √d·tol (then |r_j| ≤ tol for all j implies jaxopt's stop:
  it is asked for at most our accuracy). The achieved accuracy of every row is reported
  (largest scaled residual in our rule, ≤ 1 when it holds, and the forward error).

Gradient agreement: each library's float32 gradient (all weights, concatenated) against
a float64 reference on the same batch and weights: fixed points iterated to rounding and
polished by a Newton step, then the dense implicit-function-theorem solve
u = (I − Jᵀ)⁻¹ ∂L/∂z* per example (J = diag(1 − z*²) W) and exact backprop through
the MLP. Reported as relative error ‖g − g_ref‖/‖g_ref‖ and cosine.

Timing (`benchmarks/_timing.py`): each step is compiled ahead of time (trace + lower +
XLA compile, reported apart), then all are called round-robin, each call ended by
`block_until_ready`; median process CPU time (all threads) and median / min wall time.
The "fwd" columns time the loss alone (no gradient) to split a step into forward
solve and backward; the step's compile time is split into trace + lower (Python,
JAX) and XLA compilation; "while loops" and "callback sites" count the `while` ops
and host-callback custom calls in the compiled step's HLO (a callback under vmap
is unrolled into one per example; each `batch_buckets` bucket size of a
compacted loop is one more `while`).

Run: `python benchmarks/deq_train.py` (40 s on the 2-core dev box at load 5, 80 s at
load 10, mostly compiling) or `--quick` (tiny sizes, four rows, no forward split:
about 10 s at load 5). From a source checkout, put the checkout first on the path
(`PYTHONPATH=. python benchmarks/deq_train.py`) if another copy of eqprop_jax is
installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqprop_jax as eqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _timing, beside this file
from _timing import Timing, interleaved, load_average, machine_info, summarize  # noqa: E402

DATA_DIR = "/work/shared/data/mnist"


# --------------------------------------------------------------------------- model


class Cell(eqx.Module):
    """f(z, e) = tanh(W z + e)."""

    w: jax.Array

    def __call__(self, z, e):
        return jnp.tanh(self.w @ z + e)


class Net(eqx.Module):
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array
    deq: eqp.DEQ
    wh: jax.Array
    bh: jax.Array

    def embed(self, x):
        return self.w2 @ jax.nn.relu(self.w1 @ x + self.b1) + self.b2

    def head(self, z):
        return self.wh @ z + self.bh


def init_net(
    d: int, hidden: int, n_in: int, n_out: int, tol: float, w_norm: float = 0.9, seed: int = 0
) -> Net:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, d))
    w = w_norm * w / np.linalg.norm(w, 2)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Net(
        w1=f32(rng.standard_normal((hidden, n_in)) * np.sqrt(2 / n_in)),
        b1=f32(np.zeros(hidden)),
        w2=f32(rng.standard_normal((d, hidden)) * np.sqrt(1 / hidden)),
        b2=f32(0.1 * rng.standard_normal(d)),
        deq=eqp.DEQ(Cell(f32(w)), state_shape=(d,), solver=eqp.Picard(tol=tol)),
        wh=f32(rng.standard_normal((n_out, d)) * np.sqrt(1 / d)),
        bh=f32(np.zeros(n_out)),
    )


def weights(net: Net) -> list[np.ndarray]:
    """The trained arrays in a fixed order (also the order of a gradient)."""
    return [np.asarray(a) for a in (net.w1, net.b1, net.w2, net.b2, net.deq.cell.w, net.wh, net.bh)]


def load_batch(
    batch: int, n_in: int, random: bool, data_dir: str
) -> tuple[np.ndarray, np.ndarray, str]:
    if not random and os.path.isdir(data_dir):
        from eqprop_jax.data import load_folder

        ds = load_folder(data_dir).flat()
        x = ds.x_train[:batch].astype(np.float32)
        if x.shape[1] != n_in:
            raise ValueError(f"{data_dir}: images have {x.shape[1]} pixels, expected {n_in}.")
        return (
            x,
            ds.y_train[:batch].astype(np.int32),
            f"MNIST ({data_dir}), first {batch} training images",
        )
    rng = np.random.default_rng(1)
    why = "--random" if random else f"MNIST not found at {data_dir}"
    x = rng.uniform(0, 1, (batch, n_in)).astype(np.float32)
    return x, rng.integers(0, 10, batch).astype(np.int32), f"random inputs ({why})"


# ------------------------------------------------------------------------- solvers
# Each returns solve(net, e) -> (z*, steps) for one example.

Solve = Callable


def eqprop_solve(net: Net, e):
    sol = net.deq.solve(e)
    return sol.value, sol.stats.steps


def floor_solve(net: Net, e):
    """Not a solver: one application of the cell, for the cost of everything else."""
    return net.deq.cell(jnp.zeros(e.shape, e.dtype), e), jnp.array(1, jnp.int32)


def optx_solve(tol: float, max_steps: int, throw: bool) -> Solve:
    import optimistix as optx

    solver = optx.FixedPointIteration(rtol=tol, atol=tol)

    def solve(net, e):
        sol = optx.fixed_point(
            lambda z, a: a[0](z, a[1]),
            solver,
            jnp.zeros(e.shape, e.dtype),
            (net.deq.cell, e),
            max_steps=max_steps,
            adjoint=optx.ImplicitAdjoint(),
            throw=throw,
        )
        return sol.value, sol.stats["num_steps"]

    return solve


def jaxopt_solve(tol: float, max_steps: int) -> Solve:
    import jaxopt

    fpi = jaxopt.FixedPointIteration(
        fixed_point_fun=lambda z, cell, e: cell(z, e),
        tol=tol,
        maxiter=max_steps,
        implicit_diff=True,
    )

    def solve(net, e):
        z, state = fpi.run(jnp.zeros(e.shape, e.dtype), net.deq.cell, e)
        return z, state.iter_num

    return solve


def describe(adjoint) -> str:
    """The adjoint's effective settings (those a user gets by default)."""
    fields = ("linear_solver", "tol", "on_failure")
    kw = ", ".join(f"{k}={getattr(adjoint, k)!r}" for k in fields if hasattr(adjoint, k))
    return f"{type(adjoint).__name__}({kw})".replace("tol=None", "tol=None (follows the solver)")


def loss_fn(net: Net, x, y, solve: Solve):
    e = jax.vmap(net.embed)(x)
    z, steps = jax.vmap(lambda e: solve(net, e))(e)
    logits = jax.vmap(net.head)(z)
    loss = jnp.mean(
        jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
    )
    return loss, (z, steps)


def make_step(solve: Solve, lr: float):
    def step(net, x, y):
        (loss, (z, steps)), g = jax.value_and_grad(loss_fn, has_aux=True)(net, x, y, solve)
        new = jax.tree_util.tree_map(lambda p, gp: p - lr * gp, net, g)
        return new, loss, g, z, steps

    return step


def make_forward(solve: Solve):
    def forward(net, x, y):
        loss, (_, steps) = loss_fn(net, x, y, solve)
        return loss, steps

    return forward


# ---------------------------------------------------------------- float64 reference


@dataclass(frozen=True)
class Reference:
    z: np.ndarray
    grad: np.ndarray  # all weights' gradient, concatenated in `weights` order


def reference(net: Net, x: np.ndarray, y: np.ndarray) -> Reference:
    """Float64 fixed points and the exact gradient of the mean cross-entropy."""
    w1, b1, w2, b2, w, wh, bh = (a.astype(np.float64) for a in weights(net))
    x = x.astype(np.float64)
    batch, d = x.shape[0], w.shape[0]
    pre1 = x @ w1.T + b1
    h1 = np.maximum(pre1, 0)
    e = h1 @ w2.T + b2
    # ‖W‖₂ < 1 and |tanh'| ≤ 1: a contraction; iterate to rounding, then a Newton step.
    z = np.zeros((batch, d))
    for _ in range(100_000):
        z_new = np.tanh(z @ w.T + e)
        done = np.max(np.abs(z_new - z)) <= 1e-15
        z = z_new
        if done:
            break
    eye = np.eye(d)
    fz = np.tanh(z @ w.T + e)
    jac = eye - (1 - fz**2)[:, :, None] * w[None]
    z = z - np.linalg.solve(jac, (z - fz)[..., None])[..., 0]
    logits = z @ wh.T + bh
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dlogits = (p - np.eye(wh.shape[0])[y]) / batch
    g_wh, g_bh = dlogits.T @ z, dlogits.sum(0)
    g_z = dlogits @ wh
    s = 1 - z**2
    a_t = eye[None] - np.swapaxes(s[:, :, None] * w[None], 1, 2)  # (I - J)ᵀ
    u = np.linalg.solve(a_t, g_z[..., None])[..., 0]
    v = s * u  # dL/d(W z + e)
    g_w, g_e = v.T @ z, v
    g_w2, g_b2 = g_e.T @ h1, g_e.sum(0)
    g_pre1 = (g_e @ w2) * (pre1 > 0)
    g_w1, g_b1 = g_pre1.T @ x, g_pre1.sum(0)
    grad = np.concatenate([a.ravel() for a in (g_w1, g_b1, g_w2, g_b2, g_w, g_wh, g_bh)])
    return Reference(z, grad)


def scaled_residual(net: Net, x: np.ndarray, z: np.ndarray, tol: float) -> float:
    """Largest max_j |f(z)_j − z_j| / (tol + tol |z_j|) over the batch, in float64
    (≤ 1: the returned state meets eqprop_jax's and optimistix's stopping rule)."""
    w1, b1, w2, b2, w, _, _ = (a.astype(np.float64) for a in weights(net))
    z = z.astype(np.float64)
    e = np.maximum(x.astype(np.float64) @ w1.T + b1, 0) @ w2.T + b2
    fz = np.tanh(z @ w.T + e)
    return float(np.max(np.abs(fz - z) / (tol + tol * np.abs(z))))


# ------------------------------------------------------------------------ measuring


@dataclass
class Row:
    name: str
    library: str
    step: Timing | None = None
    fwd: Timing | None = None
    iterations: np.ndarray | None = None
    callbacks: int = 0
    while_loops: int = 0
    lower_cpu: float = float("nan")
    residual: float = float("nan")
    fwd_err: float = float("nan")
    grad_rel_err: float = float("nan")
    grad_cos: float = float("nan")
    calls: dict = dataclasses.field(default_factory=dict)
    compile_s: dict = dataclasses.field(default_factory=dict)
    compile_cpu: dict = dataclasses.field(default_factory=dict)


def compile_cold(fn: Callable, *args) -> tuple[Callable, float, float, float]:
    """`jax.jit(fn)` compiled ahead of time for `args` after `jax.clear_caches()`, so
    that no row reuses another's traced or lowered inner functions; returns the
    executable, the wall and process-CPU seconds of trace + lower + XLA compile, and
    the CPU seconds of trace + lower alone."""
    jax.clear_caches()
    t, c = time.perf_counter(), time.process_time()
    lowered = jax.jit(fn).lower(*args)
    c_lower = time.process_time() - c
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t, time.process_time() - c, c_lower


def warm_up() -> None:
    """Compile and run something small first: the process's one-time start-up costs
    would otherwise land on the first row's compile time."""

    def f(w, x):
        z = jax.lax.while_loop(lambda z: jnp.max(jnp.abs(z)) > 2.0, lambda z: z * 0.5, w @ x)
        return jnp.sum(jnp.tanh(z))

    w, xs = jnp.ones((4, 4)), jnp.ones((3, 4))
    jax.block_until_ready(jax.jit(jax.vmap(f, (None, 0)))(w, xs))
    jax.block_until_ready(jax.jit(jax.grad(lambda w: jnp.sum(jnp.tanh(xs @ w))))(w))


_CALLBACK = re.compile(r'custom_call_target="[^"]*callback[^"]*"')
_WHILE = re.compile(r" while\(")


def prepare(name, library, net, solve, x, y, ref, tol, lr, *, forward: bool) -> Row:
    row = Row(name, library)
    step, row.compile_s["step"], row.compile_cpu["step"], row.lower_cpu = compile_cold(
        make_step(solve, lr), net, x, y
    )
    hlo = step.as_text()
    row.callbacks = len(_CALLBACK.findall(hlo))
    row.while_loops = len(_WHILE.findall(hlo))
    _, _, g, z, steps = jax.block_until_ready(step(net, x, y))
    row.calls["step"] = (step, (net, x, y))
    if forward:
        fwd, row.compile_s["fwd"], row.compile_cpu["fwd"], _ = compile_cold(
            make_forward(solve), net, x, y
        )
        row.calls["fwd"] = (fwd, (net, x, y))
    row.iterations = np.asarray(steps)
    est = np.concatenate([a.ravel() for a in weights(g)]).astype(np.float64)
    row.grad_rel_err = float(np.linalg.norm(est - ref.grad) / np.linalg.norm(ref.grad))
    row.grad_cos = float(est @ ref.grad / (np.linalg.norm(est) * np.linalg.norm(ref.grad)))
    row.residual = scaled_residual(net, np.asarray(x), np.asarray(z), tol)
    row.fwd_err = float(np.max(np.abs(np.asarray(z, np.float64) - ref.z)))
    print(f"  compiled {name}: {row.compile_s}", file=sys.stderr, flush=True)
    return row


def time_rows(rows: list[Row], rounds: int) -> None:
    calls = {(i, k): c for i, r in enumerate(rows) for k, c in r.calls.items()}
    for (i, k), ts in interleaved(calls, rounds).items():
        setattr(rows[i], k, summarize(rows[i].compile_s[k], ts))
    for r in rows:
        r.calls.clear()


def _ms(t: Timing | None) -> str:
    if t is None:
        return "—"
    return f"{t.cpu_median_s * 1e3:.2f} / {t.median_s * 1e3:.2f} / {t.min_s * 1e3:.2f}"


def table(rows: list[Row]) -> str:
    head = (
        "| solve | compile s, wall (CPU): step; fwd | step ms: CPU med / wall med / wall min | "
        "fwd ms: CPU med / wall med / wall min | bwd ≈ step − fwd, CPU ms | "
        "iterations min / median / max | step compile CPU s: trace+lower / XLA | "
        "while loops | callback sites | scaled residual | fwd max err | "
        "grad rel err | grad cos |\n"
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        it = r.iterations
        fwd_c = f"{r.compile_s['fwd']:.2f} ({r.compile_cpu['fwd']:.2f})" if r.fwd else "—"
        step_c = f"{r.compile_s['step']:.2f} ({r.compile_cpu['step']:.2f})"
        bwd = f"{(r.step.cpu_median_s - r.fwd.cpu_median_s) * 1e3:.2f}" if r.fwd else "—"
        lines.append(
            f"| {r.name} | {step_c}; {fwd_c} | {_ms(r.step)} | {_ms(r.fwd)} | "
            f"{bwd} | {int(it.min())} / {np.median(it):g} / {int(it.max())} | "
            f"{r.lower_cpu:.2f} / {r.compile_cpu['step'] - r.lower_cpu:.2f} | {r.while_loops} | "
            f"{r.callbacks} | "
            f"{r.residual:.2g} | {r.fwd_err:.1e} | {r.grad_rel_err:.1e} | {r.grad_cos:.8f} |"
        )
    return head + "\n".join(lines) + "\n"


def ratios(rows: list[Row]) -> str:
    base = rows[0]
    rows = [r for r in rows if r.library != "floor"]
    out = [
        f"{base.name} against each row: step time ratio (theirs / ours) by median CPU, by "
        "median wall; step compile time ratio (ours / theirs) by wall, by CPU:"
    ]
    for r in rows[1:]:
        out.append(
            f"- {r.name}: {r.step.cpu_median_s / base.step.cpu_median_s:.2f}× CPU, "
            f"{r.step.median_s / base.step.median_s:.2f}× wall; compile "
            f"{base.compile_s['step'] / r.compile_s['step']:.2f}× wall, "
            f"{base.compile_cpu['step'] / r.compile_cpu['step']:.2f}× CPU"
        )
    return "\n".join(out) + "\n"


def goals(rows: list[Row]) -> str:
    """Issue 11's goals for the defaults, by median CPU time: at least 2× faster per
    step than jaxopt and 3× than optimistix, compile (CPU) at most 1.5× theirs."""
    base = rows[0]
    out = ["Goals (issue 11), eqprop_jax defaults, by CPU time:"]
    for lib, need in (("jaxopt", 2.0), ("optimistix", 3.0)):
        others = [r for r in rows if r.library == lib]
        if not others:
            continue
        speed = [r.step.cpu_median_s / base.step.cpu_median_s for r in others]
        comp = [base.compile_cpu["step"] / r.compile_cpu["step"] for r in others]
        out.append(
            f"- step ≥ {need:g}× faster than {lib}: "
            + ", ".join(f"{v:.2f}×" for v in speed)
            + (" — met" if min(speed) >= need else " — NOT met")
        )
        out.append(
            f"- compile ≤ 1.5× {lib}'s: "
            + ", ".join(f"{v:.2f}×" for v in comp)
            + (" — met" if max(comp) <= 1.5 else " — NOT met")
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, four rows, no fwd split")
    p.add_argument("--random", action="store_true", help="random inputs instead of MNIST")
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--d", type=int, default=None, help="DEQ state size")
    p.add_argument("--hidden", type=int, default=None, help="MLP hidden width")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--w-norm", type=float, default=0.9, help="‖W‖₂ of the DEQ cell (< 1)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=None, help="timed calls per row")
    args = p.parse_args(argv)

    quick = args.quick
    batch = args.batch or (8 if quick else 128)
    d = args.d or (16 if quick else 64)
    hidden = args.hidden or (32 if quick else 128)
    rounds = args.rounds or (3 if quick else 21)
    tol, max_steps, lr = args.tol, args.max_steps, 0.1
    n_in, n_out = 784, 10

    info = machine_info()
    x_np, y_np, data = load_batch(batch, n_in, args.random, args.data_dir)
    if not 0 < args.w_norm < 1:
        raise SystemExit(f"--w-norm must lie in (0, 1) for the map to contract, got {args.w_norm}.")
    net = init_net(d, hidden, n_in, n_out, tol, args.w_norm)
    t0 = time.perf_counter()
    ref = reference(net, x_np, y_np)
    print(f"float64 reference: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)

    def with_deq(solver, adjoint):
        return dataclasses.replace(
            net, deq=eqp.DEQ(net.deq.cell, state_shape=(d,), solver=solver, adjoint=adjoint)
        )

    ignore = with_deq(net.deq.solver, eqp.Implicit(on_failure="ignore"))
    lockstep = with_deq(
        eqp.Picard(tol=tol, batch_buckets=1), eqp.Implicit(on_failure="ignore")
    )
    sqrt_d = float(np.sqrt(d))
    configs = [
        (
            f"eqprop_jax defaults: DEQ(Picard(tol={tol:g})) = {describe(net.deq.adjoint)}",
            "eqprop_jax",
            net,
            eqprop_solve,
        ),
        (
            f"optimistix FixedPointIteration(rtol=atol={tol:g}) + ImplicitAdjoint (LU), "
            "throw=False",
            "optimistix",
            net,
            optx_solve(tol, max_steps, throw=False),
        ),
        (
            f"jaxopt FixedPointIteration(tol={tol:g}) + implicit_diff (normal CG)",
            "jaxopt",
            net,
            jaxopt_solve(tol, max_steps),
        ),
        (
            f"jaxopt FixedPointIteration(tol=√d·{tol:g}={sqrt_d * tol:.2g}) + implicit_diff",
            "jaxopt",
            net,
            jaxopt_solve(sqrt_d * tol, max_steps),
        ),
    ]
    if not quick:
        configs[1:1] = [
            ("eqprop_jax, Implicit(on_failure='ignore')", "eqprop_jax", ignore, eqprop_solve),
            (
                "eqprop_jax, Implicit(on_failure='ignore'), batch_buckets=1 (lockstep, no "
                "compaction) in solver and adjoint",
                "eqprop_jax",
                lockstep,
                eqprop_solve,
            ),
        ]
        configs.insert(
            4,
            (
                f"optimistix FixedPointIteration(rtol=atol={tol:g}) + ImplicitAdjoint (LU), "
                "throw=True (its default)",
                "optimistix",
                net,
                optx_solve(tol, max_steps, throw=True),
            ),
        )

    warm_up()
    rows = [
        prepare(name, lib, n, solve, x, y, ref, tol, lr, forward=not quick)
        for name, lib, n, solve in configs
    ]
    if not quick:
        rows.append(
            prepare(
                "floor: no solve, z = f(0, e) (the MLP, head, loss and SGD update alone)",
                "floor",
                net,
                floor_solve,
                x,
                y,
                ref,
                tol,
                lr,
                forward=True,
            )
        )
    load_before = load_average()
    time_rows(rows, rounds)
    load_after = load_average()

    report = "\n".join(
        [
            f"Machine: {info['platform']}, {info['cpus']} CPUs, jax {info['jax']}, "
            f"device {info['device']}; {info['date']}",
            f"Load before timing: {load_before}",
            f"Load after timing: {load_after}",
            f"Problem: {data}; batch {batch}, MLP 784-{hidden}-{d}, DEQ d = {d} "
            f"(‖W‖₂ = {args.w_norm:g}), head {d}-{n_out}; float32; tol {tol:g}, "
            f"max_steps {max_steps}; "
            f"{rounds} interleaved timed calls per row.",
            "Times in ms: median process CPU time (all threads) / median wall / min wall.",
            "",
            table(rows),
            ratios(rows),
            goals(rows),
        ]
    )
    print(report)
    return {"rows": rows, "report": report, "info": info}


if __name__ == "__main__":
    main()
