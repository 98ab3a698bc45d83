r"""Batched tanh DEQ solved forward and backward by eqprop_jax, optimistix and jaxopt.

The problem (one per run, float32): for each example i of a batch,

    z_i* = tanh(γ_i W z_i* + s_i U x_i + b),

with W symmetric, ‖W‖₂ = 0.9, and a per-example gain γ_i (0.02 … 1.06) and input
scale s_i (3 … 0.03): easy examples (small gain, saturating input) converge in a
handful of Picard steps, hard ones (γ_i‖W‖₂ ≈ 0.95, inputs near zero so tanh' ≈ 1)
in a few hundred. The loss is L = (1/B) Σ_i ½‖z_i* − t_i‖² and we time
`jax.value_and_grad(L)` w.r.t. (W, U) and the forward solve alone.

Matched tolerances. eqprop_jax and optimistix both stop when
max_j |f(z)_j − z_j| / (atol + rtol |z_j|) ≤ 1 (eqprop_jax scales by |z|, optimistix
by |f(z)|), with atol = rtol = `tol`. jaxopt stops when ‖f(z) − z‖₂ ≤ tol_jaxopt
(its own ℓ2 norm, `jaxopt/_src/fixed_point_iteration.py`; the Anderson solver uses the
same residual norm); we give it tol_jaxopt = `tol`, which implies the rule above
(‖r‖∞ ≤ ‖r‖₂), so jaxopt is never asked for less accuracy; one row also gives it
√d·`tol` (looser than the rule), so the two bracket equal accuracy. Every row reports what it
achieved: the largest scaled residual in the shared rule (≤ 1 means the rule holds),
the forward error against a float64 solve, and the gradient's relative error against
a float64 dense implicit-function-theorem solve. Backward solves: eqprop_jax's
`Implicit` (BiCGStab by default, or GMRES) and `AlmeidaPineda` stop at relative
residual `tol`; optimistix's
default `ImplicitAdjoint` materialises the Jacobian and LU-solves it (exact), the
"gmres" row uses `lineax.GMRES(rtol=tol)`; jaxopt's default implicit solve is CG on the
normal equations with jax's default tolerance 1e-5, the "gmres" row uses
`jaxopt.linear_solve.solve_gmres(tol=tol)`.

Batching. "vmap" rows solve each example on its own under `jax.vmap` (per-example
stopping). eqprop_jax's loops (forward, and BiCGStab / Almeida–Pineda backward) are
`ragged_while_loop`s that compact the batch so finished examples cost nothing
(`batch_buckets` bucket sizes, 4 by default); the "lockstep" row sets
`batch_buckets=1`, i.e. what `lax.while_loop` under vmap does (and what optimistix
and jaxopt do): every example is stepped until the slowest one stops. "batch" rows
solve the whole (B, d) state as one fixed point: the stopping rule then covers the
whole batch (max norm for eqprop_jax/optimistix; for jaxopt ‖R‖_F ≤ √B·`tol`, the
batch analogue of its per-example rule).

Timing: every configuration is compiled first (compile time reported apart), then all
are called round-robin (`benchmarks/_timing.py`), reporting median process CPU time
and the fastest wall-clock call, since the machine is shared.

Run: `python benchmarks/solvers.py` (full: ~25 min on a 2-core box under load 10,
most of it XLA compilation and the max_steps sweep; `--no-sweep` skips the sweep) or
`python benchmarks/solvers.py --quick` (tiny sizes, three rows: ~35 s, mostly compiling).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

import eqprop_jax as eqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _timing, beside this file
from _timing import (  # noqa: E402
    Timing,
    compile_timed,
    interleaved,
    load_average,
    machine_info,
    matmul_gflops,
    summarize,
)

# --------------------------------------------------------------------------- problem


@dataclass(frozen=True)
class Problem:
    """Weights, inputs and targets of one batched tanh DEQ (numpy float32)."""

    W: np.ndarray  # (d, d)
    U: np.ndarray  # (d, d)
    b: np.ndarray  # (d,)
    X: np.ndarray  # (B, d)
    T: np.ndarray  # (B, d) targets
    gain: np.ndarray  # (B,)
    scale: np.ndarray  # (B,)

    @property
    def d(self) -> int:
        return self.W.shape[0]

    @property
    def batch(self) -> int:
        return self.X.shape[0]


def make_problem(d: int, batch: int, *, seed: int = 0, norm: float = 0.9) -> Problem:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    a = a + a.T
    # Symmetric W: its eigenvalues reach ±‖W‖₂, so hard examples are genuinely slow
    # for plain iteration (a random non-symmetric W has spectral radius ≈ ‖W‖₂ / 2).
    W = norm * a / np.linalg.norm(a, 2)
    U = rng.standard_normal((d, d)) / np.sqrt(d)
    b = 0.01 * rng.standard_normal(d)
    X = rng.standard_normal((batch, d))
    T = rng.uniform(-0.5, 0.5, (batch, d))
    gain = np.linspace(0.02, 1.06, batch)
    scale = np.geomspace(3.0, 0.03, batch)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    return Problem(f32(W), f32(U), f32(b), f32(X), f32(T), f32(gain), f32(scale))


def injection(prob: Problem, U):
    """s_i U x_i + b for the whole batch, differentiable in U."""
    return prob.scale[:, None] * (prob.X @ U.T) + prob.b


def f_one(z, args):
    """One example's map z -> tanh(γ W z + inj)."""
    W, inj, gain = args
    return jnp.tanh(gain * (W @ z) + inj)


