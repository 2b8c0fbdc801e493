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
is exactly CROWN's offset; the larger of the two offsets is taken at every ReLU (both are valid), so
the bound is never looser than CROWN with the same slopes.

The ball holding each ReLU's pre-activation is centred at the pre-activation of the clean input
(the centre of the threat ball). Its radius is propagated through the graph as in the paper: the input
radius times an upper bound on the l2 operator norm of every affine node on the way (exact SVD for
Linear; for Conv2d the largest singular value of the circular convolution on the zero-padded grid,
Sedghi, Gupta, Long, ICLR 2019, of which the zero-padded strided convolution is a sub-block;
the largest multiplier for BatchNorm and constant products), unchanged by ReLU (1-Lipschitz, and
the centre maps to ``ReLU(z_hat)``) and reshapes, summed over the branches of an addition. Every
radius is capped by the ball around CROWN's box, ``||max(z_hat - l, u - z_hat)||_2``, which also
covers any node the propagation does not know (its radius is then unbounded before the cap).

Design: the backward pass is auto_LiRPA's own CROWN pass over the traced graph (any graph it
traces: residual blocks, custom ``forward``s, concatenations, unfolded normalisation), with the
intermediate bounds of a preceding CROWN call held fixed and, at each ReLU of the final pass, this
module's rule (:func:`cure_lirpa.bounds.lirpa.relu_backward_rule`). Per ReLU one ``lambda`` per sample
and margin (``lambda = lambda_0 * exp(theta)``, positive without projection) and, as in alpha-CROWN,
one lower slope per unstable neuron, sample and margin in ``[0, 1]`` are optimised jointly with Adam
for the classifier's alpha-CROWN step count; every step's bound is valid and the best one per margin
is kept, never below CROWN's.

Threats arrive mapped into bound space by :class:`~cure_lirpa.bounds.classifier.BoundedClassifier` (normalisation
folded, or applied with the radius divided by the smallest std). l2 balls get the bound above. An l1
ball of radius r lies in the l2 ball of radius r, so for l1 the bound is the larger of CROWN's l1 bound
and this l2 bound. Boxes (l∞ balls, box families) get CROWN's bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from ..threats.base import Threat
from ..vocabulary import CROWN, SDP_CROWN
from . import lirpa
from .region import BoundResult, Region

if TYPE_CHECKING:
    from .classifier import BoundedClassifier

LAMBDA_LR = 0.2
ALPHA_LR = 0.5
_SAFETY = 1.0 + 1e-4  # relative margin on computed operator norms (float round-off)


def operator_norm_upper(node: lirpa.GraphNode) -> float:
    """An upper bound on the l2 operator norm of an affine node's linear part (inf if unknown)."""
    with torch.no_grad():
        if node.kind == "linear" and node.weight is not None and node.weight.dim() == 2:
            norm = float(torch.linalg.matrix_norm(node.weight.double(), ord=2))
            return norm * float(node.scale if node.scale is not None else 1.0) * _SAFETY
        if node.kind == "conv" and node.weight is not None and _plain_conv(node):
            pad = node.padding if len(node.padding) == 2 else node.padding[:2]
            return conv_norm_upper(node.weight, node.stride, pad, node.in_shape) * _SAFETY
        if node.kind in ("batchnorm", "mul") and node.scale is not None:
            return float(node.scale.abs().max()) * _SAFETY
        if node.kind == "div" and node.scale is not None:
            return float(1.0 / node.scale.abs().min()) * _SAFETY
    return math.inf


def _plain_conv(node: lirpa.GraphNode) -> bool:
    """Groups 1, dilation 1, 2-D, symmetric zero padding."""
    pads = tuple(node.padding)
    symmetric = len(pads) == 2 or (len(pads) == 4 and pads[:2] == pads[2:])
    return (
        node.groups == 1
        and all(d == 1 for d in node.dilation)
        and len(node.stride) == 2
        and len(node.in_shape) == 3
        and symmetric
    )


