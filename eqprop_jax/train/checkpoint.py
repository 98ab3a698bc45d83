"""Atomic checkpoints of a training run, refused when they belong to another model."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

FORMAT = "eqprop_jax-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to a different model or optimiser."""


def _array_leaves(tree: PyTree) -> list:
    return jtu.tree_leaves(eqx.filter(tree, eqx.is_array))


def model_fingerprint(model: Any) -> tuple[str, str]:
    """A hash of the model's class, structure, static fields and array shapes/dtypes,
    and a short human-readable description of the same."""
    arrays, static = eqx.partition(model, eqx.is_array)
    leaves = jtu.tree_leaves_with_path(arrays)
    spec = [(jtu.keystr(p), tuple(a.shape), str(a.dtype)) for p, a in leaves]
    text = (
        f"{type(model).__module__}.{type(model).__qualname__}|{jtu.tree_structure(static)}|{spec}"
    )
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    n = sum(int(np.prod(s)) for _, s, _ in spec)
    shapes = ", ".join(f"{p}{list(s)}" for p, s, _ in spec[:6])
    more = f", ... ({len(spec)} arrays)" if len(spec) > 6 else ""
    return digest, f"{type(model).__name__} with {n} numbers: {shapes}{more}"


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    return np.asarray(a)


def save_checkpoint(path: str | os.PathLike, state: PyTree, info: dict) -> None:
    """Write every array of `state` and the JSON-able `info` to `path`, atomically.

    The file is written to `path + ".tmp"`, flushed to disk, then moved over `path`
    with `os.replace`, so a crash at any moment leaves either the old or the new
    checkpoint, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = [_to_numpy(a) for a in _array_leaves(state)]
    meta = dict(info, format=FORMAT, n_arrays=len(leaves))
    buf = io.BytesIO()
    np.savez(
        buf,
        __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        **{f"a{i}": a for i, a in enumerate(leaves)},
    )
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}.")
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
    except Exception as e:  # noqa: BLE001 - any failure means an unreadable file
        raise CheckpointError(f"{path} is not a readable checkpoint ({e}).") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an eqprop_jax checkpoint (format {meta.get('format')})."
        )
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
    dtype and sharding.
    """
    meta = read_info(path)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was written for a different model: it holds "
            f"{meta.get('model', '?')} (fingerprint {meta.get('fingerprint')}), but this run "
            f"builds {description or 'another model'} (fingerprint {fingerprint}). Use the same "
            "preset and model options as the run that wrote it, or another --out folder."
        )
    arrays, static = eqx.partition(template, eqx.is_array)
    leaves, treedef = jtu.tree_flatten(arrays)
    if meta["n_arrays"] != len(leaves):
        raise CheckpointError(
            f"checkpoint {path} holds {meta['n_arrays']} arrays but this run's state has "
            f"{len(leaves)} (a different optimiser or model?)."
        )
    restored = []
    with np.load(path) as z:
        for i, ref in enumerate(leaves):
            a = z[f"a{i}"]
            is_key = jnp.issubdtype(ref.dtype, jax.dtypes.prng_key)
            ref_shape = jax.random.key_data(ref).shape if is_key else ref.shape
            if a.shape != ref_shape:
                raise CheckpointError(
                    f"checkpoint {path}: array {i} has shape {a.shape}, this run expects "
                    f"{ref_shape} (a different optimiser or model?)."
                )
            new = jax.random.wrap_key_data(a) if is_key else jnp.asarray(a, ref.dtype)
            if isinstance(ref, jax.Array) and not is_key:
                new = jax.device_put(new, ref.sharding)
            restored.append(new)
    return eqx.combine(jtu.tree_unflatten(treedef, restored), static), meta
