"""Bounded classifier: lower bounds on all K-1 classification margins under a threat model.

:class:`BoundedClassifier` wraps a classifier (input in [0, 1], logits out) as an auto_LiRPA
``BoundedModule`` and returns ``lb[b, j] <= min over the threat set of (f_y - f_j)`` for every
sample b and every class j != y (SPEC.md section 2). A sample is certified iff ``lb > 0`` everywhere.

Normalisation and the l2 zero-width trap (SPEC.md section 5): auto_LiRPA carries an lp ball (p < inf)
as ``x_L = x_U = x`` plus the perturbation object, and only affine layers apply the dual norm. A
``(x - mean) / std`` layer in front of them would silently produce zero-width, unsound bounds. So:

* for verification (``trainable=False``) the ``1 / std`` of a zoo model's
  :class:`~cure_lirpa.models.Normalize` is folded exactly into a copy of its first affine layer and the
  ``- mean`` shift is applied before auto_LiRPA sees the input (a shift keeps lp balls balls);
* for training (``trainable=True``, gradients must reach the model's own parameters) the body is bounded
  in normalised space: boxes map exactly, and an lp ball of radius eps maps into the ball of radius
  ``eps / min(std)`` (exact when all channels share one std, as on MNIST; a sound enlargement otherwise);
* any other model is wrapped as it is, and the first lp-ball bound checks that the output bounds have
  non-zero width, raising :class:`~cure_lirpa.errors.UserError` if the perturbation was dropped.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import nn

from . import lirpa
from .errors import UserError
from .models import Classifier
from .threats import BoxFamily, NormBall, Threat

METHODS = (*lirpa.METHODS, "sdp-crown")  # ibp, crown-ibp, crown, alpha-crown, sdp-crown
_BYTES = 4


def margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C`` of shape (B, K-1, K) with rows ``e_y - e_j`` for the K-1 classes j != y."""
    eye = torch.eye(num_classes, device=y.device, dtype=torch.float32)
    others = torch.arange(num_classes, device=y.device).expand(len(y), -1)
    others = others[others != y.unsqueeze(1)].view(len(y), num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def fold_normalization(model: Classifier) -> Optional[nn.Module]:
    """A copy of ``model.body`` whose first affine layer absorbs ``1 / std``, or None.

    ``body((x - mean) / std) == folded(x - mean)`` exactly, zero padding included (``x - mean = 0``
    where ``(x - mean) / std = 0``); the shift by ``mean`` is applied to the input before bounding, so
    lp balls around ``x - mean`` are the balls around ``x``. None if the body does not start with
    ``Conv2d`` or ``[Flatten,] Linear``.
    """
    body = copy.deepcopy(model.body)
    inv_std = (1.0 / model.normalize.std.detach()).view(-1)
    layers = list(body.children()) if isinstance(body, nn.Sequential) else [body]
    i = 1 if layers and isinstance(layers[0], nn.Flatten) else 0
    first = layers[i] if i < len(layers) else None
    with torch.no_grad():
        if isinstance(first, nn.Conv2d) and i == 0 and first.groups == 1:
            first.weight.mul_(inv_std.view(1, -1, 1, 1))
        elif isinstance(first, nn.Linear) and i == 1:
            per = first.in_features // inv_std.numel()
            first.weight.mul_(inv_std.repeat_interleave(per).view(1, -1))
        else:
            return None
    return nn.Sequential(*layers)


def _activation_sizes(module: nn.Module) -> list[int]:
    """Numbers of neurons (per sample) of each ReLU of a traced ``BoundedModule``, in graph order.

    Read from auto_LiRPA's ReLU nodes, so ``F.relu`` calls count as well as ``nn.ReLU`` modules.
    """
    return [
        math.prod(m.output_shape[1:])
        for m in module.modules()
        if type(m).__name__ == "BoundRelu" and getattr(m, "output_shape", None) is not None
    ]


class BoundedClassifier:
    """A classifier wrapped for margin bounds under lp balls and box families.

    Args:
        model: maps [0, 1] images (B, *in_shape) to logits (B, K).
        in_shape: one input's shape, e.g. (1, 28, 28).
        device: "cpu", "cuda" or a ``torch.device``.
        memory_mb: memory budget for one bound computation; batches are split to stay under it.
        trainable: keep gradients flowing to ``model``'s parameters (for certified training).
        alpha_iterations: optimisation steps of alpha-CROWN.
    """

    def __init__(
        self,
        model: nn.Module,
        in_shape: Sequence[int],
        device: str | torch.device = "cpu",
        memory_mb: float = 4096.0,
        trainable: bool = False,
        alpha_iterations: int = 20,
    ):
        self.model = model
        self.in_shape = tuple(in_shape)
        self.device = torch.device(device)
        self.memory_mb = float(memory_mb)
        self.trainable = trainable
        # Bounds are computed on (x - shift) / scale; identity unless the model is a Classifier.
        self._shift: Optional[torch.Tensor] = None
        self._scale: Optional[torch.Tensor] = None
        self._checked_lp = False
        target = model
        if isinstance(model, Classifier):
            folded = None if trainable else fold_normalization(model)
            target = model.body if folded is None else folded
            self._shift = model.normalize.mean.to(self.device)
            self._scale = model.normalize.std.to(self.device) if folded is None else None
        self.traced = target.to(self.device)
        was_training = model.training
        try:
            self.traced.eval()  # BatchNorm1d cannot be traced in train mode with a batch of one
            self.module = lirpa.BoundedModule(
                self.traced,
                torch.zeros(1, *self.in_shape, device=self.device),
                bound_opts=lirpa.bound_opts(alpha_iterations=alpha_iterations),
                device=self.device,
            )
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"auto_LiRPA cannot trace this model ({type(exc).__name__}: {str(exc)[:200]}). "
                "Models must be traceable with torch.jit.trace and use standard layers "
                "(Conv2d, Linear, ReLU, BatchNorm, Flatten, Normalize)."
            ) from None
        self.train(was_training)  # wrapping can leave BatchNorm in eval mode (SPEC.md section 5)
        with torch.no_grad():
            self.num_classes = int(
                model(torch.zeros(1, *self.in_shape, device=self.device)).shape[1]
            )
        self._sizes = _activation_sizes(self.module)

    # ----------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> BoundedClassifier:
        """Set train/eval mode on the bounded module (BatchNorm statistics) and the model."""
        self.module.train(mode)
        self.model.train(mode)
        return self

    def bytes_per_sample(self, method: str) -> float:
        """A conservative estimate of one sample's memory for ``method`` (bytes).

        Backward (CROWN-type) bounds of layer l keep a matrix of size n_l x n_k for every earlier layer
        k; IBP keeps a few copies of every activation.
        """
        d = math.prod(self.in_shape)
        sizes = [d, *self._sizes, self.num_classes]
        if method == "ibp":
            return _BYTES * 12 * sum(sizes)
        spec = self.num_classes - 1
        layers = sizes[1:] if method in ("crown", "alpha-crown", "sdp-crown") else [spec]
        peak = max(n * max(sizes[: i + 1]) for i, n in enumerate(layers, start=1))
        # Factors calibrated against measured peaks (benchmarks/scaling.py) with some headroom.
        factor = 10 if method in ("alpha-crown", "sdp-crown") else 5
        return _BYTES * factor * peak + _BYTES * 12 * sum(sizes)

    def chunk_size(self, method: str) -> int:
        """How many samples (or boxes) one auto_LiRPA call may take under ``memory_mb``."""
        return max(1, int(self.memory_mb * 2**20 // self.bytes_per_sample(method)))

    # ----------------------------------------------------------------------------------------
    def margin_lower_bounds(
        self, x: torch.Tensor, y: torch.Tensor, threat: Threat, method: str = "ibp"
    ) -> torch.Tensor:
        """Lower bounds (B, K-1) on ``f_y - f_j`` over ``threat`` around each x (B, *in_shape)."""
        if method not in METHODS:
            raise UserError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
        if method == "sdp-crown":  # l2 balls; its own backward pass (cure_lirpa/sdp_crown.py)
            from . import sdp_crown

            return sdp_crown.margin_lower_bounds(self, x, y, threat)
        x, y = self._check_input(x, y)
        if isinstance(threat, NormBall):
            if threat.p == math.inf:
                return self.box_lower_bounds(
                    (x - threat.eps).clamp(0, 1), (x + threat.eps).clamp(0, 1), y, method
                )
            return self._chunked(x, y, method, p=threat.p, eps=threat.eps)
        if isinstance(threat, BoxFamily):
            return self._box_family_bounds(x, y, threat, method)
        raise UserError(f"threat {threat} is not supported by the bounded classifier")

    def box_lower_bounds(
        self, x_L: torch.Tensor, x_U: torch.Tensor, y: torch.Tensor, method: str = "ibp"
    ) -> torch.Tensor:
        """Lower bounds (B, K-1) on the margins over the boxes ``[x_L, x_U]`` (each (B, *in_shape))."""
        x_L, y = self._check_input(x_L, y)
        x_U = x_U.to(self.device)
        return self._chunked(None, y, method, x_L=x_L, x_U=x_U)

    def _box_family_bounds(
        self, x: torch.Tensor, y: torch.Tensor, threat: BoxFamily, method: str
    ) -> torch.Tensor:
        per_box = self.chunk_size(method)
        chunk = max(1, per_box // len(x))
        lb = torch.full((len(x), self.num_classes - 1), math.inf, device=self.device)
        for x_L, x_U in threat.boxes(x, chunk):
            b, m = x_L.shape[:2]
            box_lb = self.box_lower_bounds(
                x_L.reshape(b * m, *self.in_shape),
                x_U.reshape(b * m, *self.in_shape),
                y.repeat_interleave(m),
                method,
            )
            lb = torch.minimum(lb, box_lb.view(b, m, -1).min(1).values)
        return lb

    def _chunked(
        self,
        x: Optional[torch.Tensor],
        y: torch.Tensor,
        method: str,
        p: float = math.inf,
        eps: float = 0.0,
        x_L: Optional[torch.Tensor] = None,
        x_U: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        n = self.chunk_size(method)
        out = []
        for s in range(0, len(y), n):
            sl = slice(s, s + n)
            out.append(
                self._bound(
                    None if x is None else x[sl],
                    y[sl],
                    method,
                    p,
                    eps,
                    None if x_L is None else x_L[sl],
                    None if x_U is None else x_U[sl],
                )
            )
        return torch.cat(out)

    def _bound(self, x, y, method, p, eps, x_L, x_U) -> torch.Tensor:
        """One auto_LiRPA call: either an lp ball (x, p, eps) or a box (x_L, x_U)."""
        if x_L is not None:
            x_L, x_U = self._to_bound_space(x_L), self._to_bound_space(x_U)
            center = (x_L + x_U) / 2
            ptb = lirpa.perturbation(math.inf, float((x_U - x_L).max()) / 2, x_L, x_U)
        else:
            center = self._to_bound_space(x)
            if self._scale is not None:  # the ball of radius eps/min(std) covers the ellipsoid
                eps = eps / float(self._scale.min())
            ptb = lirpa.perturbation(p, eps)
        C = margin_matrix(y, self.num_classes)
        grad = self.trainable and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad or method == "alpha-crown"):
            lb, _ = lirpa.compute_bounds(self.module, lirpa.BoundedTensor(center, ptb), C, method)
        if x is not None and eps > 0 and not self._checked_lp:
            self._check_lp_width(center, ptb)
        return lb if grad else lb.detach()

    def _constant_near(self, center: torch.Tensor, ptb) -> bool:
        """Is the traced network constant on random points of the ball (zero width is then sound)?"""
        gen = torch.Generator(device=center.device).manual_seed(0)
        delta = torch.randn(16, *center.shape[1:], generator=gen, device=center.device)
        norms = delta.flatten(1).norm(p=float(ptb.norm), dim=1).view(-1, *[1] * (center.dim() - 1))
        with torch.no_grad():
            out = self.traced(center + delta / norms * float(ptb.eps))
            ref = self.traced(center)
        return bool(torch.allclose(out, ref.expand_as(out), atol=1e-6, rtol=0))

    def _to_bound_space(self, x: torch.Tensor) -> torch.Tensor:
        if self._shift is not None:
            x = x - self._shift
        if self._scale is not None:
            x = x / self._scale
        return x

    def _check_lp_width(self, center: torch.Tensor, ptb) -> None:
        """Refuse models whose lp-ball IBP bounds have zero width (the perturbation was dropped)."""
        with torch.no_grad():
            lo, hi = self.module.compute_bounds(
                x=(lirpa.BoundedTensor(center[:1], ptb),), method="IBP", C=None
            )
        if float((hi - lo).max()) <= 0 and not self._constant_near(center[:1], ptb):
            raise UserError(
                "l2/l1 bounds of this model have zero width: an operation before its first affine "
                "layer (typically a (x - mean) / std normalisation) drops the lp-ball perturbation "
                "in auto_LiRPA, which would make every certificate unsound. Wrap the model as "
                "cure_lirpa.models.Classifier(body, mean, std) so the normalisation is folded, or "
                "move the normalisation into the first Linear/Conv layer."
            )
        self._checked_lp = True

    def _check_input(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[1:]) != self.in_shape:
            raise UserError(
                f"input of shape {tuple(x.shape)} does not match the model's input shape "
                f"(B, {', '.join(map(str, self.in_shape))})"
            )
        if x.shape[0] != y.shape[0]:
            raise UserError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        return x.to(self.device), y.to(self.device)


def certified(lb: torch.Tensor) -> torch.Tensor:
    """Boolean (B,): all K-1 margin lower bounds are positive."""
    return (lb > 0).all(dim=1)
