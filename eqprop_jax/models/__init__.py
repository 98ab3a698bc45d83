"""Models from the literature, as equinox Modules."""

from .deq import DEQ
from .energy import EnergyModel
from .hopfield import HopfieldMLP
from .layered import LayeredNet
from .resistive import ResistiveNetwork

__all__ = ["DEQ", "EnergyModel", "HopfieldMLP", "ResistiveNetwork", "LayeredNet"]
