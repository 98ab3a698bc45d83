"""Side-by-side timing of eqprop_jax against the peers' own PyTorch code (issue 14).

For each row of issue 14's table, one training step on random inputs of the peer's
shape and settings is timed twice, one after the other, never both at once:

- eqprop_jax: the step of the existing benchmark rows (`benchmarks/gpu.py` builders:
  estimator gradient + optax update, jitted once; SimpleVGG from `benchmarks/dtp.py`),
  in a subprocess of this script, so that a row can be stopped at its time cap.
  Compile time (trace + lower + XLA compile) apart from the steady state (median of
  `--steps` calls after one warm-up call; wall and process CPU time, `_timing`);
- the peer: its harness in `--harnesses` (`laborieux_step.py`, `rain_step.py`,
  `scalingdtp_step.py`, see their README) run with the torch venv on the extracted
  repository in `--peers` (`laborieux`, `rain`, `scalingdtp`). A peer row whose
  repository, harness or python is absent is skipped with a note.

Rows, with what one run of each costs on an idle 2-core CPU (default steps; figures
from issue 14 and the harnesses' README; a side is stopped at its cap and the row
says so):

- `p-mlp`: Laborieux P-MLP 784-512-10, T 30/10, batch 50; 20 steps; peer ~2 s,
  eqprop_jax ~15 s (mostly compile); cap 60 s per side.
- `p-cnn`: Laborieux P-CNN 5x5 convs 32-64, T 200/10, batch 100; 2 steps; peer ~15 s,
  eqprop_jax ~15 s (compile 5 s, 2.7 s per step; measured loaded); cap 120 s.
- `dhn-1h`: rain DHN-1h 784-1024-10, 15 / 15x2, batch 16; 20 steps; peer ~2 s,
  eqprop_jax ~15 s; cap 60 s.
- `drn-xs`: rain DRN-XS resistive, 4 / 4x2 sweeps, batch 4; 20 steps; peer ~1 s,
  eqprop_jax ~15 s; cap 60 s.
- `dchn`: rain DCHN 128-256-512-512 at CIFAR shape, 60 / 15x2, batch 128; 1 step;
  peer ~130 s (warm-up + 1 step at 63 s), eqprop_jax ~145 s (compile 5 s, warm-up +
  1 step at ~67 s; measured loaded, 2026-12-01); cap 240 s.
- `vgg-ldrl`: scalingDTP L-DRL SimpleVGG, K 20/30/35/55/20, batch 16; 2 steps; peer
  ~20 s (one harness run gives both SimpleVGG rows), eqprop_jax ~140 s compile; cap 150 s.
- `vgg-bp`: SimpleVGG plain backprop, batch 16; 5 steps; peer in the same run,
  eqprop_jax ~20 s; cap 60 s.

All rows: 684 s on 2026-12-01 with the machine loaded (load 5-7), where the three
heavy peers were stopped at their caps (PyTorch with 2 threads collapses when another
process holds a core); about 7-10 minutes expected idle; at most 24 minutes if every
side ran to its cap (`--cap-scale` scales every cap). `--torch-threads N` sets
OMP_NUM_THREADS for the peers (the README's advice on a machine that cannot be idle;
the eqprop_jax side keeps XLA's default thread pool, so say so beside such figures).

Each row also gives examples/s as a fraction of the float32 matmul rate measured at
the start of the same run (`_timing.matmul_gflops`, 1024², 256² with `--quick`; per
wall second at the best run), through a work model of FLOPs per example: the EP MLP
rows count their matmuls (`benchmarks/ep_step.matmul_flops`, the centered rows with
both nudged phases), the conv EP rows their convolutions (`benchmarks/dchn.step_flops`,
weight gradients left out); the SimpleVGG rows have no work model ("—").

    python benchmarks/peers.py --torch-python /work/torchvenv/bin/python \\
        --peers /work/peers --harnesses /work/shared/peers [--rows p-mlp dchn ...] \\
        [--steps N] [--quick] [--out benchmarks/results/peers.md]

`--quick`: one step each, toy sizes on the eqprop_jax side (the `gpu.py --tiny`
rows) and the smallest batch the scalingDTP harness takes: a check that the script
runs, not a comparison. `--no-peers` times the eqprop_jax side only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Spec:
    label: str
    batch: int
    steps: int  # default timed steps
    cap_s: float  # per side
    peer: tuple[str, str, str] | None  # (repo folder, harness, harness config)
    peer_line: str  # which printed `peer ...` line holds this row's examples/s


ROWS: dict[str, Spec] = {
    "p-mlp": Spec(
        "Laborieux et al. 2021 P-MLP 784-512-10, T 30/10, batch 50",
        50,
        20,
        60,
        ("laborieux", "laborieux_step.py", "mlp"),
        "peer laborieux-mlp",
    ),
    "p-cnn": Spec(
        "Laborieux et al. 2021 P-CNN 1-32-64 5x5, T 200/10, batch 100",
        100,
        2,
        120,
        ("laborieux", "laborieux_step.py", "cnn"),
        "peer laborieux-cnn",
    ),
    "dhn-1h": Spec(
        "rain DHN-1h 784-1024-10, 15 / 15x2, batch 16",
        16,
        20,
        60,
        ("rain", "rain_step.py", "dhn-1h"),
        "peer rain-dhn-1h",
    ),
    "drn-xs": Spec(
        "rain DRN-XS resistive, 4 / 4x2 sweeps, batch 4",
        4,
        20,
        60,
        ("rain", "rain_step.py", "drn-xs"),
        "peer rain-drn-xs",
    ),
    "dchn": Spec(
        "rain DCHN 128-256-512-512 at CIFAR shape, 60 / 15x2, batch 128",
        128,
        1,
        240,
        ("rain", "rain_step.py", "dchn"),
        "peer rain-dchn",
    ),
    "vgg-ldrl": Spec(
        "scalingDTP L-DRL SimpleVGG at CIFAR shape, batch 16",
        16,
        2,
        150,
        ("scalingdtp", "scalingdtp_step.py", "simplevgg"),
        "peer scalingdtp-simplevgg-dtp",
    ),
    "vgg-bp": Spec(
        "SimpleVGG plain backprop, batch 16",
        16,
        5,
        60,
        ("scalingdtp", "scalingdtp_step.py", "simplevgg"),
        "peer scalingdtp-simplevgg-bp",
    ),
}
QUICK_VGG_BATCH = 2


# -- eqprop_jax side (runs in a child process) -----------------------------------------


def _import_benchmarks():
    sys.path.insert(0, str(HERE))
    import dchn
    import dtp
    import ep_step
    import gpu
    from _timing import time_jitted

    return gpu, dchn, dtp, ep_step, time_jitted


def jax_row(name: str, steps: int, quick: bool) -> dict:
    """Time eqprop_jax's step for row `name`: {compile_s, step_s, cpu_s, batch,
    flop_per_example (or None), settings}."""
    import jax
    import jax.numpy as jnp
    import optax

    gpu, dchn, dtp, ep_step, time_jitted = _import_benchmarks()
    spec = ROWS[name]
    f32 = jnp.float32
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    if name in ("vgg-ldrl", "vgg-bp"):
        batch = QUICK_VGG_BATCH if quick else spec.batch
        kw = dict(vgg_channels=(4, 4, 4, 4, 4), vgg_steps=(1, 1, 1, 1, 1)) if quick else {}
        ((_, model, x, y, est),) = dtp.setups(["vgg"], batch, batch, jax.random.PRNGKey(0), **kw)
        step, state = gpu.dtp_step(
            model, est, optax.sgd(0.05, momentum=0.9), backprop=name == "vgg-bp"
        )
        args = (*state, x, y, jax.random.PRNGKey(2))
        flop, settings = None, f"K {est.feedback_steps}" if name == "vgg-ldrl" else "backprop"
    else:
        if name in ("p-mlp", "dhn-1h", "drn-xs"):
            specs = list(gpu.mlp_rows(quick, spec.batch))
            label, batch, settings, build, est, opt, _ = specs[
                ("p-mlp", "dhn-1h", "drn-xs").index(name)
            ]
        elif name == "dchn":
            label, batch, settings, build, est, opt, _ = next(iter(gpu.dchn_rows(quick)))
        else:
            label, batch, settings, build, est, opt, _ = next(iter(gpu.pcnn_rows(quick)))
        batch = batch if quick else spec.batch
        model = build(f32, jax.random.PRNGKey(0))
        shape = getattr(model, "in_shape", None) or (784,)
        x = jax.random.uniform(kx, (batch, *shape), f32)
        y = jax.random.randint(ky, (batch,), 0, 10)
        step, state = gpu.train_step(model, est, opt)
        args = (*state, x, y)
        phases = 1 if est.variant == "positive" else 2
        relax = est.free_steps + phases * est.nudged_steps
        if name in ("dchn", "p-cnn"):
            flop = dchn.step_flops(model) * relax
        else:
            sizes = _mlp_sizes(model)
            if name == "drn-xs":  # the resistive input and output layers are doubled
                sizes = (2 * sizes[0], sizes[1], 2 * sizes[2])
            flop = ep_step.matmul_flops(sizes, 1, est.free_steps, phases * est.nudged_steps)["EP"]
    timing, _ = time_jitted(step, *args, min_runs=steps, max_runs=steps, min_time=0.0)
    return {
        "compile_s": timing.compile_s,
        "step_s": timing.median_s,
        "cpu_s": timing.cpu_median_s,
        "batch": batch,
        "flop_per_example": flop,
        "settings": settings,
    }


def _mlp_sizes(model) -> tuple[int, ...]:
    sizes = getattr(model, "sizes", None) or getattr(model, "layer_sizes", None)
    if sizes is None:
        raise AttributeError(f"{type(model).__name__}: no layer sizes for the work model")
    return tuple(int(s) for s in sizes)


# -- parent ---------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    label: str
    batch: int
    jax: dict | None = None
    jax_note: str = ""
    jax_wall_s: float = 0.0
    peer_eps: float | None = None
    peer_note: str = ""
    peer_wall_s: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0
    extra: list[str] = field(default_factory=list)

    @property
    def jax_eps(self) -> float | None:
        return None if not self.jax else self.jax["batch"] / self.jax["step_s"]


def _load1() -> float:
    return os.getloadavg()[0]


def _run(cmd: list[str], cap_s: float, env: dict | None = None) -> tuple[str | None, str, float]:
    """(stdout or None, note, wall s) of `cmd`, killed after `cap_s` seconds."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=cap_s, env=env)
    except subprocess.TimeoutExpired:
        return None, f"stopped at the cap ({cap_s:.0f} s)", time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return None, f"failed (rc {p.returncode}): {tail[0][:160]}".replace("|", "/"), wall
    return p.stdout, "", wall


