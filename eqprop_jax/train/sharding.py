"""Data parallelism over local devices: parameters replicated, batch axis sharded."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


def batch_mesh(devices=None) -> Mesh:
    """A one-axis mesh named "batch" over `devices` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.array(devices), ("batch",))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Put every array of `tree` on all devices of `mesh` (a full copy on each)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, sharding) if isinstance(a, jax.Array | np.ndarray) else a, tree
    )


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
    """Split the leading (batch) axis of every array of `tree` across the mesh's devices.

    Under `jit` the estimator then runs on each device's slice and XLA inserts the
    cross-device reductions for the batch-mean loss and gradients (GSPMD).
    """
    n = mesh.devices.size
    sharding = NamedSharding(mesh, PartitionSpec("batch"))

    def put(a):
        if a.shape[0] % n:
            raise ValueError(
                f"batch of {a.shape[0]} examples cannot be split evenly over {n} devices; "
                f"use a batch size divisible by {n}."
            )
        return jax.device_put(a, sharding)

    return jax.tree_util.tree_map(put, tree)
