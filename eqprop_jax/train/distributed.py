"""Several processes (hosts) training one model: JAX's distributed runtime, data split by process.

The library adds no launcher: each process is started by the user, by SLURM, by
Kubernetes or by any launcher JAX's cluster detection knows, and calls
[`eqprop_jax.train.distributed.initialize`][] before anything else touches JAX.
Then every process holds the same model (same seed), loads only its own rows of
each global batch ([`eqprop_jax.train.distributed.process_rows`][]), and the
jitted training step sees one global batch sharded over every device of every
process ([`eqprop_jax.train.distributed.global_batch`][]): XLA averages the
gradients across processes with its collectives (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: int = 100,
    initialization_timeout: int = 300,
) -> None:
    """Join the distributed runtime (`jax.distributed.initialize`).

    With no arguments, JAX detects the cluster from its environment (SLURM, Open
    MPI, Kubernetes, Cloud TPU, ...). On the CPU backend the cross-process
    collectives are gloo's. `heartbeat_timeout` (seconds) bounds how long the other
    processes wait for one that died before they stop with JAX's "another task
    died" error instead of hanging.
    """
    if (coordinator is None) != (num_processes is None) or (
        num_processes is not None and process_id is None
    ):
        raise ValueError(
            "initialize: give the coordinator address, the number of processes and this "
            "process's id together, or none of them (cluster auto-detection)."
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"initialize: process id {process_id} is outside 0..{num_processes - 1}."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=heartbeat_timeout,
        initialization_timeout=initialization_timeout,
    )


def is_primary() -> bool:
    """True on process 0, the one that writes checkpoints and metrics."""
    return jax.process_index() == 0


def global_mesh() -> Mesh:
    """A one-axis mesh named "batch" over every device of every process."""
    return Mesh(np.array(jax.devices()), ("batch",))


def process_rows(global_batch_size: int) -> slice:
    """The rows of a global batch that this process loads: contiguous, in process order.

    Every process must shuffle with the same key, so that the global batch (and the
    data order) is the one a single process would see.
    """
    n = jax.process_count()
    if global_batch_size % jax.device_count():
        raise ValueError(
            f"a global batch of {global_batch_size} examples cannot be split evenly over "
            f"{jax.device_count()} devices in {n} processes."
        )
    local = global_batch_size // n
    start = jax.process_index() * local
    return slice(start, start + local)


def global_batch(local: PyTree, mesh: Mesh) -> PyTree:
    """One global array per leaf from each process's rows (leading axis), sharded over
    the mesh's "batch" axis."""
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local
    )


def replicate_global(tree: PyTree, mesh: Mesh) -> PyTree:
    """Put identical host values (the same on every process) on every device of the mesh."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(a):
        if isinstance(a, jax.Array | np.ndarray):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
        return a

    return jax.tree_util.tree_map(put, tree)
