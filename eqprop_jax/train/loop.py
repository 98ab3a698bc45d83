"""The training loop: any estimator, optax updates, evaluation, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, PyTree

from ..data import Dataset
from ..data.batching import batch_indices, epoch_order, steps_per_epoch
from ..estimators.base import Estimator
from ..models.base import AbstractModel
from . import distributed
from .checkpoint import CHECKPOINT, Checkpointer, model_fingerprint
from .config import TrainConfig
from .errors import (
    CheckpointError,
    Collapsed,
    Interrupted,
    NonFiniteLoss,
    NonFiniteWarning,
    OutputError,
    TrainingError,
    TrainingWarning,
)
from .evaluate import _evaluate, evaluate
from .metrics import METRICS, MetricsWriter
from .optim import OptimizerSettings
from .per_device import PerDevice
from .progress import Progress
from .sharding import batch_mesh, replicate, shard_batch
from .state import TrainState
from .statuses import status_fractions
from .step import REFUSED, make_train_step

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "CheckpointError",
    "Collapsed",
    "Interrupted",
    "NonFiniteLoss",
    "OutputError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "evaluate",
    "fit",
    "make_train_step",
]


@dataclasses.dataclass
class TrainResult:
    model: Any
    opt_state: PyTree
    history: list[dict]
    summary: str


class _SignalFlag:
    """Records SIGINT/SIGTERM instead of dying mid-step (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed during a run: data, schedule, keys, compiled step, sharding."""

    cfg: TrainConfig
    data: Dataset
    x_test: np.ndarray
    y_test: np.ndarray
    steps_per_epoch: int
    data_key: Array
    step_key: Array
    train_step: Callable
    mesh: Any
    fingerprint: str
    description: str
    log: Callable[[str], None]


def _prepare(model, estimator, data, cfg, optimizer, log) -> tuple[_Run, TrainState]:
    """Check every input, then build the optimiser, the first state and the step."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}.")
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be an eqprop_jax.data.Dataset, got {type(data).__name__}.")
    if optimizer is not None:
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                "optimizer must be an optax.GradientTransformation, got "
                f"{type(optimizer).__name__}."
            )
        if cfg.changed_optimizer_fields():
            raise ValueError(
                "give the optimiser either as `optimizer` or as TrainConfig settings, not both: "
                f"TrainConfig sets {', '.join(cfg.changed_optimizer_fields())}."
            )
    if not isinstance(model, AbstractModel):
        raise TypeError(
            "model must be an eqprop_jax model (a subclass of eqprop_jax.AbstractModel, which "
            f"declares n_outputs, check_input and project), got {type(model).__name__}."
        )
    if not isinstance(estimator, Estimator):
        raise TypeError(
            f"estimator must be an eqprop_jax Estimator, got {type(estimator).__name__}."
        )
    x_test, y_test = data.x_test, data.y_test
    if cfg.eval_limit is not None:
        x_test, y_test = x_test[: cfg.eval_limit], y_test[: cfg.eval_limit]
    spe = steps_per_epoch(len(data.x_train), cfg.batch_size, cfg.max_steps_per_epoch)
    _check_model(model, data, cfg)
    root = jax.random.PRNGKey(cfg.seed)
    params = eqx.filter(model, eqx.is_inexact_array)
    tx = cfg.optimizer_settings(spe) if optimizer is None else optimizer
    opt_state = (tx(params) if isinstance(tx, OptimizerSettings) else tx).init(params)
    # The step donates its buffers: work on copies so the caller's model stays usable.
    model = jtu.tree_map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, model)
    state = TrainState.start(model, opt_state)
    mesh = None
    if jax.process_count() > 1:  # several processes: one global batch over every device
        mesh = distributed.global_mesh()
        if cfg.batch_size % jax.device_count():
            raise ValueError(
                f"batch size {cfg.batch_size} is not divisible by the {jax.device_count()} "
                f"devices of the {jax.process_count()} processes."
            )
        state.place(lambda tree: distributed.replicate_global(tree, mesh))
    elif cfg.shard and len(jax.local_devices()) > 1:
        mesh = batch_mesh()
        if cfg.batch_size % mesh.devices.size:
            raise ValueError(
                f"batch size {cfg.batch_size} is not divisible by the {mesh.devices.size} "
                "local devices; change it or train on one device (`shard=False`)."
            )
        state.place(lambda tree: replicate(tree, mesh))
    else:
        # Committed to one device from the first step on, so that every step (and a
        # resumed run's) sees the same placement and reuses one compilation.
        device = jax.local_devices()[0]
        state.place(lambda tree: jax.device_put(tree, device))
    fingerprint, description = model_fingerprint(state.model)
    # With the batch over several devices, each device runs the estimator on its own
    # slice under shard_map, so its solves compact that slice (jit's GSPMD sharding
    # alone would replicate the compacted buckets: see eqprop_jax.batch_compaction).
    step = make_train_step(
        estimator if mesh is None else PerDevice(estimator, mesh),
        tx,
        augment=cfg.augment,
        channels_first=cfg.channels_first,
    )
    keys = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    run = _Run(cfg, data, x_test, y_test, spe, *keys, step, mesh, fingerprint, description, log)
    return run, state