def f_batch(Z, args):
    """The whole batch's map Z -> tanh(γ ⊙ Z Wᵀ + INJ), Z of shape (B, d)."""
    W, inj, gain = args
    return jnp.tanh(gain[:, None] * (Z @ W.T) + inj)


def loss_from_state(prob: Problem, Z):
    return 0.5 * jnp.mean(jnp.sum((Z - prob.T) ** 2, axis=-1))


# ------------------------------------------------------------------ float64 reference


@dataclass(frozen=True)
class Reference:
    Z: np.ndarray  # (B, d) float64 fixed points
    grad_W: np.ndarray
    grad_U: np.ndarray


def reference(prob: Problem) -> Reference:
    """Float64 fixed points (iteration to rounding, then a Newton step) and
    dL/d(W, U) by a dense implicit-function-theorem solve.

    With σ_i = 1 − z_i², J_i = diag(σ_i) γ_i W, u_i = (I − J_iᵀ)⁻¹ (z_i − t_i)/B and
    v_i = σ_i ⊙ u_i: dL/dW = Σ_i γ_i v_i z_iᵀ and dL/dU = Σ_i s_i v_i x_iᵀ (s_i the
    input scale).
    """
    W, U, b, X, T = (np.asarray(a, np.float64) for a in (prob.W, prob.U, prob.b, prob.X, prob.T))
    gain = np.asarray(prob.gain, np.float64)
    scale = np.asarray(prob.scale, np.float64)
    inj = scale[:, None] * (X @ U.T) + b
    eye = np.eye(prob.d)
    # Plain iteration contracts at rate ≤ max_i γ_i ‖W‖₂ < 0.96: 1500 steps reach
    # float64 rounding (0.96^1500 ≈ 1e-27); one Newton step then polishes.
    Z = np.zeros_like(X)
    for _ in range(1500):
        Z = np.tanh(gain[:, None] * (Z @ W.T) + inj)
    gW = gain[:, None, None] * W[None]
    Fz = np.tanh(gain[:, None] * (Z @ W.T) + inj)
    jac = eye[None] - (1 - Fz**2)[:, :, None] * gW
    Z = Z - np.linalg.solve(jac, (Z - Fz)[..., None])[..., 0]
    s = 1 - Z**2
    g = (Z - T) / prob.batch
    a_t = eye[None] - np.swapaxes(s[:, :, None] * gW, 1, 2)
    u = np.linalg.solve(a_t, g[..., None])[..., 0]
    v = s * u
    grad_W = np.einsum("b,bi,bj->ij", gain, v, Z)
    grad_U = np.einsum("b,bi,bj->ij", scale, v, X)
    return Reference(Z, grad_W, grad_U)


