"""Fixed-point solvers: each is one update rule on a flat vector."""

from .anderson import Anderson
from .base import AbstractSolver
from .broyden import Broyden
from .chord import Chord
from .newton import AbstractNewtonSolver, Newton
from .picard import Picard

__all__ = [
    "AbstractNewtonSolver",
    "AbstractSolver",
    "Anderson",
    "Broyden",
    "Chord",
    "Newton",
    "Picard",
]
