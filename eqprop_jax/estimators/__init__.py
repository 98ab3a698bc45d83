"""Gradient estimators, one file each, one base class."""

from .base import Estimator

__all__ = ["Estimator"]
