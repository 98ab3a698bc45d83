"""Fixed-point solvers: each is one update rule on a flat vector."""

from .anderson import Anderson
from .base import AbstractSolver
from .broyden import Broyden
from .picard import Picard

__all__ = ["AbstractSolver", "Anderson", "Broyden", "Picard"]
