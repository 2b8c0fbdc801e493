"""Geometric and photometric threat models and their sound per-pixel interval hulls.

Transformation semantics (the reference is :func:`transform`; the hulls are sound for exactly it).
Pixel (i, j) of an image (C, H, W) sits at the point (x, y) = (j, i); the centre is
``c = ((W - 1) / 2, (H - 1) / 2)``. With rotation angle ``theta`` (degrees), shear ``phi``, scale
factor ``s > 0``, translation ``t = (tx, ty)`` (pixels), contrast factor ``k`` and brightness ``b``,
the content point q moves to ``p = c + s R(theta) Sh(phi) (q - c) + t`` with
``R(theta) = [[cos, -sin], [sin, cos]]`` (clockwise on screen, since y points down) and
``Sh(phi) = [[1, phi], [0, 1]]``. The output image is computed backwards, for every output pixel p:

1. ``(a, b') = (p - c - t) / s``;
2. ``(u', v') = R(-theta) (a, b')``, i.e. ``u' = cos a + sin b'``, ``v' = -sin a + cos b'``;
3. ``(u, v) = (u' - phi v', v')``; source point ``(u, v) + c`` (column, row);
4. ``y = `` bilinear interpolation of x at the source point, pixels outside the image counting as 0;
5. ``out = clip(k y + b, 0, 1)``.

Threat strings (components joined by ``+``; their order in the string does not matter, the
composition above is fixed):

* ``rotate:D`` -- theta in [-D, D] degrees;
* ``shear:F`` -- phi in [-F, F];
* ``scale:F`` -- s in [1 - F, 1 + F] (F < 1);
* ``translate:T`` -- tx, ty each an *integer* in [-T, T] (enumerated, (2T+1)^2 near-degenerate boxes);
  ``translate:T@N`` -- tx, ty each *real* in [-T, T], split into N sub-intervals per axis;
* ``contrast:F`` -- k in [1 - F, 1 + F] (F <= 1);
* ``brightness:F`` -- b in [-F, F].

``@N`` after a continuous component splits its range into N equal closed sub-intervals (default
:data:`DEFAULT_WIDTH`); the boxes of a combination are the product of the components' sub-intervals.

Soundness: for each parameter box (one sub-interval per parameter) the hull ``[x_L, x_U]`` contains,
pixel by pixel, ``transform(x, params)`` for every params in the box. Source coordinates are bounded
with exact interval arithmetic (the exact range of ``cos`` / ``sin`` over an interval, including
interior extrema; the rotation of a coordinate box bounded exactly through its four corners), then
widened by :data:`COORD_PAD` pixels to absorb float32 rounding in :func:`transform`. The interpolated
value over a box of source points is bounded *exactly*: bilinear interpolation is bilinear on each
pixel cell, so its extrema over the box are attained at the points ``{u_lo, u_hi, integers between}
x {v_lo, v_hi, integers between}``, where it is evaluated (in float64); contrast and brightness act on
the resulting intervals by interval arithmetic; the hull is widened by :data:`VALUE_PAD`, rounded
outwards to the input's dtype and clipped to [0, 1]. No sampling is involved. Splitting into more
sub-intervals gives tighter hulls at a cost linear in the number of boxes (docs/threats.md).
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import UserError
from .base import BoxFamily, register_threat

#: Parameters of :func:`transform`, in the order of the columns of parameter boxes.
PARAMS = ("angle", "shear", "scale", "tx", "ty", "contrast", "brightness")
IDENTITY = (0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0)
SPATIAL_PARAMS = 5  # the first five parameters move pixels, the last two act on values

#: Component kinds in canonical order (the order of names; the composition order is fixed).
KINDS = ("rotate", "shear", "scale", "translate", "contrast", "brightness")

#: Default sub-interval width of each continuous kind (degrees, shear factor, scale factor,
#: contrast factor, brightness). ``translate`` has no default: without ``@N`` it enumerates integers.
DEFAULT_WIDTH = {
    "rotate": 0.5,
    "shear": 0.01,
    "scale": 0.01,
    "contrast": 0.02,
    "brightness": 0.02,
}

#: Upper limits on each range (degrees for rotate).
_MAX_VALUE = {"rotate": 180.0, "scale": 0.999, "contrast": 1.0, "brightness": 1.0}

#: Padding of source-coordinate intervals (pixels), covering float32 rounding in :func:`transform`.
COORD_PAD = 1e-4

#: Widening of every hull (pixel-value units), covering float32 rounding of the interpolation and of
#: the photometric step in :func:`transform`.
VALUE_PAD = 1e-6

#: Target size (bytes) of one float64 temporary while computing hulls; larger requests are split.
HULL_BYTES = 2**22

#: A combination with more boxes than this per sample triggers a warning (cost is linear in it).
WARN_BOXES = 20000

_COMPONENT_RE = re.compile(
    r"^\s*([a-zA-Z]+)\s*:\s*([0-9.eE/+-]+?)\s*(?:@\s*(?:n\s*=\s*)?(\d+))?\s*$"
)


# ----------------------------------------------------------------------------------------------
# Reference transformation
# ----------------------------------------------------------------------------------------------
def pixel_grid(
    h: int, w: int, dtype=torch.float64, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (H, W) of every pixel relative to the image centre: ``x = j - (W-1)/2``,
    ``y = i - (H-1)/2``."""
    xs = torch.arange(w, dtype=dtype, device=device) - (w - 1) / 2
    ys = torch.arange(h, dtype=dtype, device=device) - (h - 1) / 2
    return xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)