def scaled_residual32(prob: Problem, Z, tol: float) -> float:
    """Largest max_j |f(z)_j − z_j| / (tol + tol |z_j|) over the batch: the shared
    stopping rule evaluated in float32, as the solvers see it (≤ 1: it holds)."""
    W, U, gain = jnp.asarray(prob.W), jnp.asarray(prob.U), jnp.asarray(prob.gain)
    Z = jnp.asarray(Z)
    Fz = f_batch(Z, (W, injection(prob, U), gain))
    return float(jnp.max(jnp.abs(Fz - Z) / (tol + tol * jnp.abs(Z))))


# ------------------------------------------------------------------------- the solvers
# Each builder returns solve(W, inj, gain) -> (Z, steps): steps per example (vmap)
# or one number (whole batch).

SolveFn = Callable


def eqprop_vmap(solver, adjoint) -> SolveFn:
    def solve(W, inj, gain):
        def one(i, g):
            z0 = jnp.zeros_like(i)
            sol = eqp.fixed_point(f_one, z0, (W, i, g), solver=solver, adjoint=adjoint)
            return sol.value, sol.stats.steps

        return jax.vmap(one)(inj, gain)

    return solve


def eqprop_batch(solver, adjoint) -> SolveFn:
    def solve(W, inj, gain):
        sol = eqp.fixed_point(
            f_batch, jnp.zeros_like(inj), (W, inj, gain), solver=solver, adjoint=adjoint
        )
        return sol.value, sol.stats.steps

    return solve


def optx_vmap(tol: float, max_steps: int, linear_solver=None, batch: bool = False) -> SolveFn:
    import optimistix as optx

    solver = optx.FixedPointIteration(rtol=tol, atol=tol)
    adjoint = (
        optx.ImplicitAdjoint() if linear_solver is None else optx.ImplicitAdjoint(linear_solver)
    )

    def run(f, z0, args):
        sol = optx.fixed_point(
            f, solver, z0, args, max_steps=max_steps, adjoint=adjoint, throw=False
        )
        return sol.value, sol.stats["num_steps"]

    def solve(W, inj, gain):
        if batch:
            return run(f_batch, jnp.zeros_like(inj), (W, inj, gain))
        return jax.vmap(lambda i, g: run(f_one, jnp.zeros_like(i), (W, i, g)))(inj, gain)

    return solve


def jaxopt_solver(
    kind: str,
    tol: float,
    max_steps: int,
    *,
    linear: str = "default",
    batch: bool = False,
    implicit_diff: bool = True,
) -> SolveFn:
    import jaxopt

    f = f_batch if batch else f_one

    def fp(z, W, inj, gain):
        return f(z, (W, inj, gain))

    kw = dict(tol=tol, maxiter=max_steps, implicit_diff=implicit_diff)
    if linear == "gmres":
        kw["implicit_diff_solve"] = functools.partial(jaxopt.linear_solve.solve_gmres, tol=tol)
    if kind == "picard":
        s = jaxopt.FixedPointIteration(fixed_point_fun=fp, **kw)
    else:
        # jaxopt's ridge is absolute (added to the Gram matrix of residuals), so its
        # default 1e-5 swamps the Gram matrix once residuals fall below ~3e-3. Max
        # iterations over this batch (d 256, B 128, vmap, tol 1e-6), measured
        # 2026-11-23: ridge 1e-5: 476, 1e-8: 316, 1e-10: 196, 1e-12: 93, 1e-14: 74,
        # 0: 73. We give it 1e-14.
        s = jaxopt.AndersonAcceleration(fixed_point_fun=fp, history_size=5, ridge=1e-14, **kw)

    def solve(W, inj, gain):
        if batch:
            params, state = s.run(jnp.zeros_like(inj), W, inj, gain)
            return params, state.iter_num

        def one(i, g):
            params, state = s.run(jnp.zeros_like(i), W, i, g)
            return params, state.iter_num

        return jax.vmap(one)(inj, gain)

    return solve


