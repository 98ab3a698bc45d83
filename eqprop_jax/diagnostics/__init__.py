"""Diagnostics: gradient alignment, EP = BPTT traces, EP <-> RBP traces, plots."""

from .alignment import Alignment, AlignmentReport, angle, gradient_alignment
from .compare import Comparison, compare_estimators
from .dtp import dtp_alignment, gauss_newton_targets, plot_dtp_alignment, weight_alignment
from .gdu import GDUTrace, gdu_trace
from .rbp_trace import RBPTrace, rbp_equivalence_trace

__all__ = [
    "Alignment",
    "AlignmentReport",
    "angle",
    "gradient_alignment",
    "Comparison",
    "compare_estimators",
    "dtp_alignment",
    "gauss_newton_targets",
    "plot_dtp_alignment",
    "weight_alignment",
    "GDUTrace",
    "gdu_trace",
    "RBPTrace",
    "rbp_equivalence_trace",
]
