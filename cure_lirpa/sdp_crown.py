"""SDP-CROWN: margin lower bounds over l2 balls with an inter-neuron ReLU offset.

SDP-CROWN (Chiu, Chen, Zhang, Zhang, "SDP-CROWN: Efficient Bound Propagation for Neural Network
Verification with Tightness of Semidefinite Programming", ICML 2025, arXiv 2506.06665) keeps the
linear bound propagation of CROWN and replaces the offset of each ReLU layer's linear relaxation by
one derived from the l2 ball the layer's input lies in. For a ReLU layer with pre-activation z in
the ball ``B2(z_hat, rho)`` (and in CROWN's box ``[l, u]``), back-propagated coefficients ``c`` on
``ReLU(z)``, any slopes ``g`` and any ``lambda >= 0``, weak duality gives (the paper's ReLU bound,
"h(g, lambda)")::

    c^T ReLU(z) - g^T z  >=  -lambda * rho^2 + sum_i min_{t in [l_i, u_i]} [c_i ReLU(t) - g_i t
                                                                          + lambda (t - z_hat_i)^2]

Each one-dimensional minimum is a convex quadratic on two intervals (t <= 0, t >= 0), solved in
closed form. At ``lambda = 0`` it is the best offset for ``g`` over the box, which for CROWN's slopes
is exactly CROWN's offset, so the bound is never looser than CROWN with the same slopes; the larger of
the two offsets is taken in every layer anyway (both are valid).

Layers whose input is not a ball (every ReLU but one fed directly by the input ball, and even that
one sees an ellipsoid) are handled as in the paper: the pre-activation set is enclosed in a ball
centred at the pre-activation of the clean input, with the input radius times the spectral norms of
the affine layers in between (ReLU is 1-Lipschitz and keeps the ball's centre at ``ReLU(z_hat)``).
Here that radius is also capped by the ball around the box ``[l, u]``, ``||max(z_hat - l,
u - z_hat)||_2``. Spectral norms are upper bounds: exact (SVD) for Linear, and for Conv2d the largest
singular value of the circular convolution on the zero-padded grid (Sedghi, Gupta, Long, ICLR 2019),
of which the zero-padded, strided convolution is a sub-block.

Design (auto_LiRPA 0.3 has no hook for a per-layer offset, so the backward pass is our own):

* intermediate pre-activation bounds ``[l, u]`` come from auto_LiRPA's CROWN on the same l2 ball
  (read from the ``BoundRelu`` nodes after one CROWN call through :mod:`cure_lirpa.lirpa`);
* a backward pass written here for ``Linear``, ``Conv2d``, ``ReLU``, ``Flatten``, eval-mode
  ``BatchNorm1d/2d``, ``Identity``/``Dropout`` (eval) and nested ``nn.Sequential`` (the zoo, with its
  normalisation folded by :mod:`cure_lirpa.bounds`); every other model is refused with a
  :class:`~cure_lirpa.errors.UserError`;
* per ReLU layer one ``lambda`` per sample and margin (``lambda = lambda_0 * exp(theta)``, so it
  stays positive without projection) and, as in alpha-CROWN, one lower slope per unstable neuron,
  sample and margin in ``[0, 1]``, optimised jointly with Adam for the classifier's alpha-CROWN step
  count; every step's bound is valid and the best one per margin is kept;
* the result is the element-wise maximum with auto_LiRPA's CROWN bound.

Threats: l2 balls. An l1 ball of radius r lies in the l2 ball of radius r, so for l1 the bound is the
larger of CROWN's l1 bound and this l2 bound. l∞ balls and box families get CROWN's bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import lirpa
from .errors import UserError
from .threats import NormBall, Threat

if TYPE_CHECKING:  # bounds imports this module lazily; avoid the cycle at import time
    from .bounds import BoundedClassifier

METHOD = "sdp-crown"
LAMBDA_LR = 0.2
ALPHA_LR = 0.5
_SAFETY = 1.0 + 1e-4  # relative margin on computed spectral norms (float round-off)
_TRAIN_DEPENDENT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)
_SUPPORTED = "Linear, Conv2d, ReLU, Flatten, BatchNorm1d/2d (eval mode), Identity, Dropout"


# ---------------------------------------------------------------------------------------------
# The layers of a supported model


def model_layers(module: nn.Module) -> list[nn.Module]:
    """The leaf layers of ``module`` in order (nested ``nn.Sequential`` flattened).

    Raises :class:`UserError` for any layer the SDP-CROWN backward pass does not implement.
    """
    if isinstance(module, nn.Sequential):
        return [leaf for child in module.children() for leaf in model_layers(child)]
    if isinstance(module, (nn.Identity, nn.Dropout)) or type(module).__name__ == "InputIdentity":
        return []  # InputIdentity: the identity layer the bounded classifier may put in front
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros":
            raise UserError(
                f"sdp-crown supports Conv2d with groups=1, dilation=1 and zero padding, got {module}"
            )
        if isinstance(module.padding, str):
            raise UserError(
                f"sdp-crown needs numeric Conv2d padding, got padding={module.padding!r}"
            )
        return [module]
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise UserError("sdp-crown supports nn.Flatten() with start_dim=1, end_dim=-1 only")
        return [module]
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.running_mean is None:
            raise UserError("sdp-crown needs BatchNorm with running statistics (eval mode)")
        return [module]
    if isinstance(module, (nn.Linear, nn.ReLU)):
        return [module]
    raise UserError(
        f"sdp-crown does not support the layer {type(module).__name__}; it supports models built "
        f"as nn.Sequential of {_SUPPORTED} (every zoo model). Use --method crown or alpha-crown "
        "for this model."
    )


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``scale * x + shift`` (each (C,))."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _bn_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *[1] * (ndim - 2))


def spectral_norm_upper(layer: nn.Module, in_shape: tuple[int, ...]) -> float:
    """An upper bound on the l2 operator norm of the linear part of ``layer`` on inputs of
    ``in_shape`` (one sample's shape)."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            return float(torch.linalg.matrix_norm(layer.weight.double(), ord=2)) * _SAFETY
        if isinstance(layer, nn.Conv2d):
            return _conv_norm_upper(layer, in_shape) * _SAFETY
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return float(_bn_affine(layer)[0].abs().max()) * _SAFETY
    return 1.0  # ReLU, Flatten


def _conv_norm_upper(conv: nn.Conv2d, in_shape: tuple[int, ...]) -> float:
    """Upper bound on the operator norm of a zero-padded, strided Conv2d on ``in_shape``.

    Zero padding embeds the image isometrically in the padded grid (padded further to a multiple of
    the stride). Space-to-depth by the stride s (an isometric re-arrangement: channel (c, i, j) holds
    the pixels at offsets (i, j) mod s) turns the strided correlation into a stride-1 "valid" one
    with ``C * s^2`` input channels and a ``ceil(k / s)`` kernel. That is a row block of the circular
    correlation on the same grid (no wrap-around), which the 2-D DFT block-diagonalises into one
    ``(out, in)`` matrix per frequency (Sedghi, Gupta, Long, ICLR 2019). None of these steps
    increases the norm, so the largest singular value over the frequencies bounds it.
    """
    w = conv.weight.detach().double()
    co, ci, kh, kw = w.shape
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    kh2, kw2 = -(-kh // sh), -(-kw // sw)
    w = F.pad(w, (0, kw2 * sw - kw, 0, kh2 * sh - kh))
    w = (
        w.view(co, ci, kh2, sh, kw2, sw)
        .permute(0, 1, 3, 5, 2, 4)
        .reshape(co, ci * sh * sw, kh2, kw2)
    )
    grid = (-(-(in_shape[1] + 2 * ph) // sh), -(-(in_shape[2] + 2 * pw) // sw))
    grid = (max(grid[0], kh2), max(grid[1], kw2))
    blocks = torch.fft.fft2(w, s=grid).permute(2, 3, 0, 1)
    return float(torch.linalg.matrix_norm(blocks, ord=2).max())


# ---------------------------------------------------------------------------------------------
# Forward: centres and radii of the balls holding each ReLU's pre-activation


@dataclass
class ReluLayer:
    """One ReLU's pre-activation bounds and ball, all for a chunk of B samples (flattened)."""

    lower: torch.Tensor  # (B, n)
    upper: torch.Tensor  # (B, n)
    center: torch.Tensor  # (B, n), pre-activation at the clean input
    radius: torch.Tensor  # (B,)

    @property
    def unstable(self) -> torch.Tensor:
        return (self.lower < 0) & (self.upper > 0)


def _forward(
    layers: list[nn.Module], center: torch.Tensor, eps: float, bounds: list[tuple]
) -> tuple[list[ReluLayer], list[tuple[int, ...]]]:
    """Pre-activation balls of every ReLU (in order) and every layer's input shape."""
    h = center
    radius = torch.full((len(center),), float(eps), dtype=center.dtype, device=center.device)
    relus: list[ReluLayer] = []
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad():
        for layer in layers:
            shapes.append(tuple(h.shape[1:]))
            if isinstance(layer, nn.ReLU):
                k = len(relus)
                if k >= len(bounds):
                    raise UserError("sdp-crown: the model has more ReLUs than auto_LiRPA's graph")
                lo, up = (b.reshape(len(h), -1) for b in bounds[k])
                zc = h.reshape(len(h), -1)
                if lo.shape != zc.shape:
                    raise UserError(
                        "sdp-crown: auto_LiRPA's ReLU bounds do not match the model's layers "
                        f"({tuple(lo.shape)} vs {tuple(zc.shape)}); use crown or alpha-crown"
                    )
                tol = 1e-4 * (1 + zc.abs())
                if bool(((zc < lo - tol) | (zc > up + tol)).any()):
                    raise UserError(
                        "sdp-crown: auto_LiRPA's ReLU bounds do not contain the clean "
                        "pre-activations (its graph differs from the model's layer order)"
                    )
                box = torch.maximum(zc - lo, up - zc).clamp_min(0).norm(dim=1)
                radius = torch.minimum(radius, box)
                relus.append(ReluLayer(lo, up, zc, radius.clone()))
                h = F.relu(h)
            else:
                radius = radius * spectral_norm_upper(layer, tuple(h.shape[1:]))
                h = layer(h)
    if len(relus) != len(bounds):
        raise UserError("sdp-crown: the model has fewer ReLUs than auto_LiRPA's graph")
    return relus, shapes


# ---------------------------------------------------------------------------------------------
# Backward: the linear bound with SDP-CROWN offsets


def _piece_min(k: torch.Tensor, lam: torch.Tensor, zc, a, b) -> torch.Tensor:
    """``min_{t in [a, b]} k t + lam (t - zc)^2`` element-wise (lam > 0)."""
    t = (zc - k / (2 * lam)).clamp(min=a, max=b)
    return k * t + lam * (t - zc) ** 2


def relu_offset(
    c: torch.Tensor,
    g: torch.Tensor,
    lam: torch.Tensor,
    layer: ReluLayer,
) -> torch.Tensor:
    """The SDP-CROWN offset (B, S): a lower bound on ``c^T ReLU(z) - g^T z`` over the ball and box.

    ``c`` and ``g`` are (B, S, n), ``lam`` (B, S) positive.
    """
    lam3 = lam.unsqueeze(-1)
    zc = layer.center.unsqueeze(1)
    lo, up = layer.lower.unsqueeze(1), layer.upper.unsqueeze(1)
    neg = _piece_min(-g, lam3, zc, lo.clamp(max=0), up.clamp(max=0))  # t <= 0: ReLU(t) = 0
    pos = _piece_min(c - g, lam3, zc, lo.clamp(min=0), up.clamp(min=0))  # t >= 0: ReLU(t) = t
    return torch.minimum(neg, pos).sum(-1) - lam * layer.radius.unsqueeze(1) ** 2


def _crown_slopes(layer: ReluLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CROWN's upper slope and intercept and adaptive lower slope, each (B, n)."""
    lo, up = layer.lower, layer.upper
    active = (lo >= 0).to(lo.dtype)
    unstable = layer.unstable.to(lo.dtype)
    width = (up - lo).clamp_min(1e-12)
    up_slope = active + unstable * up.clamp_min(0) / width
    up_icpt = unstable * (-lo * up.clamp_min(0) / width)
    low_slope = active + unstable * (up >= -lo).to(lo.dtype)
    return up_slope, up_icpt, low_slope


def _backward(
    layers: list[nn.Module],
    shapes: list[tuple[int, ...]],
    relus: list[ReluLayer],
    C: torch.Tensor,
    alphas: list[torch.Tensor],
    thetas: list[torch.Tensor],
    lam0: list[Optional[torch.Tensor]],
    slopes: list[tuple],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-substitute ``C`` (B, S, K) to the input: returns ``(A (B, S, *in_shape), bias (B, S))``.

    Each ReLU's offset is the larger of CROWN's (for the chosen slopes) and SDP-CROWN's.
    """
    B, S = C.shape[:2]
    A = C
    bias = torch.zeros(B, S, dtype=C.dtype, device=C.device)
    k = len(relus)
    for layer, shape in zip(reversed(layers), reversed(shapes)):
        if isinstance(layer, nn.Linear):
            if layer.bias is not None:
                bias = bias + A @ layer.bias
            A = A @ layer.weight
        elif isinstance(layer, nn.Conv2d):
            out_shape = A.shape[2:]
            flat = A.reshape(B * S, *out_shape)
            if layer.bias is not None:
                bias = bias + (A.sum((3, 4)) * layer.bias).sum(-1)
            pad = tuple(
                shape[1 + i]
                - (
                    (out_shape[1 + i] - 1) * layer.stride[i]
                    - 2 * layer.padding[i]
                    + layer.kernel_size[i]
                )
                for i in range(2)
            )
            A = F.conv_transpose2d(
                flat, layer.weight, None, layer.stride, layer.padding, output_padding=pad
            ).reshape(B, S, *shape)
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, shift = _bn_affine(layer)
            view = _bn_view(scale, A.dim() - 1)
            bias = bias + (A * _bn_view(shift, A.dim() - 1).unsqueeze(0)).flatten(2).sum(-1)
            A = A * view.unsqueeze(0)
        elif isinstance(layer, nn.Flatten):
            A = A.reshape(B, S, *shape)
        elif isinstance(layer, nn.ReLU):
            k -= 1
            r = relus[k]
            up_slope, up_icpt, _ = slopes[k]
            c = A.reshape(B, S, -1)
            unstable = r.unstable.unsqueeze(1)
            active = (r.lower >= 0).to(c.dtype).unsqueeze(1)
            low = torch.where(unstable, lirpa.clip_slope(alphas[k]), active)
            pos, neg = c.clamp(min=0), c.clamp(max=0)
            g = pos * low + neg * up_slope.unsqueeze(1)
            crown = (neg * up_icpt.unsqueeze(1)).sum(-1)
            if lam0[k] is None:  # the optimum for one layer's offset is near ||g|| / (2 rho)
                scale = (g * unstable).detach().norm(dim=-1) / (2 * r.radius.unsqueeze(1))
                lam0[k] = scale.nan_to_num(1.0).clamp(1e-6, 1e6)
            lam = lam0[k] * thetas[k].exp()
            bias = bias + torch.maximum(crown, relu_offset(c, g, lam, r))
            A = g.reshape(B, S, *shape)
        else:  # pragma: no cover - model_layers refuses everything else
            raise AssertionError(type(layer))
    return A, bias


# ---------------------------------------------------------------------------------------------
# Entry points


def margin_lower_bounds(
    bc: BoundedClassifier, x: torch.Tensor, y: torch.Tensor, threat: Threat
) -> torch.Tensor:
    """Lower bounds (B, K-1) on ``f_y - f_j`` over ``threat`` with SDP-CROWN (see the module doc).

    ``bc`` is a :class:`~cure_lirpa.bounds.BoundedClassifier`; ``x`` (B, *in_shape) in [0, 1].
    """
    if bc.trainable:
        raise UserError(
            "sdp-crown is a verification method: build the BoundedClassifier with trainable=False"
        )
    if not isinstance(threat, NormBall) or threat.p == math.inf:
        return bc.margin_lower_bounds(x, y, threat, "crown")
    layers = model_layers(bc.traced)
    x, y = bc._check_input(x, y)
    n = bc.chunk_size(METHOD)
    # Verification bounds the model in eval mode (BatchNorm running statistics, no dropout), like
    # the bounded module, whatever mode the wrapped model is in.
    modes = [(m, m.training) for m in bc.traced.modules() if isinstance(m, _TRAIN_DEPENDENT)]
    for m, _ in modes:
        m.training = False
    try:
        out = [
            _l2_bounds(bc, layers, x[s : s + n], y[s : s + n], threat.eps)
            for s in range(0, len(y), n)
        ]
    finally:
        for m, flag in modes:
            m.training = flag
    lb = torch.cat(out)
    if threat.p == 1.0:  # the l1 ball of radius eps lies in the l2 ball of radius eps
        lb = torch.maximum(lb, bc.margin_lower_bounds(x, y, threat, "crown"))
    return lb


def _iterations(bc: BoundedClassifier) -> int:
    opts = getattr(bc.module, "bound_opts", {}) or {}
    return int((opts.get("optimize_bound_args") or {}).get("iteration", 20))


def _l2_bounds(
    bc: BoundedClassifier, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor, eps: float
) -> torch.Tensor:
    from .bounds import margin_matrix

    center = bc._to_bound_space(x)
    ptb = lirpa.perturbation(2.0, eps)
    C = margin_matrix(y, bc.num_classes)
    with torch.no_grad():
        crown, _ = lirpa.compute_bounds(bc.module, lirpa.BoundedTensor(center, ptb), C, "crown")
        bounds = [
            (node.inputs[0].lower.detach(), node.inputs[0].upper.detach())
            for node in bc.module.relus
        ]
    bc._check_trace(center, ptb, 2.0)  # the traced graph is the model; the ball was not dropped
    relus, shapes = _forward(layers, center, eps, bounds)
    if not relus or eps <= 0:
        return crown.detach()
    B, S = C.shape[:2]
    slopes = [_crown_slopes(r) for r in relus]
    alphas = [s[2].unsqueeze(1).expand(B, S, -1).clone().requires_grad_(True) for s in slopes]
    lam0: list[Optional[torch.Tensor]] = [None] * len(relus)  # set by the first pass
    thetas = [torch.zeros(B, S, dtype=C.dtype, device=C.device, requires_grad=True) for _ in relus]
    opt = torch.optim.Adam(
        [{"params": alphas, "lr": ALPHA_LR}, {"params": thetas, "lr": LAMBDA_LR}]
    )
    x_flat = center.reshape(B, -1)
    best = crown.detach().clone()
    for _ in range(max(1, _iterations(bc))):
        with torch.enable_grad():
            A, bias = _backward(layers, shapes, relus, C, alphas, thetas, lam0, slopes)
            A = A.reshape(B, S, -1)
            lb = torch.einsum("bsd,bd->bs", A, x_flat) + bias - eps * A.norm(dim=-1)
            best = torch.maximum(best, lb.detach())
            # gradients for the slopes and lambdas only: the model's parameters get none
            grads = torch.autograd.grad(-lb.sum(), [*alphas, *thetas])
        for p, g in zip([*alphas, *thetas], grads):
            p.grad = g
        opt.step()
        with torch.no_grad():
            for a in alphas:
                a.clamp_(0.0, 1.0)
    return best
