"""Per-device estimators: each device relaxes and compacts its own slice of the batch."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..estimators.base import Estimator


class PerDevice(Estimator):
    r"""Run `estimator` under `jax.shard_map`: one slice of the batch per device.

    With the batch axis sharded by `jit` alone (GSPMD), the vmapped solves cannot
    compact the batch per device (the gathered buckets would be replicated, see
    [`eqprop_jax.batch_compaction`][]), so a sharded batch steps in lockstep until its
    slowest example converges. Under `shard_map` each device runs the estimator on
    its own B / n examples, so its [`eqprop_jax.ragged_while_loop`][]s compact that
    slice: a device stops working when its own examples have converged.

    Every estimator returns batch means, so the loss and the gradient are averaged
    over the devices with `lax.pmean`, which equals the mean over the whole batch
    (the slices have equal sizes). `aux` entries with a leading batch axis come back
    concatenated over the devices; the others (e.g. the β used) are taken from
    the first device. `key` is the same on every device, as on one device (EP's
    random sign is one draw per batch). `pre_step` (DTP's feedback training) runs
    unsharded, on the whole batch, since its updates are not a plain mean over the
    slices.

    Args:
        estimator: any [`eqprop_jax.Estimator`][].
        mesh: a mesh whose axis `axis` holds the devices (e.g.
            [`eqprop_jax.train.batch_mesh`][]); its size must divide the batch.
        axis: the mesh axis the batch is split over.
    """

    estimator: Estimator
    mesh: Mesh = eqx.field(static=True)
    axis: str = eqx.field(static=True, default="batch")

    def __check_init__(self):
        if not isinstance(self.estimator, Estimator):
            raise TypeError(
                f"PerDevice: `estimator` must be an eqprop_jax Estimator, got "
                f"{type(self.estimator).__name__}."
            )
        if self.axis not in self.mesh.axis_names:
            raise ValueError(
                f"PerDevice: the mesh has axes {self.mesh.axis_names}, not {self.axis!r}."
            )

    def pre_step(self, model: Any, x: Array, y: Array, *, key: PRNGKeyArray | None = None) -> Any:
        return self.estimator.pre_step(model, x, y, key=key)

    def __call__(
        self, model: Any, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        n = self.mesh.shape[self.axis]
        batch = jnp.shape(x)[0]
        if batch % n:
            raise ValueError(
                f"PerDevice: a batch of {batch} examples cannot be split evenly over {n} "
                f"devices; use a batch size divisible by {n}."
            )
        dynamic, static = eqx.partition(model, eqx.is_array)
        has_key = key is not None

        def local(dynamic, x, y, key):
            m = eqx.combine(dynamic, static)
            loss, grads, aux = self.estimator(m, x, y, key=key if has_key else None)
            return lax.pmean(loss, self.axis), lax.pmean(grads, self.axis), aux

        key_arg = key if has_key else jnp.zeros((), jnp.uint32)
        local_x = jax.ShapeDtypeStruct((batch // n,) + jnp.shape(x)[1:], jnp.result_type(x))
        local_y = jax.ShapeDtypeStruct((batch // n,) + jnp.shape(y)[1:], jnp.result_type(y))
        _, _, aux_shape = eqx.filter_eval_shape(
            lambda d, x, y, k: self.estimator(
                eqx.combine(d, static), x, y, key=k if has_key else None
            ),
            dynamic,
            local_x,
            local_y,
            key_arg,
        )
        batched = PartitionSpec(self.axis)
        aux_specs = jax.tree_util.tree_map(
            lambda a: batched if a.ndim >= 1 and a.shape[0] == batch // n else PartitionSpec(),
            aux_shape,
        )
        replicated = PartitionSpec()
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(replicated, batched, batched, replicated),
            out_specs=(replicated, replicated, aux_specs),
            check_vma=False,
        )(dynamic, x, y, key_arg)
