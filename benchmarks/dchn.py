"""Time one EP training step of a convolutional Hopfield network (DCHN or P-CNN).

Networks, as the peers configure them (`../shared/peers/`):

- `--net dchn`: rain's DCHN at CIFAR-10 shape (Laborieux et al. 2021 / Scellier et al.
  2023): 3x32x32 input, 3x3 convs 128-256-512-512 (padding 1), 2x2 max-pool after
  each, fc 2048→10, clip(x/2, 0, 1), MSE, asynchronous updates; rain's timing run is
  T 60 / K 15 centered (two nudged phases), β 0.25, batch 128.
- `--net pcnn`: Laborieux et al. 2021's P-CNN (their `check/train_mnist_cnn.sh`):
  1x28x28, 5x5 convs 32-64 (no padding) with 2x2 max-pool, fc 1024→10, hard sigmoid,
  MSE, synchronous updates, T 200 / K 10 positive, β 0.4, batch 100.

One training step = EP's free phase + nudged phase(s) + an optax update (SGD momentum
0.9 for the DCHN, Adam for the P-CNN, as the peers), on a synthetic batch, jitted once.
Compile time (trace + lower + XLA compile; wall and process CPU) is measured apart
from the steady state (median over `--repeats` calls, each ended by
`block_until_ready`; wall and process CPU time, since the machine may be shared).

`--reference` also times the same step with the relaxation field taken by autodiff
(`_autodiff_step`, the pre-optimisation code path), interleaved with the default one.

Work model: the convolution FLOPs of the relaxation steps, counted from the update
rule actually run (sync: one forward and one transposed convolution per conv layer
above the input per step; async: the forward convolution of a layer at an odd
position is needed twice, the other convolutions once; the input layer's convolution
of x is computed once per phase), plus the fc layer, times the steps of all phases.
The weight gradient (one conv VJP per compared state) is left out, so the fraction of
the machine's rate is a lower bound. That rate is measured in the same run: a chain of
the network's largest forward convolution at this batch inside `lax.fori_loop`, and a
float32 1024² matmul chain (`_timing.matmul_gflops`).

    python benchmarks/dchn.py [--net dchn|pcnn] [--batch B] [--free T] [--nudged K]
        [--variant centered] [--dtype float32|bfloat16] [--repeats 3] [--reference]
        [--write PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqprop_jax as eqp
from eqprop_jax.models.base import AbstractEnergyModel
from eqprop_jax.models.conv_hopfield import _autodiff_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _timing, beside this file
from _timing import (  # noqa: E402
    compile_timed,
    compile_timed_cpu,
    interleaved,
    machine_info,
    matmul_gflops,
    train_step,
)

NETS = {
    # name: (constructor kwargs, default settings)
    "dchn": (
        dict(
            in_shape=(3, 32, 32),
            channels=(128, 256, 512, 512),
            kernel_sizes=3,
            n_outputs=10,
            paddings=1,
            activation="clip_half",
            update="async",
        ),
        dict(batch=128, free=60, nudged=15, variant="centered", beta=0.25, opt="sgd"),
    ),
    "pcnn": (
        dict(
            in_shape=(1, 28, 28),
            channels=(32, 64),
            kernel_sizes=5,
            n_outputs=10,
            paddings=0,
            activation="hard_sigmoid",
            update="sync",
        ),
        dict(batch=100, free=200, nudged=10, variant="positive", beta=0.4, opt="adam"),
    ),
}


class AutodiffConvHopfield(eqp.ConvHopfield):
    """The same network with the relaxation field taken by `jax.grad` of the energy
    and the generic `AbstractEnergyModel.relax` (the code path before the hand-written field)."""

    def step(self, s, x, y, beta):
        return _autodiff_step(self, s, x, y, beta)

    def relax(self, *args, **kwargs):
        return AbstractEnergyModel.relax(self, *args, **kwargs)


def build(net: str, dtype, *, key, channels=None, in_shape=None, update=None, reference=False):
    kw = dict(NETS[net][0])
    if update is not None:
        kw["update"] = update
    if channels is not None:
        kw["channels"] = tuple(channels)
    if in_shape is not None:
        kw["in_shape"] = tuple(in_shape)
    cls = AutodiffConvHopfield if reference else eqp.ConvHopfield
    return cls(
        kw.pop("in_shape"),
        kw.pop("channels"),
        kw.pop("kernel_sizes"),
        kw.pop("n_outputs"),
        dtype=dtype,
        key=key,
        **kw,
    )


def _conv_out(model, j):
    _, h, w = model.in_shape if j == 0 else model.layer_shapes[j - 1]
    k, p = model.conv_weights[j].shape[2], model.paddings[j]
    return h + 2 * p - k + 1, w + 2 * p - k + 1


def conv_flops(model: eqp.ConvHopfield, j: int) -> int:
    """FLOPs of conv layer j's forward convolution for one example."""
    c_out, c_in, k, _ = model.conv_weights[j].shape
    h, w = _conv_out(model, j)
    return 2 * c_out * c_in * k * k * h * w