def bilinear(x: torch.Tensor, col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of images x (B, C, H, W) at real pixel coordinates, zero outside.

    ``col`` / ``row`` have shape (Bc, m, H', W') with Bc 1 (shared by the batch) or B; the result
    has shape (B, m, C, H', W') and the dtype of ``col``. Pixel (i, j) is at (col, row) = (j, i).
    """
    b, c, h, w = x.shape
    bc, m = col.shape[:2]
    flat = x.to(col.dtype).reshape(b, c, h * w)
    c0, r0 = torch.floor(col), torch.floor(row)
    dc, dr = col - c0, row - r0
    c0, r0 = c0.long(), r0.long()

    def tap(r: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
        valid = (r >= 0) & (r < h) & (cc >= 0) & (cc < w)
        idx = (r.clamp(0, h - 1) * w + cc.clamp(0, w - 1)).reshape(bc, 1, -1).expand(b, c, -1)
        vals = torch.gather(flat, 2, idx).view(b, c, m, *col.shape[2:])
        return vals * valid.view(bc, 1, m, *col.shape[2:]).to(vals.dtype)

    wc, wr = dc.unsqueeze(1), dr.unsqueeze(1)  # (Bc, 1, m, H', W')
    out = (1 - wr) * ((1 - wc) * tap(r0, c0) + wc * tap(r0, c0 + 1)) + wr * (
        (1 - wc) * tap(r0 + 1, c0) + wc * tap(r0 + 1, c0 + 1)
    )
    return out.transpose(1, 2)


def transform(
    x: torch.Tensor,
    angle=0.0,
    shear=0.0,
    scale=1.0,
    tx=0.0,
    ty=0.0,
    contrast=1.0,
    brightness=0.0,
) -> torch.Tensor:
    """The reference transformation (module docstring, steps 1-5) of images x (B, C, H, W).

    Each parameter is a float or a tensor (B,) (one value per image); angle in degrees,
    translations in pixels. Computed in x's dtype; returns (B, C, H, W) in [0, 1].
    """
    b, _, h, w = x.shape
    dt, dev = x.dtype, x.device

    def col(v) -> torch.Tensor:
        return torch.as_tensor(v, dtype=dt, device=dev).reshape(-1, 1, 1).expand(b, 1, 1)

    theta = col(angle) * (math.pi / 180.0)
    px, py = pixel_grid(h, w, dt, dev)
    a = (px - col(tx)) / col(scale)
    bb = (py - col(ty)) / col(scale)
    cos, sin = torch.cos(theta), torch.sin(theta)
    u1 = cos * a + sin * bb
    v1 = -sin * a + cos * bb
    u = u1 - col(shear) * v1
    src_c = (u + (w - 1) / 2).unsqueeze(1)  # (B, 1, H, W)
    src_r = (v1 + (h - 1) / 2).unsqueeze(1)
    y = bilinear(x, src_c, src_r)[:, 0]
    k = col(contrast).view(b, 1, 1, 1)
    bright = col(brightness).view(b, 1, 1, 1)
    return (k * y + bright).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Interval arithmetic
# ----------------------------------------------------------------------------------------------
def cos_interval(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact range ``[min, max]`` of cos over ``[lo, hi]`` (radians, elementwise, lo <= hi)."""
    two_pi = 2 * math.pi
    c_lo, c_hi = torch.cos(lo), torch.cos(hi)
    mn, mx = torch.minimum(c_lo, c_hi), torch.maximum(c_lo, c_hi)
    has_max = torch.ceil(lo / two_pi) * two_pi <= hi  # a multiple of 2 pi inside
    has_min = torch.ceil((lo - math.pi) / two_pi) * two_pi + math.pi <= hi  # pi + 2 pi k inside
    mx = torch.where(has_max, torch.ones_like(mx), mx)
    mn = torch.where(has_min, -torch.ones_like(mn), mn)
    return mn, mx


def sin_interval(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact range of sin over ``[lo, hi]`` (sin t = cos(t - pi/2))."""
    return cos_interval(lo - math.pi / 2, hi - math.pi / 2)


def _mul(
    a_lo: torch.Tensor, a_hi: torch.Tensor, b_lo: torch.Tensor, b_hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval product ``[a] * [b]``."""
    p = torch.stack([a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi])
    return p.min(0).values, p.max(0).values


def source_intervals(
    h: int, w: int, boxes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intervals of the source point (column, row) of every output pixel, per spatial box.

    ``boxes`` (m, 5, 2) float64 holds [lo, hi] of angle (degrees), shear, scale, tx, ty. Returns
    ``col_lo, col_hi, row_lo, row_hi`` of shape (m, H, W), padded by :data:`COORD_PAD`.
    """
    boxes = boxes.to(torch.float64)
    px, py = pixel_grid(h, w)

    def p(k: int, end: int) -> torch.Tensor:
        return boxes[:, k, end].view(-1, 1, 1)

    # step 1: (p - c - t) / s, interval division by s > 0
    dx_lo, dx_hi = px - p(3, 1), px - p(3, 0)
    dy_lo, dy_hi = py - p(4, 1), py - p(4, 0)
    s_lo, s_hi = p(2, 0), p(2, 1)
    a_lo = torch.minimum(dx_lo / s_lo, dx_lo / s_hi)
    a_hi = torch.maximum(dx_hi / s_lo, dx_hi / s_hi)
    b_lo = torch.minimum(dy_lo / s_lo, dy_lo / s_hi)
    b_hi = torch.maximum(dy_hi / s_lo, dy_hi / s_hi)
    # step 2: rotation by -theta. For fixed theta, u' and v' are linear in (a, b'), so their extrema
    # over the box are at its corners; for one corner (r cos(alpha), r sin(alpha)),
    # u' = r cos(theta - alpha) and v' = -r sin(theta - alpha), whose exact ranges over the angle
    # interval follow from cos_interval / sin_interval.
    t_lo, t_hi = p(0, 0) * (math.pi / 180), p(0, 1) * (math.pi / 180)
    rotating = bool((boxes[:, 0] != 0).any())
    if rotating:
        u_lo = v_lo = torch.full_like(a_lo, math.inf)
        u_hi = v_hi = torch.full_like(a_lo, -math.inf)
        for ca, cb in itertools.product((a_lo, a_hi), (b_lo, b_hi)):
            r = torch.hypot(ca, cb)
            alpha = torch.atan2(cb, ca)
            cmn, cmx = cos_interval(t_lo - alpha, t_hi - alpha)
            smn, smx = sin_interval(t_lo - alpha, t_hi - alpha)
            u_lo, u_hi = torch.minimum(u_lo, r * cmn), torch.maximum(u_hi, r * cmx)
            v_lo, v_hi = torch.minimum(v_lo, -r * smx), torch.maximum(v_hi, -r * smn)
    else:
        u_lo, u_hi, v_lo, v_hi = a_lo, a_hi, b_lo, b_hi
    # step 3: inverse shear u = u' - phi v'
    if bool((boxes[:, 1] != 0).any()):
        sv_lo, sv_hi = _mul(p(1, 0), p(1, 1), v_lo, v_hi)
        u_lo, u_hi = u_lo - sv_hi, u_hi - sv_lo
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return (
        u_lo + (cx - COORD_PAD),
        u_hi + (cx + COORD_PAD),
        v_lo + (cy - COORD_PAD),
        v_hi + (cy + COORD_PAD),
    )


def bilinear_range(
    x: torch.Tensor,
    col_lo: torch.Tensor,
    col_hi: torch.Tensor,
    row_lo: torch.Tensor,
    row_hi: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact min and max of the bilinear interpolant of x (B, C, H, W) over boxes of source points.

    Coordinate intervals have shape (m, H', W'); returns two (B, m, C, H', W') float64 tensors.
    On each pixel cell the interpolant is bilinear, so over a box it is extremal at
    ``{lo, hi, integers in between}`` per axis; candidate k along an axis is
    ``clamp(floor(lo) + k, lo, hi)``, which enumerates lo, every integer inside and hi.
    """
    x = x.to(col_lo.dtype)
    # The interpolant is 0 at and beyond column -1 / W and row -1 / H, so clamping the intervals to
    # [-1, W] x [-1, H] keeps the range exact and bounds the number of candidates.
    h, w = x.shape[-2:]
    col_lo, col_hi = col_lo.clamp(-1, w), col_hi.clamp(-1, w)
    row_lo, row_hi = row_lo.clamp(-1, h), row_hi.clamp(-1, h)
    f_c, f_r = torch.floor(col_lo), torch.floor(row_lo)
    n_c = int((torch.floor(col_hi) - f_c).max()) + 2
    n_r = int((torch.floor(row_hi) - f_r).max()) + 2
    lo: Optional[torch.Tensor] = None
    hi: Optional[torch.Tensor] = None
    for i in range(n_c):
        cc = torch.minimum(torch.maximum(f_c + i, col_lo), col_hi)
        for j in range(n_r):
            rr = torch.minimum(torch.maximum(f_r + j, row_lo), row_hi)
            val = bilinear(x, cc.unsqueeze(0), rr.unsqueeze(0))
            lo = val if lo is None else torch.minimum(lo, val)
            hi = val if hi is None else torch.maximum(hi, val)
    assert lo is not None and hi is not None
    return lo, hi


def _round_out(
    lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen float64 bounds by :data:`VALUE_PAD`, cast to ``dtype`` rounding outwards, clip to [0, 1]."""
    lo, hi = lo - VALUE_PAD, hi + VALUE_PAD
    lo_c, hi_c = lo.to(dtype), hi.to(dtype)
    if dtype != lo.dtype:
        neg = torch.full_like(lo_c, -math.inf)
        pos = torch.full_like(hi_c, math.inf)
        lo_c = torch.where(lo_c.to(lo.dtype) > lo, torch.nextafter(lo_c, neg), lo_c)
        hi_c = torch.where(hi_c.to(hi.dtype) < hi, torch.nextafter(hi_c, pos), hi_c)
    return lo_c.clamp(0.0, 1.0), hi_c.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Threat objects
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Component:
    """One transformation kind with its range ``value`` and sub-interval count ``splits``.

    ``splits`` None means the default (:data:`DEFAULT_WIDTH`), or integer enumeration for translate.
    """

    kind: str
    value: float
    splits: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown geometric kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if not (self.value >= 0 and math.isfinite(self.value)):
            raise UserError(
                f"{self.kind}: the range must be a finite number >= 0, got {self.value}"
            )
        limit = _MAX_VALUE.get(self.kind)
        if limit is not None and self.value > limit:
            raise UserError(f"{self.kind}:{self.value:g} is out of range (at most {limit:g})")
        if self.splits is not None and self.splits < 1:
            raise UserError(f"{self.kind}: the number of sub-intervals after @ must be >= 1")
        if self.kind == "translate" and self.splits is None and self.value != int(self.value):
            raise UserError(
                f"translate:{self.value:g} enumerates integer shifts, so the range must be an "
                f"integer; for continuous sub-pixel translation write translate:{self.value:g}@N "
                "(N sub-intervals per axis)"
            )

    @property
    def integer(self) -> bool:
        """Integer-shift enumeration (``translate:T`` without ``@N``)."""
        return self.kind == "translate" and self.splits is None

    @property
    def count(self) -> int:
        """Sub-intervals (or integer values) per parameter axis."""
        if self.value == 0:
            return 1
        if self.integer:
            return 2 * int(self.value) + 1
        if self.splits is not None:
            return self.splits
        return default_splits(self.kind, self.value)

    @property
    def name(self) -> str:
        base = f"{self.kind}:{self.value:g}"
        if self.value == 0 or self.integer or self.splits is None:
            return base
        if self.kind != "translate" and self.splits == default_splits(self.kind, self.value):
            return base
        return f"{base}@{self.splits}"

    def range(self) -> tuple[float, float]:
        """The full parameter range."""
        if self.kind in ("scale", "contrast"):
            return 1.0 - self.value, 1.0 + self.value
        return -self.value, self.value

    def intervals(self) -> torch.Tensor:
        """Sub-intervals (n, 2) float64 covering :meth:`range` (degenerate [k, k] for integer shifts)."""
        lo, hi = self.range()
        if self.integer:
            k = torch.arange(-int(self.value), int(self.value) + 1, dtype=torch.float64)
            return torch.stack([k, k], 1)
        edges = torch.linspace(lo, hi, self.count + 1, dtype=torch.float64)
        edges[0], edges[-1] = lo, hi
        return torch.stack([edges[:-1], edges[1:]], 1)


def default_splits(kind: str, value: float) -> int:
    """Default sub-interval count: the range divided by :data:`DEFAULT_WIDTH`, rounded up."""
    return max(1, math.ceil(2 * value / DEFAULT_WIDTH[kind] - 1e-9))


class GeometricThreat(BoxFamily):
    """A composition of rotation, shear, scaling, translation, contrast and brightness (module doc).

    Boxes are the product of the components' sub-intervals: spatial boxes (outer) times
    photometric boxes (inner), so consecutive boxes share their spatial hull.
    """

    def __init__(self, components: tuple[Component, ...]):
        kinds = [c.kind for c in components]
        if not components:
            raise UserError("a geometric threat needs at least one component, e.g. rotate:30")
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        if dup:
            raise UserError(f"geometric threat repeats {', '.join(dup)}; give each kind once")
        self.components = tuple(sorted(components, key=lambda c: KINDS.index(c.kind)))
        by_kind = {c.kind: c for c in self.components}
        axes: list[torch.Tensor] = []
        for i, param in enumerate(PARAMS):
            kind = {"angle": "rotate", "tx": "translate", "ty": "translate"}.get(param, param)
            comp = by_kind.get(kind)
            if comp is None:
                axes.append(torch.tensor([[IDENTITY[i], IDENTITY[i]]], dtype=torch.float64))
            else:
                axes.append(comp.intervals())
        self._spatial = _product(axes[:SPATIAL_PARAMS])  # (Ns, 5, 2)
        self._photo = _product(axes[SPATIAL_PARAMS:])  # (Np, 2, 2)
        self.has_spatial = any(c.kind in KINDS[:4] for c in self.components)
        n = self.num_boxes(())
        if n > WARN_BOXES:
            warnings.warn(
                f"{self.name} has {n} boxes per sample (product of the components' sub-intervals); "
                "certification time grows linearly with it. Use fewer sub-intervals (@N).",
                stacklevel=2,
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(c.name for c in self.components)

    def __repr__(self) -> str:
        return f"GeometricThreat({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeometricThreat) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    # ------------------------------------------------------------------------------------------
    def num_boxes(self, in_shape: tuple[int, ...] = ()) -> int:
        return len(self._spatial) * len(self._photo)

    def param_boxes(self) -> torch.Tensor:
        """All parameter boxes (N, 7, 2) float64, in the order of :data:`PARAMS` and of :meth:`boxes`."""
        ns, npb = len(self._spatial), len(self._photo)
        sp = self._spatial.repeat_interleave(npb, 0)
        ph = self._photo.repeat(ns, 1, 1)
        return torch.cat([sp, ph], 1)

    def hull(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hulls ``(x_L, x_U)`` (B, m, C, H, W) of boxes ``index`` (m,) for images x (B, C, H, W).

        Computed in pieces whose float64 temporaries stay near :data:`HULL_BYTES` each.
        """
        if x.dim() != 4:
            raise UserError(
                f"geometric threats need image batches (B, C, H, W), got {tuple(x.shape)}"
            )
        index = index.cpu()
        piece = max(1, HULL_BYTES // (8 * x.numel()))
        parts = [self._hull(x, index[s : s + piece]) for s in range(0, len(index), piece)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    def _hull(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        npb = len(self._photo)
        s_idx, p_idx = index // npb, index % npb
        if self.has_spatial:
            uniq, inv = torch.unique(s_idx, return_inverse=True)
            coords = source_intervals(h, w, self._spatial[uniq])
            lo, hi = bilinear_range(x, *(t.to(x.device) for t in coords))
            inv = inv.to(x.device)
            lo, hi = lo[:, inv], hi[:, inv]
        else:
            lo = x.to(torch.float64).unsqueeze(1).expand(b, len(index), c, h, w)
            hi = lo
        photo = self._photo[p_idx]  # (m, 2, 2): contrast and brightness [lo, hi]
        identity = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
        if bool((photo != identity).any()):
            photo = photo.to(x.device)
            k_lo, k_hi = (photo[:, 0, e].view(1, -1, 1, 1, 1) for e in (0, 1))
            b_lo, b_hi = (photo[:, 1, e].view(1, -1, 1, 1, 1) for e in (0, 1))
            lo, hi = _mul(k_lo, k_hi, lo, hi)
            lo, hi = lo + b_lo, hi + b_hi
        return _round_out(lo, hi, x.dtype)

    def boxes(self, x: torch.Tensor, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield hulls (B, m, C, H, W), m <= chunk boxes per sample, in :meth:`param_boxes` order."""
        chunk = max(1, int(chunk))
        n = self.num_boxes()
        for start in range(0, n, chunk):
            yield self.hull(x, torch.arange(start, min(n, start + chunk)))

    def boxes_at(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hulls (B, m, C, H, W) of the boxes ``index`` (m,), in :meth:`param_boxes` order."""
        return self.hull(x, index)

    def points(
        self, x: torch.Tensor, per_box: int, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """``x`` (C, H, W) transformed at the centre and ``per_box`` uniform random parameter
        vectors of every box (M = N * (1 + per_box) images): a grid search over the parameters."""
        boxes = self.param_boxes()  # (N, 7, 2)
        u = torch.rand(len(boxes), per_box, len(PARAMS), generator=generator, dtype=torch.float64)
        u = torch.cat([torch.full((len(boxes), 1, len(PARAMS)), 0.5, dtype=torch.float64), u], 1)
        vals = (boxes[:, None, :, 0] + u * (boxes[:, None, :, 1] - boxes[:, None, :, 0])).flatten(
            0, 1
        )
        params = {p: vals[:, i].to(x.dtype) for i, p in enumerate(PARAMS)}
        return transform(x.unsqueeze(0).expand(len(vals), *x.shape), **params)

    def sample_params(
        self, n: int, box: Optional[int] = None, generator: Optional[torch.Generator] = None
    ) -> dict[str, torch.Tensor]:
        """``n`` random parameter vectors (keyword arguments of :func:`transform`, each (n,)) drawn
        uniformly from box ``box`` or, if None, from the whole threat set (integer shifts stay
        integers)."""
        boxes = self.param_boxes()
        if box is None:
            pick = torch.randint(len(boxes), (n,), generator=generator)
        else:
            pick = torch.full((n,), int(box), dtype=torch.long)
        sel = boxes[pick]  # (n, 7, 2)
        u = torch.rand(n, len(PARAMS), generator=generator, dtype=torch.float64)
        vals = sel[..., 0] + u * (sel[..., 1] - sel[..., 0])
        return {p: vals[:, i].float() for i, p in enumerate(PARAMS)}


def _product(axes: list[torch.Tensor]) -> torch.Tensor:
    """Cartesian product of interval lists (n_i, 2) -> (prod n_i, len(axes), 2), last axis fastest."""
    grids = torch.meshgrid(*[torch.arange(len(a)) for a in axes], indexing="ij")
    return torch.stack([a[g.reshape(-1)] for a, g in zip(axes, grids)], 1)


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
def _number(text: str, where: str) -> float:
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{where}: {text!r} is not a number") from None


def parse_component(text: str) -> Component:
    """Parse one ``kind:VALUE[@N]`` (``@n=N`` is accepted as well)."""
    m = _COMPONENT_RE.match(text)
    if not m:
        raise UserError(
            f"geometric threat {text!r} must look like KIND:VALUE or KIND:VALUE@N with KIND one of "
            f"{', '.join(KINDS)}, e.g. rotate:30, rotate:30@120, translate:2, brightness:0.1"
        )
    kind = m.group(1).lower()
    value = _number(m.group(2), text)
    splits = int(m.group(3)) if m.group(3) else None
    return Component(kind, value, splits)


def parse_geometric(text: str) -> GeometricThreat:
    """Parse a full geometric threat such as ``rotate:2+shear:0.02`` or ``rotate:30@60+translate:2``."""
    parts = re.split(r"\+(?=\s*[a-zA-Z]{2})", text.strip())
    return GeometricThreat(tuple(parse_component(p) for p in parts))


def _parser_for(kind: str):
    def parse(arg: str) -> GeometricThreat:
        return parse_geometric(f"{kind}:{arg}")

    parse.__doc__ = f"Parse the part after ``{kind}:`` (may continue with ``+other:...``)."
    return parse


for _kind in KINDS:
    register_threat(_kind, _parser_for(_kind))

__all__ = [
    "Component",
    "GeometricThreat",
    "bilinear",
    "bilinear_range",
    "cos_interval",
    "default_splits",
    "parse_geometric",
    "sin_interval",
    "source_intervals",
    "transform",
]