def _check_model(model, data: Dataset, cfg: TrainConfig) -> None:
    """The model must be finite and able to take the data, before any step."""
    for path, a in jtu.tree_leaves_with_path(eqx.filter(model, eqx.is_inexact_array)):
        if not bool(jnp.all(jnp.isfinite(a))):
            raise ValueError(f"the model's array {jtu.keystr(path)} holds NaN or inf values.")
    if data.num_classes > model.n_outputs:
        raise ValueError(
            f"{data.name} has {data.num_classes} classes but the model has "
            f"{model.n_outputs} outputs."
        )
    model.check_input(
        jnp.asarray(data.x_train[: cfg.batch_size]), jnp.asarray(data.y_train[: cfg.batch_size])
    )


def fit(
    model: AbstractModel,
    estimator: Estimator,
    data: Dataset,
    config: TrainConfig | None = None,
    *,
    optimizer: optax.GradientTransformation | None = None,
    out_dir=None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    run_info: dict | None = None,
) -> TrainResult:
    """Train `model` with `estimator` on `data` and return the trained model.

    The optimiser is built from `config`'s settings, or is `optimizer` (any optax
    transformation; then `config` must leave its optimiser fields at their defaults).
    Each step draws its batch from an epoch order fixed by (seed, epoch) and its
    randomness from fold_in(key, step), so a run resumed from a checkpoint follows
    exactly the same trajectory as an uninterrupted one.

    With `out_dir` (locked against a second run while this one lives), after every
    epoch a row is written to `metrics.jsonl`, the curves to `curves.png`, and a
    finite `checkpoint.npz` atomically. SIGINT/SIGTERM write a checkpoint at the last
    complete step and raise [`Interrupted`][]. A step whose loss, gradients or
    updated state are NaN/inf is not applied and raises [`NonFiniteLoss`][]; test
    accuracy falling back to chance raises [`Collapsed`][]; neither touches the last
    checkpoint. Each epoch's row records the fractions of relaxation phases that
    converged, hit max_steps, diverged or went non-finite; a [`NonFiniteWarning`][]
    is issued for an epoch with non-finite phases.
    """
    config = TrainConfig() if config is None else config
    if not distributed.is_primary():  # process 0 alone writes and logs
        log = _quiet
    run, state = _prepare(model, estimator, data, config, optimizer, log)
    primary_dir = out_dir if distributed.is_primary() else None
    ckpt, metrics = Checkpointer(primary_dir), MetricsWriter(primary_dir, log=log)
    # Every process restores from the shared checkpoint; only process 0 writes it.
    reader = Checkpointer(out_dir)
    history: list[dict] = []
    t_start = time.perf_counter()
    with ckpt, _SignalFlag() as signals:
        if not resume:
            ckpt.refuse_overwrite()
        if resume and reader.exists():
            arrays, info = reader.restore(
                state.arrays,
                fingerprint=run.fingerprint,
                description=run.description,
                expect={
                    "seed": config.seed,
                    "steps_per_epoch": run.steps_per_epoch,
                    "batch_size": config.batch_size,
                },
            )
            state.restore(*arrays, info)
            history = MetricsWriter(out_dir, log=log).read(upto_epoch=state.epoch)
            log(f"resuming from {reader.path}: epoch {state.epoch}, step {state.step}")
        else:
            if resume and out_dir is not None:
                log(f"no checkpoint in {ckpt.folder}; starting a new run")
            if run_info is not None:
                metrics.write_run_info(run_info)
        try:
            for _ in range(state.epoch, config.epochs):
                t_epoch = time.perf_counter()
                _train_epoch(run, state, ckpt, signals)
                row = _epoch_row(run, state, ckpt, signals, t_epoch)
                history.append(row)
                metrics.write(history)
                _check_progress(run, history, ckpt)
                state.next_epoch()
                ckpt.save(state.arrays, _checkpoint_info(run, state))
        finally:
            metrics.plot(history)
    summary = _summary(run, history, state.step, time.perf_counter() - t_start, ckpt.folder)
    log(summary)
    return TrainResult(state.model, state.opt_state, history, summary)


