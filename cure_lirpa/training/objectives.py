"""Certified-training methods: each turns a batch and the current eps into a loss.

A method is a small object with ``norms`` (the norms it trains for) and
``step(net, batch) -> StepOutput``: the scalar loss to minimise, its parts (floats, for the
metrics) and, per norm, the boolean mask of samples whose *sound* bound at the current training eps
is positive (certified). Methods know nothing about epochs, optimizers or checkpoints; the trainer
knows nothing about method names (it builds the method with :func:`make_method` from its config).

Building blocks (IBP: Gowal et al. 2018; SABR: Müller et al. 2023; CURE's losses). ``lb`` are
lower bounds (B, K-1) on the margins
``f_y - f_j``; the per-sample certified loss of norm p is ``L_p = certified_ce(lb_p)``:

* l∞ variants: ``ibp`` -- the box ``clip(x ± eps, 0, 1)`` through IBP (optionally mixed with
  CROWN-IBP, ``lb = beta * lb_crown_ibp + (1 - beta) * lb_ibp``); ``sabr`` -- SABR's small box of radius
  ``lambda * eps`` around a PGD point (:func:`cure_lirpa.attacks.sabr_box`).
* l2 variants: ``ball`` -- the exact l2 ball through IBP; ``defence`` -- CURE's l2 defence box
  (:func:`cure_lirpa.attacks.l2_defence_box`).
* ``mtl-ibp`` (both norms): MTL-IBP's expressive loss (De Palma et al., ICLR 2024), per sample
  ``(1 - a_p) * CE(f(x_adv), y) + a_p * certified_ce(lb_p)`` with ``lb_p`` the (sound) ball bounds
  of ``ibp`` / ``ball`` and ``x_adv`` a short PGD point in the same ball; ``a_p`` per norm.
* Shi et al.'s IBP regulariser (``batch.reg_weight > 0``, on the l∞ box) is added to the loss of any
  method that trains l∞; the trainer schedules its weight over the ramp.
* Natural-loss mix (Gowal et al.): ``loss = kappa * CE(f(x), y) + (1 - kappa) * L_robust``.
* Multi-norm (CURE paper): L_Joint ``alpha * mean(L_inf) + (1 - alpha) * mean(L_2)``, L_Max
  ``mean(max(L_inf, L_2))``, L_Random (disjoint random halves), and bound alignment L_BA added as
  ``+ eta * L_BA`` (outside the kappa mix).

At eps 0 no bound is computed: the exact margins ``f_y(x) - f_j(x)`` of the clean logits are the
bounds, so every certified loss equals the natural cross-entropy (warm-up is natural training).

All forward passes of training go through the bounded module (:class:`TrainingNetwork`), which owns
the BatchNorm running statistics during training (auto_LiRPA keeps its own copies of buffers);
:meth:`TrainingNetwork.sync_to_model` copies them back into the original model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import expressive_attack_point, l2_defence_box, sabr_box
from ..bounds import lirpa
from ..bounds.classifier import BoundedClassifier, certified
from ..errors import UserError
from ..models import Classifier
from ..threats.base import NormBall
from ..vocabulary import (
    BALL,
    COMBINERS,
    CROWN_IBP,
    CURE_JOINT,
    CURE_MAX,
    CURE_RANDOM,
    DEFENCE,
    IBP,
    JOINT,
    L2,
    L2_VARIANTS,
    LINF,
    LINF_VARIANTS,
    MAX,
    MTL_IBP,
    MULTI_NORM_OBJECTIVES,
    NATURAL,
    RANDOM,
    SABR,
    SINGLE_NORM_OBJECTIVES,
    TRAINING_NORMS,
)
from . import losses

NORMS = TRAINING_NORMS
"""The norms of multi-norm training, in the order used everywhere (metrics, configs)."""
P_OF = {LINF: math.inf, L2: 2.0}


# ---------------------------------------------------------------------------------------------
# The network as methods see it


class TrainingNetwork:
    """A model and its trainable :class:`BoundedClassifier`: logits, bounds and attacks for methods.

    ``model`` maps [0, 1] images to logits. Build once per trainer; BatchNorm modes are set
    explicitly with :meth:`train`. The bounded module shares the model's parameters but holds its
    own copies of the buffers (BatchNorm running statistics): during training they live in the
    bounded module, :meth:`sync_to_model` / :meth:`sync_from_model` copy them across.
    """

    def __init__(
        self,
        model: nn.Module,
        in_shape: tuple[int, ...],
        device: str | torch.device = "cpu",
        memory_mb: float = 2048.0,
    ):
        self.model = model
        self.device = torch.device(device)
        # auto_LiRPA's parameter nodes set requires_grad = (module in train mode) on every forward;
        # remember the model's own flags (e.g. frozen layers) to restore them in train mode.
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        model.to(self.device)
        model.eval()  # tracing a BatchNorm1d model in train mode fails on the batch-of-1 dummy input
        self.bounded = BoundedClassifier(
            model, in_shape, self.device, memory_mb=memory_mb, trainable=True
        )
        self.num_classes = self.bounded.num_classes
        # Buffers of the bounded module and the model's buffers they copy.
        self._buffer_pairs = lirpa.buffer_pairs(self.bounded.module, self.bounded.traced)
        self._probe_lp_ball(in_shape)
        self.train(True)

    @torch.no_grad()
    def _probe_lp_ball(self, in_shape: tuple[int, ...]) -> None:
        """Run the bounded classifier's one-time lp-ball soundness check now, with a clearly
        non-zero radius on a mid-grey image, so that it never fires mid-training: at the start of a
        smoothed ramp eps is ~1e-10 and float32 output widths round to 0."""
        x = torch.full((1, *in_shape), 0.5, device=self.device)
        y = torch.zeros(1, dtype=torch.long, device=self.device)
        self.bounded.margin_lower_bounds(x, y, NormBall(2.0, 0.5), IBP)

    def train(self, mode: bool = True) -> TrainingNetwork:
        """Train (batch statistics, running-stat updates) or eval mode for the model and bounds.

        Keep train mode while training: auto_LiRPA's parameter nodes set ``requires_grad`` of the
        shared parameters to the module's mode on every forward; train mode restores the model's
        own flags. Dropout stays off in the bounds (they bound the network ``verify`` certifies,
        without dropout); the clean and attack forward passes of the model keep it.
        """
        self.bounded.train(mode)
        for node in self.bounded.module.modules():  # bounds are of the network without dropout
            if type(node).__name__ == "BoundDropout":
                node.train(False)
        if mode:
            for p, flag in self._requires_grad:
                p.requires_grad_(flag)
        return self

    @property
    def has_buffers(self) -> bool:
        """True for models with buffers in the bounded graph (BatchNorm running statistics)."""
        return bool(self._buffer_pairs)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Clean logits (B, K).

        Models with BatchNorm run through the bounded module (it owns the running statistics, and
        in train mode auto_LiRPA's BatchNorm bounds use the batch statistics of its last clean
        forward pass: call this on the batch *before* computing its bounds). Other models run
        through the plain model: the same parameters and operations, without auto_LiRPA's overhead.
        """
        if not self.has_buffers:
            return self.model(x)
        if isinstance(self.model, Classifier):  # the trainable bounded module sees normalised input
            x = self.model.normalize(x)
        return self.bounded.module(x)

    def ball_bounds(
        self, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, method: str = IBP
    ) -> torch.Tensor:
        """Margin lower bounds (B, K-1) over the ``norm`` ball of radius ``eps`` (with gradients)."""
        return self.bounded.margin_lower_bounds(x, y, NormBall(P_OF[norm], eps), method)

    def box_bounds(
        self, x_l: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor, method: str = IBP
    ) -> torch.Tensor:
        """Margin lower bounds (B, K-1) over the boxes ``[x_l, x_u]`` (with gradients)."""
        return self.bounded.box_lower_bounds(x_l, x_u, y, method)

    @torch.no_grad()
    def certify(
        self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, norm: str, eps: float
    ) -> torch.Tensor:
        """Bool (B,): IBP-certified under the ``norm`` ball of radius ``eps`` (no gradients).

        ``logits`` are the batch's clean logits (used at eps 0). Uses the BatchNorm statistics of
        the last :meth:`logits` call (the same batch).
        """
        if eps == 0:
            return certified(exact_margins(logits, y))
        return certified(self.ball_bounds(x, y, norm, eps, IBP))

    @torch.no_grad()
    def sync_to_model(self) -> None:
        """Copy the bounded module's buffers (BatchNorm running statistics) into the model."""
        for src, dst in self._buffer_pairs:
            dst.copy_(src)

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Copy the model's buffers into the bounded module (after loading weights into the model)."""
        for dst, src in self._buffer_pairs:
            dst.copy_(src)


