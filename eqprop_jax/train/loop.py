"""The training loop: any estimator, optax updates, evaluation, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._ragged import batch_compaction
from ..data import Dataset
from ..data.batching import batch_indices, epoch_order, random_crop_flip, steps_per_epoch
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_fingerprint,
    read_info,
    save_checkpoint,
)
from .optim import make_optimizer
from .progress import Progress
from .sharding import batch_mesh, replicate, shard_batch

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what was kept on disk."""


class NonFiniteLoss(TrainingError):
    """The loss or the gradients became NaN or infinite."""


class Interrupted(TrainingError):
    """SIGINT/SIGTERM arrived; a checkpoint of the state at the last full step was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a run (see [`make_optimizer`][] for the optimiser fields).

    `max_steps_per_epoch` and `eval_limit` shorten epochs and evaluation for quick
    checks; `eval_solver` overrides the model's own relaxation at evaluation;
    `augment` applies random crop and flip (NHWC images, NCHW with `channels_first`);
    `shard` spreads each batch over all local devices when there is more than one.
    """

    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    lr: float | Sequence[float] | Mapping[str, float] = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: int = 0
    frozen: str | None = None
    augment: bool = False
    channels_first: bool = False
    eval_batch_size: int = 500
    eval_solver: Any = None
    max_steps_per_epoch: int | None = None
    eval_limit: int | None = None
    shard: bool = True
    progress: bool | None = None

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}.")


@dataclasses.dataclass
class TrainResult:
    model: Any
    opt_state: PyTree
    history: list[dict]
    summary: str


