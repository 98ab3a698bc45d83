"""eqprop_jax: learning in fixed-point (equilibrium) systems with JAX."""

from importlib import metadata as _metadata

from . import data, train  # the submodules eqp.data and eqp.train
from ._checks import default_tol
from .diagnostics import gradient_alignment
from .equilibrium import (
    AbstractAdjoint,
    AbstractLinearAdjoint,
    AbstractNewtonSolver,
    AbstractSolver,
    AdjointStats,
    AlmeidaPineda,
    Anderson,
    Broyden,
    Chord,
    Implicit,
    JacobianFree,
    Neumann,
    Newton,
    PhantomGradient,
    Picard,
    Result,
    Solution,
    Stats,
    Unrolled,
    adjoint_probe,
    batch_compaction,
    custom_fixed_point,
    custom_root,
    fixed_point,
    ragged_while_loop,
    root_find,
)
from .estimators import (
    BPTT,
    DTP,
    ContinualEP,
    EquilibriumProp,
    Estimator,
    RecurrentBackprop,
    ResistiveEP,
    VectorFieldEP,
)
from .models import (
    DEQ,
    ConvHopfield,
    EnergyModel,
    HopfieldMLP,
    LayeredNet,
    ResistiveNetwork,
    VectorFieldMLP,
)
from .regularisation import SpectralRadius, jacobian_frobenius, spectral_radius

try:
    __version__ = _metadata.version("eqprop_jax")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "data",
    "train",
    "AbstractAdjoint",
    "AbstractLinearAdjoint",
    "AbstractNewtonSolver",
    "AbstractSolver",
    "AdjointStats",
    "AlmeidaPineda",
    "Anderson",
    "BPTT",
    "Broyden",
    "Chord",
    "ContinualEP",
    "ConvHopfield",
    "DEQ",
    "DTP",
    "EnergyModel",
    "EquilibriumProp",
    "Estimator",
    "HopfieldMLP",
    "Implicit",
    "JacobianFree",
    "LayeredNet",
    "Neumann",
    "Newton",
    "PhantomGradient",
    "Picard",
    "RecurrentBackprop",
    "ResistiveEP",
    "ResistiveNetwork",
    "Result",
    "Solution",
    "SpectralRadius",
    "Stats",
    "Unrolled",
    "VectorFieldEP",
    "VectorFieldMLP",
    "adjoint_probe",
    "batch_compaction",
    "custom_fixed_point",
    "custom_root",
    "default_tol",
    "fixed_point",
    "gradient_alignment",
    "jacobian_frobenius",
    "ragged_while_loop",
    "root_find",
    "spectral_radius",
]
