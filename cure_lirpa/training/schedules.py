"""Training schedules: eps ramp, natural-loss share kappa, CROWN-IBP beta, learning-rate decay.

Every schedule is a pure function of ``(step, config)`` -- no state -- so a resumed run sees exactly
the values it would have seen without interruption. ``step`` may be a float (e.g. a fractional epoch)
and counts in whatever unit the :class:`Ramp` was given in (optimizer steps or epochs).

The eps ramp follows Gowal et al. (IBP): ``warmup`` steps at eps 0 (natural training), then a ramp of
``length`` steps from 0 to ``eps_max``, then constant. The *smoothed* ramp is the polynomial
``A * t**degree`` up to ``t = mid`` of the ramp (degree 4, mid 0.25 by default) and then the straight
line tangent to it at ``mid`` that reaches 1 at ``t = 1``; value and slope are continuous at ``mid``.
With ``f(t) = A t^d`` and tangent ``f(m) + f'(m)(t - m)``, ``f(1) = 1`` gives
``A = 1 / (m^(d-1) * (m + d (1 - m)))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import UserError

SHAPES = ("smoothed", "linear")


def smoothed_ramp(t: float, mid: float = 0.25, degree: float = 4.0) -> float:
    """Shape of the smoothed ramp at progress ``t`` (clamped to [0, 1]); 0 at t=0, 1 at t=1, C^1."""
    t = min(max(float(t), 0.0), 1.0)
    if mid >= 1.0:
        return t**degree
    a = 1.0 / (mid ** (degree - 1) * (mid + degree * (1.0 - mid)))
    if t <= mid:
        return a * t**degree
    return a * mid**degree + a * degree * mid ** (degree - 1) * (t - mid)


@dataclass(frozen=True)
class Ramp:
    """When a schedule ramps: ``warmup`` steps before it starts, ``length`` steps of ramp.

    ``shape`` is ``'smoothed'`` (polynomial of ``degree`` up to ``mid`` of the ramp, then linear) or
    ``'linear'``; it applies to eps. kappa and beta always change linearly over the same ramp.
    ``length = 0`` jumps to the end value right after the warm-up.
    """

    warmup: float
    length: float
    shape: str = "smoothed"
    mid: float = 0.25
    degree: float = 4.0

    def __post_init__(self) -> None:
        if not (self.warmup >= 0 and self.length >= 0) or math.isinf(self.warmup + self.length):
            raise UserError(
                f"ramp warm-up and length must be finite and >= 0, got {self.warmup}, {self.length}"
            )
        if self.shape not in SHAPES:
            raise UserError(f"unknown ramp shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if not 0.0 < self.mid <= 1.0:
            raise UserError(f"ramp mid point must be in (0, 1], got {self.mid}")
        if not self.degree >= 1.0:
            raise UserError(f"ramp degree must be >= 1, got {self.degree}")

    @classmethod
    def from_epochs(
        cls,
        warmup_epochs: float,
        ramp_epochs: float,
        steps_per_epoch: int,
        shape: str = "smoothed",
        **kw,
    ) -> Ramp:
        """A ramp counted in optimizer steps from epoch counts (``steps_per_epoch`` steps per epoch)."""
        if steps_per_epoch < 1:
            raise UserError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        return cls(warmup_epochs * steps_per_epoch, ramp_epochs * steps_per_epoch, shape, **kw)

    @property
    def end(self) -> float:
        """First step at which the ramp is complete (``warmup + length``)."""
        return self.warmup + self.length

    def progress(self, step: float) -> float:
        """Linear progress through the ramp in [0, 1]: 0 up to the end of warm-up, 1 from ``end`` on."""
        if step <= self.warmup:
            return 0.0
        if step >= self.end:
            return 1.0
        return (step - self.warmup) / self.length

    def shaped(self, step: float) -> float:
        """Progress passed through the ramp's shape (smoothed or linear), in [0, 1]."""
        t = self.progress(step)
        if self.shape == "linear":
            return t
        return smoothed_ramp(t, self.mid, self.degree)

    def ended(self, step: float) -> bool:
        """True once the ramp is complete (e.g. CURE applies gradient projection only then)."""
        return step >= self.end


def eps_at(step: float, eps_max: float, ramp: Ramp) -> float:
    """Training eps at ``step``: 0 during warm-up, ramps (smoothed or linear) to ``eps_max``, then flat."""
    if not eps_max >= 0 or math.isinf(eps_max):
        raise UserError(f"eps_max must be finite and >= 0, got {eps_max}")
    return eps_max * ramp.shaped(step)


def linear_eps_at(step: float, eps_max: float, warmup: float, length: float) -> float:
    """Linear eps schedule: 0 for ``warmup`` steps, linear to ``eps_max`` over ``length`` steps, flat."""
    return eps_at(step, eps_max, Ramp(warmup, length, "linear"))


def kappa_at(step: float, ramp: Ramp, kappa_start: float = 1.0, kappa_end: float = 0.0) -> float:
    """Natural-loss share kappa in ``loss = kappa * CE_clean + (1 - kappa) * certified``.

    ``kappa_start`` during warm-up, linear to ``kappa_end`` over the ramp, then ``kappa_end``.
    """
    for name, v in (("kappa_start", kappa_start), ("kappa_end", kappa_end)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{name} must be in [0, 1], got {v}")
    t = ramp.progress(step)
    return kappa_start + (kappa_end - kappa_start) * t


def crown_ibp_beta_at(step: float, ramp: Ramp, start: float = 1.0, end: float = 0.0) -> float:
    """CROWN-IBP mixing weight beta in ``lb = beta * crown_ibp_lb + (1 - beta) * ibp_lb``.

    ``start`` (1) during warm-up, linear to ``end`` (0) over the ramp, then ``end``.
    """
    for name, v in (("start", start), ("end", end)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"CROWN-IBP beta {name} must be in [0, 1], got {v}")
    return start + (end - start) * ramp.progress(step)


def lr_at(
    epoch: float, base_lr: float, milestones: Sequence[float] = (), factor: float = 0.2
) -> float:
    """Step learning-rate decay: ``base_lr * factor ** #{m in milestones : epoch >= m}``.

    E.g. CURE's MNIST runs: milestones (50, 60), factor 0.2, with epochs counted from 0.
    """
    if not base_lr >= 0:
        raise UserError(f"base_lr must be >= 0, got {base_lr}")
    if not factor > 0:
        raise UserError(f"learning-rate decay factor must be > 0, got {factor}")
    return base_lr * factor ** sum(1 for m in milestones if epoch >= m)


__all__ = [
    "Ramp",
    "SHAPES",
    "crown_ibp_beta_at",
    "eps_at",
    "kappa_at",
    "linear_eps_at",
    "lr_at",
    "smoothed_ramp",
]