# ------------------------------------------------------------------------- measuring


@dataclass
class Row:
    name: str
    grad: bool = True
    fwd: Timing | None = None
    fwd_grad: Timing | None = None
    steps: np.ndarray | None = None
    residual: float = float("nan")
    fwd_err: float = float("nan")
    grad_err: float = float("nan")
    note: str = ""
    calls: dict = field(default_factory=dict)  # "fwd"/"grad" -> (compiled, args)
    compile_s: dict = field(default_factory=dict)


def prepare(
    name: str, solve: SolveFn, prob: Problem, ref: Reference | None, tol: float, *, grad=True
) -> Row:
    """Compile the forward solve (and `value_and_grad` of the loss), run each once and
    measure accuracy; the timing is done later, round-robin over all rows."""
    W, U, gain = jnp.asarray(prob.W), jnp.asarray(prob.U), jnp.asarray(prob.gain)

    def forward(W, U):
        return solve(W, injection(prob, U), gain)

    def loss(W, U):
        Z, steps = forward(W, U)
        return loss_from_state(prob, Z), (Z, steps)

    row = Row(name, grad=grad)
    fwd, row.compile_s["fwd"] = compile_timed(forward, W, U)
    row.calls["fwd"] = (fwd, (W, U))
    Z, steps = jax.block_until_ready(fwd(W, U))
    row.steps = np.atleast_1d(np.asarray(steps))
    row.residual = scaled_residual32(prob, Z, tol)
    if ref is not None:
        row.fwd_err = float(np.max(np.abs(np.asarray(Z, np.float64) - ref.Z)))
    if grad:
        vg, row.compile_s["grad"] = compile_timed(
            jax.value_and_grad(loss, (0, 1), has_aux=True), W, U
        )
        try:
            _, (gW, gU) = jax.block_until_ready(vg(W, U))
        except Exception as e:  # noqa: BLE001 - a library's run-time error is a result
            msg = next((ln for ln in str(e).splitlines() if "Error" in ln), str(e)[:200])
            row.note = f"backward failed: {msg.strip()}"
            print(f"  {name}: {row.note}", file=sys.stderr, flush=True)
            return row
        row.calls["grad"] = (vg, (W, U))
        if ref is not None:
            est = np.concatenate([np.ravel(gW), np.ravel(gU)]).astype(np.float64)
            exact = np.concatenate([np.ravel(ref.grad_W), np.ravel(ref.grad_U)])
            row.grad_err = float(np.linalg.norm(est - exact) / np.linalg.norm(exact))
    print(
        f"  compiled {name}: {row.compile_s}, steps max {row.steps.max()}",
        file=sys.stderr,
        flush=True,
    )
    return row


def time_rows(rows: list[Row], rounds: int) -> None:
    calls = {(i, k): c for i, r in enumerate(rows) for k, c in r.calls.items()}
    times = interleaved(calls, rounds)
    for (i, k), ts in times.items():
        t = summarize(rows[i].compile_s[k], ts)
        if k == "fwd":
            rows[i].fwd = t
        else:
            rows[i].fwd_grad = t
    for r in rows:
        r.calls.clear()  # free the executables


def _t(t: Timing | None) -> str:
    if t is None:
        return "—"
    return f"{t.cpu_median_s * 1e3:.3g} / {t.min_s * 1e3:.3g}"


def _c(t: Timing | None) -> str:
    return "—" if t is None else f"{t.compile_s:.1f}"


def _steps(s: np.ndarray) -> str:
    if s.size == 1:
        return f"{int(s[0])} (whole batch)"
    return f"{int(s.min())} / {np.median(s):g} / {int(s.max())}"


