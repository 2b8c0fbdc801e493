"""One training step, shared by the training loop and every step-time benchmark.

:class:`LossModule` is the whole loss of one batch as an ``nn.Module`` (clean forward, the method's
bounds and alignment, or the natural cross-entropy of a gradient-projection sub-epoch): it is what
:class:`torch.nn.parallel.DistributedDataParallel` wraps under torchrun, so every rank's gradients
are reduced. :class:`TrainStep` runs one optimizer step around it: learning rate, forward,
backward, the clean logits for the metrics, the training-certificate pass (no-grad IBP for the norms
the method's loss did not certify), gradient clipping, the optimizer step and the BatchNorm buffer
sync. Certified training (:class:`cure_lirpa.training.certified.CertifiedTask`) and
:func:`cure_lirpa.training.timing.step_times` (hence every step-time table in ``benchmarks/``) call
the same :class:`TrainStep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import World
from ..vocabulary import CERTIFIED, L1, NATURAL
from .meter import StepResult
from .objectives import NORMS, Batch, Method, StepOutput, TrainingNetwork

PHASES = (CERTIFIED, NATURAL)
"""``certified``: the method's loss; ``natural``: cross-entropy only (gradient projection's
natural sub-epoch)."""


@dataclass(frozen=True)
class StepSchedule:
    """Schedule values of one step: eps per norm (pixel units), natural-loss share ``kappa``,
    CROWN-IBP weight, learning rate and the weight of Shi et al.'s IBP regulariser."""

    eps: dict[str, float]
    kappa: float
    crown_ibp_beta: float
    lr: float
    reg_weight: float = 0.0


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """``sum |w|`` over the weight matrices and kernels of ``model`` (biases and norms excluded)."""
    return sum(p.abs().sum() for p in model.parameters() if p.dim() > 1)


class LossModule(nn.Module):
    """The loss of one batch as a module holding the model (and its bounded module's buffers).

    ``forward(batch, phase)`` returns the scalar loss times ``batch.loss_scale`` (1 in one process;
    under DistributedDataParallel the share that makes the average over ranks the loss of the
    global batch, see :mod:`cure_lirpa.distributed`); the method's :class:`StepOutput` is kept in
    :attr:`output` for the metrics.
    """

    def __init__(self, net: TrainingNetwork, method: Method, l1_reg: float = 0.0):
        super().__init__()
        self.model = net.model
        self.bounded = net.bounded.module
        self.net = net
        self.method = method
        self.l1_reg = float(l1_reg)
        self.output: Optional[StepOutput] = None

    def forward(self, batch: Batch, phase: str = CERTIFIED) -> torch.Tensor:
        if self.net.has_buffers:
            batch.ensure_logits()  # BatchNorm bounds need this batch's statistics first
        if phase == NATURAL:
            out = StepOutput(F.cross_entropy(batch.logits, batch.y))
        else:
            out = self.method.step(self.net, batch)
            if self.l1_reg > 0:  # an L1 penalty on the weights (as in CTRAIN's recipes)
                l1 = self.l1_reg * l1_penalty(self.model)
                out = StepOutput(
                    out.loss + l1, {**out.parts, L1: float(l1.detach())}, out.certified
                )
        self.output = out
        return out.loss if batch.loss_scale == 1.0 else out.loss * batch.loss_scale


class TrainStep:
    """One optimizer step of a training run (see the module docstring).

    With a ``world`` (distributed training) the :class:`LossModule` runs inside
    DistributedDataParallel and every call is on this process's slice of a global batch of
    ``global_size`` samples.
    """

    def __init__(
        self,
        net: TrainingNetwork,
        method: Method,
        opt: torch.optim.Optimizer,
        grad_clip: float = 0.0,
        train_cert: bool = True,
        world: Optional[World] = None,
        l1_reg: float = 0.0,
    ):
        self.net, self.method, self.opt = net, method, opt
        self.grad_clip, self.train_cert = float(grad_clip), bool(train_cert)
        self.loss_module = LossModule(net, method, l1_reg)
        self.world = world
        self.forward = world.wrap(self.loss_module) if world is not None else self.loss_module
        self.params = list(net.model.parameters())

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        values: StepSchedule,
        generator: Optional[torch.Generator] = None,
        phase: str = CERTIFIED,
        global_size: Optional[int] = None,
    ) -> StepResult:
        """One step on the batch ``(x, y)`` (already on the training device); under a world, the
        slice of a global batch of ``global_size`` samples."""
        net, opt = self.net, self.opt
        for group in opt.param_groups:
            group["lr"] = values.lr
        batch = Batch(
            x,
            y,
            values.eps,
            values.kappa,
            values.crown_ibp_beta,
            generator,
            reg_weight=values.reg_weight,
            forward=net.logits,
        )
        if self.world is not None:
            self.world.prepare(batch, global_size or len(y))
        loss = self.forward(batch, phase)
        out = self.loss_module.output
        self.loss_module.output = None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if batch.has_logits:
            logits = batch.logits.detach()
        else:  # a pure certified loss: clean logits for the metrics only
            with torch.no_grad():
                logits = net.logits(x)
        masks = dict(out.certified)
        if phase != NATURAL and self.train_cert:
            for norm in NORMS:  # norms the method's own bounds did not certify
                if norm not in masks:
                    masks[norm] = net.certify(x, y, logits, norm, values.eps[norm])
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        opt.step()
        net.sync_to_model()
        parts = dict(out.parts) if phase != NATURAL else {}
        return StepResult(float(out.loss.detach()), parts, logits, masks)


__all__ = ["LossModule", "PHASES", "StepResult", "StepSchedule", "TrainStep"]