def exact_margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Margins ``f_y - f_j`` (B, K-1) for j != y in increasing j, as :func:`bounds.margin_matrix`."""
    true = logits.gather(1, y[:, None])
    keep = ~F.one_hot(y, logits.shape[1]).bool()
    return (true - logits)[keep].view(logits.shape[0], logits.shape[1] - 1)


# ---------------------------------------------------------------------------------------------
# What a method receives and returns


@dataclass
class Batch:
    """One training batch and the schedule values of the current step.

    ``x`` (B, C, H, W) in [0, 1]; ``y`` (B,); ``eps`` the current training radius per norm
    (``{'linf': ..., 'l2': ...}``, pixel units); ``kappa`` the natural-loss share;
    ``crown_ibp_beta`` the CROWN-IBP mixing weight (0 = pure IBP); ``reg_weight`` the weight of
    Shi et al.'s IBP regulariser (0 = off); ``generator`` for the method's
    randomness (attack starts, random halves), on the training device; ``forward`` computes clean
    logits (:meth:`TrainingNetwork.logits`). :attr:`logits` runs it once, with gradients, when a
    method first needs it (a pure certified loss never does).

    Distributed training (:mod:`cure_lirpa.distributed`): the batch is one process's slice of a
    global batch; ``loss_scale`` multiplies the method's loss so that the average over processes is
    the global batch's loss (for terms that are means over the batch), and ``count_factor(n)``
    turns a term normalised by a count of this slice (``sum / max(n, 1)``, e.g. bound alignment's
    ``|gamma|``) into one normalised by the count of the global batch. Both are neutral (1.0, None)
    in one process.
    """

    x: torch.Tensor
    y: torch.Tensor
    eps: dict[str, float]
    kappa: float = 0.0
    crown_ibp_beta: float = 0.0
    generator: Optional[torch.Generator] = None
    reg_weight: float = 0.0
    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    loss_scale: float = 1.0
    count_factor: Optional[Callable[[int], float]] = None
    _logits: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """Clean logits (B, K), computed on first use and cached."""
        if self._logits is None:
            if self.forward is None:
                raise UserError("this batch has no forward function to compute clean logits")
            self._logits = self.forward(self.x)
        return self._logits

    @property
    def has_logits(self) -> bool:
        return self._logits is not None

    def ensure_logits(self) -> torch.Tensor:
        """Compute the clean logits now (BatchNorm models: before any bound of this batch)."""
        return self.logits


@dataclass
class StepOutput:
    """A method's answer: the scalar ``loss``, its ``parts`` (floats) and per-norm ``certified``
    masks (bool (B,)) for the norms whose sound bound over the whole batch was computed."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)
    certified: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(Protocol):
    """What the trainer needs from a training method."""

    name: str
    norms: tuple[str, ...]

    def step(self, net: TrainingNetwork, batch: Batch) -> StepOutput: ...


