"""Smoothing and training noise: Gaussian, Uniform and Normal-Uniform (NU paper, section 4.3).

Every distribution is parameterised by a per-coordinate standard deviation ``sigma`` in pixel units
(inputs live in [0, 1]). Samples are drawn on the device and with the ``torch.Generator`` the
caller passes, so a run is reproducible under a seed. Shapes: ``sample(shape)`` returns a tensor of
``shape``; ``perturb(x)`` returns ``x + noise`` with the shape of ``x``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence

import torch
from scipy.stats import norm

from ..errors import UserError
from ..vocabulary import GAUSSIAN, NOISE_ALIASES, NOISES, NORMAL_UNIFORM, UNIFORM

SQRT3 = math.sqrt(3.0)


def _check_sigma(name: str, sigma: float) -> float:
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {sigma!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(
            f"{name} must be a positive number (a standard deviation in pixel units), got {sigma!r}"
        )
    return value


class Noise(ABC):
    """Additive noise with i.i.d. coordinates."""

    name: str = ""

    @abstractmethod
    def sample(
        self,
        shape: Sequence[int],
        generator: Optional[torch.Generator] = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """A noise tensor of ``shape`` on ``device`` drawn with ``generator``."""

    def sample_into(
        self, out: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Fill ``out`` with noise in place (no allocation) and return it."""
        return out.copy_(self.sample(out.shape, generator, out.device, out.dtype))

    def perturb(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``x + noise`` (no clipping to [0, 1], as in Cohen et al.)."""
        return x + self.sample(x.shape, generator, x.device, x.dtype)

    @property
    def std(self) -> float:
        """Per-coordinate standard deviation of the noise."""
        raise NotImplementedError

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able description (name and parameters)."""

    def radii(self, p_lower: float, dim: int) -> tuple[float, float]:
        """Certified ``(l1, l2)`` radii for a lower bound ``p_lower >= 1/2`` on the top-class probability.

        ``dim`` is the input dimension d (C*H*W). Only smoothing noises certify.
        """
        raise UserError(
            f"{self.name} noise is a training noise; certify with '{GAUSSIAN}' or '{UNIFORM}'"
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "noise")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Noise) and self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.describe().items())))


class GaussianNoise(Noise):
    """N(0, sigma^2 I) (Cohen et al. 2019)."""

    name = GAUSSIAN

    def __init__(self, sigma: float):
        self.sigma = _check_sigma("Gaussian sigma", sigma)

    @property
    def std(self) -> float:
        return self.sigma

    def sample(self, shape, generator=None, device=None, dtype=torch.float32):
        out = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return out.mul_(self.sigma)

    def sample_into(self, out, generator=None):
        torch.randn(out.shape, generator=generator, out=out)
        return out.mul_(self.sigma)

    def radii(self, p_lower: float, dim: int) -> tuple[float, float]:
        """Cohen et al. Theorem 1: l2 radius ``sigma * PhiInv(p_lower)``; the l1 radius is the same
        value (an l1 ball of radius r lies inside the l2 ball of radius r)."""
        if p_lower < 0.5:
            return 0.0, 0.0
        r = self.sigma * float(norm.ppf(p_lower))
        return r, r

    def describe(self) -> dict[str, Any]:
        return {"noise": self.name, "sigma": self.sigma}


class UniformNoise(Noise):
    """U[-lambda, lambda]^d with ``lambda = sqrt(3) * sigma`` (variance sigma^2; Yang et al. 2020)."""

    name = UNIFORM

    def __init__(self, sigma: float):
        self.sigma = _check_sigma("Uniform sigma", sigma)
        self.half_width = SQRT3 * self.sigma

    @property
    def std(self) -> float:
        return self.sigma

    def sample(self, shape, generator=None, device=None, dtype=torch.float32):
        out = torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)
        return out.mul_(2.0 * self.half_width).sub_(self.half_width)

    def sample_into(self, out, generator=None):
        torch.rand(out.shape, generator=generator, out=out)
        return out.mul_(2.0 * self.half_width).sub_(self.half_width)

    def radii(self, p_lower: float, dim: int) -> tuple[float, float]:
        """Yang et al.: l1 radius ``2 * lambda * (p_lower - 1/2)``; l2 radius = l1 / sqrt(d)
        (the l2 ball of radius r lies inside the l1 ball of radius r * sqrt(d))."""
        if p_lower < 0.5:
            return 0.0, 0.0
        r1 = 2.0 * self.half_width * (p_lower - 0.5)
        return r1, r1 / math.sqrt(dim)

    def describe(self) -> dict[str, Any]:
        return {"noise": self.name, "sigma": self.sigma}


class NormalUniformNoise(Noise):
    """Normal-Uniform: ``N(0, sigma_n^2) + U[-sqrt(3) sigma_u, sqrt(3) sigma_u]`` (NU paper, Sec. 4.3).

    The paper's pairs use ``sigma_u = (sqrt(3)/2) * sigma_n`` (kurtosis -0.22), the default here.
    """

    name = NORMAL_UNIFORM

    def __init__(self, sigma_n: float, sigma_u: Optional[float] = None):
        self.gaussian = GaussianNoise(_check_sigma("Normal-Uniform sigma_n", sigma_n))
        if sigma_u is None:
            sigma_u = SQRT3 / 2.0 * self.gaussian.sigma
        self.uniform = UniformNoise(_check_sigma("Normal-Uniform sigma_u", sigma_u))

    @property
    def sigma_n(self) -> float:
        return self.gaussian.sigma

    @property
    def sigma_u(self) -> float:
        return self.uniform.sigma

    @property
    def std(self) -> float:
        return math.sqrt(self.sigma_n**2 + self.sigma_u**2)

    @property
    def kurtosis(self) -> float:
        """Excess kurtosis of one coordinate: ``-1.2 sigma_u^4 / (sigma_n^2 + sigma_u^2)^2``."""
        return -1.2 * self.sigma_u**4 / (self.sigma_n**2 + self.sigma_u**2) ** 2

    def sample(self, shape, generator=None, device=None, dtype=torch.float32):
        out = self.gaussian.sample(shape, generator, device, dtype)
        return out.add_(self.uniform.sample(shape, generator, device, dtype))

    def describe(self) -> dict[str, Any]:
        return {"noise": self.name, "sigma_n": self.sigma_n, "sigma_u": self.sigma_u}


def make_noise(name: str, sigma: float, sigma_u: Optional[float] = None) -> Noise:
    """Build a noise by name: 'gaussian' or 'uniform' (``sigma``), 'normal-uniform' (``sigma`` is
    sigma_n, ``sigma_u`` defaults to sqrt(3)/2 sigma_n)."""
    key = str(name).lower().replace("_", "-")
    if key in (GAUSSIAN, *NOISE_ALIASES[GAUSSIAN]):
        return GaussianNoise(sigma)
    if key in (UNIFORM, *NOISE_ALIASES[UNIFORM]):
        return UniformNoise(sigma)
    if key in (NORMAL_UNIFORM, *NOISE_ALIASES[NORMAL_UNIFORM]):
        return NormalUniformNoise(sigma, sigma_u)
    raise UserError(f"unknown noise {name!r}; choose one of {', '.join(NOISES)}")


def make_generator(device: torch.device | str, seed: Optional[int] = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (seeded when ``seed`` is given, else from entropy)."""
    gen = torch.Generator(device=torch.device(device))
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
