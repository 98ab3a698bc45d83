"""Gradient estimators, one file each, one base class."""

from .backprop import Backprop
from .base import Estimator
from .bptt import BPTT
from .continual_ep import ContinualEP
from .contrastive_hebbian import ContrastiveHebbian
from .dtp import DRL, DTP, LDRL, FeedbackLoss, Lee
from .ep import EquilibriumProp
from .losses import cross_entropy
from .phases import phase_results
from .rbp import RecurrentBackprop
from .resistive_ep import ResistiveEP
from .vector_field_ep import VectorFieldEP

__all__ = [
    "BPTT",
    "DRL",
    "DTP",
    "LDRL",
    "Backprop",
    "ContinualEP",
    "ContrastiveHebbian",
    "EquilibriumProp",
    "Estimator",
    "FeedbackLoss",
    "Lee",
    "RecurrentBackprop",
    "ResistiveEP",
    "VectorFieldEP",
    "cross_entropy",
    "phase_results",
]
