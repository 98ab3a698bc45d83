"""Checkpoints of a training run: atomic, finite, locked, refused for another model."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from .errors import CheckpointError, OutputError, TrainingError

try:  # POSIX advisory locks; the kernel drops them when the process dies (even kill -9).
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
FORMAT = "eqprop_jax-checkpoint-1"
CHECKPOINT = "checkpoint.npz"
LOCK = ".lock"


def _array_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    leaves = jtu.tree_leaves_with_path(eqx.filter(tree, eqx.is_array))
    return [(jtu.keystr(p), a) for p, a in leaves]


def model_fingerprint(model: Any) -> tuple[str, str]:
    """A hash of the model's class, structure, static fields and array shapes/dtypes,
    and a short human-readable description of the same."""
    arrays, static = eqx.partition(model, eqx.is_array)
    leaves = jtu.tree_leaves_with_path(arrays)
    spec = [(jtu.keystr(p), tuple(a.shape), str(a.dtype)) for p, a in leaves]
    # Static fields that are functions (activations) print with their memory address,
    # which differs from one process to the next: without it, a run resumed in a new
    # process finds the same fingerprint.
    structure = _ADDRESS.sub("", str(jtu.tree_structure(static)))
    text = f"{type(model).__module__}.{type(model).__qualname__}|{structure}|{spec}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    n = sum(int(np.prod(s)) for _, s, _ in spec)
    shapes = ", ".join(f"{p}{list(s)}" for p, s, _ in spec[:6])
    more = f", ... ({len(spec)} arrays)" if len(spec) > 6 else ""
    return digest, f"{type(model).__name__} with {n} numbers: {shapes}{more}"


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    return np.asarray(a)


def _first_nonfinite(named: list[tuple[str, np.ndarray]]) -> str | None:
    for name, a in named:
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            return name or "(root)"
    return None


def save_checkpoint(path: str | os.PathLike, state: PyTree, info: dict) -> None:
    """Write every array of `state` and the JSON-able `info` to `path`, atomically.

    A state holding NaN or inf is refused ([`CheckpointError`][]): a checkpoint on
    disk is always a finite state. The file is written to `path + ".tmp"`, flushed
    to disk, then moved over `path` with `os.replace`, so a crash at any moment
    leaves either the old or the new checkpoint, never a torn one.
    """
    path = Path(path)
    named = [(name, _to_numpy(a)) for name, a in _array_leaves(state)]
    bad = _first_nonfinite(named)
    if bad is not None:
        raise CheckpointError(
            f"refusing to write {path}: array {bad} of the state holds NaN or inf values; "
            "the previous checkpoint is kept."
        )
    meta = dict(info, format=FORMAT, n_arrays=len(named))
    buf = io.BytesIO()
    np.savez(
        buf,
        __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        **{f"a{i}": a for i, (_, a) in enumerate(named)},
    )
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write the checkpoint {path}: {e.strerror or e}.") from e
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_info(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint (epoch, step, fingerprint, ...)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}.")
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
    except Exception as e:  # noqa: BLE001 - any failure means an unreadable file
        raise CheckpointError(
            f"{path} is not a readable checkpoint: it is corrupt or truncated "
            f"({type(e).__name__}: {e})."
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} is not an eqprop_jax checkpoint (format {fmt}).")
    return meta


def load_checkpoint(
    path: str | os.PathLike,
    template: PyTree,
    *,
    fingerprint: str | None = None,
    description: str = "",
) -> tuple[PyTree, dict]:
    """Restore the arrays of `template` (same structure as the saved state) from `path`.

    `fingerprint` (from [`model_fingerprint`][]) must match the one stored, otherwise
    a [`CheckpointError`][] says which models differ. Arrays keep the template's
    dtype and sharding. A corrupt file, or one holding NaN/inf, is refused.
    """
    path = Path(path)
    meta = read_info(path)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was written for a different model: it holds "
            f"{meta.get('model', '?')} (fingerprint {meta.get('fingerprint')}), but this run "
            f"builds {description or 'another model'} (fingerprint {fingerprint}). Use the same "
            "preset and model options as the run that wrote it, or another `out_dir`."
        )
    arrays, static = eqx.partition(template, eqx.is_array)
    leaves, treedef = jtu.tree_flatten(arrays)
    if meta.get("n_arrays") != len(leaves):
        raise CheckpointError(
            f"checkpoint {path} holds {meta.get('n_arrays')} arrays but this run's state has "
            f"{len(leaves)} (a different optimiser or model?)."
        )
    try:
        with np.load(path) as z:
            stored = [z[f"a{i}"] for i in range(len(leaves))]
    except Exception as e:  # noqa: BLE001 - zip, CRC, header and pickle errors alike
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})."
        ) from e
    bad = _first_nonfinite([(f"array {i}", a) for i, a in enumerate(stored)])
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its {bad} holds NaN or inf values.")
    restored = []
    for i, (a, ref) in enumerate(zip(stored, leaves, strict=True)):
        is_key = jnp.issubdtype(ref.dtype, jax.dtypes.prng_key)
        ref_shape = jax.random.key_data(ref).shape if is_key else ref.shape
        if a.shape != ref_shape:
            raise CheckpointError(
                f"checkpoint {path}: array {i} has shape {a.shape}, this run expects "
                f"{ref_shape} (a different optimiser or model?)."
            )
        if is_key:
            new = jax.random.wrap_key_data(a)
        elif isinstance(ref, jax.Array) and not ref.is_fully_addressable:
            # A multi-process run: every process reads the same file and fills its own
            # devices' part of the global array.
            host = np.asarray(a, ref.dtype)
            new = jax.make_array_from_callback(
                host.shape, ref.sharding, lambda i, host=host: host[i]
            )
        else:
            new = jnp.asarray(a, ref.dtype)
            if isinstance(ref, jax.Array):
                new = jax.device_put(new, ref.sharding)
        restored.append(new)
    return eqx.combine(jtu.tree_unflatten(treedef, restored), static), meta


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Refuse, before any work is done, an output folder that cannot be created or
    written, or that another run holds. Nothing is created on disk."""
    if "\0" in str(folder):
        raise OutputError(f"output folder {str(folder)!r} has a NUL character in its name.")
    try:
        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"output folder {folder} exists and is not a folder.")
        parent = folder
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise OutputError(f"cannot create output folder {folder}: {parent} is not a folder.")
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".eqprop-probe-")
        os.close(fd)
        os.unlink(probe)
    except OutputError:
        raise
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise OutputError(f"cannot write to output folder {folder} ({why}).") from e
    if (folder / LOCK).exists():
        _RunLock(folder).acquire().release()
    return folder