# ---------------------------------------------------------------------------------------------
# Per-norm bound blocks


class Bound(Protocol):
    """Lower bounds of one norm for a batch; ``sound`` says whether they certify the whole ball."""

    norm: str
    sound: bool

    def __call__(self, net: TrainingNetwork, batch: Batch, idx: Optional[torch.Tensor]): ...


def _select(batch: Batch, idx: Optional[torch.Tensor]):
    if idx is None:
        return batch.x, batch.y
    return batch.x[idx], batch.y[idx]


def _margins(batch: Batch, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """The bounds at eps 0: exact margins of the clean logits (rows ``idx``)."""
    logits = batch.logits if idx is None else batch.logits[idx]
    return exact_margins(logits, batch.y if idx is None else batch.y[idx])


class BallBound:
    """IBP bounds over the whole ``norm`` ball (optionally mixed with CROWN-IBP); sound.

    ``lb = beta * lb_crown_ibp + (1 - beta) * lb_ibp`` with ``beta = batch.crown_ibp_beta`` (a convex
    combination of two lower bounds is a lower bound).
    """

    def __init__(self, norm: str):
        self.norm = norm
        self.sound = True

    def __call__(self, net, batch, idx=None) -> torch.Tensor:
        eps = batch.eps[self.norm]
        if eps == 0:
            return _margins(batch, idx)
        x, y = _select(batch, idx)
        lb = net.ball_bounds(x, y, self.norm, eps, IBP)
        beta = batch.crown_ibp_beta
        if beta > 0:
            lb = beta * net.ball_bounds(x, y, self.norm, eps, CROWN_IBP) + (1 - beta) * lb
        return lb


class _AttackBoxBound:
    """IBP over the l∞ box of radius ``lambda * eps`` that ``box`` (an attack of
    :mod:`cure_lirpa.attacks`) places around a PGD point in the ``norm`` ball."""

    norm: str
    option: str  # the CLI option of lambda, for the error message
    box: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # a staticmethod in each subclass
    sound = False

    def __init__(self, lam: float, steps: int = 8):
        if not 0.0 <= lam <= 1.0:
            raise UserError(f"{self.option} must be in [0, 1], got {lam}")
        self.lam, self.steps = float(lam), int(steps)

    def __call__(self, net, batch, idx=None) -> torch.Tensor:
        eps = batch.eps[self.norm]
        if eps == 0:
            return _margins(batch, idx)
        x, y = _select(batch, idx)
        x_l, x_u = self.box(
            net.model, x, y, eps, self.lam * eps, steps=self.steps, generator=batch.generator
        )
        return net.box_bounds(x_l, x_u, y, IBP)


class SabrBound(_AttackBoxBound):
    """SABR (Müller et al. 2023): IBP over the box of radius ``lambda * eps`` around a PGD point.

    Sound for the whole l∞ ball only when ``lambda = 1`` (then the box is the ball).
    """

    norm, option = LINF, "--sabr-lambda"
    box = staticmethod(sabr_box)

    def __init__(self, lam: float, steps: int = 8):
        super().__init__(lam, steps)
        self.sound = self.lam >= 1.0


class L2DefenceBound(_AttackBoxBound):
    """CURE's l2 defence: IBP over the l∞ box of radius ``lambda2 * eps`` around an l2 PGD point.

    A training heuristic: the box neither lies in nor covers the l2 ball, so it is never sound.
    """

    norm, option = L2, "--l2-lambda"
    box = staticmethod(l2_defence_box)


class ExpressiveBound:
    """MTL-IBP (De Palma et al., ICLR 2024) for one norm: the ball bounds of :class:`BallBound`
    (sound, CROWN-IBP mixing included) and the expressive per-sample loss
    ``(1 - alpha) * CE(f(x_adv), y) + alpha * certified_ce(lb)`` (:func:`losses.expressive_loss`),
    ``x_adv`` from :func:`cure_lirpa.attacks.expressive_attack_point` in the same ball."""

    def __init__(self, norm: str, alpha: float, steps: int = 1):
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"--mtl-alpha-{norm} must be in [0, 1], got {alpha}")
        if steps < 1:
            raise UserError(f"--mtl-attack-steps must be >= 1, got {steps}")
        self.norm, self.alpha, self.steps = norm, float(alpha), int(steps)
        self.sound = True
        self._ball = BallBound(norm)

    def __call__(self, net, batch, idx=None) -> torch.Tensor:
        return self._ball(net, batch, idx)

    def loss(self, net, batch, idx=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lb, per-sample loss)``; at eps 0 both terms are the clean cross-entropy."""
        lb = self._ball(net, batch, idx)  # first: BatchNorm bounds use the clean batch statistics
        cert = losses.certified_ce(lb)
        eps = batch.eps[self.norm]
        if eps == 0 or self.alpha >= 1.0:
            return lb, cert
        x, y = _select(batch, idx)
        x_adv = expressive_attack_point(
            net.model, x, y, P_OF[self.norm], eps, self.steps, batch.generator
        )
        adv = F.cross_entropy(net.logits(x_adv), y, reduction="none")
        return lb, losses.expressive_loss(adv, cert, self.alpha)


def block_loss(
    block: Bound, net: TrainingNetwork, batch: Batch, idx: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's bounds (B, K-1) and per-sample loss (B,): its own ``loss`` if it has one
    (MTL-IBP), else the certified cross-entropy of its bounds."""
    if hasattr(block, "loss"):
        return block.loss(net, batch, idx)
    lb = block(net, batch, idx)
    return lb, losses.certified_ce(lb)