def run_jax_side(r: Result, steps: int, quick: bool, cap_s: float) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_jax-row", r.name]
    cmd += ["--steps", str(steps)] + (["--quick"] if quick else [])
    out, note, r.jax_wall_s = _run(cmd, cap_s)
    r.jax_note = note
    if out is not None:
        lines = [ln for ln in out.splitlines() if ln.startswith("JAXROW ")]
        r.jax = json.loads(lines[-1][len("JAXROW ") :])
        r.batch = r.jax["batch"]


def run_peer_side(r: Result, spec: Spec, args, steps: int, cache: dict) -> None:
    if args.no_peers or spec.peer is None:
        r.peer_note = "peer not run (--no-peers)" if args.no_peers else "no peer"
        return
    folder, harness, config = spec.peer
    repo, script = Path(args.peers) / folder, Path(args.harnesses) / harness
    missing = [str(p) for p in (Path(args.torch_python), repo, script) if not p.exists()]
    if missing:
        r.peer_note = "skipped: absent " + ", ".join(missing)
        return
    cmd = [args.torch_python, str(script), str(repo), config, str(steps)]
    if harness == "scalingdtp_step.py":
        cmd.append(str(QUICK_VGG_BATCH if args.quick else spec.batch))
    key = tuple(cmd)
    if key not in cache:  # one scalingDTP run gives both SimpleVGG rows
        env = dict(os.environ, MPLBACKEND="Agg")
        if args.torch_threads:
            env["OMP_NUM_THREADS"] = str(args.torch_threads)
        cache[key] = _run(cmd, spec.cap_s * args.cap_scale, env)
    out, note, r.peer_wall_s = cache[key]
    r.peer_note = note
    if out is None:
        return
    for line in out.splitlines():
        if line.startswith(spec.peer_line + " "):
            m = re.search(r"examples_per_s=([0-9.eE+-]+)", line)
            r.peer_eps = float(m.group(1)) if m else None
            t = re.search(r"threads=(\d+)", line)
            if t:
                args.threads_seen.add(int(t.group(1)))
            b = re.search(r"batch=(\d+)", line)
            if b:
                r.extra.append(f"peer batch {b.group(1)}")
        if "dtp_over_bp_time_ratio" in line and r.name == "vgg-ldrl":
            r.extra.append("peer " + line.split()[-2].replace("_", " "))
    if r.peer_eps is None:
        r.peer_note = f"no '{spec.peer_line}' line in the harness output"