def _tree_all_finite(tree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _project(model):
    """Keep a model in its admissible set after an update (e.g. conductances >= 0)."""
    for name in ("project", "clip_conductances"):
        fn = getattr(model, name, None)
        if callable(fn):
            return fn()
    return model


def _fill_missing(grads: PyTree, params: PyTree) -> PyTree:
    """Zeros where an estimator returns no gradient for a trainable array."""
    return jtu.tree_map(
        lambda p, g: g if p is None or g is not None else jnp.zeros_like(p),
        params,
        grads,
        is_leaf=lambda x: x is None,
    )


class _StepSpec(eqx.Module):
    """What a training step closes over; hashable, so equal specs share one compilation."""

    estimator: Any
    tx: Any = eqx.field(static=True)
    augment: bool = eqx.field(static=True)
    channels_first: bool = eqx.field(static=True)
    compaction: bool = eqx.field(static=True, default=True)


@eqx.filter_jit(donate="all-except-first")
def _train_step(spec: _StepSpec, model, opt_state, x, y, key):
    with batch_compaction(spec.compaction):  # static, so part of the jit cache key
        return _train_step_body(spec, model, opt_state, x, y, key)


def _train_step_body(spec: _StepSpec, model, opt_state, x, y, key):
    estimator = spec.estimator
    k_aug, k_pre, k_est = jax.random.split(key, 3)
    if spec.augment:
        x = random_crop_flip(k_aug, x, channels_first=spec.channels_first)
    new = estimator.pre_step(model, x, y, key=k_pre)
    loss, grads, _ = estimator(new, x, y, key=k_est)
    params = eqx.filter(new, eqx.is_inexact_array)
    grads = _fill_missing(grads, params)
    ok = jnp.isfinite(loss) & _tree_all_finite(grads) & _tree_all_finite(params)
    updates, new_opt = spec.tx.update(grads, opt_state, params)
    new = _project(eqx.apply_updates(new, updates))
    keep = lambda a, b: jnp.where(ok, a, b) if eqx.is_array(a) else a
    model = jtu.tree_map(keep, new, model)
    opt_state = jtu.tree_map(keep, new_opt, opt_state)
    return model, opt_state, loss, ok


def make_train_step(
    estimator,
    tx,
    *,
    augment: bool = False,
    channels_first: bool = False,
    compaction: bool = True,
) -> Callable:
    """`model, opt_state, loss, ok = step(model, opt_state, x, y, key)`, jitted once.

    One step: the estimator's `pre_step` (e.g. DTP's feedback training), the
    gradient estimate, the optax update, then projection onto the model's admissible
    set. If the loss or any gradient is NaN/inf the old model and optimiser state are
    returned unchanged and `ok` is False. The model, optimiser state and batch are
    donated (the caller must not reuse them). `compaction=False` steps vmapped
    solves in lockstep (see [`eqprop_jax.batch_compaction`][]): what a batch
    sharded over several devices needs.
    """
    spec = _StepSpec(estimator, tx, augment, channels_first, compaction)
    return lambda model, opt_state, x, y, key: _train_step(spec, model, opt_state, x, y, key)


# Optimisers by settings and parameter layout: the same settings give the same `tx`
# object, so a resumed or repeated run in one process reuses the compiled step.
_TX_CACHE: dict = {}


def _optimizer(params, cfg: TrainConfig, total_steps: int, spe: int):
    leaves = jtu.tree_leaves_with_path(params)
    layout = (
        jtu.tree_structure(params),
        tuple((jtu.keystr(p), a.shape, str(a.dtype)) for p, a in leaves),
    )
    lr = cfg.lr if not isinstance(cfg.lr, Mapping) else tuple(cfg.lr.items())
    lr = tuple(lr) if isinstance(lr, list) else lr
    settings = (
        lr,
        cfg.optimizer,
        cfg.momentum,
        cfg.weight_decay,
        cfg.schedule,
        total_steps if cfg.schedule != "constant" else None,
        cfg.warmup_epochs * spe,
        cfg.frozen,
    )
    key = (layout, settings)
    if key not in _TX_CACHE:
        if len(_TX_CACHE) > 32:
            _TX_CACHE.clear()
        _TX_CACHE[key] = make_optimizer(
            params,
            lr=cfg.lr,
            optimizer=cfg.optimizer,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            schedule=cfg.schedule,
            total_steps=total_steps,
            warmup_steps=cfg.warmup_epochs * spe,
            frozen=cfg.frozen,
        )
    return _TX_CACHE[key]


def _predict_one(model, x, y, solver):
    """Class scores and loss of one example at the model's free equilibrium."""
    relax = getattr(model, "relax", None)
    if relax is None:
        logits = model(x)
        logp = jax.nn.log_softmax(logits)
        return logits, -logp[y]
    sol = relax(x, y, 0.0) if solver is None else relax(x, y, 0.0, solver=solver)
    return model.predict(sol.value), model.loss(sol.value, y)


def _eval_counts(model, x, y, mask, solver):
    logits, loss = jax.vmap(_predict_one, in_axes=(None, 0, 0, None))(model, x, y, solver)
    correct = (jnp.argmax(jnp.real(logits), axis=-1) == y) & mask
    return jnp.sum(correct), jnp.sum(jnp.where(mask, jnp.real(loss), 0.0))


@eqx.filter_jit
def _eval_batch(model, x, y, mask, solver, compaction: bool):
    with batch_compaction(compaction):  # a Python bool: static, in the cache key
        return _eval_counts(model, x, y, mask, solver)


def evaluate(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 500,
    solver: Any = None,
    mesh=None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Accuracy and mean loss over (x, y), each example relaxed by the model itself
    (`model.relax(x, y, beta=0)` then `predict`; plain `model(x)` for feedforward nets).

    Batches have one static shape (the last one is padded and masked), so this
    compiles once.
    """
    n = len(x)
    if mesh is not None:
        d = mesh.devices.size
        batch_size = max(d, batch_size // d * d)
    batch_size = min(batch_size, n) if mesh is None else batch_size
    correct, total_loss = 0, 0.0
    bar = Progress(math.ceil(n / batch_size), "eval", enabled=progress)
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        m = len(xb)
        mask = np.arange(batch_size) < m
        if m < batch_size:
            xb = np.concatenate([xb, np.repeat(xb[:1], batch_size - m, 0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], batch_size - m, 0)])
        batch = (jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(mask))
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        # A sharded batch is stepped in lockstep: see eqprop_jax.batch_compaction.
        c, s = _eval_batch(model, *batch, solver, mesh is None)
        correct += int(c)
        total_loss += float(s)
        bar.update()
    bar.close()
    return {"accuracy": correct / n, "loss": total_loss / n}


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


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fit(
    model: Any,
    estimator: Any,
    data: Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    run_info: dict | None = None,
) -> TrainResult:
    """Train `model` with `estimator` on `data` and return the trained model.

    Each step draws its batch from an epoch order fixed by (seed, epoch) and its
    randomness from fold_in(key, step), so a run resumed from a checkpoint follows
    exactly the same trajectory as an uninterrupted one. With `out_dir`, after every
    epoch a metrics line is appended to `metrics.jsonl` and `checkpoint.npz` is
    rewritten atomically; SIGINT/SIGTERM write a checkpoint at the last complete step
    and raise [`Interrupted`][]. A NaN/inf loss raises [`NonFiniteLoss`][] without
    touching the last checkpoint.
    """
    cfg = config
    x_train, y_train = data.x_train, data.y_train
    x_test, y_test = data.x_test, data.y_test
    if cfg.eval_limit is not None:
        x_test, y_test = x_test[: cfg.eval_limit], y_test[: cfg.eval_limit]
    check = getattr(model, "check_input", None)
    if callable(check):
        check(jnp.asarray(x_train[: cfg.batch_size]), jnp.asarray(y_train[: cfg.batch_size]))

    n = len(x_train)
    spe = steps_per_epoch(n, cfg.batch_size, cfg.max_steps_per_epoch)
    total_steps = cfg.epochs * spe
    root = jax.random.PRNGKey(cfg.seed)
    data_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)

    params = eqx.filter(model, eqx.is_inexact_array)
    tx = _optimizer(params, cfg, total_steps, spe)
    opt_state = tx.init(params)
    # The step donates its buffers: work on copies so the caller's model stays usable.
    model = jtu.tree_map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, model)

    mesh = None
    if cfg.shard and len(jax.local_devices()) > 1:
        mesh = batch_mesh()
        if cfg.batch_size % mesh.devices.size:
            raise ValueError(
                f"batch size {cfg.batch_size} is not divisible by the {mesh.devices.size} "
                "local devices; change it or train on one device (shard=False)."
            )
        model, opt_state = replicate((model, opt_state), mesh)

    fingerprint, description = model_fingerprint(model)
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / CHECKPOINT if out is not None else None
    start_epoch, position, step, loss_sum, history = 0, 0, 0, 0.0, []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt.exists() and not resume:
            info = read_info(ckpt)
            raise TrainingError(
                f"{out} already holds a checkpoint (epoch {info.get('epoch')}, step "
                f"{info.get('step')}); pass --resume to continue that run, or choose another "
                "--out folder. Nothing was overwritten."
            )
        if resume and ckpt.exists():
            (model, opt_state), info = load_checkpoint(
                ckpt, (model, opt_state), fingerprint=fingerprint, description=description
            )
            if info.get("seed") != cfg.seed:
                raise CheckpointError(
                    f"checkpoint {ckpt} was written by a run with seed {info.get('seed')}; this "
                    f"run has seed {cfg.seed}. Resume with --seed {info.get('seed')}."
                )
            if info.get("steps_per_epoch") != spe or info.get("batch_size") != cfg.batch_size:
                raise CheckpointError(
                    f"checkpoint {ckpt} was written with {info.get('steps_per_epoch')} steps of "
                    f"{info.get('batch_size')} examples per epoch; this run has {spe} of "
                    f"{cfg.batch_size}. Resume with the same settings."
                )
            start_epoch, position = info["epoch"], info["position"]
            step, loss_sum = info["step"], info["loss_sum"]
            history = [r for r in _read_metrics(out / METRICS) if r["epoch"] <= start_epoch]
            log(f"resuming from {ckpt}: epoch {start_epoch}, step {step}")
        elif resume:
            log(f"no checkpoint in {out}; starting a new run")
        if run_info is not None and not (resume and ckpt.exists()):
            (out / "run.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")

    def checkpoint(epoch, pos):
        if ckpt is None:
            return
        save_checkpoint(
            ckpt,
            (model, opt_state),
            {
                "epoch": epoch,
                "position": pos,
                "step": step,
                "loss_sum": loss_sum,
                "seed": cfg.seed,
                # The keys of the data order and of the steps derive from this one.
                "key": np.asarray(root).tolist(),
                "batch_size": cfg.batch_size,
                "steps_per_epoch": spe,
                "fingerprint": fingerprint,
                "model": description,
            },
        )

    # A batch sharded by jit would get its compacted buckets replicated on every
    # device: step it in lockstep instead (see eqprop_jax.batch_compaction).
    train_step = make_train_step(
        estimator,
        tx,
        augment=cfg.augment,
        channels_first=cfg.channels_first,
        compaction=mesh is None,
    )
    t_start = time.perf_counter()
    with _SignalFlag() as flag:
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            order = epoch_order(data_key, epoch, n)
            bar = Progress(spe, f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress)
            bar.update(position)
            for pos in range(position, spe):
                idx = batch_indices(order, pos, cfg.batch_size)
                batch = (jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
                if mesh is not None:
                    batch = shard_batch(batch, mesh)
                key = jax.random.fold_in(step_key, step)
                model, opt_state, loss, ok = train_step(model, opt_state, *batch, key)
                loss = float(loss)
                if not bool(ok):
                    bar.close()
                    kept = (
                        f"the last good checkpoint {ckpt} (epoch {_ckpt_epoch(ckpt)}) is kept"
                        if ckpt is not None and ckpt.exists()
                        else "no checkpoint was written"
                    )
                    raise NonFiniteLoss(
                        f"non-finite loss or gradient (loss = {loss}) at epoch {epoch + 1}, "
                        f"step {step + 1}; training stopped and {kept}. Lower the learning "
                        "rate or β, or check the data."
                    )
                step += 1
                loss_sum += loss
                bar.update(loss=loss)
                if flag.signum is not None:
                    bar.close()
                    checkpoint(epoch, pos + 1)
                    where = f"; checkpoint written to {ckpt}" if ckpt is not None else ""
                    raise Interrupted(
                        f"interrupted by {signal.Signals(flag.signum).name} at epoch {epoch + 1}, "
                        f"step {step}{where} (continue with --resume).",
                        flag.signum,
                    )
            bar.close()
            train_time = time.perf_counter() - t_epoch
            metrics = evaluate(
                model,
                x_test,
                y_test,
                batch_size=cfg.eval_batch_size,
                solver=cfg.eval_solver,
                mesh=mesh,
                progress=cfg.progress,
            )
            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": loss_sum / spe,
                "test_loss": metrics["loss"],
                "test_accuracy": metrics["accuracy"],
                "train_time_s": round(train_time, 3),
                "epoch_time_s": round(time.perf_counter() - t_epoch, 3),
            }
            history.append(row)
            log(
                f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
                f"test loss {row['test_loss']:.4f}  test acc {100 * row['test_accuracy']:.2f}%  "
                f"({row['epoch_time_s']:.1f} s)"
            )
            position, loss_sum = 0, 0.0
            if out is not None:
                _write_metrics(out / METRICS, history)
            checkpoint(epoch + 1, 0)
    elapsed = time.perf_counter() - t_start
    summary = _summary(history, step, elapsed, out)
    log(summary)
    return TrainResult(model, opt_state, history, summary)


def _ckpt_epoch(ckpt: Path) -> Any:
    try:
        return read_info(ckpt).get("epoch")
    except CheckpointError:
        return "?"


def _summary(history, steps, elapsed, out) -> str:
    if not history:
        return f"done: no epoch to run ({steps} steps so far)."
    last = history[-1]
    best = max(history, key=lambda r: r["test_accuracy"])
    where = f"; outputs in {out}" if out is not None else ""
    return (
        f"done: {last['epoch']} epochs, {steps} steps in {elapsed:.1f} s this session; "
        f"test accuracy {100 * last['test_accuracy']:.2f}% "
        f"(best {100 * best['test_accuracy']:.2f}% at epoch {best['epoch']}), "
        f"test loss {last['test_loss']:.4f}{where}"
    )