def ibp_regulariser(net: TrainingNetwork, batch: Batch) -> Optional[torch.Tensor]:
    """Shi et al.'s regulariser (:func:`losses.ibp_regulariser`) on the l∞ box of the current eps,
    times ``batch.reg_weight``; None when off or at eps 0."""
    eps = batch.eps.get(LINF, 0.0)
    if batch.reg_weight <= 0 or eps == 0:
        return None
    x_l = (batch.x - eps).clamp(0, 1)
    x_u = (batch.x + eps).clamp(0, 1)
    net.box_bounds(x_l, x_u, batch.y, IBP)
    scale = net.bounded._scale  # the trainable bounded module works in normalised space
    radius = (x_u - x_l) / 2 if scale is None else (x_u - x_l) / 2 / scale
    bounds = lirpa.relu_input_bounds(net.bounded.module)  # of that IBP call, in bound space
    if not bounds:
        return None
    return batch.reg_weight * losses.ibp_regulariser(radius.mean(), bounds)


def _add_regulariser(net, batch: Batch, loss: torch.Tensor, parts: dict[str, float]):
    reg = ibp_regulariser(net, batch)
    if reg is None:
        return loss
    parts["ibp_reg"] = float(reg.detach())
    return loss + reg


def linf_bound(
    variant: str, sabr_lambda: float, mtl_alpha: float = 0.5, mtl_steps: int = 1
) -> Bound:
    """The l∞ block: ``'ibp'`` (whole ball), ``'sabr'`` (small box, radius ``sabr_lambda * eps``)
    or ``'mtl-ibp'`` (expressive loss with weight ``mtl_alpha`` on IBP, ``mtl_steps`` PGD steps)."""
    box = {SABR: lambda: SabrBound(sabr_lambda)}
    return _norm_bound(LINF, variant, IBP, box, mtl_alpha, mtl_steps)


