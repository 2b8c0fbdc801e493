"""Threat models: the sets of inputs a certificate must cover, all in [0, 1] pixel units.

A threat is parsed from a short string, as on the command line:

* ``linf:0.1``, ``l2:0.5``, ``l1:1.0`` -- an lp ball of radius eps around x, intersected with [0, 1]^d
  (:class:`NormBall`).
* ``patch:2``, ``patch:5x5@2`` and geometric threats such as ``rotate:30`` -- a finite family of boxes,
  one per patch location or parameter sub-interval; certified iff every box is certified
  (:class:`BoxFamily`, registered from :mod:`cure_lirpa.threats.patches` and :mod:`cure_lirpa.threats.geometry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, ClassVar, Iterator, Optional, Sequence

import torch

from ..errors import UserError
from ..vocabulary import L1, L2, LINF, NORM_OF_P, NORM_SYMBOLS, NORMS


class Threat:
    """Base class; ``name`` is the canonical string (``"l2:0.5"``) used in every results file."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class NormBall(Threat):
    """The lp ball ``{x' in [0,1]^d : ||x' - x||_p <= eps}``; ``p`` is ``math.inf``, 2.0 or 1.0."""

    p: float
    eps: float

    @property
    def norm(self) -> str:
        return NORM_OF_P[self.p]

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.norm}:{format_eps(self.eps)}"

    def scaled(self, eps: float) -> NormBall:
        """The same norm with radius ``eps`` (used by eps schedules)."""
        return NormBall(self.p, eps)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project ``x_adv`` (B, ...) into the ball around ``x`` and then into [0, 1].

        For l∞ the result is exactly in the threat set. For l2 / l1 the radial projection followed by
        clipping to [0, 1] never increases the distance to ``x`` (x itself is in [0, 1]), so the result
        stays in the set as well.
        """
        delta = x_adv - x
        if self.p == math.inf:
            delta = delta.clamp(-self.eps, self.eps)
        elif self.p == 2.0:
            norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            delta = delta * (self.eps / norms).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
        else:
            delta = project_l1(delta, self.eps)
        return (x + delta).clamp(0.0, 1.0)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """Boolean (B,): is each ``x_adv`` inside the threat set around ``x`` (up to ``tol``)?"""
        dist = (x_adv - x).flatten(1).norm(p=self.p, dim=1)
        in_box = (x_adv >= -tol).flatten(1).all(1) & (x_adv <= 1 + tol).flatten(1).all(1)
        return (dist <= self.eps * (1 + tol) + tol) & in_box


def format_eps(eps: float) -> str:
    """The shortest exact text of a radius: ``0.1``, ``2/255``, ``1/3``; parses back to ``eps``.

    A short decimal when one is exact, else a fraction over 255 (pixel levels), else another
    fraction with a small denominator, else the full decimal.
    """
    short = f"{eps:g}"
    if float(short) == eps:
        return short
    levels = round(eps * 255)
    if levels and levels / 255 == eps:
        return f"{levels}/255"
    frac = Fraction(eps).limit_denominator(10_000)
    if frac.numerator / frac.denominator == eps:
        return f"{frac.numerator}/{frac.denominator}"
    return repr(float(eps))


def project_l1(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each row of ``delta`` (B, ...) onto the l1 ball of radius ``eps``.

    Sort-based algorithm of Duchi et al. (2008), applied only to rows outside the ball.
    """
    shape = delta.shape
    v = delta.flatten(1)
    abs_v = v.abs()
    outside = abs_v.sum(1) > eps
    if not outside.any():
        return delta
    u = abs_v[outside]
    mu, _ = torch.sort(u, dim=1, descending=True)
    cums = mu.cumsum(1)
    ks = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=u.dtype)
    cond = mu - (cums - eps) / ks > 0
    rho = cond.to(u.dtype).cumsum(1).argmax(1, keepdim=True)
    theta = (cums.gather(1, rho) - eps) / (rho + 1).to(u.dtype)
    out = v.clone()
    out[outside] = torch.sign(v[outside]) * (u - theta).clamp_min(0)
    return out.view(shape)


