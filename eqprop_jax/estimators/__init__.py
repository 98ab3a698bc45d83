"""Gradient estimators, one file each, one base class."""

from .base import Estimator
from .bptt import BPTT
from .continual_ep import ContinualEP
from .contrastive_hebbian import ContrastiveHebbian
from .dtp import DTP
from .ep import EquilibriumProp
from .losses import cross_entropy
from .phases import phase_results
from .rbp import RecurrentBackprop
from .resistive_ep import ResistiveEP
from .vector_field_ep import VectorFieldEP

__all__ = [
    "BPTT",
    "DTP",
    "ContinualEP",
    "ContrastiveHebbian",
    "EquilibriumProp",
    "Estimator",
    "RecurrentBackprop",
    "ResistiveEP",
    "VectorFieldEP",
    "cross_entropy",
    "phase_results",
]
