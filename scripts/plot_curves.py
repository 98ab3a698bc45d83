"""Learning curves of several `eqprop-jax train` runs in one small PNG.

Reads each run's `metrics.jsonl` (one line per epoch, written by
`eqprop_jax.train.fit`) and plots test error (and, with --train-loss, the mean
training loss) against the epoch:

    python scripts/plot_curves.py --out docs/p1h_mnist.png --title "P-1h, MNIST" \\
        EP=/work/runs/p1h-ep-v2 BPTT=/work/runs/p1h-bptt-v2

Each run is LABEL=FOLDER. A horizontal line marks --target (a test error in %).
With --angles, a panel of the median angle to the implicit gradient per epoch, from
each run's `angles.jsonl` (written by `scripts/cep_vf_curves.py`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(folder: str | Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no epochs recorded yet.")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=FOLDER (a run's --out folder)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default="")
    p.add_argument("--target", type=float, default=None, help="target test error (%%)")
    p.add_argument("--train-loss", action="store_true", help="add a panel of training loss")
    p.add_argument("--ymax", type=float, default=None, help="upper limit of the error axis (%%)")
    p.add_argument("--angles", action="store_true", help="add a panel of angles.jsonl's angle")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 1 + bool(args.train_loss) + bool(args.angles)
    ax_angle = None
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.0), squeeze=False)
    ax_err = axes[0, 0]
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        if not folder:
            raise SystemExit(f"expected LABEL=FOLDER, got {spec!r}.")
        rows = read_metrics(folder)
        epochs = [r["epoch"] for r in rows]
        err = [100 * (1 - r["test_accuracy"]) for r in rows]
        ax_err.plot(epochs, err, marker=".", lw=1.2, label=f"{label} ({err[-1]:.2f}%)")
        if args.train_loss:
            axes[0, 1].plot(epochs, [r["train_loss"] for r in rows], lw=1.2, label=label)
        if args.angles:
            ax_angle = axes[0, ncols - 1]
            path = Path(folder) / "angles.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            ax_angle.plot(
                [r["epoch"] for r in rows], [r["angle_median"] for r in rows], marker=".",
                lw=1.2, label=label,
            )
    if args.target is not None:
        ax_err.axhline(args.target, color="grey", ls="--", lw=0.8, label=f"target {args.target}%")
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("test error (%)")
    if args.ymax is not None:
        ax_err.set_ylim(0, args.ymax)
    ax_err.grid(alpha=0.3)
    ax_err.legend(fontsize=7)
    if args.train_loss:
        axes[0, 1].set_xlabel("epoch")
        axes[0, 1].set_ylabel("mean training loss")
        axes[0, 1].set_yscale("log")
        axes[0, 1].grid(alpha=0.3)
        axes[0, 1].legend(fontsize=7)
    if ax_angle is not None:
        ax_angle.set_xlabel("epoch")
        ax_angle.set_ylabel("angle to implicit grad. (°)")
        ax_angle.grid(alpha=0.3)
        ax_angle.legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
