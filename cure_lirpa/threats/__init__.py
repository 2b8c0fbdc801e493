"""Threat models: lp balls (l∞, l2, l1) and box families (patches, geometric transformations).

``parse_threat("linf:0.1")`` (or ``"l2:0.5"``, ``"patch:2"``, ``"rotate:30"``...) turns the text form
used by every command into a :class:`Threat`; radii are in [0, 1] pixel units.
"""

from .base import BoxFamily, NormBall, Threat, format_eps, parse_eps, parse_threat

__all__ = ["BoxFamily", "NormBall", "Threat", "format_eps", "parse_eps", "parse_threat"]
