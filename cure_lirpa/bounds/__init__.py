"""Margin lower bounds: the bounded classifier (the one door from a threat to bound space), the
bound methods as backends, SDP-CROWN, patch IBP, and the one door to auto_LiRPA (``lirpa``)."""

from .classifier import BoundedClassifier, certified, margin_matrix

__all__ = ["BoundedClassifier", "certified", "margin_matrix"]
