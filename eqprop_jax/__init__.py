"""eqprop_jax: learning in fixed-point (equilibrium) systems with JAX."""

from importlib import metadata as _metadata

from . import data, train  # the submodules eqp.data and eqp.train
from ._checks import default_tol
from ._ragged import batch_compaction, ragged_while_loop
from ._solution import Result, Solution, Stats
from .adjoints import (
    AbstractAdjoint,
    AbstractLinearAdjoint,
    AdjointStats,
    AlmeidaPineda,
    Implicit,
    JacobianFree,
    Neumann,
    PhantomGradient,
    Unrolled,
    adjoint_probe,
)
from .custom import custom_fixed_point, custom_root
from .diagnostics import gradient_alignment
from .estimators import (
    BPTT,
    ContinualEP,
    EquilibriumProp,
    Estimator,
    RecurrentBackprop,
    VectorFieldEP,
)
from .estimators.dtp import DTP
from .fixed_point import fixed_point
from .models import DEQ, ConvHopfield, HopfieldMLP, VectorFieldMLP
from .regularisation import SpectralRadius, jacobian_frobenius, spectral_radius
from .root_find import root_find
from .solvers import (
    AbstractNewtonSolver,
    AbstractSolver,
    Anderson,
    Broyden,
    Chord,
    Newton,
    Picard,
)

try:
    __version__ = _metadata.version("eqprop_jax")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "data",
    "train",
    "AbstractAdjoint",
    "AbstractLinearAdjoint",
    "adjoint_probe",
    "default_tol",
    "AbstractSolver",
    "AdjointStats",
    "AlmeidaPineda",
    "DEQ",
    "Estimator",
    "Anderson",
    "Broyden",
    "AbstractNewtonSolver",
    "Newton",
    "Chord",
    "Implicit",
    "JacobianFree",
    "Neumann",
    "PhantomGradient",
    "Picard",
    "Result",
    "Solution",
    "Stats",
    "Unrolled",
    "fixed_point",
    "root_find",
    "custom_root",
    "custom_fixed_point",
    "ragged_while_loop",
    "batch_compaction",
    "gradient_alignment",
    "jacobian_frobenius",
    "spectral_radius",
    "SpectralRadius",
    "BPTT",
    "EquilibriumProp",
    "HopfieldMLP",
    "RecurrentBackprop",
    "DTP",
    "ContinualEP",
    "VectorFieldEP",
    "ConvHopfield",
    "VectorFieldMLP",
]
