"""What the training scripts share: data from `eqprop_jax.data`, `eqprop_jax.train.fit`
run one epoch at a time (for per-epoch measurements and a time budget), and the line
that says which machine ran them.

The scripts import this as `from _common import ...`: `python scripts/x.py` puts
scripts/ on sys.path (a test that loads a script by path puts it there too).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqprop_jax.data import Dataset, load_dataset, steps_per_epoch
from eqprop_jax.train import TrainConfig, TrainResult, fit

# The IDX folders (mnist/, fashion_mnist/); never copied into the repository.
DATA_ROOT = Path(os.environ.get("EQPROP_DATA", "/work/shared/data"))


def load_images(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    train: int | None = None,
    test: int | None = None,
) -> Dataset:
    """`name`'s IDX folder (checked against its MD5SUMS) through `eqprop_jax.data`,
    cut to the first `train` / `test` examples; images (N, 28, 28, 1) in [0, 1]."""
    data_dir = DATA_ROOT / name if data_dir is None else data_dir
    return load_dataset(name, data_dir=data_dir).subset(train, test)


def channels_first(data: Dataset) -> Dataset:
    """NHWC images as NCHW (the layout of the conv nets of `LayeredNet`)."""
    return dataclasses.replace(
        data,
        x_train=np.ascontiguousarray(np.moveaxis(data.x_train, -1, 1)),
        x_test=np.ascontiguousarray(np.moveaxis(data.x_test, -1, 1)),
    )


def random_images(name: str, n_train: int, n_test: int, shape=(8, 8, 1), classes=10) -> Dataset:
    """Uniform noise images with random labels: a script's smoke run, in seconds."""
    rng = np.random.default_rng(0)
    x_train = rng.random((n_train, *shape), dtype=np.float32)
    x_test = rng.random((n_test, *shape), dtype=np.float32)
    y_train = rng.integers(0, classes, n_train).astype(np.int32)
    y_test = rng.integers(0, classes, n_test).astype(np.int32)
    return Dataset(f"random-{name}", x_train, y_train, x_test, y_test, classes)


def flat(tree) -> jax.Array:
    """Every leaf of a pytree (a gradient), raveled into one vector."""
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def angle_deg(g, ref) -> float:
    """The angle in degrees between two gradients (pytrees of one structure, or vectors)."""
    # In float64, and as 2·atan2(‖u − v‖, ‖u + v‖) of the unit vectors: arccos of a
    # float32 cosine cannot tell angles below ~0.02° from 0.
    u = np.asarray(flat(g), np.float64)
    v = np.asarray(flat(ref), np.float64)
    u, v = u / (np.linalg.norm(u) + 1e-300), v / (np.linalg.norm(v) + 1e-300)
    return float(np.degrees(2 * np.arctan2(np.linalg.norm(u - v), np.linalg.norm(u + v))))


def machine() -> str:
    """Platform, cores, JAX and its backend, and the load average now (the CPU is shared)."""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"({jax.default_backend()}), load average {os.getloadavg()}"
    )


def fit_by_epoch(
    model,
    estimator,
    data: Dataset,
    config: TrainConfig,
    *,
    optimizer: optax.GradientTransformation | None = None,
    out_dir: str | os.PathLike | None = None,
    after_epoch: Callable[[TrainResult], dict] | None = None,
    budget_s: float | None = None,
    start_epoch: int = 1,
    resume: bool = False,
    run_info: dict | None = None,
    log: Callable[[str], None] = print,
) -> tuple[TrainResult, list[dict]]:
    """`fit` for `config.epochs` epochs, resumed from its checkpoint after each one.

    The same trajectory as one `fit` call (fit fixes each step's batch and key by
    (seed, epoch, step), and restores the optimiser state), with two things `fit`
    alone does not offer: `after_epoch(result)` measures the model after every epoch
    (its dict joins that epoch's row), and training stops after the epoch at which
    the next one would end past `budget_s` seconds. The optimiser (`optimizer`, or
    else the one `config` describes) is built once for the whole run, so a schedule
    spans all `config.epochs`, not each call's.
    With `start_epoch` > 1 (or `resume`, for a checkpoint written part-way through
    epoch 1) the run continues from the checkpoint in `out_dir`.
    Returns the last `TrainResult` and one row per epoch run here (fit's metrics and
    `after_epoch`'s).
    """
    if optimizer is None:
        spe = steps_per_epoch(len(data.x_train), config.batch_size, config.max_steps_per_epoch)
        optimizer = config.optimizer_settings(spe)(eqx.filter(model, eqx.is_inexact_array))
    defaults = TrainConfig()
    per_call = dataclasses.replace(
        config, **{f: getattr(defaults, f) for f in config.changed_optimizer_fields()}
    )

    def quiet(line: str) -> None:
        # Every call but the first resumes, and every call ends with a summary of its
        # own session: the run's summary is logged once, below.
        if not line.startswith(("resuming from", "done: ")):
            log(line)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp if out_dir is None else out_dir)
        rows: list[dict] = []
        start = time.perf_counter()
        result = None
        for epoch in range(start_epoch, config.epochs + 1):
            cfg = dataclasses.replace(per_call, epochs=epoch)
            result = fit(
                model,
                estimator,
                data,
                cfg,
                optimizer=optimizer,
                out_dir=folder,
                resume=resume or epoch > 1,
                run_info=run_info,
                log=quiet,
            )
            row = dict(result.history[-1])
            if after_epoch is not None:
                row.update(after_epoch(result))
            rows.append(row)
            elapsed = time.perf_counter() - start
            if budget_s is not None and elapsed + row["epoch_time_s"] > budget_s:
                log(f"stopped after epoch {epoch}: {elapsed:.0f} s of a {budget_s:.0f} s budget")
                break
    if rows:
        best = max(rows, key=lambda r: r["test_accuracy"])
        log(
            f"done: epoch {rows[-1]['epoch']}, test accuracy "
            f"{100 * rows[-1]['test_accuracy']:.2f}% (best {100 * best['test_accuracy']:.2f}% "
            f"at epoch {best['epoch']}), {time.perf_counter() - start:.0f} s"
        )
    return result, rows
