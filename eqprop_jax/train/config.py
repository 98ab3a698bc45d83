"""The settings of a training run, checked when they are built."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .optim import OptimizerSettings, check_learning_rate, check_optimizer_settings

# The fields that describe the optimiser; `fit(..., optimizer=tx)` replaces them.
OPTIMIZER_FIELDS = (
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "frozen",
)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a run (see [`make_optimizer`][] for the optimiser fields).

    `max_steps_per_epoch` and `eval_limit` shorten epochs and evaluation for quick
    checks; `eval_solver` overrides the model's own relaxation at evaluation;
    `augment` applies random crop and flip (NHWC images, NCHW with `channels_first`);
    `shard` spreads each batch over all local devices when there is more than one.
    `progress`: None (default) draws a progress bar on a terminal and, when stderr is
    a file or a pipe, writes its line once a minute; False is silent.
    Every value is checked here, so a bad setting fails before any data is touched.
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
            if not _is_int(v) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}.")
        for name in ("max_steps_per_epoch", "eval_limit"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(
                    f"TrainConfig.{name} must be None or a positive integer, got {v!r}"
                    + (" (nothing would be evaluated)." if name == "eval_limit" else ".")
                )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(
                f"TrainConfig.seed must be an integer in [0, 2**32), got {self.seed!r}."
            )
        if not _is_int(self.warmup_epochs) or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"TrainConfig.warmup_epochs must be an integer in [0, epochs = {self.epochs}), "
                f"got {self.warmup_epochs!r}."
            )
        check_learning_rate(self.lr, "TrainConfig.lr")
        check_optimizer_settings(
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            frozen=self.frozen,
            who="TrainConfig.",
        )
        for name in ("augment", "channels_first", "shard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False.")

    def optimizer_settings(self, steps_per_epoch: int) -> OptimizerSettings:
        """The optimiser these settings describe, for runs of `steps_per_epoch` steps."""
        return OptimizerSettings.of(
            self.lr,
            optimizer=self.optimizer,
            momentum=float(self.momentum),
            weight_decay=float(self.weight_decay),
            schedule=self.schedule,
            total_steps=self.epochs * steps_per_epoch if self.schedule != "constant" else None,
            warmup_steps=self.warmup_epochs * steps_per_epoch,
            frozen=self.frozen,
        )

    def changed_optimizer_fields(self) -> list[str]:
        """The optimiser fields set to something else than their defaults."""
        default = TrainConfig()
        return [f for f in OPTIMIZER_FIELDS if getattr(self, f) != getattr(default, f)]