def conv_norm_upper(
    weight: torch.Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    in_shape: tuple[int, ...],
) -> float:
    """Upper bound on the operator norm of a zero-padded, strided 2-D convolution (kernel ``weight``
    (out, in, kh, kw), groups 1, dilation 1) on inputs of ``in_shape`` (C, H, W).

    Zero padding embeds the image isometrically in the padded grid (padded further to a multiple of
    the stride). Space-to-depth by the stride s (an isometric re-arrangement: channel (c, i, j) holds
    the pixels at offsets (i, j) mod s) turns the strided correlation into a stride-1 "valid" one
    with ``C * s^2`` input channels and a ``ceil(k / s)`` kernel. That is a row block of the circular
    correlation on the same grid (no wrap-around), which the 2-D DFT block-diagonalises into one
    ``(out, in)`` matrix per frequency (Sedghi, Gupta, Long, ICLR 2019). None of these steps
    increases the norm, so the largest singular value over the frequencies bounds it.
    """
    w = weight.detach().double()
    co, ci, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
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
# The balls holding each ReLU's pre-activation


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


def relu_balls(module, eps: float) -> dict[str, ReluLayer]:
    """Per ReLU node of a bounded module (after a CROWN call on the l2 ball of radius ``eps``): its
    pre-activation bounds and the ball holding the pre-activation (see the module doc)."""
    inputs = lirpa.relu_inputs(module)
    radius: dict[str, torch.Tensor] = {}
    layers: dict[str, ReluLayer] = {}
    batch = next(iter(inputs.values()))[0].shape[0] if inputs else 1
    for node in lirpa.graph(module):
        live = [radius[i] for i in node.inputs]
        if node.kind == "input":
            r = torch.full((batch,), float(eps), dtype=torch.float64)
        elif node.kind == "constant":
            r = torch.zeros(batch, dtype=torch.float64)
        elif node.kind in ("shape", "add", "sub"):
            r = sum(live, torch.zeros(batch, dtype=torch.float64))
        elif node.kind == "concat":
            r = torch.stack(live).pow(2).sum(0).sqrt()
        elif node.kind == "relu":
            lower, upper, center = (t.reshape(batch, -1) for t in inputs[node.name])
            box = torch.maximum(center - lower, upper - center).clamp_min(0).norm(dim=1)
            r = torch.minimum(live[0], box.double())
            layers[node.name] = ReluLayer(lower, upper, center, r.to(center.dtype))
        else:  # affine nodes; "other" gets inf and is capped by the box at the next ReLU
            norm = operator_norm_upper(node) if len(live) == 1 else math.inf
            r = sum(live, torch.zeros(batch, dtype=torch.float64))
            r = torch.where(r > 0, r * norm, r)
        radius[node.name] = r
    return layers


# ---------------------------------------------------------------------------------------------
# The ReLU rule of the final backward pass


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