class _RunLock:
    """An exclusive advisory lock on `folder/.lock`, holding the owner's process id."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.file = None

    def acquire(self) -> _RunLock:
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise OutputError(f"cannot create the lock file {self.path}: {e.strerror}.") from e
        if fcntl is None:
            return self
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self.file.seek(0)
            owner = self.file.read().strip() or "?"
            self.file.close()
            self.file = None
            raise OutputError(
                f"another run (process {owner}) is writing to {self.path.parent}; wait for it "
                "to end or choose another `out_dir`. Nothing was written."
            ) from e
        except OSError:  # a file system without locks (some network mounts): unlocked
            pass
        return self

    def claim(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            if fcntl is not None:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


class Checkpointer:
    """The checkpoint of one run in `folder` (or nothing at all when `folder` is None).

    As a context manager it creates the folder and holds a lock on it, so a second
    run into the same folder is refused while this one lives (the lock goes with the
    process, kill -9 included). `save` writes atomically and only finite states;
    `restore` checks that the file belongs to this model and these settings.
    """

    def __init__(self, folder: str | os.PathLike | None, name: str = CHECKPOINT):
        self.folder = None if folder is None else Path(folder).expanduser()
        self.path = None if folder is None else self.folder / name
        self._lock: _RunLock | None = None

    def __enter__(self) -> Checkpointer:
        if self.folder is not None:
            check_output_folder(self.folder)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except (OSError, ValueError) as e:
                why = getattr(e, "strerror", None) or str(e)
                raise OutputError(f"cannot create output folder {self.folder}: {why}.") from e
            self._lock = _RunLock(self.folder).acquire()
            self._lock.claim()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def exists(self) -> bool:
        return self.path is not None and self.path.exists()

    def refuse_overwrite(self) -> None:
        """A new run must not replace another run's checkpoint."""
        if self.exists():
            try:
                info = read_info(self.path)
                what = f"a checkpoint (epoch {info.get('epoch')}, step {info.get('step')})"
            except CheckpointError as e:
                what = f"a checkpoint that cannot be read ({e})"
            raise TrainingError(
                f"{self.folder} already holds {what}; pass `resume=True` to continue that "
                "run, or choose another `out_dir`. Nothing was overwritten."
            )

    def save(self, state: PyTree, info: dict) -> None:
        if self.path is not None:
            save_checkpoint(self.path, state, info)

    def restore(
        self,
        template: PyTree,
        *,
        fingerprint: str,
        description: str,
        expect: Mapping[str, Any],
    ) -> tuple[PyTree, dict]:
        """The state saved in this run's checkpoint; `expect` lists the settings
        (seed, batch size, ...) that must equal those of the run that wrote it."""
        state, info = load_checkpoint(
            self.path, template, fingerprint=fingerprint, description=description
        )
        for key, want in expect.items():
            if info.get(key) != want:
                raise CheckpointError(
                    f"checkpoint {self.path} was written by a run with {key} {info.get(key)}; "
                    f"this run has {key} {want}. Resume with `{key}={info.get(key)}`, or "
                    "choose another `out_dir`."
                )
        return state, info

    def last_good(self) -> str:
        """Which checkpoint a stopped run leaves behind, for its error message."""
        if not self.exists():
            return "no checkpoint was written"
        try:
            epoch = read_info(self.path).get("epoch")
        except CheckpointError:
            epoch = "?"
        return f"the last good checkpoint {self.path} (epoch {epoch}) is kept"
