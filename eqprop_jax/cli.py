"""`eqprop-jax train | align | bench | presets`: the command line.

- `train`: train a preset (default: an EP network on the embedded digits).
- `align`: every estimator that applies to a preset's model, on one batch, against
  the autodiff reference; prints the gradient-alignment table, writes PNG plots.
- `bench`: runs the benchmarks of the source tree (their `main`) and prints their tables.
- `presets`: lists the presets and their settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHMARKS = ("solvers", "ep_step", "dchn", "resistive", "dtp", "deq_train")

# Library messages name Python parameters in backquotes; here they become flags.
_FLAGS = {
    "resume": "--resume",
    "out_dir": "--out",
    "data_dir": "--data-dir",
    "download": "--download",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "steps_per_epoch": "--max-steps-per-epoch",
    "epochs": "--epochs",
    "lr": "--lr",
    "eval_limit": "--eval-limit",
}
MAX_LR = 100.0


def _translate(msg: str) -> str:
    """`resume=True` -> --resume, `seed=0` -> --seed 0, `out_dir` -> --out."""

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(3)
        if name not in _FLAGS:
            return m.group(0)
        return _FLAGS[name] if value in (None, "True") else f"{_FLAGS[name]} {value}"

    return re.sub(r"`(\w+)(=([^`]*))?`", flag, msg)


def _err(msg: str) -> None:
    print(f"eqprop-jax: error: {_translate(msg)}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"eqprop-jax: warning: {_translate(str(message))}", file=sys.stderr)


# -- flag values -----------------------------------------------------------------


def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low or (high is not None and v > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def _number(*, positive: bool = False, nonzero: bool = False, high: float | None = None):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if positive and v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        if nonzero and v == 0:
            raise argparse.ArgumentTypeError("must be nonzero, got 0")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {text}")
        return v

    parse.__name__ = "number"
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqprop-jax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(q):
        q.add_argument("--preset", default="default", help="a preset name (see `presets`)")
        q.add_argument("--dataset", default=None, help="override the preset's dataset")
        q.add_argument(
            "--data-dir",
            default=None,
            help="a folder of IDX (.gz) / npz files, or a tensorflow-datasets data_dir",
        )
        q.add_argument("--download", action="store_true", help="let tfds download (network)")
        q.add_argument("--seed", type=_int_at_least(0, 2**32 - 1), default=0)
        q.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
        q.add_argument("--train-limit", type=_int_at_least(1), default=None, help=argparse.SUPPRESS)

    positive = _int_at_least(1)
    t = sub.add_parser("train", help="train a preset")
    data_args(t)
    t.add_argument("--estimator", default=None, help="override the preset's estimator")
    t.add_argument("--epochs", type=positive, default=None)
    t.add_argument("--batch-size", type=positive, default=None)
    t.add_argument(
        "--lr",
        type=_number(positive=True, high=MAX_LR),
        default=None,
        help=f"one learning rate for all layers, in (0, {MAX_LR:g}]",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--max-steps-per-epoch", type=positive, default=None, help=argparse.SUPPRESS)
    t.add_argument("--eval-limit", type=positive, default=None, help=argparse.SUPPRESS)
    t.add_argument("--x64", action="store_true", help=argparse.SUPPRESS)
    d = t.add_argument_group("several processes (jax.distributed; start one command per process)")
    d.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    d.add_argument("--num-processes", type=positive, default=None)
    d.add_argument("--process-id", type=_int_at_least(0), default=None)
    d.add_argument(
        "--distributed",
        action="store_true",
        help="join a cluster that JAX detects itself (SLURM, Open MPI, Kubernetes, ...)",
    )
    d.add_argument(
        "--heartbeat-timeout",
        type=positive,
        default=100,
        help="seconds before the others stop when a process dies (default 100)",
    )

    a = sub.add_parser("align", help="gradient alignment of every estimator on one batch")
    data_args(a)
    a.add_argument("--batch-size", type=positive, default=32)
    a.add_argument(
        "--betas",
        type=_number(nonzero=True),
        nargs="+",
        default=[0.01, 0.03, 0.1, 0.3, 1.0],
        help="the β values of the EP sweep",
    )
    a.add_argument(
        "--estimators", nargs="+", default=None, help="a subset of the preset's estimators"
    )
    a.add_argument("--float32", action="store_true", help="compute in float32 (default: float64)")
    a.add_argument("--no-plot", action="store_true")

    b = sub.add_parser("bench", help="run the benchmark scripts and print their tables")
    b.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {BENCHMARKS})")
    b.add_argument("--quick", action="store_true", help="small sizes (passed on)")

    sub.add_parser("presets", help="list the presets")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for a bad command line, 1 for a
    refused input or a stopped run, 128 + signal for an interrupted one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the problem
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    from .data import DataError
    from .presets import PresetError
    from .train import CheckpointError, Interrupted, TrainingError, TrainingWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", TrainingWarning)
            warnings.showwarning = _show_warning
            if args.command == "train":
                return _train(args)
            if args.command == "align":
                return _align(args)
            if args.command == "bench":
                return _bench(args)
            return _list_presets()
    except Interrupted as e:
        _err(str(e))
        return 128 + e.signum
    except (PresetError, DataError, CheckpointError, TrainingError) as e:
        _err(str(e))
        return 1
    except (ValueError, TypeError) as e:
        # Bad settings or shapes: the library's errors name the problem.
        _err(f"{type(e).__name__}: {e}")
        return 1
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        _err(f"{e.strerror or e}{where}.")
        return 1
    except KeyboardInterrupt:
        _err("interrupted.")
        return 130


# -- shared ----------------------------------------------------------------------


def _dataset(args, preset):
    from .data import load_dataset

    name = args.dataset or preset.dataset
    data = load_dataset(name, data_dir=args.data_dir, seed=args.seed, download=args.download)
    if args.train_limit:
        data = data.subset(train=args.train_limit)
    if preset.standardize:
        data = data.standardized()
    return data


def _in_layout(data, preset):
    from .presets import to_layout

    return dataclasses.replace(
        data,
        x_train=to_layout(data.x_train, preset.layout),
        x_test=to_layout(data.x_test, preset.layout),
    )


# -- train -----------------------------------------------------------------------


def _train(args) -> int:
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    from .presets import get_preset
    from .train import Checkpointer, check_output_folder, distributed, fit

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) or args.distributed:
        if args.distributed and any(v is not None for v in explicit):
            raise ValueError(
                "give either --distributed (cluster detection) or --coordinator, "
                "--num-processes and --process-id, not both."
            )
        if not args.distributed and any(v is None for v in explicit):
            raise ValueError(
                "--coordinator, --num-processes and --process-id go together "
                "(or use --distributed for JAX's cluster detection)."
            )
        distributed.initialize(*explicit, heartbeat_timeout=args.heartbeat_timeout)
    say = print if distributed.is_primary() else (lambda *_: None)

    preset = get_preset(args.preset)
    estimator_name = args.estimator or preset.estimator
    estimator = preset.make_estimator(estimator_name)
    cfg = preset.train
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "eval_limit": args.eval_limit,
    }
    cfg = dataclasses.replace(
        cfg,
        seed=args.seed,
        eval_solver=preset.eval_solver(),
        channels_first=preset.layout == "nchw",
        progress=False if args.no_progress else None,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    # Every setting and the output folder are checked before the data is loaded.
    out = check_output_folder(args.out or f"runs/{preset.name}")
    if not args.resume:
        Checkpointer(out).refuse_overwrite()
    data = _in_layout(_dataset(args, preset), preset)
    key = jax.random.PRNGKey(args.seed)
    model = preset.model(jax.random.fold_in(key, 7), data.x_train.shape[1:], data.num_classes)
    say(f"preset {preset.name}: {preset.summary}")
    say(
        f"training {type(model).__name__} with {estimator_name} on {data!r}; "
        f"{cfg.epochs} epochs of batch {cfg.batch_size}; outputs in {out}"
        + (f"; {jax.process_count()} processes" if jax.process_count() > 1 else "")
    )
    info = {
        "preset": preset.name,
        "estimator": estimator_name,
        "dataset": data.name,
        "argv": args.argv,
        "config": {k: repr(v) for k, v in dataclasses.asdict(cfg).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    fit(model, estimator, data, cfg, out_dir=out, resume=args.resume, run_info=info)
    return 0


# -- align -----------------------------------------------------------------------


def _align(args) -> int:
    import jax

    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from .data import batch_indices, epoch_order
    from .diagnostics import compare_estimators
    from .presets import PresetError, cast_floats, get_preset
    from .train import check_output_folder

    preset = get_preset(args.preset)
    names = [n for n in preset.estimators if n != preset.reference]
    if args.estimators:
        unknown = [n for n in args.estimators if n not in names]
        if unknown:
            raise PresetError(
                f"estimator(s) {unknown} do not apply to preset {preset.name!r}; choose among: "
                f"{', '.join(names)}."
            )
        names = list(args.estimators)

    out = check_output_folder(args.out or f"runs/align-{preset.name}")
    data = _in_layout(_dataset(args, preset), preset)
    dtype = jnp.float32 if args.float32 else jnp.float64
    key = jax.random.PRNGKey(args.seed)
    model = preset.model(jax.random.fold_in(key, 7), data.x_train.shape[1:], data.num_classes)
    model = cast_floats(model, dtype)
    idx = batch_indices(
        epoch_order(jax.random.fold_in(key, 0), 0, len(data.x_train)),
        0,
        min(args.batch_size, len(data.x_train)),
    )
    x = jnp.asarray(data.x_train[idx], dtype)
    y = jnp.asarray(data.y_train[idx])

    def make(name, beta=None):
        # β as an array is traced, so the β sweep reuses one compilation per variant.
        if name in preset.beta_sweep:
            beta = preset.make_estimator(name).beta if beta is None else beta
            return preset.make_estimator(name, beta=jnp.asarray(beta, dtype))
        return preset.make_estimator(name)

    t0 = time.perf_counter()
    ref = compare_estimators(
        model, {}, x, y, reference=preset.make_estimator(preset.reference), key=key
    )
    print(
        f"preset {preset.name}: {type(model).__name__}, batch {len(x)} of {data.name}, "
        f"{jnp.dtype(dtype).name}; reference {preset.reference} (loss "
        f"{ref.reference_loss:.6f}, {time.perf_counter() - t0:.1f} s)"
    )
    found = compare_estimators(
        model, {n: make(n) for n in names}, x, y, reference=ref.reference_grads, key=key
    )
    print(f"\nalignment with {preset.reference}:\n{found.table()}")
    for name, rep in found.reports.items():
        print(f"\n{name}, per layer:\n{rep}")

    sweep = {}
    swept = [n for n in names if n in preset.beta_sweep]
    for name in swept:
        sweep[name] = []
        for beta in args.betas:
            rep = compare_estimators(
                model, {name: make(name, beta)}, x, y, reference=ref.reference_grads, key=key
            ).reports[name]
            sweep[name].append(
                {
                    "beta": beta,
                    "overall": rep.overall.angle,
                    "per_leaf": {k: v.angle for k, v in rep.per_leaf.items()},
                }
            )
    if swept:
        print("\nangle° against β (overall):")
        print(f"{'estimator':<16}" + "".join(f"{b:>10.3g}" for b in args.betas))
        for name, rows in sweep.items():
            print(f"{name:<16}" + "".join(f"{r['overall']:>10.3f}" for r in rows))

    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment.json").write_text(
        json.dumps(
            {
                "preset": preset.name,
                "reference": preset.reference,
                "estimators": found.as_dict(),
                "beta_sweep": sweep,
            },
            indent=2,
            default=float,
        )
        + "\n"
    )
    written = [out / "alignment.json"]
    if not args.no_plot:
        written += _plots(out, found.reports, sweep, np)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _plots(out: Path, reports, sweep, np) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'eqprop_jax[plot]').")
        return []
    written = []
    if sweep:
        leaves = list(next(iter(sweep.values()))[0]["per_leaf"])
        panels = ["overall", *leaves]
        cols = min(3, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, panels, strict=False):
            for name, pts in sweep.items():
                betas = [p["beta"] for p in pts]
                vals = [p["overall"] if panel == "overall" else p["per_leaf"][panel] for p in pts]
                ax.loglog(betas, np.maximum(vals, 1e-6), "o-", label=name)
            ax.set_title(panel, fontsize=9)
            ax.set_xlabel("β")
            ax.set_ylabel("angle to reference (°)")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "angle_vs_beta.png", dpi=110)
        plt.close(fig)
        written.append(out / "angle_vs_beta.png")
    names = list(reports)
    leaves = list(reports[names[0]].per_leaf)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(leaves) * len(names) / 2), 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        # Log axis: an exact 0° (e.g. BPTT through a converged state) is drawn at 1e-6.
        vals = np.maximum([reports[name].per_leaf[leaf].angle for leaf in leaves], 1e-6)
        ax.bar(np.arange(len(leaves)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(leaves)) + 0.4 - width / 2, leaves, rotation=30, fontsize=8)
    ax.set_ylabel("angle to reference (°)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "angle_per_layer.png", dpi=110)
    plt.close(fig)
    written.append(out / "angle_per_layer.png")
    return written


# -- bench -----------------------------------------------------------------------


def _benchmark_main(name: str) -> Callable[[list[str]], Any]:
    """The `main(argv)` of benchmarks/<name>.py, imported as a module of the source
    tree (benchmarks/ sits beside the package in a checkout; a wheel has none)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    if name == "solvers":
        from benchmarks.solvers import main
    elif name == "ep_step":
        from benchmarks.ep_step import main
    elif name == "dchn":
        from benchmarks.dchn import main
    elif name == "resistive":
        from benchmarks.resistive import main
    elif name == "dtp":
        from benchmarks.dtp import main
    elif name == "deq_train":
        from benchmarks.deq_train import main
    else:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}.")
    return main


def _bench(args) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        _err(f"no benchmarks folder at {root}; `bench` runs from a source checkout.")
        return 1
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        _err(f"unknown benchmark(s) {unknown}; available: {', '.join(BENCHMARKS)}.")
        return 1
    status = 0
    for name in names:
        print(f"\n== benchmarks/{name}.py {'--quick' if args.quick else ''}".rstrip())
        if not (root / f"{name}.py").exists():
            print("   (not available in this checkout)")
            continue
        try:
            main = _benchmark_main(name)
            try:
                main(["--quick"] if args.quick else [])
            except SystemExit as e:
                if not (args.quick and e.code == 2):
                    raise
                # argparse refused --quick: this script has no quick mode.
                print(f"   benchmarks/{name}.py has no --quick option; running its defaults")
                main([])
        except SystemExit as e:
            if e.code not in (0, None):
                status = 1
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the rest
            print(f"   failed: {type(e).__name__}: {e}")
            status = 1
    return status


# -- presets ---------------------------------------------------------------------


def _list_presets() -> int:
    from .presets import PRESETS

    for p in PRESETS.values():
        print(f"{p.name:<26} {p.dataset:<9} {p.estimator:<12} {p.summary}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