def step_flops(model: eqp.ConvHopfield) -> int:
    """Convolution and fc FLOPs of one relaxation step for one example, counted from
    the update rule `ConvHopfield.step` runs (input layer's convolution excluded: it is
    computed once per phase)."""
    n = len(model.conv_weights)
    n_layers = len(model.layer_shapes)
    if model.update == "sync":
        halves = [range(n_layers)]
    else:
        halves = [range(0, n_layers, 2), range(1, n_layers, 2)]
    valid = {0}  # conv j's output is cached for the current layers (0: x, hoisted)
    total = 0
    for which in halves:
        for i in which:
            if i == n:
                total += 2 * model.fc_weight.size
                continue
            need = [i] + ([i + 1] if i + 1 < n else [])
            for j in need:
                if j not in valid:
                    total += conv_flops(model, j)
                    valid.add(j)
            if i + 1 < n:
                total += conv_flops(model, i + 1)  # the transposed convolution
            elif model.cost_type == "mse":
                total += 2 * model.fc_weight.size
        for i in which:
            valid.discard(i + 1)
    return total


def conv_gflops(
    model: eqp.ConvHopfield, batch: int, dtype, *, chain: int = 10
) -> tuple[float, float]:
    """Measured GFLOP/s of the network's costliest forward convolution at this batch,
    `chain` of them in a `lax.fori_loop`: (per wall second at the best run, per CPU
    second at the median run)."""
    j = max(range(1, len(model.conv_weights)), key=lambda j: conv_flops(model, j), default=0)
    c_out, c_in, k, _ = model.conv_weights[j].shape
    _, h, w = model.in_shape if j == 0 else model.layer_shapes[j - 1]
    p = model.paddings[j]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(batch, h, w, c_in)), dtype)
    kern = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)) / np.sqrt(k * k * c_in), dtype)

    def chained(x, kern):
        def body(i, acc):
            # The input depends on the loop index, so XLA cannot hoist the conv.
            xi = x + (i * 1e-3).astype(x.dtype)
            y = jax.lax.conv_general_dilated(
                xi, kern, (1, 1), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            return acc + y

        h2, w2 = _conv_out(model, j)
        return jax.lax.fori_loop(0, chain, body, jnp.zeros((batch, h2, w2, c_out), x.dtype))

    compiled, _ = compile_timed(chained, x, kern)
    times = interleaved({"c": (compiled, (x, kern))}, 3)["c"]
    flop = chain * batch * conv_flops(model, j)
    return flop / min(t for t, _ in times) / 1e9, flop / statistics.median(
        c for _, c in times
    ) / 1e9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--net", choices=sorted(NETS), default="dchn")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--free", type=int, default=None)
    ap.add_argument("--nudged", type=int, default=None)
    ap.add_argument("--update", choices=["sync", "async"], default=None)
    ap.add_argument("--variant", choices=["positive", "centered"], default=None)
    ap.add_argument("--beta", type=float, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--channels", type=int, nargs="+", default=None, help="override widths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference", action="store_true", help="also time the autodiff field")
    ap.add_argument("--no-rates", action="store_true", help="skip the conv/matmul rate runs")
    ap.add_argument("--write", default=None, help="append a markdown section to this file")
    args = ap.parse_args(argv)
    defaults = NETS[args.net][1]
    cfg = {
        k: getattr(args, k) if getattr(args, k, None) is not None else v
        for k, v in defaults.items()
    }
    dtype = jnp.dtype(args.dtype)
    key = jax.random.PRNGKey(0)
    model = build(args.net, dtype, key=key, channels=args.channels, update=args.update)
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(kx, (cfg["batch"], *model.in_shape), dtype)
    y = jax.random.randint(ky, (cfg["batch"],), 0, model.n_outputs)
    est = eqp.EquilibriumProp(
        beta=cfg["beta"], variant=cfg["variant"], free_steps=cfg["free"], nudged_steps=cfg["nudged"]
    )
    opt = optax.sgd(0.05, momentum=0.9) if cfg["opt"] == "sgd" else optax.adam(5e-4)

    variants = {"hand-written field": model}
    if args.reference:
        ref = build(
            args.net, dtype, key=key, channels=args.channels, update=args.update, reference=True
        )
        variants["autodiff field (before)"] = ref
    calls, compile_s, losses = {}, {}, {}
    for name, m in variants.items():
        fn, (params, opt_state) = train_step(m, est, opt)
        compiled, wall, cpu = compile_timed_cpu(fn, params, opt_state, x, y)
        compile_s[name] = (wall, cpu)
        calls[name] = (compiled, (params, opt_state, x, y))
        print(f"{name}: compile {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    times = interleaved(calls, args.repeats)
    for name, (compiled, a) in calls.items():
        losses[name] = float(compiled(*a)[2])

    n_phases = 1 if cfg["variant"] == "positive" else 2
    steps = cfg["free"] + n_phases * cfg["nudged"]
    flops = step_flops(model) * steps * cfg["batch"]
    rates = {}
    if not args.no_rates:
        rates["conv"] = conv_gflops(model, cfg["batch"], dtype)
        rates["matmul"] = matmul_gflops(1024, 1024, 1024, min_time=0.3)
    info = machine_info()
    rows = {}
    for name, ts in times.items():
        wall = statistics.median(t for t, _ in ts)
        cpu = statistics.median(c for _, c in ts)
        rows[name] = {
            "compile_wall_s": compile_s[name][0],
            "compile_cpu_s": compile_s[name][1],
            "step_wall_s": wall,
            "step_cpu_s": cpu,
            "examples_per_s": cfg["batch"] / wall,
            "examples_per_cpu_s": cfg["batch"] / cpu,
            "gflops": flops / wall / 1e9,
            "gflops_cpu": flops / cpu / 1e9,
            "loss": losses[name],
        }
    cmd = "python benchmarks/dchn.py " + " ".join(sys.argv[1:] if argv is None else argv)
    widths = "-".join(str(c) for c in (args.channels or NETS[args.net][0]["channels"]))
    lines = [
        f"### {args.net.upper()} EP training step, {info['date']}",
        "",
        f"- command: `{cmd.strip()}`",
        f"- machine: {info['cpus']} CPUs, jax {info['jax']} ({info['device']}); "
        f"`uptime` at the end: {info['uptime']}",
        f"- {args.net} convs {widths}, {model.update} updates, batch {cfg['batch']}, "
        f"T {cfg['free']} / K {cfg['nudged']} ({cfg['variant']}), β {cfg['beta']}, {args.dtype}",
        f"- work model: {flops / 1e9:.1f} GFLOP per training step "
        f"({step_flops(model) / 1e6:.1f} MFLOP per example and relaxation step)",
    ]
    if rates:
        lines.append(
            "- rates measured in this run (per wall second at the best run / per CPU second "
            f"at the median run): largest forward conv {rates['conv'][0]:.0f} / "
            f"{rates['conv'][1]:.0f} GFLOP/s, float32 1024² matmul {rates['matmul'][0]:.0f} / "
            f"{rates['matmul'][1]:.0f} GFLOP/s"
        )
    lines += [
        "",
        "| variant | compile s (wall / CPU) | step s (wall / CPU) | examples/s (wall / per CPU-s) "
        "| GFLOP/s (wall / per CPU-s) | % of conv rate (per CPU-s) | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        pct = f"{100 * r['gflops_cpu'] / rates['conv'][1]:.0f}%" if rates else "—"
        lines.append(
            f"| {name} | {r['compile_wall_s']:.1f} / {r['compile_cpu_s']:.1f} | "
            f"{r['step_wall_s']:.3f} / {r['step_cpu_s']:.3f} | {r['examples_per_s']:.2f} / "
            f"{r['examples_per_cpu_s']:.2f} | {r['gflops']:.1f} / {r['gflops_cpu']:.1f} | {pct} | "
            f"{r['loss']:.4f} |"
        )
    lines.append("")
    print("\n".join(lines))
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n".join(lines) + "\n")
    return {"rows": rows, "rates": rates, "flops": flops, "batch": cfg["batch"], **info}


if __name__ == "__main__":
    main()