def l2_bound(variant: str, l2_lambda: float, mtl_alpha: float = 0.5, mtl_steps: int = 1) -> Bound:
    """The l2 block: ``'ball'`` (exact l2-ball IBP), ``'defence'`` (CURE's l2 defence box) or
    ``'mtl-ibp'`` (expressive loss on the exact l2-ball IBP bounds and an l2 PGD point)."""
    box = {DEFENCE: lambda: L2DefenceBound(l2_lambda)}
    return _norm_bound(L2, variant, BALL, box, mtl_alpha, mtl_steps)


def _norm_bound(
    norm: str,
    variant: str,
    whole: str,
    box: dict[str, Callable[[], Bound]],
    mtl_alpha: float,
    mtl_steps: int,
) -> Bound:
    """The ``norm`` block of ``variant``: ``whole`` the ball bound, ``'mtl-ibp'`` the expressive
    loss, a key of ``box`` its attack-box bound."""
    label, variants = ("l∞", LINF_VARIANTS) if norm == LINF else (norm, L2_VARIANTS)
    if variant == whole:
        return BallBound(norm)
    if variant == MTL_IBP:
        return ExpressiveBound(norm, mtl_alpha, mtl_steps)
    if variant in box:
        return box[variant]()
    raise UserError(f"unknown {label} variant {variant!r}; choose one of {', '.join(variants)}")