def _quiet(_: str) -> None:
    pass


def _train_epoch(run: _Run, state: TrainState, ckpt: Checkpointer, signals: _SignalFlag) -> None:
    cfg, spe = run.cfg, run.steps_per_epoch
    order = epoch_order(run.data_key, state.epoch, len(run.data.x_train))
    bar = Progress(
        spe, f"epoch {state.epoch + 1}/{cfg.epochs}", enabled=cfg.progress, initial=state.position
    )
    for pos in range(state.position, spe):
        idx = batch_indices(order, pos, cfg.batch_size)
        if jax.process_count() > 1:  # each process loads its own rows of the batch
            idx = idx[distributed.process_rows(cfg.batch_size)]
            batch = distributed.global_batch((run.data.x_train[idx], run.data.y_train[idx]),
                                             run.mesh)
        else:
            batch = (jnp.asarray(run.data.x_train[idx]), jnp.asarray(run.data.y_train[idx]))
            if run.mesh is not None:
                batch = shard_batch(batch, run.mesh)
        key = jax.random.fold_in(run.step_key, state.step)
        state.model, state.opt_state, state.phase_counts, loss, flag = run.train_step(
            state.model, state.opt_state, state.phase_counts, *batch, key
        )
        # One small read per step, so that a refused update stops the run at once.
        loss, flag = jax.device_get((loss, flag))
        if flag:
            bar.close()
            raise NonFiniteLoss(
                f"{REFUSED[int(flag)]} (loss = {float(loss)}) at epoch {state.epoch + 1}, step "
                f"{state.step + 1}: the update was not applied; training stopped and "
                f"{ckpt.last_good()}. Lower the learning rate or β, or check the data."
            )
        state.step, state.position = state.step + 1, pos + 1
        state.loss_sum += float(loss)
        bar.update(loss=float(loss))
        if signals.signum is not None:
            bar.close()
            _interrupt(run, state, ckpt, signals.signum, "")
    bar.close()


def _interrupt(run: _Run, state: TrainState, ckpt: Checkpointer, signum: int, during: str):
    """Checkpoint the state after the last complete step, then raise `Interrupted`."""
    ckpt.save(state.arrays, _checkpoint_info(run, state))
    where = f"; checkpoint written to {ckpt.path}" if ckpt.path is not None else ""
    raise Interrupted(
        f"interrupted by {signal.Signals(signum).name}{during} at epoch {state.epoch + 1}, "
        f"step {state.step}{where} (continue with `resume=True`).",
        signum,
    )


