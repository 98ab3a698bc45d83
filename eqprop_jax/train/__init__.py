"""Training: optax loop, per-layer learning rates, checkpoints, metrics, sharding."""

from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_fingerprint,
    read_info,
    save_checkpoint,
)
from .loop import (
    Interrupted,
    NonFiniteLoss,
    TrainConfig,
    TrainingError,
    TrainResult,
    evaluate,
    fit,
    make_train_step,
)
from .optim import layer_indices, make_optimizer
from .per_device import PerDevice
from .progress import Progress
from .sharding import batch_mesh, replicate, shard_batch

__all__ = [
    "CheckpointError",
    "Interrupted",
    "NonFiniteLoss",
    "PerDevice",
    "Progress",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "batch_mesh",
    "evaluate",
    "fit",
    "layer_indices",
    "load_checkpoint",
    "make_optimizer",
    "make_train_step",
    "model_fingerprint",
    "read_info",
    "replicate",
    "save_checkpoint",
    "shard_batch",
]
