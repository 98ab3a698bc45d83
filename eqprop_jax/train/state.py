"""Where a run stands: its device arrays and its position in the epoch schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PyTree

from .statuses import N_STATUSES


@dataclasses.dataclass
class TrainState:
    """The model, the optimiser state and this epoch's phase-status counts (on the
    device), with the counters that place the run in its schedule (on the host).

    `epoch` counts completed epochs, `position` the completed steps of the current
    epoch, `step` all completed steps; `loss_sum` adds the current epoch's step
    losses. Together with the run's seed these fix every later batch and key, which
    is what makes a resumed run follow the uninterrupted one exactly.
    """

    model: Any
    opt_state: PyTree
    phase_counts: Int[Array, " 4"]
    epoch: int = 0
    position: int = 0
    step: int = 0
    loss_sum: float = 0.0

    @classmethod
    def start(cls, model, opt_state) -> TrainState:
        return cls(model, opt_state, jnp.zeros(N_STATUSES, jnp.int32))

    @property
    def arrays(self) -> tuple[Any, PyTree]:
        """What a checkpoint stores as arrays."""
        return self.model, self.opt_state

    def counters(self) -> dict:
        """What a checkpoint stores beside the arrays (JSON-able)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "loss_sum": self.loss_sum,
            "phase_counts": [int(c) for c in jax.device_get(self.phase_counts)],
        }

    def place(self, put: Callable[[PyTree], PyTree]) -> None:
        """Put the device arrays where the steps run (`put` maps a pytree of arrays)."""
        arrays, static = eqx.partition(
            (self.model, self.opt_state, self.phase_counts), eqx.is_array
        )
        self.model, self.opt_state, self.phase_counts = eqx.combine(put(arrays), static)

    def restore(self, model, opt_state, info: dict) -> None:
        """Take the arrays and counters of a checkpoint (arrays already placed)."""
        counts = np.asarray(info.get("phase_counts") or [0] * N_STATUSES, np.int32)
        self.model, self.opt_state = model, opt_state
        self.phase_counts = jax.device_put(counts, self.phase_counts.sharding)
        self.epoch, self.position = int(info["epoch"]), int(info["position"])
        self.step, self.loss_sum = int(info["step"]), float(info["loss_sum"])

    def take_epoch_counts(self) -> np.ndarray:
        """This epoch's phase counts, brought to the host, and a fresh zero count."""
        counts = np.asarray(jax.device_get(self.phase_counts))
        # A fresh count placed like the old one (on one device, a local mesh or every
        # process's devices).
        self.phase_counts = jax.device_put(np.zeros_like(counts), self.phase_counts.sharding)
        return counts

    def next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self.loss_sum = 0.0
