"""What one training step reports, and the running sums of one pass over an epoch's batches.

Shared by every kind of training the loop of :mod:`cure_lirpa.training.trainer` runs (certified
training, smoothing training); no torch module beyond tensors, no training method named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..vocabulary import UNION


@dataclass
class StepResult:
    """What one step reports for the metrics: the loss (this process's slice), its parts, the clean
    logits (B, K, detached) and the per-norm certified masks (bool (B,))."""

    loss: float
    parts: dict[str, float]
    logits: torch.Tensor
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


class Meter:
    """Running sums of one pass (sample-weighted means of the loss and its parts, correct
    predictions, certified counts per norm).

    ``norms``: the mask names counted, in the order the metrics list them; ``union`` counts the
    samples certified for all of them (when a step reports every one).
    """

    def __init__(self, norms: Sequence[str] = ()) -> None:
        self.norms = tuple(norms)
        self.n = 0
        self.sums: dict[str, float] = {}
        self.correct = 0
        self.cert: dict[str, int] = {}
        self.cert_n = 0

    def add(self, name: str, value: float, b: int) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value * b

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    @property
    def accuracy(self) -> float:
        """Fraction of correct predictions."""
        return self.correct / max(self.n, 1)

    def update(self, res: StepResult, y: torch.Tensor) -> None:
        """Add one step's loss, parts, accuracy and certified counts (``y``: its labels)."""
        b = len(y)
        self.n += b
        self.add("loss", res.loss, b)
        for k, v in res.parts.items():
            self.add(k, v, b)
        self.correct += int((res.logits.argmax(1) == y).sum())
        if res.masks:
            union = torch.ones(b, dtype=torch.bool, device=y.device)
            for norm in self.norms:
                if norm in res.masks:
                    self.cert[norm] = self.cert.get(norm, 0) + int(res.masks[norm].sum())
                    union &= res.masks[norm]
            if self.norms and all(norm in res.masks for norm in self.norms):
                self.cert[UNION] = self.cert.get(UNION, 0) + int(union.sum())
            self.cert_n += b


__all__ = ["Meter", "StepResult"]
