"""L-DRL (DTP) vs backprop on MNIST or Fashion-MNIST, with an MLP and a LeNet-sized
conv net, each run resumable, with per-layer angles to backprop and to Gauss–Newton
targets recorded after every epoch (issue 15).

Data through `eqprop_jax.data` (the IDX files of /work/shared/data/<dataset>, never
copied into the repo; standardised with the training split's mean and std); training
through `eqprop_jax.train.fit` (`_common.fit_by_epoch`): SGD with momentum 0.9, weight
decay 1e-4 and a cosine schedule over all epochs on the forward weights, the feedback
weights frozen in that optimiser (they are trained by `DTP.pre_step` inside each
training step). Backprop runs use the same architecture, initialisation (seed), data
order and optimiser.

Each (dataset, arch, method) run lives in its own folder `<out-root>/<dataset>-<arch>-<method>`:

- `metrics.jsonl`, `curves.png`, `checkpoint.npz`, `run.json`: written by `fit`;
- `angles.jsonl`: one row per epoch (epoch 0: before the first step), per layer
  F_1..F_N, angles in degrees on the first 256 test images
  ([`eqprop_jax.diagnostics.dtp_alignment`][]): `update_to_bp`, `update_to_gn` (the
  update the method trains with, vs backprop's gradient and vs the Gauss–Newton target
  update of Meulemans et al. 2020; for L-DRL the DTP update at the training β, for
  backprop its own gradient, so `update_to_bp` is 0), `gn_to_bp`, and for L-DRL
  `small_beta_to_bp` / `small_beta_to_gn` (the DTP update at β = 0.01, the limit
  in which it measures how well the feedback Jacobians match) and
  `weight_to_transpose` (V_n vs W_nᵀ; null for layer 1, which has no feedback);
- `angles.png`: those angles per layer against the epoch.

`--resume` continues every run from its checkpoint (the feedback warm-up, which runs
before a new L-DRL run's first step, lives in the checkpointed model and is not
repeated); without it an existing checkpoint is refused. After each run,
`<out-root>/summary.md` is rewritten from every run folder under `--out-root`
(also `--summary-only`); `--out FILE` appends the same table to FILE.

`--time-steps N` times N training steps (the step `fit` compiles) and one angle
measurement per run instead of training, and prints s/step and s/epoch.

    python scripts/dtp_mnist.py --dataset mnist --arch mlp --method ldrl bp --epochs 30
    python scripts/dtp_mnist.py --dataset mnist --arch mlp --method ldrl bp --epochs 30 --resume
    nice -n 19 python scripts/dtp_mnist.py --arch mlp lenet --time-steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import channels_first, fit_by_epoch, load_images, machine, random_images

import eqprop_jax as eqp
from eqprop_jax.data import steps_per_epoch
from eqprop_jax.diagnostics.dtp import dtp_alignment
from eqprop_jax.estimators import Backprop
from eqprop_jax.estimators.dtp import feedback_mask
from eqprop_jax.models.layered import ConvFeedback, LayeredNet
from eqprop_jax.train import Collapsed, NonFiniteLoss, TrainConfig, fit
from eqprop_jax.train.checkpoint import CHECKPOINT, read_info
from eqprop_jax.train.step import make_train_step

WARMUP_BATCHES = 20
ANGLES = "angles.jsonl"
ANGLES_PNG = "angles.png"
STOPPED = "stopped.txt"  # why a run stopped early (NaN step, collapse)
SMALL_BETA = 1e-2
ANGLE_EXAMPLES = 256
# Settings that change a run's trajectory: a run may only be resumed with the same.
RUN_SETTINGS = (
    "dataset", "epochs", "batch", "train_size", "test_size", "fb_steps", "fb_lr",
    "lr", "beta", "seed", "smoke",
)  # fmt: skip


def build(arch: str, key):
    if arch == "mlp":
        return LayeredNet.mlp([784, 256, 256, 10], key=key, activation=jax.nn.elu)
    return LayeredNet.lenet(key=key)


def shaped(arch, data):
    """Flat vectors for the MLP, NCHW images for LeNet."""
    return data.flat() if arch == "mlp" else channels_first(data)


def run_name(dataset: str, arch: str, method: str) -> str:
    return f"{dataset}-{arch}-{method}"


def warm_up_feedback(est, model, data, batch, key):
    """`pre_step` alone on the first WARMUP_BATCHES batches: the feedback weights learn
    before the forward weights move (as Ernoult et al. 2022 train the feedback alone
    first), a phase `fit` has no place for."""
    for i in range(WARMUP_BATCHES):
        xb = jnp.asarray(data.x_train[i * batch : (i + 1) * batch])
        yb = jnp.asarray(data.y_train[i * batch : (i + 1) * batch])
        if len(xb) < batch:
            break
        model = est.pre_step(model, xb, yb, key=jax.random.fold_in(key, 10_000 + i))
    return model


def setup(arch, method, data, args):
    """Model (at initialisation), estimator and `TrainConfig` of one run.

    Feedback settings in the spirit of Ernoult et al. 2022 (σ larger at the bottom, more
    steps for wider layers is theirs; here one K for all to keep CPU time low). L-DRL
    gradients of a conv kernel sum over the H·W output positions of G, so its learning
    rate is divided by H·W (the paper's bottom layers also use tiny lrs).
    """
    model = build(arch, jax.random.PRNGKey(args.seed))
    # Only a conv feedback layer's kernel sums over positions: a dense G_n whose output
    # s_{n-1} is a (C, H, W) map (LeNet's G_3) keeps the full rate (it was divided by
    # H·W too before, which left LeNet's G_3 at 88° from W_3ᵀ after an epoch).
    shapes = model.shapes
    lrs = tuple(
        args.fb_lr / (math.prod(shapes[n - 1][1:]) if isinstance(g, ConvFeedback) else 1.0)
        for n, g in enumerate(model.feedback, start=2)
    )
    est = (
        eqp.DTP(
            variant=eqp.LDRL(),
            beta=args.beta,
            feedback_steps=args.fb_steps,
            noise=0.1,
            feedback_lr=lrs,
        )
        if method == "ldrl"
        else Backprop()
    )
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        seed=args.seed,
        lr=args.lr,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="cosine",
        frozen=feedback_mask,  # trained by DTP.pre_step, not by this optimiser
        eval_batch_size=min(1000, len(data.x_test)),
        progress=False,
    )
    return model, est, cfg


def _angles(values) -> list:
    """Degrees per layer as JSON (None where undefined)."""
    return [None if not np.isfinite(v) else round(float(v), 4) for v in np.asarray(values)]


def angle_row(method, model, x, y, beta, epoch) -> dict:
    """One `angles.jsonl` row: per-layer angles of the method's update (module docstring)."""
    diag = dtp_alignment(model, x, y, beta=beta if method == "ldrl" else SMALL_BETA)
    row = {"epoch": epoch, "loss": round(float(diag["loss"]), 6)}
    if method == "ldrl":
        small = dtp_alignment(model, x, y, beta=SMALL_BETA)
        row.update(
            update_to_bp=_angles(diag["update_angle"]),
            update_to_gn=_angles(diag["gn_angle"]),
            small_beta_to_bp=_angles(small["update_angle"]),
            small_beta_to_gn=_angles(small["gn_angle"]),
            gn_to_bp=_angles(diag["gn_bp_angle"]),
            weight_to_transpose=_angles(diag["weight_angle"]),
            beta=beta,
            small_beta=SMALL_BETA,
        )
    else:  # backprop's update is its gradient: 0° to itself
        row.update(
            update_to_bp=[0.0] * model.num_layers,
            update_to_gn=_angles(diag["gn_bp_angle"]),
            gn_to_bp=_angles(diag["gn_bp_angle"]),
        )
    row["examples"] = int(len(x))
    return row


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def plot_angles(rows: list[dict], path: Path, title: str = "") -> None:
    """`angles.png`: per-layer angles against the epoch, a panel per comparison (solid:
    the training update; dashed: the DTP update at β = 0.01)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        ("update_to_bp", "small_beta_to_bp", "update vs backprop"),
        ("update_to_gn", "small_beta_to_gn", "update vs Gauss–Newton targets"),
    ]
    if "weight_to_transpose" in rows[0]:
        panels.append(("weight_to_transpose", None, "feedback V_n vs W_nᵀ"))
    else:
        panels = panels[1:]
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    epochs = [r["epoch"] for r in rows]
    as_array = lambda key: np.array(
        [[np.nan if v is None else v for v in r[key]] for r in rows], float
    )
    for ax, (key, dashed, name) in zip(axes, panels, strict=True):
        values = as_array(key)
        for layer in range(values.shape[1]):
            if np.all(np.isnan(values[:, layer])):
                continue
            (line,) = ax.plot(epochs, values[:, layer], "o-", ms=3, label=f"F_{layer + 1}")
            if dashed is not None and dashed in rows[0]:
                ax.plot(epochs, as_array(dashed)[:, layer], "--", color=line.get_color(), lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("degrees")
        ax.set_ylim(0, None)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run(arch, method, data, args, out_root: Path, *, log=print) -> Path:
    """Train one (arch, method) run in its own folder, or resume it; returns the folder."""
    data = shaped(arch, data)
    name = run_name(args.dataset, arch, method)
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    model, est, cfg = setup(arch, method, data, args)
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    ckpt = out / CHECKPOINT
    angles_path = out / ANGLES
    diag_x = jnp.asarray(data.x_test[:ANGLE_EXAMPLES])
    diag_y = jnp.asarray(data.y_test[:ANGLE_EXAMPLES])
    title = name + (
        f" (solid: β = {args.beta}; dashed: β = {SMALL_BETA})" if method == "ldrl" else ""
    )
    measure = lambda m, epoch: angle_row(method, m, diag_x, diag_y, args.beta, epoch)
    if ckpt.exists():
        if not args.resume:
            raise SystemExit(f"{out} already holds a run; pass --resume to continue it.")
        old = json.loads((out / "run.json").read_text()).get("settings", {})
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise SystemExit(f"{out}: cannot resume with other settings (was, now): {changed}")
        done = int(read_info(ckpt)["epoch"])  # complete epochs in the checkpoint
        rows = [r for r in read_jsonl(angles_path) if r["epoch"] <= done]
        if not rows or rows[-1]["epoch"] < done:
            # Killed between the checkpoint and its angles: measure the checkpointed
            # model (fit with no epoch left to run restores it and returns).
            restored = fit(
                model, est, data, _epochs(cfg, done), out_dir=out, resume=True, log=lambda _: None
            )
            rows.append(measure(restored.model, done))
        write_jsonl(angles_path, rows)
        if done >= args.epochs:
            log(f"{name}: all {args.epochs} epochs done")
            plot_angles(rows, out / ANGLES_PNG, title)
            return out
        log(f"{name}: resuming after epoch {done}")
        start, resume = done + 1, True
    else:
        if method == "ldrl":
            key = jax.random.PRNGKey(args.seed)
            model = warm_up_feedback(est, model, data, args.batch, key)
        rows = [measure(model, 0)]
        write_jsonl(angles_path, rows)
        start, resume = 1, False
    info = {
        "script": "scripts/dtp_mnist.py",
        "arch": arch,
        "method": method,
        "settings": settings,
        "warmup_batches": WARMUP_BATCHES if method == "ldrl" else 0,
        "command": " ".join(sys.argv),
        "machine": machine(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }

    def after_epoch(result):
        r = result.history[-1]
        rows.append(measure(result.model, r["epoch"]))
        write_jsonl(angles_path, rows)
        plot_angles(rows, out / ANGLES_PNG, title)
        a = rows[-1]
        log(
            f"{name} epoch {r['epoch']}: test error {100 * (1 - r['test_accuracy']):.2f}% "
            f"loss {r['train_loss']:.3f} time {r['train_time_s']:.1f}s "
            f"∠BP {a['update_to_bp']} ∠GN {a['update_to_gn']}"
        )
        return {}

    (out / STOPPED).unlink(missing_ok=True)
    fit_by_epoch(
        model,
        est,
        data,
        cfg,
        out_dir=out,
        after_epoch=after_epoch,
        start_epoch=start,
        resume=resume,
        run_info=info,
        log=lambda _: None,
    )
    return out


def _epochs(cfg, n):
    return dataclasses.replace(cfg, epochs=max(n, 1))


def time_steps(arch, method, data, args, *, log=print) -> dict:
    """Seconds per training step (the step `fit` compiles: `pre_step`, estimate, optax
    update), median of `args.time_steps` calls after a compile call, and seconds of
    one angle measurement."""
    data = shaped(arch, data)
    model, est, cfg = setup(arch, method, data, args)
    spe = steps_per_epoch(len(data.x_train), cfg.batch_size)
    tx = cfg.optimizer_settings(spe)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = tx(params).init(params)
    step = make_train_step(est, tx)
    counts = jnp.zeros(4, jnp.int32)
    times = []
    t0 = time.perf_counter()
    for i in range(args.time_steps + 1):
        idx = np.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size) % len(data.x_train)
        x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
        t = time.perf_counter()
        model, opt_state, counts, loss, _ = step(
            model, opt_state, counts, x, y, jax.random.PRNGKey(i)
        )
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    compile_s = times[0] - statistics.median(times[1:])
    x, y = jnp.asarray(data.x_test[:ANGLE_EXAMPLES]), jnp.asarray(data.y_test[:ANGLE_EXAMPLES])
    angle_row(method, model, x, y, args.beta, 0)  # compile
    t = time.perf_counter()
    angle_row(method, model, x, y, args.beta, 0)
    angle_s = time.perf_counter() - t
    s = statistics.median(times[1:])
    out = {
        "arch": arch,
        "method": method,
        "batch": cfg.batch_size,
        "s_per_step": s,
        "steps_per_epoch": spe,
        "s_per_epoch": s * spe,
        "compile_s": compile_s,
        "angle_s": angle_s,
        "total_s": time.perf_counter() - t0,
    }
    log(
        f"{arch} {method}: {s:.4f} s/step (median of {args.time_steps}), {spe} steps/epoch "
        f"-> {s * spe:.0f} s/epoch; compile {compile_s:.1f} s; angles {angle_s:.1f} s"
    )
    return out


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    p.add_argument("--arch", nargs="+", default=["mlp", "lenet"], choices=["mlp", "lenet"])
    p.add_argument("--method", nargs="+", default=["ldrl", "bp"], choices=["ldrl", "bp"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-size", type=int, default=60_000)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--fb-steps", type=int, default=5)
    p.add_argument("--fb-lr", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--beta", type=float, default=0.7, help="L-DRL target step β")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="the IDX folder (default: the dataset's)")
    p.add_argument("--smoke", action="store_true", help="random 28x28 data (the test)")
    p.add_argument("--out-root", type=Path, default=Path("/work/runs/dtp"))
    p.add_argument("--resume", action="store_true", help="continue runs from their checkpoints")
    p.add_argument("--out", type=Path, default=None, help="also append the summary table here")
    p.add_argument("--summary-only", action="store_true", help="only rewrite summary.md")
    p.add_argument("--time-steps", type=int, default=0, help="time N steps instead of training")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.summary_only:
        return write_summary(args.out_root, args.out)
    if args.smoke:
        data = random_images(args.dataset, args.train_size, args.test_size, shape=(28, 28, 1))
    else:
        data = load_images(args.dataset, args.data_dir, train=args.train_size, test=args.test_size)
    data = data.standardized()
    if args.time_steps:
        print(f"Machine: {machine()}")
        return [time_steps(a, m, data, args) for a in args.arch for m in args.method]
    folders, failed = [], []
    for arch in args.arch:
        for method in args.method:
            folder = args.out_root / run_name(args.dataset, arch, method)
            try:
                run(arch, method, data, args, args.out_root)
            except (NonFiniteLoss, Collapsed) as e:
                # The run stops at its last good checkpoint; the other runs go on.
                (folder / STOPPED).write_text(f"{type(e).__name__}: {e}\n")
                print(f"{folder.name} stopped: {type(e).__name__}: {e}", flush=True)
                failed.append(folder.name)
            folders.append(folder)
            write_summary(args.out_root)
    if args.out:
        write_summary(args.out_root, args.out)
    if failed and argv is None:
        raise SystemExit(f"stopped before the last epoch: {', '.join(failed)}")
    return folders


def summarize(folder: Path) -> dict | None:
    """The figures of one run folder (None when it has no metrics yet)."""
    metrics = read_jsonl(folder / "metrics.jsonl")
    if not metrics or not (folder / "run.json").exists():
        return None
    info = json.loads((folder / "run.json").read_text())
    angles = read_jsonl(folder / ANGLES)
    best = max(metrics, key=lambda r: r["test_accuracy"])
    times = [r["train_time_s"] for r in metrics[1:]] or [metrics[0]["train_time_s"]]
    return {
        "dataset": info["settings"]["dataset"],
        "arch": info["arch"],
        "method": info["method"],
        "epochs": metrics[-1]["epoch"],
        "of": info["settings"]["epochs"],
        "final_error": 1 - metrics[-1]["test_accuracy"],
        "best_error": 1 - best["test_accuracy"],
        "best_epoch": best["epoch"],
        "s_per_epoch": statistics.median(times),
        "angles": angles[-1] if angles else {},
        "stopped": (folder / STOPPED).read_text().split(":")[0]
        if (folder / STOPPED).exists()
        else "",
    }


def write_summary(out_root: Path, append_to: Path | None = None) -> str:
    """`<out-root>/summary.md`: a markdown table of every run folder under `out_root`
    (and the same appended to `append_to`)."""
    runs = [s for f in sorted(Path(out_root).glob("*/")) if (s := summarize(f)) is not None]
    bp = {(r["dataset"], r["arch"]): r for r in runs if r["method"] == "bp"}
    fmt = lambda a: " / ".join("-" if v is None else f"{v:.1f}" for v in a) if a else ""
    now = datetime.datetime.now(datetime.UTC)
    lines = [
        f"## L-DRL vs backprop ({now:%Y-%m-%d %H:%M} UTC, `{out_root}`)\n",
        "Test error at the last epoch run and the best over epochs; s/epoch is training "
        "time only (median over epochs 2.., the first includes compilation); angles "
        f"(degrees, per layer F_1..F_N, last epoch, first {ANGLE_EXAMPLES} test images): "
        "the update the method trains with (L-DRL: DTP at the training β; backprop: its "
        "gradient) vs backprop and vs the Gauss–Newton target update (Meulemans et al. "
        "2020); for L-DRL also at β = 0.01 and V_n vs W_nᵀ. Gap: final error minus "
        "backprop's on the same net and dataset.\n",
        "| dataset | net | method | epochs | final error | best error (epoch) | gap to BP "
        "| s/epoch | ∠ to BP | ∠ to GN | ∠ to BP, GN at β=0.01 | ∠ V vs Wᵀ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        a = r["angles"]
        ref = bp.get((r["dataset"], r["arch"]))
        gap = (
            f"{100 * (r['final_error'] - ref['final_error']):+.2f}"
            if ref is not None and r["method"] != "bp"
            else ""
        )
        small = (
            f"{fmt(a['small_beta_to_bp'])}; {fmt(a['small_beta_to_gn'])}"
            if "small_beta_to_bp" in a
            else ""
        )
        stop = f" (stopped: {r['stopped']})" if r["stopped"] else ""
        lines.append(
            f"| {r['dataset']} | {r['arch']} | {r['method']} | {r['epochs']}/{r['of']}{stop} "
            f"| {100 * r['final_error']:.2f}% | {100 * r['best_error']:.2f}% ({r['best_epoch']}) "
            f"| {gap} | {r['s_per_epoch']:.1f} | {fmt(a.get('update_to_bp'))} "
            f"| {fmt(a.get('update_to_gn'))} | {small} | {fmt(a.get('weight_to_transpose'))} |"
        )
    text = "\n".join(lines) + "\n"
    Path(out_root).mkdir(parents=True, exist_ok=True)
    (Path(out_root) / "summary.md").write_text(text)
    if append_to is not None:
        append_to.parent.mkdir(parents=True, exist_ok=True)
        with open(append_to, "a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