# ---------------------------------------------------------------------------------------------
# Methods


def _mix(batch: Batch, robust_fn: Callable[[], torch.Tensor], parts: dict[str, float]):
    """``kappa * CE(f(x), y) + (1 - kappa) * robust``; a zero-weight term is not computed at all
    (no clean forward pass for a pure certified loss, no bounds for a purely natural one)."""
    k = batch.kappa
    loss = None
    if k > 0.0:
        ce = F.cross_entropy(batch.logits, batch.y)
        parts["ce"] = float(ce.detach())
        loss = ce if k >= 1.0 else k * ce
    if k < 1.0:
        robust = robust_fn()
        loss = (1.0 - k) * robust if loss is None else loss + (1.0 - k) * robust
    return loss


class Natural:
    """Natural training: ``CE(f(x), y)`` on clean inputs."""

    name = NATURAL
    norms: tuple[str, ...] = ()

    def step(self, net: TrainingNetwork, batch: Batch) -> StepOutput:
        ce = F.cross_entropy(batch.logits, batch.y)
        return StepOutput(ce, {"ce": float(ce.detach())})


class SingleNorm:
    """Certified training for one norm: ``kappa * CE + (1 - kappa) * mean(certified_ce(lb))``.

    ``ibp-linf`` (IBP, Gowal et al.; CROWN-IBP mixing optional), ``sabr-linf`` (SABR),
    ``ibp-l2`` (exact l2-ball IBP), ``l2-defence`` (CURE's l2 defence) and ``mtl-ibp-linf`` /
    ``mtl-ibp-l2`` (MTL-IBP's expressive loss).
    """

    def __init__(self, name: str, bound: Bound):
        self.name = name
        self.bound = bound
        self.norms = (bound.norm,)

    def step(self, net: TrainingNetwork, batch: Batch) -> StepOutput:
        norm = self.bound.norm
        parts: dict[str, float] = {}
        lbs: dict[str, torch.Tensor] = {}

        def robust() -> torch.Tensor:
            lbs[norm], per = block_loss(self.bound, net, batch)
            value = per.mean()
            parts[norm] = float(value.detach())
            return value

        loss = _mix(batch, robust, parts)
        if norm == LINF:
            loss = _add_regulariser(net, batch, loss, parts)
        out = StepOutput(loss, parts)
        if norm in lbs and (self.bound.sound or batch.eps[norm] == 0):
            out.certified[norm] = certified(lbs[norm].detach())
        return out


