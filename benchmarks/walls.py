"""Minimal measurements of what stands between eqprop_jax and issue 14's goals on this CPU.

Each section times the library's training step next to the smallest program that
does the same arithmetic, so that a ratio to a peer can be read as "the library" or
"XLA:CPU / the algorithm". Sections (`--sections`, all by default):

- `p-mlp`: the Laborieux 2021 P-MLP step (784-512-10, T 30 / K 10, β 0.1, batch 50,
  Adam) as the library runs it (`benchmarks/gpu.py`'s row) against a hand-written
  JAX step of the same algorithm: one `lax.fori_loop` per phase over the two layer
  updates of the prototypical dynamics, the input drive W₁x + b₁ computed once, the
  EP update as two matrix products, Adam. No status, no checks: the floor XLA:CPU
  gives this algorithm at this size. Also the cost of one relaxation iteration.
- `conv`: each convolution of SimpleVGG (batch 16, 3×3, CIFAR shape) and of P-CNN
  (batch 100, 5×5, MNIST shape): forward, and forward + both derivatives (input and
  kernel), in XLA (NCHW, as the models run, and NHWC) and, with `--torch-python`, in
  PyTorch (oneDNN, 2 threads) on the same shapes. The ratio XLA / PyTorch is the
  wall of every conv row against a PyTorch peer.
- `vgg`: SimpleVGG plain backprop (batch 16, SGD) as the library runs it against a
  hand-written JAX step (`lax.conv_general_dilated`, ELU, 2×2 max-pool, one linear
  layer): whether the library adds anything to XLA's conv time.
- `dtp`: the L-DRL SimpleVGG step split into its feedback training (`DTP.pre_step`,
  K = 20/30/35/55/20 optimiser steps per feedback layer) and its forward update,
  against one backprop step on the same net and batch: the DTP/BP time ratio and
  the cost of one feedback iteration per layer, in backprop steps.

Timings: each function compiled ahead of time, then the median of repeated calls
ended by `block_until_ready` (`_timing.time_jitted`); the float32 matmul rate at
1024² from the same run; the load average before and after.

    python benchmarks/walls.py [--sections p-mlp conv vgg dtp]
        [--torch-python /work/torchvenv/bin/python] [--out benchmarks/results/walls.md]
    python benchmarks/walls.py --quick     # toy sizes, seconds: the test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import load_average, matmul_gflops, time_jitted, train_step  # noqa: E402

from eqprop_jax.models.layered import LayeredNet  # noqa: E402

SECTIONS = ("p-mlp", "conv", "vgg", "dtp")


def _ms(t) -> float:
    return t.median_s * 1e3


def _time(fn, *args, runs: int):
    t, _ = time_jitted(fn, *args, min_runs=runs, max_runs=max(runs, 50), min_time=1.0)
    return t


# ----------------------------------------------------------------------------- P-MLP


def pmlp_floor_step(model, batch, free, nudged, beta, opt):
    """The hand-written P-MLP EP step on a one-hidden-layer prototypical `HopfieldMLP`'s
    weights (sync updates, sigmoid4, MSE cost, positive nudge): returns
    `step(params, opt_state, x, y) -> (params, opt_state)` and its initial arguments."""
    n_in, n_h, n_out = model.sizes

    def rho(a):
        return jax.nn.sigmoid(4 * a - 2)

    def relax(p, drive, h, o, target, b, n):
        def body(_, c):
            h, o = c
            return rho(drive + o @ p["w2"]), rho(h @ p["w2"].T + p["b2"] + b * (target - o))

        return jax.lax.fori_loop(0, n, body, (h, o))

    def step(p, s, x, y):
        target = jax.nn.one_hot(y, n_out, dtype=x.dtype)
        drive = x @ p["w1"].T + p["b1"]
        zeros = (jnp.zeros((batch, n_h), x.dtype), jnp.zeros((batch, n_out), x.dtype))
        h0, o0 = relax(p, drive, *zeros, target, 0.0, free)
        h1, o1 = relax(p, drive, h0, o0, target, beta, nudged)
        g = {
            "w1": -((h1 - h0).T @ x) / (beta * batch),
            "b1": -jnp.mean(h1 - h0, 0) / beta,
            "w2": -(o1.T @ h1 - o0.T @ h0) / (beta * batch),
            "b2": -jnp.mean(o1 - o0, 0) / beta,
        }
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    (w1, w2), (b1, b2) = model.weights, model.biases
    p = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    return step, p, opt.init(p)


def section_pmlp(quick: bool, runs: int) -> dict:
    import gpu

    label, batch, settings, build, est, opt, _ = next(iter(gpu.mlp_rows(quick, 50)))
    model = build(jnp.float32, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, model.sizes[0]))
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, model.sizes[-1])
    step, state = train_step(model, est, opt)
    lib = _time(step, *state, x, y, runs=runs)
    f_step, p, s = pmlp_floor_step(model, batch, est.free_steps, est.nudged_steps, est.beta, opt)
    floor = _time(f_step, p, s, x, y, runs=runs)
    f_short, _, _ = pmlp_floor_step(model, batch, 1, 1, est.beta, opt)
    short = _time(f_short, p, s, x, y, runs=runs)
    iters = est.free_steps + est.nudged_steps
    per_iter = (floor.median_s - short.median_s) / max(iters - 2, 1)
    return {
        "label": label,
        "batch": batch,
        "library_ms": _ms(lib),
        "floor_ms": _ms(floor),
        "library_ex_s": batch / lib.median_s,
        "floor_ex_s": batch / floor.median_s,
        "floor_outside_loop_ms": (short.median_s - 2 * per_iter) * 1e3,
        "per_iteration_us": per_iter * 1e6,
        "iterations": iters,
        "compile_s": lib.compile_s,
    }


# ------------------------------------------------------------------------------ conv

# (name, batch, c_in, c_out, spatial, kernel, padding)
VGG_CONVS = [
    ("VGG conv1 3→128 @32²", 16, 3, 128, 32, 3, 1),
    ("VGG conv2 128→128 @16²", 16, 128, 128, 16, 3, 1),
    ("VGG conv3 128→256 @8²", 16, 128, 256, 8, 3, 1),
    ("VGG conv4 256→256 @4²", 16, 256, 256, 4, 3, 1),
    ("VGG conv5 256→512 @2²", 16, 256, 512, 2, 3, 1),
]
PCNN_CONVS = [
    ("P-CNN conv1 1→32 @28² 5×5", 100, 1, 32, 28, 5, 2),
    ("P-CNN conv2 32→64 @14² 5×5", 100, 32, 64, 14, 5, 2),
]
QUICK_CONVS = [("toy conv 3→8 @8²", 4, 3, 8, 8, 3, 1)]


def conv_flops(batch, c_in, c_out, hw, k):
    return 2 * batch * c_out * hw * hw * c_in * k * k


def xla_conv_times(spec, layout: str, runs: int) -> tuple[float, float]:
    """(forward ms, forward + input and kernel derivatives ms) in XLA: `lax` convolution
    in NCHW or NHWC, or ("library") the models' own `conv2d` (channels-last per
    example under `vmap`, derivatives as im2col products: `eqprop_jax.models._conv`)."""
    _, b, ci, co, hw, k, pad = spec
    if layout == "library":
        from eqprop_jax.models._conv import conv2d

        x = jax.random.normal(jax.random.PRNGKey(0), (b, hw, hw, ci))
        w = jax.random.normal(jax.random.PRNGKey(1), (k, k, ci, co)) * 0.05

        def lib(x, w):
            return jax.vmap(lambda xi: conv2d(xi, w, pad))(x)

        def lib_both(x, w):
            out, vjp = jax.vjp(lib, x, w)
            return vjp(out)

        return _ms(_time(lib, x, w, runs=runs)), _ms(_time(lib_both, x, w, runs=runs))
    dn = ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC")
    xs = (b, ci, hw, hw) if layout == "NCHW" else (b, hw, hw, ci)
    ws = (co, ci, k, k) if layout == "NCHW" else (k, k, ci, co)
    x = jax.random.normal(jax.random.PRNGKey(0), xs)
    w = jax.random.normal(jax.random.PRNGKey(1), ws) * 0.05

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad)] * 2, dimension_numbers=dn)

    def both(x, w):
        out, vjp = jax.vjp(conv, x, w)
        return vjp(out)

    return _ms(_time(conv, x, w, runs=runs)), _ms(_time(both, x, w, runs=runs))


TORCH_CONV = r"""
import json, sys, time, torch
torch.set_num_threads(2)
specs, runs = json.loads(sys.argv[1]), int(sys.argv[2])
def med(f):
    f(); f()
    ts = []
    for _ in range(runs):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts) // 2] * 1e3