class _Rule:
    """SDP-CROWN's rule at each ReLU of the final backward pass, with its optimisable variables:
    per ReLU the lower slopes (B, S, n) and ``theta`` (B, S), ``lambda = lambda_0 * exp(theta)``."""

    def __init__(self, layers: dict[str, ReluLayer]):
        self.layers = layers
        self.slopes = {name: _crown_slopes(layer) for name, layer in layers.items()}
        self.alphas: dict[str, torch.Tensor] = {}
        self.thetas: dict[str, torch.Tensor] = {}
        self.lam0: dict[str, torch.Tensor] = {}

    def params(self) -> list[torch.Tensor]:
        return [*self.alphas.values(), *self.thetas.values()]

    def __call__(self, name: str, last_lA: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S, B = last_lA.shape[:2]
        layer = self.layers[name]
        up_slope, up_icpt, low0 = self.slopes[name]
        c = last_lA.reshape(S, B, -1).transpose(0, 1)  # (B, S, n)
        if name not in self.alphas:
            self.alphas[name] = low0.unsqueeze(1).expand(B, S, -1).clone().requires_grad_(True)
            self.thetas[name] = torch.zeros(B, S, dtype=c.dtype, requires_grad=True)
        unstable = layer.unstable.unsqueeze(1)
        active = (layer.lower >= 0).to(c.dtype).unsqueeze(1)
        low = torch.where(unstable, lirpa.clip_slope(self.alphas[name]), active)
        pos, neg = c.clamp(min=0), c.clamp(max=0)
        g = pos * low + neg * up_slope.unsqueeze(1)
        crown = (neg * up_icpt.unsqueeze(1)).sum(-1)
        if name not in self.lam0:  # the optimum for one layer's offset is near ||g|| / (2 rho)
            scale = (g * unstable).detach().norm(dim=-1) / (2 * layer.radius.unsqueeze(1))
            self.lam0[name] = scale.nan_to_num(1.0).clamp(1e-6, 1e6)
        lam = self.lam0[name] * self.thetas[name].exp()
        bias = torch.maximum(crown, relu_offset(c, g, lam, layer))
        return g.transpose(0, 1).reshape(last_lA.shape), bias.transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# The backend


class SdpCrown:
    """The SDP-CROWN bound method (see the module doc); a :class:`~cure_lirpa.bounds.backends.Backend`.

    It receives the threat already mapped into bound space by the bounded classifier (a
    :class:`~cure_lirpa.bounds.region.Region`) and bounds any graph auto_LiRPA's CROWN bounds.
    """

    name = SDP_CROWN
    trainable = False

    def supports(self, bc: BoundedClassifier, threat: Optional[Threat]) -> Optional[str]:
        if bc.trainable:
            return "sdp-crown is a verification method (the classifier is built for training)"
        return None

    def bound(self, bc: BoundedClassifier, region: Region, C: torch.Tensor) -> BoundResult:
        """l2 regions: SDP-CROWN's bound, at least CROWN's. l1 regions: the larger of CROWN's l1
        bound and SDP-CROWN's bound over the enclosing l2 ball of the same radius. Boxes: CROWN."""
        crown = bc.lirpa_bounds(region, C, CROWN)
        if region.is_box or region.eps <= 0:
            return crown
        ball = region if region.p == 2.0 else Region(region.center, 2.0, region.eps)
        crown_l2 = crown if region.p == 2.0 else bc.lirpa_bounds(ball, C, CROWN)
        lb = _optimise(bc, ball, C, crown_l2.lower)
        return BoundResult.exact(torch.maximum(lb, crown.lower.detach()))


def _optimise(
    bc: BoundedClassifier, ball: Region, C: torch.Tensor, crown: torch.Tensor
) -> torch.Tensor:
    """SDP-CROWN lower bounds (B, S) over the l2 ``ball`` right after a CROWN call on it."""
    layers = relu_balls(bc.module, ball.eps)
    best = crown.detach().clone()
    if not layers:
        return best
    interm = lirpa.node_bounds(bc.module)
    rule = _Rule(layers)
    opt: Optional[torch.optim.Optimizer] = None
    for _ in range(max(1, bc.alpha_iterations)):
        with torch.enable_grad(), lirpa.relu_backward_rule(bc.module, rule):
            lb = bc.lirpa_bounds(ball, C, CROWN, interm_bounds=interm).lower
            loss = -lb.sum()
        best = torch.maximum(best, lb.detach())
        params = rule.params()
        if opt is None:
            opt = torch.optim.Adam(
                [
                    {"params": list(rule.alphas.values()), "lr": ALPHA_LR},
                    {"params": list(rule.thetas.values()), "lr": LAMBDA_LR},
                ]
            )
        # gradients for the slopes and lambdas only: the model's parameters get none
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        opt.step()
        with torch.no_grad():
            for a in rule.alphas.values():
                a.clamp_(0.0, 1.0)
    return best
