"""Every training-step benchmark of issue 14 in one run, in float32 and bfloat16, with
a markdown results table that names the device. Meant for one GPU (`benchmarks/gpu.sh`,
at most ~8 minutes on an H100/H200); `--tiny` runs the same rows at toy sizes on any
backend (a CPU check of the script itself, seconds per row).

Rows (the peers' configurations of issue 14, at GPU batch sizes):

- DCHN, rain's timing configuration: 3x32x32, convs 128-256-512-512, async, MSE,
  T 60 / K 15 centered, β 0.25, batch 128;
- DCHN, Laborieux et al. 2021's CIFAR-10 settings (preset `laborieux2021-cifar10`:
  cross-entropy readout, sync, T 250 / K 30 centered, β 1, batch 128), with the time of
  one 50,000-example epoch extrapolated from the step (the issue's goal: < 60 s);
- P-CNN (Laborieux et al. 2021, MNIST): 5x5 convs 32-64, T 200 / K 10, batch 100;
- SimpleVGG (Ernoult et al. 2022) plain backprop and L-DRL (K = 20, 30, 35, 55, 20),
  batch 128;
- the MLP rows at large batch (`--mlp-batch`, default 4096): P-MLP 784-512-10
  (T 30 / K 10, positive, β 0.1), DHN-1h 784-1024-10 (async, 15 / 15 centered, β 0.2),
  DRN-XS 784-100-10 resistive (4 / 4 centered, β 1);
- the solver comparison `benchmarks/solvers.py --no-sweep` (float32 only: its
  tolerances are float32's; its own table is appended).

One training step = the estimator's gradient (for DTP its feedback training first) and
an optax update, jitted once, on synthetic data. Compile time (trace + lower + XLA
compile) apart from the steady state (median wall time of at least 3 calls, each
ended by `block_until_ready`). Rows run, most wanted first (every section in
float32, the solver comparison, then bfloat16, the P-CNN last), until `--budget`
seconds have passed (default 450: with the last row started, about 8 minutes); the
rest are marked skipped. A row that fails is marked with its error and
the run goes on.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.md] [--budget 450] [--tiny]
        [--dtypes float32 bfloat16] [--only dchn pcnn vgg mlp solvers]

`EQP_BENCH_TINY=1` in the environment is the same as `--tiny`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqprop_jax as eqp
from eqprop_jax.diagnostics.dtp import backprop_gradients
from eqprop_jax.models.layered import LayeredNet
from eqprop_jax.models.resistive import ResistiveNetwork

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _timing, beside this file
from _timing import machine_info, time_jitted, train_step  # noqa: E402

SECTIONS = ("dchn", "pcnn", "vgg", "mlp", "solvers")
VGG_STEPS = (20, 30, 35, 55, 20)
VGG_NOISE = (0.4, 0.4, 0.2, 0.2, 0.08)
VGG_LR = (1e-4, 3.5e-4, 8e-3, 8e-3, 0.18)


@dataclass
class Row:
    section: str
    name: str
    dtype: str
    batch: int
    settings: str
    compile_s: float | None = None
    step_s: float | None = None
    note: str = ""
    epoch_s: float | None = None

    @property
    def examples_per_s(self) -> float | None:
        return None if self.step_s is None else self.batch / self.step_s


# -- steps ----------------------------------------------------------------------------


def dtp_step(model, est, opt, *, backprop: bool):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    fwd = lambda p: p.forward  # noqa: E731 - the trained (forward) weights

    def step(params, opt_state, x, y, key):
        m = eqx.combine(params, static)
        if backprop:
            loss, grads = backprop_gradients(m, x, y)
        else:
            m = est.pre_step(m, x, y, key=key)
            loss, grads, _ = est(m, x, y)
        p = eqx.filter(m, eqx.is_inexact_array)
        updates, opt_state = opt.update(fwd(grads), opt_state, fwd(p))
        p = eqx.tree_at(fwd, p, optax.apply_updates(fwd(p), updates))
        return p, opt_state, loss

    return step, (params, opt.init(fwd(params)))


# -- rows -----------------------------------------------------------------------------


def _dchn(channels, **kw):
    """The CIFAR-10 DCHN of both settings: 3x3 convs, padding 1, clipped activation."""
    return lambda dt, key: eqp.ConvHopfield(
        (3, 32, 32), channels, 3, 10, paddings=1, activation="clip_half", dtype=dt, key=key, **kw
    )


def dchn_rows(tiny: bool):
    ch = (4, 4, 4, 4) if tiny else (128, 256, 512, 512)
    b = 2 if tiny else 128
    free, nudged = (2, 1) if tiny else (60, 15)
    yield (
        "DCHN (rain: async MSE, T 60 / K 15x2, β 0.25)",
        b,
        f"convs {'-'.join(map(str, ch))}, T {free}/{nudged} centered",
        _dchn(ch, update="async"),
        eqp.EquilibriumProp(beta=0.25, variant="centered", free_steps=free, nudged_steps=nudged),
        optax.sgd(0.05, momentum=0.9),
        None,
    )
    free, nudged = (2, 1) if tiny else (250, 30)
    yield (
        "DCHN (Laborieux 2021: sync CE, T 250 / K 30x2, β 1)",
        b,
        f"convs {'-'.join(map(str, ch))}, T {free}/{nudged} centered",
        _dchn(ch, cost="ce", update="sync"),
        eqp.EquilibriumProp(beta=1.0, variant="centered", free_steps=free, nudged_steps=nudged),
        optax.sgd(0.05, momentum=0.9),
        50_000,
    )


def pcnn_rows(tiny: bool):
    ch = (2, 4) if tiny else (32, 64)
    free, nudged = (2, 1) if tiny else (200, 10)
    yield (
        "P-CNN (Laborieux 2021: T 200 / K 10, β 0.4)",
        2 if tiny else 100,
        f"5x5 convs {'-'.join(map(str, ch))}, T {free}/{nudged} positive",
        lambda dt, key: eqp.ConvHopfield(
            (1, 28, 28), ch, 5, 10, activation="hard_sigmoid", dtype=dt, key=key
        ),
        eqp.EquilibriumProp(beta=0.4, variant="positive", free_steps=free, nudged_steps=nudged),
        optax.adam(5e-4),
        None,
    )


def mlp_rows(tiny: bool, batch: int):
    b = 8 if tiny else batch
    hid = (16, 16, 16) if tiny else (512, 1024, 100)
    t1 = (2, 1) if tiny else (30, 10)
    yield (
        "P-MLP (Laborieux 2021: T 30 / K 10, β 0.1)",
        b,
        f"784-{hid[0]}-10 prototypical sigmoid4, T {t1[0]}/{t1[1]} positive",
        lambda dt, key: eqp.HopfieldMLP(
            (784, hid[0], 10), dynamics="prototypical", activation="sigmoid4", dtype=dt, key=key
        ),
        eqp.EquilibriumProp(beta=0.1, variant="positive", free_steps=t1[0], nudged_steps=t1[1]),
        optax.adam(5e-4),
        None,
    )
    t2 = (2, 1) if tiny else (15, 15)
    yield (
        "DHN-1h (rain: async, 15 / 15x2, β 0.2)",
        b,
        f"784-{hid[1]}-10 hard sigmoid async, T {t2[0]}/{t2[1]} centered",
        lambda dt, key: eqp.HopfieldMLP(
            (784, hid[1], 10),
            dynamics="prototypical",
            activation="hard_sigmoid",
            update="async",
            dtype=dt,
            key=key,
        ),
        eqp.EquilibriumProp(beta=0.2, variant="centered", free_steps=t2[0], nudged_steps=t2[1]),
        optax.sgd(0.05),
        None,
    )
    t3 = (2, 1) if tiny else (4, 4)
    yield (
        "DRN-XS (rain: resistive, 4 / 4x2 sweeps, β 1)",
        b,
        f"784x2-{hid[2]}-10x2 resistive, T {t3[0]}/{t3[1]} centered",
        lambda dt, key: ResistiveNetwork((784, hid[2], 10), key=key, dtype=dt),
        eqp.EquilibriumProp(beta=1.0, variant="centered", free_steps=t3[0], nudged_steps=t3[1]),
        optax.sgd(0.006),
        None,
    )


def run_ep_row(section, name, batch, settings, build, est, opt, epoch, dtype) -> Row:
    row = Row(section, name, dtype, batch, settings)
    dt = jnp.dtype(dtype)
    model = build(dt, jax.random.PRNGKey(0))
    shape = getattr(model, "in_shape", None) or (784,)
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(kx, (batch, *shape), dt)
    y = jax.random.randint(ky, (batch,), 0, 10)
    step, state = train_step(model, est, opt)
    timing, _ = time_jitted(step, *state, x, y, min_runs=3, max_runs=10, min_time=1.0)
    row.compile_s, row.step_s = timing.compile_s, timing.median_s
    if epoch:
        row.epoch_s = epoch / batch * timing.median_s
    return row


def vgg_rows(tiny: bool, dtype: str, budget_left) -> list[Row]:
    dt = jnp.dtype(dtype)
    ch = (4, 4, 4, 4, 4) if tiny else (128, 128, 256, 256, 512)
    steps = (1, 1, 1, 1, 1) if tiny else VGG_STEPS
    b = 2 if tiny else 128
    model = LayeredNet.simple_vgg(key=jax.random.PRNGKey(0), channels=ch, dtype=dt)
    est = eqp.DTP(beta=0.7, feedback_steps=steps, noise=VGG_NOISE, feedback_lr=VGG_LR)
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, (b, 3, 32, 32), dt)
    y = jax.random.randint(ky, (b,), 0, 10)
    key = jax.random.PRNGKey(2)
    rows = []
    for name, bp in (("SimpleVGG backprop", True), ("SimpleVGG L-DRL (K 20/30/35/55/20)", False)):
        settings = f"convs {'-'.join(map(str, ch))}" + ("" if bp else f", K {steps}")
        row = Row("vgg", name, dtype, b, settings)
        if budget_left() <= 0:
            row.note = "skipped (time budget)"
        else:
            try:
                step, state = dtp_step(model, est, optax.sgd(0.05, momentum=0.9), backprop=bp)
                timing, _ = time_jitted(step, *state, x, y, key, min_runs=3, max_runs=10)
                row.compile_s, row.step_s = timing.compile_s, timing.median_s
            except Exception as e:  # noqa: BLE001 - one failing row must not stop the run
                row.note = _failure(e)
        rows.append(row)
    return rows


def solver_rows(tiny: bool) -> tuple[list[Row], str]:
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    try:
        import solvers
    finally:
        sys.path.remove(str(here))
    out = solvers.main(["--quick"] if tiny else ["--no-sweep"])
    return [], out.get("report", "")


def _failure(e: Exception) -> str:
    # One table cell: a runtime error from a check carries its message after the host
    # traceback, so keep that line when there is one.
    text = "".join(traceback.format_exception_only(type(e), e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error:" in ln]
    last = (named or lines or [type(e).__name__])[-1].replace("|", "/")
    return f"failed: {last[:200]}"


# -- report ---------------------------------------------------------------------------


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    lines = [
        "| section | benchmark | dtype | batch | settings | compile s | step ms | examples/s "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step_ms = None if r.step_s is None else 1e3 * r.step_s
        note = r.note
        if r.epoch_s is not None:
            note = (note + "; " if note else "") + f"50k-example epoch ≈ {r.epoch_s:.0f} s"
        lines.append(
            f"| {r.section} | {r.name} | {r.dtype} | {r.batch} | {r.settings} | "
            f"{_fmt(r.compile_s, '.1f')} | {_fmt(step_ms, '.1f')} "
            f"| {_fmt(r.examples_per_s, ',.1f')} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.md"))
    p.add_argument(
        "--budget", type=float, default=None, help="seconds (default 450; none with --tiny)"
    )
    p.add_argument("--tiny", action="store_true", help="toy sizes (a CPU check of the script)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--mlp-batch", type=int, default=4096)
    args = p.parse_args(argv)
    tiny = args.tiny or os.environ.get("EQP_BENCH_TINY", "") not in ("", "0")
    if args.budget is None:
        args.budget = float("inf") if tiny else 450.0
    start = time.perf_counter()
    budget_left = lambda: args.budget - (time.perf_counter() - start)  # noqa: E731
    info = machine_info()
    device = jax.devices()[0]
    kind = device.device_kind
    print(f"device: {kind} ({device.platform}), jax {jax.__version__}, tiny={tiny}", flush=True)

    rows: list[Row] = []
    solver_report = ""

    def ep_section(section, specs, dtype):
        for name, batch, settings, build, est, opt, epoch in specs:
            if budget_left() <= 0:
                rows.append(
                    Row(section, name, dtype, batch, settings, note="skipped (time budget)")
                )
                continue
            try:
                rows.append(
                    run_ep_row(section, name, batch, settings, build, est, opt, epoch, dtype)
                )
            except Exception as e:  # noqa: BLE001 - one failing row must not stop the run
                rows.append(Row(section, name, dtype, batch, settings, note=_failure(e)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)

    def run_section(section, dtype):
        nonlocal solver_report
        if section == "dchn":
            ep_section(section, dchn_rows(tiny), dtype)
        elif section == "pcnn":
            ep_section(section, pcnn_rows(tiny), dtype)
        elif section == "mlp":
            ep_section(section, mlp_rows(tiny, args.mlp_batch), dtype)
        elif section == "vgg":
            rows.extend(vgg_rows(tiny, dtype, budget_left))
            print("\n".join(table(rows[-2:]).splitlines()[-2:]), flush=True)
        elif budget_left() <= 0:
            solver_report = "Solver comparison: skipped (time budget)."
        else:
            try:
                solver_report = solver_rows(tiny)[1]
            except Exception as e:  # noqa: BLE001
                solver_report = f"Solver comparison: {_failure(e)}"

    # Most wanted first, so that a tight budget drops the least wanted rows: every
    # section in the first dtype (the GPU goals: DCHN, L-DRL), the solver comparison
    # (float32 only), then the other dtypes; the P-CNN (an MNIST CPU row) last.
    order = [s for s in ("dchn", "vgg", "mlp") if s in args.only]
    for i, dtype in enumerate(args.dtypes):
        for section in order:
            run_section(section, dtype)
        if i == 0 and "solvers" in args.only:
            run_section("solvers", dtype)
    if "pcnn" in args.only:
        for dtype in args.dtypes:
            run_section("pcnn", dtype)

    elapsed = time.perf_counter() - start
    cmd = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join(
        [
            f"# Benchmarks on {kind} ({device.platform})",
            "",
            f"- date: {info['date']}; jax {jax.__version__}; {len(jax.devices())} device(s); "
            f"host: {info['platform']}, {info['cpus']} CPUs; `uptime`: {info['uptime']}",
            f"- command: `{cmd.strip()}`"
            + (" (tiny sizes: a check, not a benchmark)" if tiny else ""),
            f"- whole run: {elapsed:.0f} s (budget {args.budget:.0f} s)".replace("inf s", "none"),
            "- one training step = gradient estimate + optax update, jitted; synthetic data; "
            "step = median wall time (`block_until_ready`), compile = trace + lower + compile",
            "",
            table(rows),
            "",
            solver_report,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({elapsed:.0f} s)")
    return {"rows": rows, "device": kind, "out": args.out, "elapsed_s": elapsed}


if __name__ == "__main__":
    main()
