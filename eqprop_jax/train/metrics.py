"""The metrics of a run: one JSON line per epoch, and a PNG of the learning curves."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import CheckpointError, OutputError

METRICS = "metrics.jsonl"
CURVES = "curves.png"
PHASES = ("converged", "max_steps", "diverged", "nonfinite")


class MetricsWriter:
    """`metrics.jsonl` and `curves.png` in `folder` (nothing when `folder` is None).

    The metrics file is rewritten whole and atomically after every epoch, so it always
    matches the last checkpoint or runs ahead of it, never behind. The curves are
    redrawn at most every `plot_every` seconds, and at the end of the run.
    """

    def __init__(
        self,
        folder: str | os.PathLike | None,
        *,
        log: Callable[[str], None] = print,
        plot_every: float = 30.0,
    ):
        self.folder = None if folder is None else Path(folder).expanduser()
        self.log = log
        self.plot_every = plot_every
        self._plotted = time.monotonic()  # the first drawing waits `plot_every` too
        self._no_matplotlib = False

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / METRICS

    @property
    def curves(self) -> Path | None:
        return None if self.folder is None else self.folder / CURVES

    def read(self, upto_epoch: int) -> list[dict]:
        """The rows of the epochs 1..`upto_epoch` (those a resumed checkpoint covers)."""
        if self.path is None or not self.path.exists():
            return []
        rows = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                epoch = int(row["epoch"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{self.path}, line {n}, is not a metrics row ({e}); the file is corrupt."
                ) from e
            if epoch <= upto_epoch:
                rows.append(row)
        return rows

    def write(self, rows: Sequence[dict], *, final: bool = False) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            raise OutputError(f"cannot write the metrics {self.path}: {e.strerror or e}.") from e
        if final or time.monotonic() - self._plotted >= self.plot_every:
            self.plot(rows)

    def write_run_info(self, info: dict) -> None:
        """`run.json`: how the run was started (settings, command line, date)."""
        if self.folder is None:
            return
        try:
            (self.folder / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        except OSError as e:
            raise OutputError(f"cannot write {self.folder / 'run.json'}: {e.strerror or e}.") from e

    def plot(self, rows: Sequence[dict]) -> Path | None:
        """Draw `curves.png`; a one-line notice instead when matplotlib is missing."""
        if self.curves is None or not rows or self._no_matplotlib:
            return None
        try:
            plot_curves(rows, self.curves)
        except ImportError:
            self._no_matplotlib = True
            self.log("matplotlib is not installed: no curves.png (pip install 'eqprop_jax[plot]').")
            return None
        self._plotted = time.monotonic()
        return self.curves


def plot_curves(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Loss, test accuracy and the fractions of relaxation phases by status, per epoch.

    Draws on a bare Agg canvas (no pyplot), so it touches no global matplotlib state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(12, 3.4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc, ax_phase = fig.subplots(1, 3)
    marker = "o-" if len(rows) < 40 else "-"
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker, label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], marker, label="test")
    losses = [r[k] for r in rows for k in ("train_loss", "test_loss")]
    if all(math.isfinite(v) and v > 0 for v in losses):
        ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in rows], marker, color="C2")
    ax_acc.set_title("test accuracy (%)")
    ax_acc.set_ylim(0, 100)
    if any(f"phase_{p}" in r for r in rows for p in PHASES):
        for i, p in enumerate(PHASES):
            ax_phase.plot(
                epochs,
                [100 * r.get(f"phase_{p}", math.nan) for r in rows],
                marker,
                color=f"C{i}",
                label=p,
            )
        ax_phase.set_ylim(-3, 103)
        ax_phase.legend(fontsize=8)
    else:
        ax_phase.text(
            0.5,
            0.5,
            "this estimator reports\nno phase statuses",
            ha="center",
            va="center",
            transform=ax_phase.transAxes,
        )
    ax_phase.set_title("relaxation phases by status (%)")
    for ax in (ax_loss, ax_acc, ax_phase):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
