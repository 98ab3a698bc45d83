"""The fixed-point core: solving z* = f(z*, θ) or g(z*, θ) = 0 per example, and
differentiating the solution.

- [`fixed_point`][eqprop_jax.fixed_point] and [`root_find`][eqprop_jax.root_find]:
  the solves, with a solver object (`solvers/`) and an adjoint object (`adjoints.py`)
  that owns their derivative.
- `custom_fixed_point` / `custom_root`: implicit differentiation of a user's own solver.
- `ragged_while_loop` / `batch_compaction`: per-example stopping in a batch.
- `Result`, `Solution`, `Stats`: what a solve returns.
"""

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
from .fixed_point import fixed_point
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

__all__ = [
    "AbstractAdjoint",
    "AbstractLinearAdjoint",
    "AbstractNewtonSolver",
    "AbstractSolver",
    "AdjointStats",
    "AlmeidaPineda",
    "Anderson",
    "Broyden",
    "Chord",
    "Implicit",
    "JacobianFree",
    "Neumann",
    "Newton",
    "PhantomGradient",
    "Picard",
    "Result",
    "Solution",
    "Stats",
    "Unrolled",
    "adjoint_probe",
    "batch_compaction",
    "custom_fixed_point",
    "custom_root",
    "fixed_point",
    "ragged_while_loop",
    "root_find",
]
