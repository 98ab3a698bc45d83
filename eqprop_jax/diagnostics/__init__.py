"""Diagnostics: gradient alignment, EP = BPTT traces, EP <-> RBP traces, plots."""

from .alignment import Alignment, AlignmentReport, angle, gradient_alignment

__all__ = ["Alignment", "AlignmentReport", "angle", "gradient_alignment"]
