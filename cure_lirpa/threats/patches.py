"""Patch threat model: one rectangle of pixels anywhere in the image is replaced by arbitrary content.

``patch:K`` (= ``patch:KxK@1``), ``patch:KxL@s``: for every location (i, j) of a K-row by L-column
rectangle, with top-left corners ``i = 0, s, 2s, ... <= H - K`` and ``j = 0, s, 2s, ... <= W - L``,
the threat set holds every image equal to x outside the rectangle and free in [0, 1] inside it (all
channels). Each location is its own box ``[x_L, x_U]``: ``x_L = x`` and ``x_U = x`` outside the
rectangle, ``x_L = 0`` and ``x_U = 1`` inside. A sample is certified iff every location is certified,
which is exactly certification of the union of the boxes (the patch threat of the CURE paper's
generalisation experiments).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch

from ..errors import UserError
from .base import BoxFamily, register_threat

_PATCH_RE = re.compile(r"^\s*(\d+)(?:\s*[xX]\s*(\d+))?\s*(?:@\s*(\d+))?\s*$")


@dataclass(frozen=True)
class PatchThreat(BoxFamily):
    """All ``height x width`` patches with top-left corners on a grid of step ``stride`` pixels."""

    height: int
    width: int
    stride: int = 1
    exact_boxes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise UserError(f"patch size must be at least 1x1, got {self.height}x{self.width}")
        if self.stride < 1:
            raise UserError(f"patch stride must be a positive integer, got {self.stride}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"patch:{self.height}x{self.width}@{self.stride}"

    # ------------------------------------------------------------------------------------------
    def locations(self, in_shape: tuple[int, ...]) -> torch.Tensor:
        """Top-left corners (N, 2) as (row, col) of every patch location for inputs (C, H, W)."""
        h, w = self._check_shape(in_shape)
        rows = torch.arange(0, h - self.height + 1, self.stride)
        cols = torch.arange(0, w - self.width + 1, self.stride)
        return torch.cartesian_prod(rows, cols).view(-1, 2)

    def num_boxes(self, in_shape: tuple[int, ...]) -> int:
        h, w = self._check_shape(in_shape)
        n_rows = (h - self.height) // self.stride + 1
        n_cols = (w - self.width) // self.stride + 1
        return n_rows * n_cols

    def masks(
        self,
        in_shape: tuple[int, ...],
        start: int = 0,
        stop: int | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean masks (m, 1, H, W) of locations ``start .. stop-1``, or of the locations
        ``index`` (m,) if given (True inside the patch)."""
        h, w = self._check_shape(in_shape)
        loc = self.locations(in_shape)
        loc = loc[start:stop] if index is None else loc[index.cpu()]
        r = torch.arange(h).view(1, h, 1)
        c = torch.arange(w).view(1, 1, w)
        top, left = loc[:, 0].view(-1, 1, 1), loc[:, 1].view(-1, 1, 1)
        inside = (r >= top) & (r < top + self.height) & (c >= left) & (c < left + self.width)
        return inside.unsqueeze(1)

    def boxes(self, x: torch.Tensor, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x_L, x_U)`` of shape (B, m, C, H, W), m <= chunk locations per sample."""
        if x.dim() != 4:
            raise UserError(
                f"patch threats need image batches (B, C, H, W), got shape {tuple(x.shape)}"
            )
        chunk = max(1, int(chunk))
        n = self.num_boxes(tuple(x.shape[1:]))
        for start in range(0, n, chunk):
            mask = self.masks(tuple(x.shape[1:]), start, min(n, start + chunk)).to(x.device)
            outside = x.unsqueeze(1) * (~mask).to(x.dtype)  # (B, m, C, H, W)
            yield outside, outside + mask.to(x.dtype)

    def boxes_at(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_L, x_U)`` of shape (B, m, C, H, W) of the locations ``index`` (m,) for every sample."""
        if x.dim() != 4:
            raise UserError(
                f"patch threats need image batches (B, C, H, W), got shape {tuple(x.shape)}"
            )
        mask = self.masks(tuple(x.shape[1:]), index=index).to(x.device)
        outside = x.unsqueeze(1) * (~mask).to(x.dtype)
        return outside, outside + mask.to(x.dtype)

    def apply(self, x: torch.Tensor, location: int, content: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) with the patch at ``location`` (an index into :meth:`locations`)
        replaced by ``content`` (B, C, height, width) -- an element of the threat set if content is
        in [0, 1]."""
        top, left = (int(v) for v in self.locations(tuple(x.shape[1:]))[location])
        out = x.clone()
        out[:, :, top : top + self.height, left : left + self.width] = content
        return out

    def _check_shape(self, in_shape: tuple[int, ...]) -> tuple[int, int]:
        if len(in_shape) != 3:
            raise UserError(f"patch threats need image inputs (C, H, W), got shape {in_shape}")
        h, w = int(in_shape[1]), int(in_shape[2])
        if self.height > h or self.width > w:
            raise UserError(
                f"{self.name} does not fit into {h}x{w} images; use a patch of at most {h}x{w}"
            )
        return h, w


def parse_patch(arg: str) -> PatchThreat:
    """Parse the part after ``patch:``: ``K``, ``KxL`` or either with ``@stride``."""
    m = _PATCH_RE.match(arg)
    if not m:
        raise UserError(
            f"patch threat 'patch:{arg}' must look like patch:K, patch:KxL or patch:KxL@STRIDE "
            "with positive integers, e.g. patch:2, patch:5x5@1, patch:3x4@2"
        )
    k = int(m.group(1))
    l_ = int(m.group(2)) if m.group(2) else k
    stride = int(m.group(3)) if m.group(3) else 1
    return PatchThreat(k, l_, stride)


register_threat("patch", parse_patch)

__all__ = ["PatchThreat", "parse_patch"]