def _epoch_row(
    run: _Run, state: TrainState, ckpt: Checkpointer, signals: _SignalFlag, t_epoch: float
) -> dict:
    """Evaluate, then the metrics row of the epoch that just ended (and its log line).

    A signal during the evaluation checkpoints the end of the epoch's steps (resuming
    evaluates again; `train_time_s` then counts the resumed process only)."""
    cfg = run.cfg
    train_time = time.perf_counter() - t_epoch
    model, mesh = state.model, run.mesh
    if jax.process_count() > 1:
        # Every process evaluates the whole test set on its own first device, from its
        # copy of the replicated model: the same figures everywhere, no collectives.
        model = jtu.tree_map(
            lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, model
        )
        mesh = None
    test = _evaluate(
        model,
        run.x_test,
        run.y_test,
        batch_size=cfg.eval_batch_size,
        solver=cfg.eval_solver,
        mesh=mesh,
        progress=cfg.progress and distributed.is_primary(),
        stop=lambda: signals.signum is not None,
    )
    if test is None:
        _interrupt(run, state, ckpt, signals.signum, " during the evaluation")
    counts = state.take_epoch_counts()
    epoch = state.epoch + 1
    row = {
        "epoch": epoch,
        "step": state.step,
        "train_loss": state.loss_sum / run.steps_per_epoch,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "test_nonfinite": test["nonfinite"],
        **status_fractions(counts),
        "train_time_s": round(train_time, 3),
        "epoch_time_s": round(time.perf_counter() - t_epoch, 3),
    }
    run.log(
        f"epoch {epoch:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
        f"test loss {row['test_loss']:.4f}  test acc {100 * row['test_accuracy']:.2f}%  "
        f"({row['epoch_time_s']:.1f} s)"
    )
    if counts[3]:
        warnings.warn(
            f"epoch {epoch}: {100 * row['phase_nonfinite']:.2f}% of the relaxation phases "
            f"({int(counts[3])} of {int(counts.sum())}) ended with NaN or inf states; their "
            "examples gave no useful gradient.",
            NonFiniteWarning,
            stacklevel=3,
        )
    if test["nonfinite"]:
        warnings.warn(
            f"epoch {epoch}: {100 * test['nonfinite']:.2f}% of the test examples relaxed to NaN "
            "or inf states (counted as wrong).",
            NonFiniteWarning,
            stacklevel=3,
        )
    return row


def _chance_band(run: _Run) -> tuple[float, float, float]:
    """Chance accuracy p = 1/classes and its binomial spread σ on the test examples."""
    p = 1.0 / run.data.num_classes
    return p, math.sqrt(p * (1 - p) / len(run.x_test)), len(run.x_test)


def _check_progress(run: _Run, history: list[dict], ckpt: Checkpointer) -> None:
    """Stop a run whose test accuracy fell back to chance after clearly exceeding it.

    Clearly above: ≥ p + 6σ at some earlier epoch; back at chance: ≤ p + 2σ (p the
    chance level, σ its binomial spread on the test examples; only with ≥ 50 of them).
    """
    p, sigma, n = _chance_band(run)
    if n < 50 or len(history) < 2:
        return
    best = max(r["test_accuracy"] for r in history[:-1])
    last = history[-1]["test_accuracy"]
    if best >= p + 6 * sigma and last <= p + 2 * sigma:
        raise Collapsed(
            f"test accuracy collapsed to chance at epoch {history[-1]['epoch']}: "
            f"{100 * last:.2f}% (chance {100 * p:.1f}%) after {100 * best:.2f}% earlier; "
            f"training stopped and {ckpt.last_good()}. Lower the learning rate."
        )


def _checkpoint_info(run: _Run, state: TrainState) -> dict:
    return {
        **state.counters(),
        "seed": run.cfg.seed,
        # The keys of the data order and of the steps derive from this one.
        "key": np.asarray(jax.random.PRNGKey(run.cfg.seed)).tolist(),
        "batch_size": run.cfg.batch_size,
        "steps_per_epoch": run.steps_per_epoch,
        "fingerprint": run.fingerprint,
        "model": run.description,
    }


def _summary(run: _Run, history, steps, elapsed, out) -> str:
    if not history:
        return f"done: no epoch to run ({steps} steps so far)."
    last = history[-1]
    best = max(history, key=lambda r: r["test_accuracy"])
    p, sigma, n = _chance_band(run)
    if n >= 50 and best["test_accuracy"] <= p + 2 * sigma:
        warnings.warn(
            f"test accuracy stayed at chance level ({100 * best['test_accuracy']:.2f}% at best, "
            f"chance {100 * p:.1f}%): the model did not learn; check the learning rate and the "
            "data.",
            TrainingWarning,
            stacklevel=3,
        )
    where = f"; outputs in {out}" if out is not None else ""
    return (
        f"done: {last['epoch']} epochs, {steps} steps in {elapsed:.1f} s this session; "
        f"test accuracy {100 * last['test_accuracy']:.2f}% "
        f"(best {100 * best['test_accuracy']:.2f}% at epoch {best['epoch']}), "
        f"test loss {last['test_loss']:.4f}{where}"
    )
