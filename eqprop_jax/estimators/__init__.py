"""Gradient estimators, one file each, one base class."""

from .base import Estimator
from .bptt import BPTT
from .continual_ep import ContinualEP
from .dtp import DTP
from .ep import EquilibriumProp
from .phases import phase_results
from .rbp import RecurrentBackprop
from .resistive_ep import ResistiveEP
from .vector_field_ep import VectorFieldEP

__all__ = [
    "Estimator",
    "phase_results",
    "BPTT",
    "EquilibriumProp",
    "RecurrentBackprop",
    "DTP",
    "ContinualEP",
    "VectorFieldEP",
    "ResistiveEP",
]
