"""A threat set in bound space, and what a bound method returns for it.

:class:`~cure_lirpa.bounds.classifier.BoundedClassifier` is the one place that turns a user's threat (in [0, 1]
pixel units) into a :class:`Region` in the space the bounded graph reads (normalisation folded or
applied, radius scaled, box clipped to the input range). Bound methods (:mod:`cure_lirpa.bounds.backends`)
only ever see regions, so none of them can skip that mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import lirpa


@dataclass(frozen=True)
class Region:
    """An lp ball ``{z : ||z - center||_p <= eps}`` or a box ``[lower, upper]`` in bound space.

    ``center`` (B, *in_shape). Boxes have ``p = inf``, ``lower``/``upper`` (B, *in_shape) and ``eps``
    their largest half-width; lp balls (p = 2 or 1) have no corners.
    """

    center: torch.Tensor
    p: float
    eps: float
    lower: Optional[torch.Tensor] = None
    upper: Optional[torch.Tensor] = None

    @property
    def is_box(self) -> bool:
        return self.p == math.inf

    def __len__(self) -> int:
        return len(self.center)

    def perturbation(self) -> Any:
        """The auto_LiRPA perturbation object of this region."""
        return lirpa.perturbation(self.p, self.eps, self.lower, self.upper)

    def bounded_tensor(self) -> Any:
        """``center`` as an auto_LiRPA ``BoundedTensor`` carrying this region."""
        return lirpa.BoundedTensor(self.center, self.perturbation())


@dataclass
class BoundResult:
    """Lower bounds ``lower`` (B, S) on ``C f(z)`` over a region, and per sample whether the method
    answered with a looser fallback than the one asked for (``fell_back``, bool (B,); e.g.
    alpha-CROWN answered by CROWN where auto_LiRPA 0.3 fails, see :mod:`cure_lirpa.bounds.lirpa`)."""

    lower: torch.Tensor
    fell_back: torch.Tensor

    @staticmethod
    def exact(lower: torch.Tensor) -> BoundResult:
        """A result without fallbacks."""
        return BoundResult(lower, torch.zeros(len(lower), dtype=torch.bool))

    @staticmethod
    def cat(results: list[BoundResult]) -> BoundResult:
        return BoundResult(
            torch.cat([r.lower for r in results]), torch.cat([r.fell_back for r in results])
        )