def table(rows: list[Row], step_ms: float) -> str:
    head = (
        "| solver | compile s fwd / fwd+grad | fwd ms: CPU / wall min | "
        "fwd+grad ms: CPU / wall min | iterations min / median / max | "
        "fwd CPU ms per iteration (× matmul-bound) | scaled residual | "
        "fwd max abs err | grad rel err |\n"
        "|---|---:|---:|---:|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        it = int(r.steps.max())
        per_it = r.fwd.cpu_median_s * 1e3 / max(it, 1)
        lines.append(
            f"| {r.name} | {_c(r.fwd)} / {_c(r.fwd_grad)} | {_t(r.fwd)} | {_t(r.fwd_grad)} | "
            f"{_steps(r.steps)} | {per_it:.3f} ({per_it / step_ms:.1f}×) | {r.residual:.2g} | "
            f"{r.fwd_err:.1e} | {r.note or f'{r.grad_err:.1e}'} |"
        )
    return head + "\n".join(lines) + "\n"


def sweep_table(sweep: dict[str, dict[int, Row]], max_steps_list: list[int]) -> str:
    head = (
        "| solver | "
        + " | ".join(f"max_steps {m:g}: compile s, CPU ms / wall min ms" for m in max_steps_list)
        + " | iterations (max over batch) |\n|---|"
        + "---:|" * len(max_steps_list)
        + "---:|\n"
    )
    lines = []
    for name, by_m in sweep.items():
        cells = []
        for m in max_steps_list:
            r = by_m.get(m)
            if r is None:
                cells.append("not run")
                continue
            t = r.fwd_grad if r.grad else r.fwd
            cells.append(f"{t.compile_s:.1f}, {_t(t)}")
        its = sorted({int(r.steps.max()) for r in by_m.values()})
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {its} |")
    return head + "\n".join(lines) + "\n"


def speedups(rows: list[Row]) -> str:
    """fwd+grad time of eqprop_jax with its defaults over the other libraries' rows."""
    eq = [r for r in rows if r.name.startswith("eqprop_jax") and r.fwd_grad is not None]
    if not eq:
        return ""
    defaults = [r for r in eq if "(defaults)" in r.name]
    best = defaults[0] if defaults else min(eq, key=lambda r: r.fwd_grad.cpu_median_s)
    out = [f"Speed-up of {best.name}, fwd+grad, by median CPU time / by min wall time:"]
    for r in rows:
        if r.name.startswith(("optimistix", "jaxopt")) and r.fwd_grad is not None:
            out.append(
                f"- vs {r.name}: {r.fwd_grad.cpu_median_s / best.fwd_grad.cpu_median_s:.2f}× / "
                f"{r.fwd_grad.min_s / best.fwd_grad.min_s:.2f}×"
            )
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ main


def fori_baseline(iterations: int) -> SolveFn:
    """A hand-written `lax.fori_loop` of the batched map for a fixed number of
    iterations: the floor for any solver's forward loop (no stopping test)."""

    def solve(W, inj, gain):
        Z = jax.lax.fori_loop(
            0, iterations, lambda _, Z: f_batch(Z, (W, inj, gain)), jnp.zeros_like(inj)
        )
        return Z, jnp.array(iterations)

    return solve


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, three rows, no sweep")
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--rounds", type=int, default=None, help="timed calls per row")
    p.add_argument("--no-sweep", action="store_true", help="skip the max_steps sweep")
    args = p.parse_args(argv)

    quick = args.quick
    d = args.d or (16 if quick else 256)
    batch = args.batch or (8 if quick else 128)
    tol = args.tol
    rounds = args.rounds or (3 if quick else 7)
    max_steps = 1000
    do_sweep = not (args.no_sweep or quick)
    sweep_steps = [1000, 10_000, 100_000]

    info = machine_info()
    gflops_step, gflops_step_cpu = matmul_gflops(batch, d, d, min_time=0.1 if quick else 1.0)
    big = 128 if quick else 1024
    gflops_big, gflops_big_cpu = matmul_gflops(
        big, big, big, chain=10, min_time=0.1 if quick else 1.0
    )
    # One forward iteration of the batched map is a (B, d) @ (d, d) matmul.
    step_ms = 2.0 * batch * d * d / (gflops_step_cpu * 1e9) * 1e3

    prob = make_problem(d, batch)
    t0 = time.perf_counter()
    ref = reference(prob)
    print(f"float64 reference: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    picard = eqp.Picard(tol=tol, max_steps=max_steps)
    lockstep = eqp.Picard(tol=tol, max_steps=max_steps, batch_buckets=1)
    anderson = eqp.Anderson(history=5, tol=tol, max_steps=max_steps)
    implicit = eqp.Implicit(tol=tol, on_failure="ignore")  # BiCGStab, the default
    gmres = eqp.Implicit(eqp.GMRES(max_steps=100), tol=tol, on_failure="ignore")
    ap = eqp.AlmeidaPineda(tol=tol, max_steps=10 * max_steps, on_failure="ignore")

    configs: list[tuple[str, SolveFn]] = [
        ("eqprop_jax Picard + Implicit(bicgstab) (defaults), vmap", eqprop_vmap(picard, implicit)),
        ("optimistix FixedPointIteration + ImplicitAdjoint (LU), vmap", optx_vmap(tol, max_steps)),
        (
            "jaxopt FixedPointIteration + implicit_diff (normal CG), vmap",
            jaxopt_solver("picard", tol, max_steps),
        ),
    ]
    if not quick:
        import lineax as lx

        gm = lx.GMRES(rtol=tol, atol=0.0, restart=20, max_steps=100 * 20)
        configs[1:1] = [
            ("eqprop_jax Picard + Implicit(gmres), vmap", eqprop_vmap(picard, gmres)),
            ("eqprop_jax Picard + AlmeidaPineda, vmap", eqprop_vmap(picard, ap)),
            (
                "eqprop_jax Picard + AlmeidaPineda, vmap, lockstep (batch_buckets=1)",
                eqprop_vmap(lockstep, ap),  # the adjoint follows the solver
            ),
            (
                "eqprop_jax Picard + Implicit(bicgstab), vmap, lockstep (batch_buckets=1)",
                eqprop_vmap(lockstep, implicit),
            ),
            ("eqprop_jax Anderson(5) + Implicit(bicgstab), vmap", eqprop_vmap(anderson, implicit)),
            ("eqprop_jax Anderson(5) + AlmeidaPineda, vmap", eqprop_vmap(anderson, ap)),
            ("eqprop_jax Picard + Implicit(bicgstab), batch", eqprop_batch(picard, implicit)),
        ]
        configs += [
            (
                "optimistix FixedPointIteration + ImplicitAdjoint (lineax GMRES), vmap",
                optx_vmap(tol, max_steps, gm),
            ),
            (
                "jaxopt FixedPointIteration + implicit_diff (gmres), vmap",
                jaxopt_solver("picard", tol, max_steps, linear="gmres"),
            ),
            (
                f"jaxopt FixedPointIteration + implicit_diff (normal CG), vmap, tol √d·{tol:g}",
                jaxopt_solver("picard", tol * np.sqrt(d), max_steps),
            ),
            (
                "jaxopt AndersonAcceleration(5) + implicit_diff (normal CG), vmap",
                jaxopt_solver("anderson", tol, max_steps),
            ),
            (
                "jaxopt AndersonAcceleration(5) + implicit_diff (gmres), vmap",
                jaxopt_solver("anderson", tol, max_steps, linear="gmres"),
            ),
            # Whole batch: jaxopt's ℓ2 norm runs over all B·d entries, and the analogue
            # of ‖r_i‖₂ ≤ tol for every example is ‖R‖_F ≤ √B tol (with tol itself
            # float32 rounding alone exceeds it and the solve never stops).
            (
                f"jaxopt FixedPointIteration + implicit_diff (normal CG), batch, tol √B·{tol:g}",
                jaxopt_solver("picard", tol * np.sqrt(batch), max_steps, batch=True),
            ),
            (
                f"jaxopt AndersonAcceleration(5) + implicit_diff (normal CG), batch, "
                f"tol √B·{tol:g}",
                jaxopt_solver("anderson", tol * np.sqrt(batch), max_steps, batch=True),
            ),
        ]

    rows = [prepare(name, solve, prob, ref, tol) for name, solve in configs]
    slowest = int(rows[0].steps.max())
    rows.append(
        prepare(
            f"hand-written lax.fori_loop, {slowest} iterations (floor; no stopping test)",
            fori_baseline(slowest),
            prob,
            ref,
            tol,
            grad=False,
        )
    )
    time_rows(rows, rounds)

    sweep: dict[str, dict[int, Row]] = {}
    if do_sweep:
        builders = {
            "eqprop_jax Picard + Implicit(bicgstab), vmap (fwd+grad)": lambda m: eqprop_vmap(
                eqp.Picard(tol=tol, max_steps=m), implicit
            ),
            "optimistix FixedPointIteration + ImplicitAdjoint (LU), vmap (fwd+grad)": lambda m: (
                optx_vmap(tol, m)
            ),
            "jaxopt FixedPointIteration + implicit_diff, vmap (fwd+grad)": lambda m: jaxopt_solver(
                "picard", tol, m
            ),
            f"jaxopt FixedPointIteration, implicit_diff=False (scan), batch, tol √B·{tol:g} "
            "(fwd only)": (
                lambda m: jaxopt_solver(
                    "picard", tol * np.sqrt(batch), m, batch=True, implicit_diff=False
                )
            ),
            "jaxopt FixedPointIteration, implicit_diff=False (scan), vmap (fwd only)": (
                lambda m: jaxopt_solver("picard", tol, m, implicit_diff=False)
            ),
        }
        # Under vmap jaxopt's scan runs every one of max_steps iterations (its lax.cond
        # becomes a select), ~0.5 s per 1000 here: 1e5 would take minutes per call.
        skip = {("vmap (fwd only)", 100_000)}
        for name, build in builders.items():
            grad = "fwd only" not in name
            sweep[name] = {
                m: prepare(f"{name} @ {m}", build(m), prob, None, tol, grad=grad)
                for m in sweep_steps
                if not any(name.endswith(k) and m == n for k, n in skip)
            }
        time_rows([r for by_m in sweep.values() for r in by_m.values()], max(3, rounds // 2))

    out = [
        f"Machine: {info['platform']}, {info['cpus']} CPUs, jax {info['jax']}, "
        f"device {info['device']}; {info['date']}",
        f"Load before: {info['uptime']}",
        f"Load after: {load_average()}",
        f"Problem: d = {d}, batch = {batch}, float32, tol = {tol:g}, max_steps = {max_steps}; "
        f"{rounds} interleaved timed calls per row.",
        f"Measured float32 matmul (chained in a loop), GFLOP per CPU second / per wall "
        f"second: {gflops_step_cpu:.1f} / {gflops_step:.1f} at ({batch}, {d}) @ ({d}, {d}) "
        f"(= {step_ms * 1e3:.0f} CPU µs per forward iteration if matmul-bound); "
        f"{gflops_big_cpu:.1f} / {gflops_big:.1f} at {big}³.",
        "Times: CPU = median process CPU time (all threads) over the interleaved calls, "
        "robust to other jobs on the machine; wall min = fastest wall-clock call.",
        "",
        table(rows, step_ms),
        speedups(rows),
    ]
    if sweep:
        out += ["max_steps sweep (same tol, so the iterations actually taken are fixed):", ""]
        out.append(sweep_table(sweep, sweep_steps))
    report = "\n".join(out)
    print(report)
    return {"rows": rows, "sweep": sweep, "report": report, "info": info}


if __name__ == "__main__":
    main()
