"""Models from the literature, as equinox Modules."""

from .deq import DEQ
from .energy import EnergyModel

__all__ = ["DEQ", "EnergyModel"]
