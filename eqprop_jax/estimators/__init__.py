"""Gradient estimators, one file each, one base class."""

from .base import Estimator
from .bptt import BPTT
from .dtp import DTP
from .ep import EquilibriumProp
from .rbp import RecurrentBackprop

__all__ = ["Estimator", "BPTT", "EquilibriumProp", "RecurrentBackprop", "DTP"]
