"""Holomorphic EP against centered EP, one-sided EP and BPTT on P-1h (784-512-10): the
time of a training step and the angle of each gradient to the implicit one.

Laborieux & Zenke 2022 show that holomorphic EP (N complex nudges on a circle of
radius |β|) computes the exact gradient of the loss at the free fixed point for any
|β|, where one-sided EP carries an O(β) bias and centered EP an O(β²) one. This
script measures both sides of that trade on the `ernoult2019-p1h` preset's network
and MNIST batches:

- **angle** between each estimator's gradient and the implicit gradient
  (`rbp-implicit`, the preset's reference: recurrent backprop with a Krylov adjoint
  at a tight free phase), per batch of the preset's size, on `--batches` test
  batches, at initialisation and after `--train-epochs` epochs of EP training
  (through `eqprop_jax.train.fit`), in float32 as training runs;
- **time** of one jitted training step (estimate + SGD update, the preset's batch),
  compiled apart and then timed round-robin (`benchmarks/_timing.py`), and the
  implied seconds per MNIST epoch.

The test errors of the 30-epoch runs of each estimator are in
`benchmarks/results/reproduction.md` (not re-run here).

    python scripts/hep_table.py --out benchmarks/results/hep_table.md
    python scripts/hep_table.py --smoke      # random data, tiny net, seconds (the test)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import angle_deg, load_images, machine, random_images

from eqprop_jax.equilibrium import BiCGStab, Implicit, Picard
from eqprop_jax.estimators.rbp import RecurrentBackprop
from eqprop_jax.presets import get_preset
from eqprop_jax.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _timing import interleaved, load_average, summarize, train_step  # noqa: E402

ESTIMATORS = ("ep-positive", "ep-centered", "ep-holomorphic", "bptt")


# The implicit gradient at a free phase run to the float32 tolerance (the preset's own
# `rbp-implicit` keeps the preset's 40 fixed steps; after training some examples are not
# settled there, its adjoint check fails and the batch's reference comes back NaN).
REFERENCE = RecurrentBackprop(adjoint=Implicit(BiCGStab(200)), solver=Picard(max_steps=5000))


def angles(preset, model, data, batches: int, batch: int) -> dict[str, list[float]]:
    ref = jax.jit(lambda m, x, y: REFERENCE(m, x, y)[1])
    def grad_of(est):
        return jax.jit(lambda m, x, y: est(m, x, y)[1])

    ests = {name: grad_of(preset.estimators[name]()) for name in ESTIMATORS}
    out: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for i in range(batches):
        x = jnp.asarray(data.x_test[i * batch : (i + 1) * batch])
        y = jnp.asarray(data.y_test[i * batch : (i + 1) * batch])
        g_ref = ref(model, x, y)
        for name, f in ests.items():
            out[name].append(angle_deg(f(model, x, y), g_ref))
    return out


def step_times(preset, model, data, batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    x = jnp.asarray(data.x_train[:batch])
    y = jnp.asarray(data.y_train[:batch])
    calls, compile_s = {}, {}
    for name in ESTIMATORS:
        step, state = train_step(model, preset.estimators[name](), optax.sgd(0.01))
        t = time.perf_counter()
        compiled = jax.jit(step).lower(*state, x, y).compile()
        compile_s[name] = time.perf_counter() - t
        calls[name] = (compiled, (*state, x, y))
    times = interleaved(calls, rounds)
    return {n: (summarize(compile_s[n], ts).median_s, compile_s[n]) for n, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="the MNIST IDX folder")
    p.add_argument("--batches", type=int, default=10, help="test batches for the angles")
    p.add_argument("--train-epochs", type=int, default=1, help="EP epochs before 2nd angles")
    p.add_argument("--rounds", type=int, default=20, help="timed steps per estimator")
    p.add_argument("--smoke", action="store_true", help="random 8x8 data, tiny sizes")
    p.add_argument("--out", type=Path, default=None, help="append the markdown table here")
    args = p.parse_args(argv)
    preset = get_preset("ernoult2019-p1h")
    if args.smoke:
        data = random_images("smoke", 64, 64).flat()
        args.batches, args.rounds = 2, 2
        cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, max_steps_per_epoch=2)
    else:
        data = load_images("mnist", args.data_dir).flat()
        cfg = preset.train
    batch = cfg.batch_size
    model = preset.model(jax.random.PRNGKey(0), data.x_train.shape[1:], data.num_classes)
    load0 = load_average()
    res: dict = {"init": angles(preset, model, data, args.batches, batch)}
    times = step_times(preset, model, data, batch, args.rounds)
    if args.train_epochs > 0:
        cfg = TrainConfig(**{**cfg.__dict__, "epochs": args.train_epochs, "progress": False})
        trained = fit(model, preset.make_estimator(), data, cfg, log=lambda _: None).model
        res["trained"] = angles(preset, trained, data, args.batches, batch)
    per_epoch = len(data.x_train) // batch
    head = (
        f"P-1h ({preset.name}), float32, batch {batch}; angles to the implicit gradient "
        f"(median over {args.batches} test batches [min, max]); step = median wall time of "
        f"{args.rounds} interleaved jitted training steps; reference: recurrent backprop, free "
        "phase to the float32 tolerance (Picard, ≤ 5000 steps), BiCGStab adjoint. "
        f"{machine()}; load "
        f"{load0} → {load_average()}.\n\n"
        "| estimator | angle at init (°) | angle after "
        f"{args.train_epochs} EP epoch(s) (°) | step ms | s per epoch ({per_epoch} steps) "
        "| compile s |\n|---|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for name in ESTIMATORS:
        a0 = res["init"][name]
        a1 = res.get("trained", {}).get(name)
        fmt = lambda a: f"{np.median(a):.3g} [{min(a):.3g}, {max(a):.3g}]"  # noqa: E731
        if any(not np.isfinite(v) for v in a0 + (a1 or [])):
            raise RuntimeError(f"{name}: a non-finite angle (estimate or reference failed)")
        step, comp = times[name]
        rows.append(
            f"| {name} | {fmt(a0)} | {fmt(a1) if a1 else '—'} | {step * 1e3:.2f} | "
            f"{step * per_epoch:.1f} | {comp:.1f} |"
        )
    text = head + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            cmd = " ".join(argv if argv is not None else sys.argv[1:])
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
                    f"`python scripts/hep_table.py {cmd}`\n\n{text}")
    res["times"] = times
    return res


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