def _f(v, spec="{:,.1f}"):
    return "—" if v is None else spec.format(v)


def _pct(eps, flop, gflops):
    if eps is None or flop is None or not gflops:
        return "—"
    return f"{100 * eps * flop / (gflops * 1e9):.3g}%"


def table(results: list[Result], gflops: float | None) -> str:
    lines = [
        "| configuration | peer examples/s | eqprop_jax examples/s | eqprop_jax / peer "
        "| eqprop_jax compile s | eqprop_jax CPU s per step | peer % of matmul rate "
        "| eqprop_jax % of matmul rate | load1 before / after | wall s (peer / eqprop_jax) "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r.jax_eps / r.peer_eps if r.jax_eps is not None and r.peer_eps else None
        flop = r.jax["flop_per_example"] if r.jax else None
        toy = bool(r.jax) and r.jax["batch"] != ROWS[r.name].batch
        peer_pct = "—" if toy else _pct(r.peer_eps, flop, gflops)  # the work model is the toy's
        notes = [
            n
            for n in (
                r.peer_note and f"peer: {r.peer_note}",
                r.jax_note and f"eqprop_jax: {r.jax_note}",
            )
            if n
        ]
        notes += r.extra
        if toy:
            notes.append(f"eqprop_jax at toy size: {r.jax['settings']}, batch {r.jax['batch']}")
        lines.append(
            f"| {r.label} | {_f(r.peer_eps)} | {_f(r.jax_eps)} | {_f(ratio, '{:.2f}x')} "
            f"| {_f(r.jax and r.jax['compile_s'])} | {_f(r.jax and r.jax['cpu_s'], '{:.3g}')} "
            f"| {peer_pct} | {_pct(r.jax_eps, flop, gflops)} "
            f"| {r.load_before:.2f} / {r.load_after:.2f} "
            f"| {r.peer_wall_s:.0f} / {r.jax_wall_s:.0f} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: per row)")
    p.add_argument("--quick", action="store_true", help="1 step, toy eqprop_jax sizes")
    p.add_argument(
        "--torch-python", default=os.environ.get("EQP_TORCH_PYTHON", "/work/torchvenv/bin/python")
    )
    p.add_argument("--peers", default=os.environ.get("EQP_PEERS", "/work/peers"))
    p.add_argument(
        "--harnesses", default=os.environ.get("EQP_PEER_HARNESSES", "/work/shared/peers")
    )
    p.add_argument("--no-peers", action="store_true", help="time the eqprop_jax side only")
    p.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS for the peers")
    p.add_argument("--cap-scale", type=float, default=1.0, help="multiply every row's cap")
    p.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    p.add_argument("--_jax-row", dest="jax_row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.jax_row:  # child: one eqprop_jax row, one JSON line
        steps = 1 if args.quick else (args.steps or ROWS[args.jax_row].steps)
        print("JAXROW " + json.dumps(jax_row(args.jax_row, steps, args.quick)), flush=True)
        return {}

    import jax

    sys.path.insert(0, str(HERE))
    from _timing import matmul_gflops

    start = time.perf_counter()
    load_start = os.getloadavg()
    mm = 256 if args.quick else 1024
    gflops = matmul_gflops(mm, mm, mm, min_time=0.1 if args.quick else 0.3)[0]
    print(f"float32 {mm}² matmul: {gflops:.0f} GFLOP/s (best wall)", flush=True)
    args.threads_seen = set()
    results, cache = [], {}
    for name in args.rows:
        spec = ROWS[name]
        steps = 1 if args.quick else (args.steps or spec.steps)
        cap = spec.cap_s * args.cap_scale
        r = Result(name, spec.label, spec.batch, load_before=_load1())
        run_peer_side(r, spec, args, steps, cache)
        run_jax_side(r, steps, args.quick, cap)
        r.load_after = _load1()
        results.append(r)
        print(table([r], gflops).splitlines()[-1], flush=True)
    load_end = os.getloadavg()
    elapsed = time.perf_counter() - start

    cmd = "python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = lambda la: " ".join(f"{x:.2f}" for x in la)  # noqa: E731
    threads = ", ".join(map(str, sorted(args.threads_seen))) or "— (no peer ran)"
    text = "\n".join(
        [
            f"## Side by side with the peers ({now})",
            "",
            f"- command: `{cmd.strip()}`"
            + (" (quick: toy eqprop_jax sizes, a check, not a comparison)" if args.quick else ""),
            f"- machine: {platform.platform()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
            f"({jax.devices()[0].platform}); torch threads: {threads}",
            f"- load average (1/5/15 min) at the start: {load(load_start)}; "
            f"at the end: {load(load_end)}",
            f"- float32 {mm}² matmul rate measured in this run: {gflops:.0f} GFLOP/s "
            "(best wall); the % columns are examples/s x the row's FLOP per example "
            "over this rate",
            f"- whole run: {elapsed:.0f} s; the peer and eqprop_jax sides of a row run one "
            "after the other, each in its own process, each stopped at the row's cap",
            "",
            table(results, gflops),
            "",
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return {"results": results, "gflops": gflops, "text": text, "elapsed_s": elapsed}


if __name__ == "__main__":
    main()