out = []
for name, b, ci, co, hw, k, pad in specs:
    x = torch.randn(b, ci, hw, hw, requires_grad=True)
    conv = torch.nn.Conv2d(ci, co, k, padding=pad, bias=False)
    def fwd():
        with torch.no_grad():
            conv(x)
    def both():
        y = conv(x); y.backward(y.detach())
    out.append([med(fwd), med(both)])
print(json.dumps({"threads": torch.get_num_threads(), "version": torch.__version__, "ms": out}))
"""


def torch_conv_times(specs, torch_python: str | None, runs: int) -> dict | None:
    if not torch_python or not Path(torch_python).exists():
        return None
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run(
        [torch_python, "-c", TORCH_CONV, json.dumps(specs), str(runs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def section_conv(quick: bool, runs: int, torch_python: str | None) -> dict:
    specs = QUICK_CONVS if quick else VGG_CONVS + PCNN_CONVS
    rows = []
    for spec in specs:
        nchw = xla_conv_times(spec, "NCHW", runs)
        nhwc = xla_conv_times(spec, "NHWC", runs)
        rows.append(
            {
                "name": spec[0],
                "gflop_fwd": conv_flops(*spec[1:6]) / 1e9,
                "xla_nchw_ms": nchw,
                "xla_nhwc_ms": nhwc,
                "library_ms": xla_conv_times(spec, "library", runs),
            }
        )
    torch_res = torch_conv_times(specs, torch_python, runs)
    if torch_res and "ms" in torch_res:
        for r, t in zip(rows, torch_res["ms"], strict=True):
            r["torch_ms"] = t
    return {"rows": rows, "torch": {k: v for k, v in (torch_res or {}).items() if k != "ms"}}


# ------------------------------------------------------------------------------- VGG


def vgg_floor_step(model: LayeredNet, lr: float):
    """Hand-written SimpleVGG backprop step on the model's own weights: conv (NCHW,
    'SAME'), ELU, 2×2 max-pool per block, then the linear layer; SGD."""
    convs = [layer for layer in model.forward if hasattr(layer, "weight")]
    params = [(c.weight, c.bias) for c in convs]

    def net(params, x):
        h = x
        for w, b in params[:-1]:
            h = jax.lax.conv_general_dilated(
                h, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
            )
            h = jax.nn.elu(h + b.reshape(1, -1, 1, 1))
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        w, b = params[-1]
        return h.reshape(h.shape[0], -1) @ w.T + b

    def loss(params, x, y):
        logits = net(params, x)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1))

    def step(params, x, y):
        g = jax.grad(loss)(params, x, y)
        return jax.tree_util.tree_map(lambda p, d: p - lr * d, params, g)

    return step, params


def _vgg_setup(quick: bool, batch: int):
    import dtp

    kw = dict(vgg_channels=(4, 4, 4, 4, 4), vgg_steps=(1, 1, 1, 1, 1)) if quick else {}
    ((_, model, x, y, est),) = dtp.setups(["vgg"], batch, batch, jax.random.PRNGKey(0), **kw)
    return model, x, y, est


def section_vgg(quick: bool, runs: int) -> dict:
    import gpu

    batch = 4 if quick else 16
    model, x, y, est = _vgg_setup(quick, batch)
    step, state = gpu.dtp_step(model, est, optax.sgd(0.05, momentum=0.9), backprop=True)
    lib = _time(step, *state, x, y, jax.random.PRNGKey(2), runs=runs)
    out = {"batch": batch, "library_ms": _ms(lib), "library_ex_s": batch / lib.median_s}
    try:
        f_step, params = vgg_floor_step(model, 0.05)
        floor = _time(f_step, params, x, y, runs=runs)
        out.update(floor_ms=_ms(floor), floor_ex_s=batch / floor.median_s)
    except Exception as e:  # the model's layer layout differs from the hand-written net
        out["floor_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


# ------------------------------------------------------------------------------- DTP


def section_dtp(quick: bool, runs: int) -> dict:
    import gpu

    batch = 4 if quick else 16
    model, x, y, est = _vgg_setup(quick, batch)
    key = jax.random.PRNGKey(3)
    bp_step, bp_state = gpu.dtp_step(model, est, optax.sgd(0.05, momentum=0.9), backprop=True)
    bp = _time(bp_step, *bp_state, x, y, key, runs=runs)
    feedback = _time(lambda m, x, y, k: est.pre_step(m, x, y, key=k), model, x, y, key, runs=2)
    forward = _time(lambda m, x, y: est(m, x, y)[1], model, x, y, runs=runs)
    steps = est._layer_settings(model)[0]
    total_k = int(sum(steps))
    return {
        "batch": batch,
        "feedback_steps": [int(k) for k in steps],
        "backprop_ms": _ms(bp),
        "feedback_ms": _ms(feedback),
        "forward_update_ms": _ms(forward),
        "dtp_over_bp": (feedback.median_s + forward.median_s) / bp.median_s,
        "feedback_iteration_over_bp": feedback.median_s / total_k / bp.median_s,
        "compile_feedback_s": feedback.compile_s,
    }


# ---------------------------------------------------------------------------- report


def report(res: dict) -> str:
    out = [
        f"Load before: {res['load_before']}; after: {res['load_after']}. Float32 matmul "
        f"rate (1024², same run): {res['gflops']:.0f} GFLOP/s.",
        "",
    ]
    if "p-mlp" in res:
        r = res["p-mlp"]
        out += [
            f"**P-MLP** ({r['label']}, batch {r['batch']}): library {r['library_ms']:.3f} ms "
            f"({r['library_ex_s']:,.0f} ex/s) vs hand-written XLA floor {r['floor_ms']:.3f} ms "
            f"({r['floor_ex_s']:,.0f} ex/s); floor = {r['floor_outside_loop_ms']:.3f} ms outside "
            f"the loops + {r['iterations']} iterations × {r['per_iteration_us']:.1f} µs.",
            "",
        ]
    if "conv" in res:
        c = res["conv"]
        t = c.get("torch") or {}
        out += [
            f"**Convolutions** (ms, median; PyTorch {t.get('version', '—')}, "
            f"{t.get('threads', '—')} threads{', ' + t['error'] if 'error' in t else ''}):",
            "",
            "| conv | GFLOP fwd | XLA NCHW fwd / fwd+bwd | XLA NHWC fwd / fwd+bwd | "
            "library `conv2d` fwd / fwd+bwd | PyTorch fwd / fwd+bwd | "
            "best XLA / PyTorch (fwd+bwd) | best XLA GFLOP/s fwd |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in c["rows"]:
            xla = (r["xla_nchw_ms"], r["xla_nhwc_ms"], r["library_ms"])
            best = min(t[1] for t in xla)
            tm = r.get("torch_ms")
            ratio = f"{best / tm[1]:.2f}" if tm else "—"
            tms = f"{tm[0]:.3f} / {tm[1]:.3f}" if tm else "—"
            rate = r["gflop_fwd"] / (min(t[0] for t in xla) / 1e3)
            cells = " | ".join(f"{t[0]:.3f} / {t[1]:.3f}" for t in xla)
            out.append(
                f"| {r['name']} | {r['gflop_fwd']:.3f} | {cells} | {tms} | {ratio} | {rate:.0f} |"
            )
        out.append("")
    if "vgg" in res:
        r = res["vgg"]
        floor = (
            f"hand-written JAX {r['floor_ms']:.2f} ms ({r['floor_ex_s']:,.0f} ex/s)"
            if "floor_ms" in r
            else f"hand-written JAX failed: {r.get('floor_error')}"
        )
        out += [
            f"**SimpleVGG backprop** (batch {r['batch']}): library {r['library_ms']:.2f} ms "
            f"({r['library_ex_s']:,.0f} ex/s); {floor}.",
            "",
        ]
    if "dtp" in res:
        r = res["dtp"]
        out += [
            f"**L-DRL SimpleVGG** (batch {r['batch']}, K {r['feedback_steps']}): feedback "
            f"training {r['feedback_ms']:.1f} ms + forward update {r['forward_update_ms']:.1f} "
            f"ms vs backprop {r['backprop_ms']:.2f} ms: DTP/BP = {r['dtp_over_bp']:.1f}×; one "
            f"feedback iteration (one layer) = {r['feedback_iteration_over_bp']:.2f} backprop "
            f"steps (ΣK = {sum(r['feedback_steps'])}).",
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--torch-python", default=os.environ.get("EQP_TORCH_PYTHON"))
    p.add_argument("--runs", type=int, default=None, help="timed calls per function")
    p.add_argument("--quick", action="store_true", help="toy sizes (seconds): the test")
    p.add_argument("--out", type=Path, default=None, help="append the markdown report here")
    args = p.parse_args(argv)
    runs = args.runs or (2 if args.quick else 20)
    res: dict = {"load_before": load_average()}
    n = 256 if args.quick else 1024
    res["gflops"] = matmul_gflops(n, n, n)[0]
    t0 = time.perf_counter()
    if "p-mlp" in args.sections:
        res["p-mlp"] = section_pmlp(args.quick, runs)
    if "conv" in args.sections:
        res["conv"] = section_conv(args.quick, runs, args.torch_python)
    if "vgg" in args.sections:
        res["vgg"] = section_vgg(args.quick, runs)
    if "dtp" in args.sections:
        res["dtp"] = section_dtp(args.quick, runs)
    res["load_after"] = load_average()
    res["wall_s"] = time.perf_counter() - t0
    text = report(res)
    print(text)
    if args.out:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(args.out, "a") as f:
            cmd = " ".join(argv or sys.argv[1:])
            f.write(f"\n## {stamp}: `python benchmarks/walls.py {cmd}`\n\n")
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
