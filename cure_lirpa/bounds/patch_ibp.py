"""Incremental interval bound propagation (IBP) for patch boxes.

A patch box differs from the clean image only inside the patch, so the IBP interval of a
convolution's output differs from the clean activation only inside the patch's receptive field.
:class:`PatchIBP` computes the clean activations once per image and, per box, propagates only a
window holding every position whose interval can differ from the clean value: a convolution reads
the clean activation around the window (zero padding included) and computes only the outputs whose
receptive field meets the window. From the first dense layer on the intervals are propagated in full.

The arithmetic is that of auto_LiRPA's IBP (Gowal et al. 2018, eq. 6): ``mid = (l + u) / 2``,
``rad = (u - l) / 2``, ``W mid + b -/+ |W| rad`` for convolutions and linear layers, ``relu(l)``,
``relu(u)`` for ReLU, the specification matrix merged into the last linear layer. The bounds equal
plain IBP on the same boxes up to floating-point rounding (a different summation order); outside the
window the intervals are exactly the clean activations, which plain IBP reproduces as ``[a, a]``.

Supported: ``nn.Sequential`` (nested allowed) of ``Conv2d`` (zero padding, dilation 1), ``ReLU``,
``BatchNorm2d`` / ``BatchNorm1d`` (in eval mode when used), ``Flatten``, ``Linear``, ``Identity``,
ending in ``Linear``. :func:`build` returns None for anything else (callers then use auto_LiRPA's IBP).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def has_batchnorm(model: nn.Module) -> bool:
    """Does ``model`` hold a BatchNorm layer (bounded incrementally only in eval mode)?"""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _flatten_layers(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [m for child in module.children() for m in _flatten_layers(child)]
    return [module]


def _supported(layer: nn.Module, spatial: bool) -> bool:
    if isinstance(layer, (nn.ReLU, nn.Identity)):
        return True
    if isinstance(layer, nn.Conv2d):
        return (
            spatial
            and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
            and tuple(layer.dilation) == (1, 1)
        )
    if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return (
            layer.running_mean is not None
            and layer.running_var is not None
            and isinstance(layer, nn.BatchNorm2d) == spatial
        )
    if isinstance(layer, nn.Flatten):
        return spatial and layer.start_dim == 1 and layer.end_dim == -1
    if isinstance(layer, nn.Linear):
        return not spatial
    return False


def build(model: nn.Module, in_shape: tuple[int, ...]) -> Optional[PatchIBP]:
    """A :class:`PatchIBP` for ``model`` (inputs (C, H, W)), or None if a layer is not supported."""
    if len(in_shape) != 3:
        return None
    layers = _flatten_layers(model)
    spatial = True
    for layer in layers:
        if not _supported(layer, spatial):
            return None
        if isinstance(layer, nn.Flatten):
            spatial = False
    if spatial or not layers or not isinstance(layers[-1], nn.Linear):
        return None
    return PatchIBP(layers, in_shape)


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm, computed as auto_LiRPA does."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else None
    if scale is None:
        scale = 1.0 / torch.sqrt(bn.running_var + bn.eps)
        return scale, -bn.running_mean * scale
    return scale, bn.bias - bn.running_mean * scale


def _affine_interval(
    lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1) + (1,) * (lo.dim() - 2)
    mid, rad = (hi + lo) / 2.0, (hi - lo) / 2.0
    center = scale.view(shape) * mid + shift.view(shape)
    dev = scale.abs().view(shape) * rad
    return center - dev, center + dev


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def _assemble(
    background: Optional[torch.Tensor],
    window: torch.Tensor,
    sample: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    region: tuple[torch.Tensor, torch.Tensor, int, int],
) -> torch.Tensor:
    """Per box, the ``region`` (corner rows (P,), corner columns (P,), height, width) of the map
    that equals ``window`` (P, C, h, w) at ``(top, left)`` and ``background`` (B, C, H, W) of
    image ``sample`` elsewhere (zero if ``background`` is None); returns (P, C, height, width)."""
    p, c, h, w = window.shape
    r_top, r_left, height, width = region
    rows = r_top.view(-1, 1, 1) + torch.arange(height, device=window.device).view(1, -1, 1)
    cols = r_left.view(-1, 1, 1) + torch.arange(width, device=window.device).view(1, 1, -1)
    dr, dc = rows - top.view(-1, 1, 1), cols - left.view(-1, 1, 1)
    inside = (dr >= 0) & (dr < h) & (dc >= 0) & (dc < w)
    in_win = (torch.arange(p, device=window.device).view(-1, 1, 1) * h + dr) * w + dc
    if background is None:
        back, out_win = window.new_zeros(1, c), torch.zeros_like(in_win)
    else:
        bh, bw = background.shape[2:]
        back = background.permute(0, 2, 3, 1).reshape(-1, c)
        out_win = (sample.view(-1, 1, 1) * bh + rows) * bw + cols
    source = torch.cat([back, window.permute(0, 2, 3, 1).reshape(p * h * w, c)])
    index = torch.where(inside, in_win + len(back), out_win)
    return source[index].permute(0, 3, 1, 2)


def _crop(
    maps: torch.Tensor, sample: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """The windows (P, C, h, w) at ``(top, left)`` of ``maps`` (B, C, H, W) of images ``sample``."""
    c, height, width = maps.shape[1:]
    rows = top.view(-1, 1, 1) + torch.arange(h, device=maps.device).view(1, -1, 1)
    cols = left.view(-1, 1, 1) + torch.arange(w, device=maps.device).view(1, 1, -1)
    index = (sample.view(-1, 1, 1) * height + rows) * width + cols
    return maps.permute(0, 2, 3, 1).reshape(-1, c)[index].permute(0, 3, 1, 2)


def _groups(key: torch.Tensor) -> list[torch.Tensor]:
    """Indices of the rows of ``key`` (P, k) split into groups of equal rows."""
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse).tolist()
    return [g for g in torch.split(order, counts) if len(g)]


class PatchIBP:
    """IBP margin lower bounds of patch boxes, computing only what a patch can change (module doc)."""

    def __init__(self, layers: list[nn.Module], in_shape: tuple[int, ...]):
        self.layers = [m for m in layers if not isinstance(m, nn.Identity)]
        self.in_shape = tuple(in_shape)

    @torch.no_grad()
    def margins(
        self,
        x: torch.Tensor,
        sample: torch.Tensor,
        top: torch.Tensor,
        left: torch.Tensor,
        size: tuple[int, int],
        inside: tuple[torch.Tensor, torch.Tensor],
        C: torch.Tensor,
    ) -> torch.Tensor:
        """Lower bounds (P, S) on ``C[p] @ logits`` over P patch boxes.

        Args:
            x: clean images (B, C, H, W) in the model's input space.
            sample, top, left: (P,) image index and top-left corner (row, column) of each box.
            size: patch (height, width) in pixels.
            inside: per-channel (C,) lower and upper input values inside the patch.
            C: specification (P, S, K), e.g. :func:`cure_lirpa.bounds.classifier.margin_matrix`.
        """
        dev = x.device
        sample, top, left = sample.to(dev), top.to(dev), left.to(dev)
        n = len(sample)
        ph, pw = size
        lo = inside[0].to(x).view(1, -1, 1, 1).expand(n, -1, ph, pw)
        hi = inside[1].to(x).view(1, -1, 1, 1).expand(n, -1, ph, pw)
        clean = x  # clean activations (B, C, H, W) of the current layer's input
        k = 0
        while not isinstance(self.layers[k], nn.Flatten):
            layer = self.layers[k]
            if isinstance(layer, nn.ReLU):
                lo, hi, clean = F.relu(lo), F.relu(hi), F.relu(clean)
            elif isinstance(layer, nn.BatchNorm2d):
                scale, shift = _bn_affine(layer)
                lo, hi = _affine_interval(lo, hi, scale, shift)
                clean = _affine_interval(clean, clean, scale, shift)[0]
            else:
                lo, hi, top, left = self._conv(layer, clean, sample, lo, hi, top, left)
                clean = layer(clean)
            k += 1
        if isinstance(self.layers[k + 1], nn.Linear) and k + 2 < len(self.layers):
            lo, hi = self._first_linear(self.layers[k + 1], clean, sample, lo, hi, top, left)
            k += 1
        else:
            region = (torch.zeros_like(top), torch.zeros_like(left), *clean.shape[2:])
            lo = _assemble(clean, lo, sample, top, left, region).flatten(1)
            hi = _assemble(clean, hi, sample, top, left, region).flatten(1)
        rest = self.layers[k + 1 :]
        for i, layer in enumerate(rest):
            if isinstance(layer, nn.ReLU):
                lo, hi = F.relu(lo), F.relu(hi)
            elif isinstance(layer, nn.BatchNorm1d):
                lo, hi = _affine_interval(lo, hi, *_bn_affine(layer))
            elif i < len(rest) - 1:
                mid, rad = (hi + lo) / 2, (hi - lo) / 2
                center = F.linear(mid, layer.weight, layer.bias)
                deviation = F.linear(rad, layer.weight.abs())
                lo, hi = center - deviation, center + deviation
            else:  # the last Linear, merged with the specification C
                w = C.to(layer.weight).matmul(layer.weight)  # (P, S, D)
                mid, rad = (hi + lo) / 2, (hi - lo) / 2
                center = torch.bmm(mid.unsqueeze(1), w.transpose(1, 2)).squeeze(1)
                deviation = torch.bmm(rad.unsqueeze(1), w.abs().transpose(1, 2)).squeeze(1)
                bias = 0.0 if layer.bias is None else C.to(layer.bias).matmul(layer.bias)
                return center - deviation + bias
        raise AssertionError("build() guarantees a final Linear layer")

    @staticmethod
    def _first_linear(
        linear: nn.Linear,
        clean: torch.Tensor,
        sample: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        top: torch.Tensor,
        left: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """IBP of ``Flatten`` then ``linear``: the clean output plus the change that the windows
        cause, ``W[:, window] (mid - clean) -/+ |W[:, window]| rad``, one weight slice per window
        position."""
        p, c, h, w = lo.shape
        height, width = clean.shape[2:]
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        delta = (mid - _crop(clean, sample, top, left, h, w)).reshape(p, -1)
        rad = rad.reshape(p, -1)
        center = F.linear(clean.flatten(1), linear.weight, linear.bias)[sample]
        deviation = center.new_zeros(center.shape)
        offsets = (
            torch.arange(c, device=lo.device).view(-1, 1, 1) * height * width
            + torch.arange(h, device=lo.device).view(1, -1, 1) * width
            + torch.arange(w, device=lo.device).view(1, 1, -1)
        ).view(-1)
        for g in _groups(torch.stack([top, left], 1)):
            columns = offsets + int(top[g[0]]) * width + int(left[g[0]])
            weight = linear.weight[:, columns]
            center[g] += delta[g] @ weight.T
            deviation[g] = rad[g] @ weight.abs().T
        return center - deviation, center + deviation

    @staticmethod
    def _conv(
        conv: nn.Conv2d,
        clean: torch.Tensor,
        sample: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        top: torch.Tensor,
        left: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """IBP of ``conv`` for windows (P, C, h, w) at (top, left) over the clean input (B, C, H, W):
        the output windows (P, C', oh, ow) holding every output that reads the window, and their
        corners."""
        (kh, kw), (sh, sw), (pad_h, pad_w) = conv.kernel_size, conv.stride, conv.padding
        h, w = lo.shape[2:]
        height, width = clean.shape[2:]
        out_h = (height + 2 * pad_h - kh) // sh + 1
        out_w = (width + 2 * pad_w - kw) // sw + 1
        # Outputs o read input rows o*s - pad .. o*s - pad + k - 1; those meeting rows
        # top .. top + h - 1 are at most (h + k - 2) // s + 1 consecutive ones.
        oh = min(out_h, (h + kh - 2) // sh + 1)
        ow = min(out_w, (w + kw - 2) // sw + 1)
        o_top = _ceil_div(top + pad_h - kh + 1, sh).clamp(0, out_h - oh)
        o_left = _ceil_div(left + pad_w - kw + 1, sw).clamp(0, out_w - ow)
        padded = F.pad(clean, (pad_w, pad_w, pad_h, pad_h))
        # Receptive field of the output window, in padded coordinates.
        region = (o_top * sh, o_left * sw, (oh - 1) * sh + kh, (ow - 1) * sw + kw)
        mid = _assemble(padded, (hi + lo) / 2.0, sample, top + pad_h, left + pad_w, region)
        rad = _assemble(None, (hi - lo) / 2.0, sample, top + pad_h, left + pad_w, region)
        center = F.conv2d(mid, conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)
        deviation = F.conv2d(rad, conv.weight.abs(), None, conv.stride, 0, 1, conv.groups)
        return center - deviation, center + deviation, o_top, o_left
