"""Helpers shared by the test files: flattening and comparing pytrees, running an
estimator compiled once, random classification batches, and the environment of a
test that starts a Python subprocess, and loading a script or benchmark by path.

pytest puts `tests/` on sys.path (the folder has no `__init__.py`), so a test file
imports these as `from helpers import rel_err`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def flat(tree) -> jax.Array:
    """Every array leaf of `tree`, raveled and concatenated into one vector."""
    return jnp.concatenate([jnp.ravel(jnp.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])


def np_flat(tree) -> np.ndarray:
    """`flat` as a host NumPy array (for boolean masks and NumPy linear algebra)."""
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])


def rel_err(a, b) -> float:
    """‖a − b‖₂ / ‖b‖₂ over all leaves of two pytrees (b the reference), their leaves
    raveled in order (the trees may differ in structure, not in their leaves' sizes)."""
    a, b = np_flat(a), np_flat(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


@eqx.filter_jit
def run_estimator(estimator, model, x, y, key=None):
    """`estimator(model, x, y, key=key)` -> (loss, grads, aux), compiled once per
    estimator and model structure (module level, so the compilations are shared)."""
    return estimator(model, x, y, key=key)


def random_batch(x_shape, n_out, batch, seed=1):
    """Inputs uniform in [0, 1) of shape (batch, *x_shape) and labels in [0, n_out)."""
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return (
        jax.random.uniform(kx, (batch, *tuple(x_shape))),
        jax.random.randint(ky, (batch,), 0, n_out),
    )


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a Python subprocess of a test: CPU only, unbuffered, this
    checkout first on the path, and no inherited XLA_FLAGS but the suite's own
    (conftest's optimisation level; pass more in `extra`)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    kept = [f for f in env.pop("XLA_FLAGS", "").split() if "backend_optimization_level" in f]
    env["XLA_FLAGS"] = " ".join([*kept, extra.pop("XLA_FLAGS", "")]).strip()
    env.update(extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def load_source(folder: str, name: str, monkeypatch):
    """Import `<repo>/<folder>/<name>.py` as `python <folder>/<name>.py` sees it: its
    folder on sys.path (for `_timing`, `_common`), the module registered in
    sys.modules under `_eqprop_<folder>_<name>` (its dataclasses look it up there).
    Both are undone with `monkeypatch` after the test."""
    root = REPO / folder
    monkeypatch.syspath_prepend(str(root))
    spec = importlib.util.spec_from_file_location(f"_eqprop_{folder}_{name}", root / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module