class MultiNorm:
    """CURE multi-norm training with l∞ and l2 per-sample certified losses ``L_inf``, ``L_2``.

    ``combine``: ``'joint'`` (L_Joint, weight ``alpha`` on l∞), ``'max'`` (L_Max) or ``'random'``
    (L_Random, disjoint random halves; without bound alignment each half's bound is computed only
    for its own norm). Bound alignment (L_BA) with ``ba_eta > 0``: gamma = samples certified by the
    training bound of norm ``ba_direction`` (q), ``L_BA = sum_gamma KL(P_q || P_r) / |gamma|`` with
    ``P_p = softmax([0, -lb_p])``; total ``kappa * CE + (1 - kappa) * L_multi + eta * L_BA``.
    """

    def __init__(
        self,
        name: str,
        combine: str,
        linf: Bound,
        l2: Bound,
        alpha: float = 0.5,
        ba_eta: float = 0.0,
        ba_direction: str = L2,
    ):
        if combine not in COMBINERS:
            raise UserError(f"unknown combiner {combine!r}; choose one of {', '.join(COMBINERS)}")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"--alpha must be in [0, 1], got {alpha}")
        if ba_eta < 0:
            raise UserError(f"--ba-eta must be >= 0, got {ba_eta}")
        if ba_direction not in NORMS:
            raise UserError(
                f"--ba-direction must be one of {', '.join(NORMS)}, got {ba_direction!r}"
            )
        self.name, self.combine = name, combine
        self.blocks = {LINF: linf, L2: l2}
        self.alpha, self.ba_eta, self.ba_direction = float(alpha), float(ba_eta), ba_direction
        self.norms = NORMS

    def step(self, net: TrainingNetwork, batch: Batch) -> StepOutput:
        parts: dict[str, float] = {}
        lbs: dict[str, torch.Tensor] = {}
        loss = _mix(batch, lambda: self._robust(net, batch, parts, lbs), parts)
        if self.ba_eta > 0 and lbs:
            q = self.ba_direction
            r = L2 if q == LINF else LINF
            gamma = certified(lbs[q].detach())
            ba = losses.bound_alignment(lbs[q], lbs[r], gamma)
            parts["ba"] = float(ba.detach())
            if batch.count_factor is not None:  # a slice: normalise by the global |gamma|
                ba = ba * batch.count_factor(int(gamma.sum()))
            loss = loss + self.ba_eta * ba
        loss = _add_regulariser(net, batch, loss, parts)
        out = StepOutput(loss, parts)
        for norm, lb in lbs.items():
            if self.blocks[norm].sound or batch.eps[norm] == 0:
                out.certified[norm] = certified(lb.detach())
        return out

    def _robust(self, net, batch: Batch, parts: dict[str, float], lbs: dict) -> torch.Tensor:
        """L_Joint, L_Max or L_Random; fills ``parts`` and (for full-batch bounds) ``lbs``."""
        b = batch.y.shape[0]
        if self.combine == RANDOM and self.ba_eta == 0:
            idx_a, idx_b = losses.random_halves(b, batch.generator)
            idx_a, idx_b = idx_a.to(batch.y.device), idx_b.to(batch.y.device)
            per = {}
            for norm, idx in ((LINF, idx_a), (L2, idx_b)):
                _, l_half = block_loss(self.blocks[norm], net, batch, idx)
                per[norm] = torch.zeros(b, dtype=l_half.dtype, device=l_half.device).index_put(
                    (idx,), l_half
                )
                parts[norm] = float(l_half.detach().mean()) if len(idx) else 0.0
            robust = losses.random_loss(per[LINF], per[L2], idx_a, idx_b)
            parts["robust"] = float(robust.detach())
            return robust
        per = {}
        for norm in NORMS:
            lbs[norm], per[norm] = block_loss(self.blocks[norm], net, batch)
        for norm in NORMS:
            parts[norm] = float(per[norm].detach().mean())
        if self.combine == JOINT:
            robust = losses.joint(per[LINF], per[L2], self.alpha)
        elif self.combine == MAX:
            robust = losses.max_loss(per[LINF], per[L2])
        else:
            idx_a, idx_b = losses.random_halves(b, batch.generator)
            robust = losses.random_loss(per[LINF], per[L2], idx_a, idx_b)
        parts["robust"] = float(robust.detach())
        return robust


