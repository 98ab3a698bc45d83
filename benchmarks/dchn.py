"""Time one EP training step of the DCHN (Laborieux 2021 / Scellier 2023) at CIFAR-10 shape.

The network: 3x32x32 input, 3x3 convs 128-256-512-512 (padding 1) each followed by
2x2 max-pool, fc 2048→10, clip(x/2, 0, 1), MSE, asynchronous (even/odd) updates.
One training step = EP's free phase (T steps) + nudged phase(s) (K steps) + an SGD
(momentum 0.9) update, on a synthetic batch, jitted once. Compile time and
steady-state time are measured apart (`block_until_ready`, median of the repeats).

Work model for the matmul-rate fraction: one relaxation step costs about three
forward convolutions per layer (the pooled conv going up; going down, the
transposed conv plus the forward conv that max-pool's backward needs for its
argmax), so 3 x F per step with F the forward conv FLOPs of one pass; the phases
run T + K·(number of nudges) steps. The weight gradient (one conv VJP per state
compared) is small beside that and left out, so the fraction is a lower bound.

    python benchmarks/dchn.py [--batch 16] [--free 60] [--nudged 15] [--update async]
        [--variant positive] [--dtype float32] [--repeats 3] [--write PATH]
"""

from __future__ import annotations

import argparse
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqprop_jax as eqp

try:  # run as `python benchmarks/dchn.py` or imported as `benchmarks.dchn`
    from _timing import machine_info, matmul_gflops, time_jitted
except ImportError:  # pragma: no cover
    from benchmarks._timing import machine_info, matmul_gflops, time_jitted


def conv_flops(model: eqp.ConvHopfield) -> int:
    """FLOPs of one forward pass of the convs and the fc layer, for one example."""
    total = 0
    _, h, w = model.in_shape
    for wt, p, q in zip(model.conv_weights, model.paddings, model.pools, strict=True):
        c_out, c_in, k, _ = wt.shape
        h, w = h + 2 * p - k + 1, w + 2 * p - k + 1
        total += 2 * c_out * c_in * k * k * h * w
        h, w = h // q, w // q
    return total + 2 * model.fc_weight.size


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--free", type=int, default=60)
    ap.add_argument("--nudged", type=int, default=15)
    ap.add_argument("--update", choices=["sync", "async"], default="async")
    ap.add_argument("--variant", choices=["positive", "centered"], default="positive")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", default=None, help="append a markdown section to this file")
    args = ap.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    model = eqp.ConvHopfield.dchn(key=jax.random.PRNGKey(0), update=args.update, dtype=dtype)
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(kx, (args.batch, 3, 32, 32), dtype)
    y = jax.random.randint(ky, (args.batch,), 0, 10)
    est = eqp.EquilibriumProp(
        beta=args.beta, variant=args.variant, free_steps=args.free, nudged_steps=args.nudged
    )
    opt = optax.sgd(0.05, momentum=0.9)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = opt.init(params)

    def train_step(params, opt_state, x, y):
        loss, grads, _ = est(eqx.combine(params, static), x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    timing, out = time_jitted(
        train_step, params, opt_state, x, y, min_runs=args.repeats, max_runs=args.repeats
    )
    loss = float(out[2])
    print(f"compile {timing.compile_s:.1f} s, step median {timing.median_s:.2f} s", flush=True)
    n_nudges = 1 if args.variant == "positive" else 2
    steps = args.free + n_nudges * args.nudged
    flops = 3 * conv_flops(model) * steps * args.batch
    gflops = flops / timing.median_s / 1e9
    peak = matmul_gflops(1024, 1024, 1024)
    peak = peak[0] if isinstance(peak, tuple) else peak  # (wall, per-CPU-second) rates
    info = machine_info()
    result = {
        "batch": args.batch,
        "steps": f"{args.free}/{args.nudged} ({args.update}, {args.variant})",
        "dtype": args.dtype,
        "compile_s": timing.compile_s,
        "step_s": timing.median_s,
        "min_s": timing.min_s,
        "examples_per_s": args.batch / timing.median_s,
        "model_gflop": flops / 1e9,
        "gflops": gflops,
        "matmul_gflops": peak,
        "loss": loss,
        **info,
    }
    cmd = "python benchmarks/dchn.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"### DCHN EP training step, {info['date']}",
        "",
        f"- command: `{cmd.strip()}`",
        f"- machine: 2-core CPU container, jax {info['jax']} ({info['device']}); "
        f"`uptime`: {info['uptime']}",
        f"- DCHN 3x32x32, convs 128-256-512-512, batch {args.batch}, T/K {result['steps']}, "
        f"{args.dtype}, β {args.beta}, SGD momentum 0.9",
        f"- compile: {timing.compile_s:.1f} s; steady state: median {timing.median_s:.2f} s "
        f"per step (min {timing.min_s:.2f} s, {timing.runs} runs) = "
        f"{result['examples_per_s']:.2f} examples/s",
        f"- work model: {flops / 1e9:.0f} GFLOP per step (3 conv passes per relaxation step) "
        f"→ {gflops:.1f} GFLOP/s = {100 * gflops / peak:.0f}% of the measured float32 "
        f"1024² matmul rate ({peak:.1f} GFLOP/s, same run)",
        f"- loss after the step (sanity): {loss:.4f}",
        "",
    ]
    print("\n".join(lines))
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
