"""Gradient estimators, one file each, one base class."""

from ._batch import phase_results
from .backprop import Backprop
from .base import Estimator
from .bptt import BPTT
from .continual_ep import ContinualEP
from .dtp import DRL, DTP, LDRL, FeedbackLoss, Lee
from .ep import EquilibriumProp
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
    "Backprop",
    "FeedbackLoss",
    "LDRL",
    "DRL",
    "Lee",
    "ContinualEP",
    "VectorFieldEP",
    "ResistiveEP",
]