# ---------------------------------------------------------------------------------------------
# Registry: method name -> factory(options)


@dataclass(frozen=True)
class MethodOptions:
    """The options methods are built from (a subset of the trainer's configuration)."""

    linf_variant: str = IBP
    l2_variant: str = BALL
    sabr_lambda: float = 0.4
    l2_lambda: float = 1e-5
    alpha: float = 0.5
    ba_eta: float = 0.0
    ba_direction: str = L2
    mtl_alpha_linf: float = 0.5
    mtl_alpha_l2: float = 0.5
    mtl_attack_steps: int = 1

    def block(self, norm: str, variant: str) -> Bound:
        """The ``norm`` block of ``variant`` with these options."""
        if norm == LINF:
            return linf_bound(variant, self.sabr_lambda, self.mtl_alpha_linf, self.mtl_attack_steps)
        return l2_bound(variant, self.l2_lambda, self.mtl_alpha_l2, self.mtl_attack_steps)


def _single(name: str, norm: str, variant: str) -> Callable[[MethodOptions], Method]:
    def build(o: MethodOptions) -> Method:
        return SingleNorm(name, o.block(norm, variant))

    return build


def _multi(name: str, combine: str) -> Callable[[MethodOptions], Method]:
    def build(o: MethodOptions) -> Method:
        return MultiNorm(
            name,
            combine,
            o.block(LINF, o.linf_variant),
            o.block(L2, o.l2_variant),
            o.alpha,
            o.ba_eta,
            o.ba_direction,
        )

    return build


SINGLE_NORM_VARIANTS: dict[str, tuple[str, str]] = SINGLE_NORM_OBJECTIVES
"""Single-norm methods: the norm they train and the variant their name fixes."""

METHODS: dict[str, Callable[[MethodOptions], Method]] = {
    NATURAL: lambda o: Natural(),
    **{name: _single(name, *norm_variant) for name, norm_variant in SINGLE_NORM_VARIANTS.items()},
    CURE_JOINT: _multi(CURE_JOINT, JOINT),
    CURE_MAX: _multi(CURE_MAX, MAX),
    CURE_RANDOM: _multi(CURE_RANDOM, RANDOM),
}
"""Every method name the trainer and the CLI accept."""

MULTI_NORM = MULTI_NORM_OBJECTIVES


def is_multi_norm(name: str) -> bool:
    return name in MULTI_NORM


def make_method(name: str, options: MethodOptions | None = None, **kw: Any) -> Method:
    """Build method ``name`` (one of :data:`METHODS`) from ``options`` (or keyword options)."""
    if name not in METHODS:
        raise UserError(f"unknown training method {name!r}; choose one of {', '.join(METHODS)}")
    options = options if options is not None else MethodOptions(**kw)
    if options.ba_eta > 0 and not is_multi_norm(name):
        raise UserError(
            f"bound alignment (--ba-eta {options.ba_eta:g}) needs a multi-norm method "
            f"({', '.join(MULTI_NORM)}), not {name!r}"
        )
    return METHODS[name](options)


__all__ = [
    "Batch",
    "BallBound",
    "COMBINERS",
    "ExpressiveBound",
    "L2DefenceBound",
    "L2_VARIANTS",
    "LINF_VARIANTS",
    "METHODS",
    "MULTI_NORM",
    "Method",
    "MethodOptions",
    "MultiNorm",
    "NORMS",
    "Natural",
    "SabrBound",
    "SingleNorm",
    "StepOutput",
    "TrainingNetwork",
    "block_loss",
    "exact_margins",
    "ibp_regulariser",
    "is_multi_norm",
    "l2_bound",
    "linf_bound",
    "make_method",
]
