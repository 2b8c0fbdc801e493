"""The NU paper's hybrid certificate (Table 1): combine a Gaussian and a Uniform certificate.

Table 1 (y_G, y_U the two labels; r^l1, r^l2 the radii):

=========================  ===================  ===================  ===============
category                   l1 radius            l2 radius            label
=========================  ===================  ===================  ===============
y_U = y_G                  max(r_U^l1, r_G^l1)  max(r_U^l2, r_G^l2)  the common label
only y_U abstained         r_G^l1               r_G^l2               y_G
only y_G abstained         r_U^l1               r_U^l2               y_U
both abstained             0                    0                    abstain
y_U != y_G                 0                    0                    abstain
=========================  ===================  ===================  ===============

Probability. Each certificate is wrong with probability at most its own alpha, so by the union
bound the pair (and hence the hybrid) is right with probability at least ``1 - alpha_G - alpha_U``.
:func:`split_alpha` runs each at ``alpha / 2`` for a joint ``1 - alpha`` guarantee (the default;
the public NU code runs each at alpha, which only gives ``1 - 2 alpha``).

Meaning of the max: per norm, the smoothed classifier with the larger radius keeps the common label
throughout that ball. Re-applying Table 1 at a perturbed point may still give ``disagree`` (the other
smoothed classifier can change its answer there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import UserError
from .certifier import ABSTAIN, Certificate, Smooth, _Answer
from .noise import GaussianNoise, UniformNoise


@dataclass(frozen=True)
class HybridCertificate(_Answer):
    """Combined certificate; ``rule`` names the Table 1 row that produced it: ``agree``,
    ``uniform-abstained``, ``gaussian-abstained``, ``both-abstained`` or ``disagree``."""

    label: int
    radius_l1: float
    radius_l2: float
    rule: str


def combine(gaussian: Certificate, uniform: Certificate) -> HybridCertificate:
    """Apply Table 1 of the NU paper to a Gaussian and a Uniform certificate (any objects with
    ``label``, ``radius_l1``, ``radius_l2``; ``label == -1`` means abstained)."""
    g_abs, u_abs = gaussian.label == ABSTAIN, uniform.label == ABSTAIN
    if g_abs and u_abs:
        return HybridCertificate(ABSTAIN, 0.0, 0.0, "both-abstained")
    if u_abs:
        return HybridCertificate(
            gaussian.label, gaussian.radius_l1, gaussian.radius_l2, "uniform-abstained"
        )
    if g_abs:
        return HybridCertificate(
            uniform.label, uniform.radius_l1, uniform.radius_l2, "gaussian-abstained"
        )
    if gaussian.label != uniform.label:
        return HybridCertificate(ABSTAIN, 0.0, 0.0, "disagree")
    return HybridCertificate(
        gaussian.label,
        max(gaussian.radius_l1, uniform.radius_l1),
        max(gaussian.radius_l2, uniform.radius_l2),
        "agree",
    )


def split_alpha(alpha: float, parts: int = 2, joint: bool = True) -> float:
    """The alpha each of ``parts`` certificates runs at: ``alpha / parts`` when ``joint`` (union
    bound: all hold together with probability >= 1 - alpha), else ``alpha`` (each alone)."""
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha!r}")
    return alpha / parts if joint else alpha


class HybridSmooth:
    """A Gaussian and a Uniform :class:`Smooth` of the same base classifier, combined by Table 1."""

    def __init__(
        self,
        base_classifier: nn.Module,
        num_classes: int,
        sigma_gaussian: float,
        sigma_uniform: float,
        device: torch.device | str | None = None,
        seed: Optional[int] = None,
    ):
        self.gaussian = Smooth(
            base_classifier, num_classes, GaussianNoise(sigma_gaussian), device, seed
        )
        self.uniform = Smooth(
            base_classifier,
            num_classes,
            UniformNoise(sigma_uniform),
            device,
            None if seed is None else seed + 1,
        )

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        joint_alpha: bool = True,
    ) -> tuple[HybridCertificate, Certificate, Certificate]:
        """Certify ``x`` with both noises (each at :func:`split_alpha`) and combine them.

        Returns ``(hybrid, gaussian, uniform)``. The hybrid holds with probability >= 1 - alpha when
        ``joint_alpha`` (>= 1 - 2 alpha otherwise).
        """
        a = split_alpha(alpha, 2, joint_alpha)
        g = self.gaussian.certify(x, n0, n, a, batch_size)
        u = self.uniform.certify(x, n0, n, a, batch_size)
        return combine(g, u), g, u
