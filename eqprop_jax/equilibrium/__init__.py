"""The fixed-point core: solving z* = f(z*, θ) or g(z*, θ) = 0 per example, and
differentiating the solution.

- [`fixed_point`][eqprop_jax.fixed_point] and [`root_find`][eqprop_jax.root_find]:
  the solves, with a solver object (`solvers/`) and an adjoint object (`adjoints.py`)
  that owns their derivative.
- Linear solvers (`linear_solvers.py`): BiCGStab, GMRES, NormalCG, Richardson, the
  objects an implicit adjoint solves its linear systems with.
- `custom_fixed_point` / `custom_root`: implicit differentiation of a user's own solver.
- `ragged_while_loop` / `batch_compaction`: per-example stopping in a batch.
- `Result`, `Solution`, `Stats`: what a solve returns.

Everything the rest of the package uses from the core is exported here; the
underscored modules are the core's own.
"""

from ._ragged import BATCH_BUCKETS, batch_compaction, ragged_while_loop
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
from .linear_solvers import GMRES, AbstractLinearSolver, BiCGStab, NormalCG, Richardson
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
    "BATCH_BUCKETS",
    "AbstractAdjoint",
    "AbstractLinearAdjoint",
    "AbstractLinearSolver",
    "AbstractNewtonSolver",
    "AbstractSolver",
    "AdjointStats",
    "AlmeidaPineda",
    "Anderson",
    "BiCGStab",
    "Broyden",
    "Chord",
    "GMRES",
    "Implicit",
    "JacobianFree",
    "Neumann",
    "Newton",
    "NormalCG",
    "PhantomGradient",
    "Picard",
    "Result",
    "Richardson",
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
