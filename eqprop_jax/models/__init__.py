"""Models from the literature, as equinox Modules."""

from .conv_hopfield import ConvHopfield
from .deq import DEQ
from .energy import EnergyModel
from .hopfield import HopfieldMLP
from .layered import LayeredNet
from .resistive import ResistiveNetwork
from .vector_field import VectorFieldMLP

__all__ = [
    "DEQ",
    "EnergyModel",
    "HopfieldMLP",
    "ResistiveNetwork",
    "LayeredNet",
    "ConvHopfield",
    "VectorFieldMLP",
]
