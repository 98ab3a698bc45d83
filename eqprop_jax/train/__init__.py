"""Training: optax loop, per-layer learning rates, checkpoints, metrics, sharding."""

from .checkpoint import (
    Checkpointer,
    check_output_folder,
    load_checkpoint,
    model_fingerprint,
    read_info,
    save_checkpoint,
)
from .config import TrainConfig
from .errors import (
    CheckpointError,
    Collapsed,
    Interrupted,
    NonFiniteLoss,
    NonFiniteWarning,
    OutputError,
    TrainingError,
    TrainingWarning,
)
from .evaluate import evaluate
from .loop import TrainResult, fit
from .metrics import MetricsWriter, plot_curves
from .optim import OptimizerSettings, layer_indices, make_optimizer
from .per_device import PerDevice
from .progress import Progress
from .sharding import batch_mesh, replicate, shard_batch
from .state import TrainState
from .statuses import count_statuses, phase_statuses, status_fractions
from .step import make_train_step

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "Collapsed",
    "Interrupted",
    "MetricsWriter",
    "NonFiniteLoss",
    "NonFiniteWarning",
    "OptimizerSettings",
    "OutputError",
    "PerDevice",
    "Progress",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingError",
    "TrainingWarning",
    "batch_mesh",
    "check_output_folder",
    "count_statuses",
    "evaluate",
    "fit",
    "layer_indices",
    "load_checkpoint",
    "make_optimizer",
    "make_train_step",
    "model_fingerprint",
    "phase_statuses",
    "plot_curves",
    "read_info",
    "replicate",
    "save_checkpoint",
    "shard_batch",
    "status_fractions",
]
