"""Models from the literature, as equinox Modules."""

from .deq import DEQ
from .energy import EnergyModel
from .hopfield import HopfieldMLP
from .layered import LayeredNet

__all__ = ["DEQ", "EnergyModel", "HopfieldMLP", "LayeredNet"]