class BoxFamily(Threat):
    """A threat given by many boxes per sample (patch locations, geometric sub-intervals).

    Subclasses implement :meth:`boxes`, yielding chunks ``(x_L, x_U)`` of shape (B, M, C, H, W) with
    M boxes per sample, and :meth:`boxes_at`, the boxes of given indices (the order of
    :meth:`boxes`); a sample is certified iff the margins are positive on every box.
    ``exact_boxes`` is True when every point of every box belongs to the threat set (patches), so
    that a point found in a box is a real counterexample (geometric hulls are larger than the set).
    """

    exact_boxes: ClassVar[bool] = False

    def points(
        self, x: torch.Tensor, per_box: int, generator: Optional[torch.Generator] = None
    ) -> Optional[torch.Tensor]:
        """Images (M, C, H, W) of the threat set around one image ``x`` (C, H, W) for a sampling
        attack, or None: families with exact boxes are attacked by PGD inside their boxes."""
        return None

    def num_boxes(self, in_shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def boxes(self, x: torch.Tensor, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def boxes_at(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_L, x_U)`` of shape (B, m, C, H, W): boxes ``index`` (m,) of every sample of x."""
        raise NotImplementedError


# Parsers for non-norm threats register here: key is the prefix before ':'.
_PARSERS: dict[str, Callable[[str], Threat]] = {}


def register_threat(prefix: str, parser: Callable[[str], Threat]) -> None:
    """Let ``parse_threat`` build ``prefix:ARGS`` threats with ``parser(ARGS)``."""
    _PARSERS[prefix] = parser


def parse_threat(text: str) -> Threat:
    """Parse ``linf:0.1``, ``l2:0.5``, ``l1:1.0`` or a registered family such as ``patch:2``."""
    if isinstance(text, Threat):
        return text
    kind, sep, arg = text.strip().partition(":")
    kind = kind.lower()
    if kind in (LINF, "l_inf", "inf"):
        kind = LINF
    if not sep or not arg:
        raise UserError(
            f"threat {text!r} must look like KIND:VALUE, e.g. linf:0.1, l2:0.5, l1:1.0, patch:2"
        )
    if kind in NORMS:
        try:
            eps = parse_eps(arg)
        except UserError as exc:
            raise UserError(f"threat {text!r}: {exc}") from None
        check_radius(kind, eps, what=f"threat {text.strip()}")
        return NormBall(NORMS[kind], eps)
    _load_families()
    if kind in _PARSERS:
        return _PARSERS[kind](arg)
    known = ", ".join(list(NORMS) + sorted(_PARSERS))
    raise UserError(f"unknown threat kind {kind!r} in {text!r}; known kinds: {known}")


def _load_families() -> None:
    """Import the modules that register patch and geometric threats (they import this one)."""
    import importlib

    for name in ("cure_lirpa.threats.patches", "cure_lirpa.threats.geometry"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def covering_radius(norm: str, in_shape: Optional[Sequence[int]] = None) -> Optional[float]:
    """The radius from which the ``norm`` ball around any point of the input box [0, 1]^d holds the
    whole box: 1 for l∞, sqrt(d) for l2, d for l1 (the box's diameter); None when the norm needs
    ``d`` and ``in_shape`` is not given."""
    p = NORMS[norm]
    if p == math.inf:
        return 1.0
    if in_shape is None:
        return None
    return float(math.prod(in_shape)) ** (1.0 / p)


def check_radius(
    norm: str, eps: float, in_shape: Optional[Sequence[int]] = None, what: str = "radius"
) -> None:
    """Refuse an lp radius whose ball covers the whole input box [0, 1]^d (:func:`covering_radius`):
    every image is then within reach and nothing can be certified. Without ``in_shape`` only l∞
    (radius >= 1) is checked."""
    limit = covering_radius(norm, in_shape)
    if limit is None or eps < limit:
        return
    d = "d" if in_shape is None else str(math.prod(in_shape))
    how = {LINF: "1", L2: f"{limit:g} = sqrt(d)", L1: f"{limit:g} = d"}[norm]
    hint = "e.g. 8/255"
    if float(eps).is_integer() and eps <= 255:
        hint = f"did you mean {format_eps(eps / 255)}?"
    shown = NORM_SYMBOLS[norm]
    raise UserError(
        f"{what}: an {shown} ball of radius {format_eps(eps)} covers the whole input box "
        f"[0, 1]^{d} (from radius {how} on), so no image can be certified; radii are in "
        f"[0, 1] pixel units ({hint})"
    )


def parse_eps(text: str) -> float:
    """A radius in [0, 1] pixel units from ``0.1`` or a fraction such as ``8/255``; finite, >= 0."""
    s = str(text).strip()
    num, slash, den = s.partition("/")
    try:
        top, bottom = float(num), float(den) if slash else 1.0
    except ValueError:
        raise UserError(
            f"{s!r} is not a number (write eps in [0, 1] pixel units, e.g. 0.1 or 8/255)"
        ) from None
    if bottom == 0:
        raise UserError(f"{s!r} divides by zero (write eps like 8/255 or 0.03)")
    eps = top / bottom
    if not (math.isfinite(eps) and eps >= 0):
        raise UserError(f"eps must be a finite number >= 0, got {s!r}")
    return eps
