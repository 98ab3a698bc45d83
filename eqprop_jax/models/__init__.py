"""Models from the literature, as equinox Modules."""

from .base import AbstractEnergyModel, AbstractModel, AbstractVectorFieldModel
from .conv_hopfield import ConvHopfield
from .deq import DEQ
from .fully_connected import FullyConnectedHopfield
from .hopfield import HopfieldMLP
from .layered import LayeredNet
from .resistive import ResistiveNetwork
from .vector_field import VectorFieldMLP

__all__ = [
    "AbstractEnergyModel",
    "AbstractModel",
    "AbstractVectorFieldModel",
    "ConvHopfield",
    "DEQ",
    "FullyConnectedHopfield",
    "HopfieldMLP",
    "LayeredNet",
    "ResistiveNetwork",
    "VectorFieldMLP",
]
