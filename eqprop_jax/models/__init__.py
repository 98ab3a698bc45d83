"""Models from the literature, as equinox Modules."""

from .deq import DEQ

__all__ = ["DEQ"]
