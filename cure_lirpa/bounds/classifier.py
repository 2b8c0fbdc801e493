"""Bounded classifier: lower bounds on all K-1 classification margins under a threat model.

:class:`BoundedClassifier` wraps a classifier (input in [0, 1], logits out) as an auto_LiRPA
``BoundedModule`` and returns ``lb[b, j] <= min over the threat set of (f_y - f_j)`` for every
sample b and every class j != y. A sample is certified iff ``lb > 0`` everywhere.

Normalisation and the l2 zero-width trap (auto_LiRPA 0.3 to 0.7): auto_LiRPA carries an lp ball
(p < inf)
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
import logging
import math
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..models import Classifier
from ..threats.base import BoxFamily, NormBall, Threat
from ..vocabulary import ALPHA_CROWN, CROWN_IBP, IBP, SDP_CROWN
from . import backends, lirpa
from .region import BoundResult, Region

_log = logging.getLogger(__name__)

METHODS = backends.names()  # ibp, crown-ibp, crown, alpha-crown, sdp-crown
_BYTES = 4
_BOX_COPIES = 8


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


class InputIdentity(nn.Module):
    """The identity on inputs of shape (B, *in_shape), written as an affine layer auto_LiRPA bounds.

    Prepended to models whose first operation on the input is not affine (a normalisation, a skip
    path, a per-pixel scale): auto_LiRPA would drop an lp ball there. Through this layer an lp ball
    of radius eps becomes its enclosing box ``x ± eps`` for IBP; CROWN-type bounds still concretise
    the ball at the input. A 1x1 convolution for (C, H, W) inputs, else a
    ``Linear`` on the flattened input. Its weights are fixed (no gradient).
    """

    def __init__(self, in_shape: Sequence[int]):
        super().__init__()
        self.in_shape = tuple(in_shape)
        if len(self.in_shape) == 3:
            c = self.in_shape[0]
            self.layer: nn.Module = nn.Conv2d(c, c, 1, bias=False)
            weight = torch.eye(c).view(c, c, 1, 1)
        else:
            d = math.prod(self.in_shape)
            self.layer = nn.Linear(d, d, bias=False)
            weight = torch.eye(d)
        with torch.no_grad():
            self.layer.weight.copy_(weight)
        self.layer.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.in_shape) == 3:
            return self.layer(x)
        return self.layer(x.flatten(1)).view(-1, *self.in_shape)


def _modes(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """The train/eval flag of every submodule (``module.train(flag)`` would set them all alike)."""
    return [(m, m.training) for m in module.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, flag in modes:
        m.training = flag


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
        self.alpha_iterations = alpha_iterations
        self._conv_mode = "patches"
        self.incremental_ibp = True  # patch boxes under IBP: cure_lirpa.bounds.patch_ibp
        # Bounds are computed on (x - shift) / scale; identity unless the model is a Classifier.
        self._shift: Optional[torch.Tensor] = None
        self._scale: Optional[torch.Tensor] = None
        target = model
        if isinstance(model, Classifier):
            folded = None if trainable else fold_normalization(model)
            target = model.body if folded is None else folded
            self._shift = model.normalize.mean.to(self.device)
            self._scale = model.normalize.std.to(self.device) if folded is None else None
        self.traced = target.to(self.device)
        self.module = self._trace(self.traced)
        # An lp ball must reach an affine layer intact: otherwise prepend an identity affine layer
        # (CROWN still concretises the ball at the input; IBP gets the enclosing box there).
        self.lp_droppers = lirpa.lp_ball_droppers(self.module)
        if self.lp_droppers:
            self.traced = nn.Sequential(InputIdentity(self.in_shape), self.traced).to(self.device)
            self.module = self._trace(self.traced)
            assert not lirpa.lp_ball_droppers(self.module)
        self.train(trainable and model.training)
        model_modes = _modes(model)
        # in eval mode: a forward in train mode would move BatchNorm's running statistics
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *self.in_shape, device=self.device))
        _restore(model_modes)
        if out.dim() != 2:
            raise UserError(
                f"the model returns outputs of shape {tuple(out.shape)} for one input; a classifier "
                "must return logits of shape (B, num_classes)"
            )
        self.num_classes = int(out.shape[1])
        self._sizes = _activation_sizes(self.module)
        self._checked_threats: set[str] = set()
        if trainable:
            # Check the trace now, while the bounded module's BatchNorm statistics still equal the
            # model's (in training they live in the bounded module and are copied back later).
            x0 = self._to_bound_space(torch.full((1, *self.in_shape), 0.5, device=self.device))
            for p in (math.inf, 2.0, 1.0):
                box = (x0 - 0.1, x0 + 0.1) if p == math.inf else (None, None)
                self._check_trace(Region(x0, p, 0.1, *box))

    def _trace(self, target: nn.Module):
        """``target`` as an auto_LiRPA ``BoundedModule``; refuses untraceable models and models whose
        trace froze a data-dependent Python branch (torch.jit's "Converting a tensor to a Python
        boolean/number" warning)."""
        modes = _modes(target)
        try:
            target.eval()  # BatchNorm1d cannot be traced in train mode with a batch of one
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", torch.jit.TracerWarning)
                module = lirpa.BoundedModule(
                    target,
                    torch.zeros(1, *self.in_shape, device=self.device),
                    bound_opts=lirpa.bound_opts(
                        alpha_iterations=self.alpha_iterations, conv_mode=self._conv_mode
                    ),
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
        finally:
            _restore(modes)
        for w in caught:
            if issubclass(
                w.category, torch.jit.TracerWarning
            ) and "Converting a tensor to a Python" in str(w.message):
                raise UserError(
                    "the model's forward takes a Python decision on tensor values (an `if`, `int()` "
                    "or `.item()` on a tensor), so the traced graph that bounds are computed on is "
                    "only one branch of the model and certificates would describe another function. "
                    "Rewrite the branch with tensor operations (torch.where, torch.clamp) or remove "
                    f"it. torch.jit said: {str(w.message).splitlines()[0][:160]}"
                )
            if not issubclass(w.category, torch.jit.TracerWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return module

    # ----------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> BoundedClassifier:
        """Set train/eval mode on the bounded module (BatchNorm statistics) and the model.

        Only a ``trainable`` classifier can be put in train mode: bounds for verification always use
        the model in eval mode (BatchNorm with its running statistics), the function it computes at
        test time, whatever mode the model was in when it was wrapped.
        """
        mode = bool(mode) and self.trainable
        self.module.train(mode)
        if self.trainable:
            self.model.train(mode)
        return self

    def bytes_per_sample(self, method: str) -> float:
        """A conservative estimate of one sample's memory for ``method`` (bytes).

        Backward (CROWN-type) bounds of layer l keep a matrix of size n_l x n_k for every earlier layer
        k; CROWN-IBP's single backward pass keeps (K-1) x n_k for every layer k; IBP keeps a few
        copies of every activation. A box of a box family costs as much as one sample.
        """
        d = math.prod(self.in_shape)
        sizes = [d, *self._sizes, self.num_classes]
        if method == IBP:
            return _BYTES * 12 * sum(sizes)
        spec = self.num_classes - 1
        if method == CROWN_IBP:  # one backward pass from the K-1 margins through every layer
            return _BYTES * 5 * spec * sum(sizes) + _BYTES * 12 * sum(sizes)
        layers = sizes[1:]
        peak = max(n * max(sizes[: i + 1]) for i, n in enumerate(layers, start=1))
        # Factors calibrated against measured peaks (benchmarks/scaling.py) with some headroom.
        factor = 10 if method in (ALPHA_CROWN, SDP_CROWN) else 5
        return _BYTES * factor * peak + _BYTES * 12 * sum(sizes)

    def chunk_size(self, method: str) -> int:
        """How many samples (or boxes) one auto_LiRPA call may take under ``memory_mb``."""
        return max(1, int(self.memory_mb * 2**20 // self.bytes_per_sample(method)))

    def box_chunk_size(self, method: str, threat: BoxFamily) -> int:
        """How many (sample, box) pairs of a box family one chunk may hold under ``memory_mb``:
        one sample's bound memory per box, plus the box tensors (lower and upper, their copies in
        bound space and the centre: ``_BOX_COPIES`` input-sized tensors)."""
        per_box = self.bytes_per_sample(method) + _BYTES * _BOX_COPIES * math.prod(self.in_shape)
        return max(1, int(self.memory_mb * 2**20 // per_box))

    # ----------------------------------------------------------------------------------------
    def margin_lower_bounds(
        self, x: torch.Tensor, y: torch.Tensor, threat: Threat, method: str = IBP
    ) -> torch.Tensor:
        """Lower bounds (B, K-1) on ``f_y - f_j`` over ``threat`` around each x (B, *in_shape)."""
        return self.bounds(x, y, threat, method).lower

    def bounds(
        self, x: torch.Tensor, y: torch.Tensor, threat: Threat, method: str = IBP
    ) -> BoundResult:
        """:meth:`margin_lower_bounds` and, per sample, whether ``method`` fell back to a looser one.

        Raises :class:`UnsupportedMethod` (a :class:`UserError`) if ``method`` cannot bound this
        model under ``threat`` (:meth:`supports` says why beforehand).
        """
        self._require(method, threat)
        x, y = self._check_input(x, y)
        if isinstance(threat, NormBall):
            if threat.p == math.inf:
                lo, hi = (x - threat.eps).clamp(0, 1), (x + threat.eps).clamp(0, 1)
                return self._chunked(y, method, x_L=lo, x_U=hi)
            return self._chunked(y, method, x=x, p=threat.p, eps=threat.eps)
        if isinstance(threat, BoxFamily):
            return BoundResult.exact(self._box_family_bounds(x, y, threat, method))
        raise UserError(f"threat {threat} is not supported by the bounded classifier")

    def supports(self, method: str, threat: Optional[Threat]) -> Optional[str]:
        """None if bound ``method`` can bound this model under ``threat`` (None: boxes), else why not."""
        return backends.get(method).supports(self, threat)

    def _require(self, method: str, threat: Optional[Threat]) -> None:
        reason = self.supports(method, threat)
        if reason is not None:
            raise UnsupportedMethod(reason)

    def box_lower_bounds(
        self, x_L: torch.Tensor, x_U: torch.Tensor, y: torch.Tensor, method: str = IBP
    ) -> torch.Tensor:
        """Lower bounds (B, K-1) on the margins over the boxes ``[x_L, x_U]`` (each (B, *in_shape))."""
        self._require(method, None)
        x_L, y = self._check_input(x_L, y)
        x_U, y = self._check_input(x_U, y)
        if bool((x_L > x_U).any()):
            raise UserError("box lower corners must not exceed their upper corners (x_L <= x_U)")
        return self._chunked(y, method, x_L=x_L, x_U=x_U).lower

    def box_margins(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: BoxFamily,
        method: str = IBP,
        open: Optional[torch.Tensor] = None,
        on_chunk: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """Lower bounds (B, N) on ``min_j (f_y - f_j)`` over each of the N boxes of every sample.

        Only the (sample, box) pairs where ``open`` (bool (B, N), default all) is True are bounded;
        the others are +inf. ``on_chunk`` is called with the sample index (P,) of each finished
        chunk of pairs (for progress bars).
        """
        self._require(method, threat)
        x, y = self._check_input(x, y)
        n = threat.num_boxes(self.in_shape)
        out = torch.full((len(x), n), math.inf, device=self.device)
        for b_idx, n_idx, lb in self._pair_bounds(x, y, threat, method, open, on_chunk):
            out[b_idx, n_idx] = lb.min(1).values.detach()
        return out

    def _box_family_bounds(
        self, x: torch.Tensor, y: torch.Tensor, threat: BoxFamily, method: str
    ) -> torch.Tensor:
        """Lower bounds (B, K-1): for each class, the minimum over all boxes of the sample."""
        lb = torch.full((len(x), self.num_classes - 1), math.inf, device=self.device)
        for b_idx, _, box_lb in self._pair_bounds(x, y, threat, method, None, None):
            index = b_idx.view(-1, 1).expand_as(box_lb)
            lb = lb.scatter_reduce(0, index, box_lb, reduce="amin", include_self=True)
        return lb

    def _pair_bounds(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: BoxFamily,
        method: str,
        open: Optional[torch.Tensor],
        on_chunk: Optional[Callable[[torch.Tensor], None]],
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(sample index (P,), box index (P,), lower bounds (P, K-1))`` for the open
        (sample, box) pairs, at most :meth:`box_chunk_size` pairs at a time."""
        n = threat.num_boxes(self.in_shape)
        if open is None:
            open = torch.ones(len(x), n, dtype=torch.bool)
        pairs = open.to(torch.bool).cpu().nonzero()  # (P, 2), sorted by sample then box
        size = self.box_chunk_size(method, threat)
        incremental = self._patch_ibp(threat, method)
        for s in range(0, len(pairs), size):
            b_idx, n_idx = pairs[s : s + size].unbind(1)
            yy = y[b_idx.to(y.device)]
            if incremental is not None:
                lb = self._incremental_ibp(incremental, x, b_idx, n_idx, threat, yy)
            else:
                lo, hi = [], []
                for b in b_idx.unique_consecutive().tolist():
                    box_lo, box_hi = threat.boxes_at(x[b : b + 1], n_idx[b_idx == b])
                    lo.append(box_lo[0])
                    hi.append(box_hi[0])
                lb = self.box_lower_bounds(torch.cat(lo), torch.cat(hi), yy, method)
            yield b_idx.to(self.device), n_idx.to(self.device), lb
            if on_chunk is not None:
                on_chunk(b_idx)

    def _patch_ibp(self, threat: BoxFamily, method: str):
        """The incremental IBP of :mod:`cure_lirpa.bounds.patch_ibp` if it applies, else None."""
        from ..threats.patches import PatchThreat

        if method != IBP or not isinstance(threat, PatchThreat) or not self.incremental_ibp:
            return None
        if self.trainable and torch.is_grad_enabled():
            return None
        if not hasattr(self, "_patch_ibp_model"):
            from . import patch_ibp

            self._patch_ibp_model = patch_ibp.build(self.traced, self.in_shape)
        if self._patch_ibp_model is None:
            return None
        from .patch_ibp import has_batchnorm

        # auto_LiRPA's BatchNorm follows the bounded module's mode (batch statistics when training);
        # a verification classifier's module is always in eval mode, whatever the model's mode
        if has_batchnorm(self.traced) and self.module.training:
            return None
        return self._patch_ibp_model

    def _incremental_ibp(self, engine, x, b_idx, n_idx, threat, y) -> torch.Tensor:
        """Margin lower bounds (P, K-1) of the patch boxes ``n_idx`` of the samples ``b_idx``."""
        corners = threat.locations(self.in_shape)[n_idx]
        ones = torch.ones(1, self.in_shape[0], 1, 1, device=self.device)
        inside = (self._to_bound_space(0 * ones).view(-1), self._to_bound_space(ones).view(-1))
        samples, local = b_idx.unique(return_inverse=True)
        return engine.margins(
            self._to_bound_space(x[samples.to(x.device)]),
            local,
            corners[:, 0],
            corners[:, 1],
            (threat.height, threat.width),
            inside,
            margin_matrix(y, self.num_classes),
        )

    # ----------------------------------------------------------------------------------------
    # The one door from a threat to bound space

    def ball_region(self, x: torch.Tensor, p: float, eps: float) -> Region:
        """The lp ball (p = 2 or 1) of radius ``eps`` (pixel units) around ``x`` (B, *in_shape), in
        bound space. Unfolded normalisation ``(x - mean) / std`` maps it into the ellipsoid with
        semi-axes ``eps / std_c``, which the ball of radius ``eps / min(std)`` covers (exact when all
        channels share one std)."""
        if self._scale is not None:
            eps = eps / float(self._scale.min())
        return Region(self._to_bound_space(x), p, eps)

    def box_region(self, x_L: torch.Tensor, x_U: torch.Tensor) -> Region:
        """The box ``[x_L, x_U]`` (each (B, *in_shape), pixel units) in bound space (exact)."""
        lo, hi = self._to_bound_space(x_L), self._to_bound_space(x_U)
        return Region((lo + hi) / 2, math.inf, float((hi - lo).max()) / 2, lo, hi)

    def _chunked(
        self,
        y: torch.Tensor,
        method: str,
        x: Optional[torch.Tensor] = None,
        p: float = math.inf,
        eps: float = 0.0,
        x_L: Optional[torch.Tensor] = None,
        x_U: Optional[torch.Tensor] = None,
    ) -> BoundResult:
        """Bounds over lp balls (``x``, ``p``, ``eps``) or boxes (``x_L``, ``x_U``), in chunks that
        fit the memory budget."""
        n = self.chunk_size(method)
        out = []
        for s in range(0, len(y), n):
            sl = slice(s, s + n)
            if x_L is not None and x_U is not None:
                region = self.box_region(x_L[sl], x_U[sl])
            else:
                assert x is not None
                region = self.ball_region(x[sl], p, eps)
            out.append(self._bound(region, y[sl], method))
        return BoundResult.cat(out)

    def _bound(self, region: Region, y: torch.Tensor, method: str) -> BoundResult:
        """One backend call on a region in bound space, then the once-per-norm trace check."""
        backend = backends.get(method)
        C = margin_matrix(y, self.num_classes)
        grad = self.trainable and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            result = backend.bound(self, region, C)
        if not self.trainable:
            self._check_trace(region)
        fell = result.fell_back.to(torch.bool).cpu()
        return BoundResult(result.lower if grad else result.lower.detach(), fell)

    def lirpa_bounds(
        self,
        region: Region,
        C: torch.Tensor,
        method: str,
        interm_bounds: Optional[dict] = None,
    ) -> BoundResult:
        """auto_LiRPA's bound ``method`` (ibp, crown-ibp, crown, alpha-crown) over ``region`` for the
        specification ``C`` (B, S, K): lower bounds (B, S). For backends; ``interm_bounds`` holds
        the intermediate bounds fixed (:func:`cure_lirpa.bounds.lirpa.node_bounds`)."""
        try:
            out = lirpa.compute_bounds(
                self.module, region.bounded_tensor(), C, method, interm_bounds=interm_bounds
            )
        except lirpa.BoundFailure as exc:
            if self._conv_mode == "matrix":
                raise UserError(
                    f"auto_LiRPA {lirpa.AUTO_LIRPA_VERSION} cannot compute {method} bounds for "
                    f"this model ({exc}). IBP may still work; otherwise express the failing "
                    "operation with standard layers (Conv2d, Linear, BatchNorm, ReLU)."
                ) from None
            # auto_LiRPA 0.3's default "patches" mode for convolutions lacks some operators
            # (e.g. a product with a learnt per-channel scale); its "matrix" mode has them.
            _log.info("%s bounds failed in patches mode (%s); retrying in matrix mode", method, exc)
            self._conv_mode = "matrix"
            self.module = self._trace(self.traced)
            self.train(self.trainable and self.model.training)
            return self.lirpa_bounds(region, C, method, interm_bounds)
        return BoundResult(out.lower, torch.full((len(region),), out.fell_back, dtype=torch.bool))

    def _check_trace(self, region: Region) -> None:
        """Once per norm: the traced graph computes the model's function on points of the threat set
        (a frozen data-dependent branch or an untraceable op would make bounds describe another
        function), and lp-ball bounds do not have zero width (a dropped perturbation)."""
        key = "box" if region.is_box else f"l{region.p:g}"
        if key in self._checked_threats:
            return
        center, p = region.center, region.p
        gen = torch.Generator(device=center.device).manual_seed(0)
        x0 = center[:1]
        if region.lower is not None and region.upper is not None:
            lo, hi = region.lower[:1], region.upper[:1]
            u = torch.rand(8, *x0.shape[1:], generator=gen, device=x0.device)
            points = torch.cat([x0, lo, hi, lo + u * (hi - lo)])
        else:
            delta = torch.randn(8, *x0.shape[1:], generator=gen, device=x0.device)
            norms = delta.flatten(1).norm(p=p, dim=1).view(-1, *[1] * (x0.dim() - 1))
            points = torch.cat([x0, x0 + delta / norms * float(region.eps)])
        with torch.no_grad():
            modes = self.module.training, _modes(self.traced)
            # auto_LiRPA's parameter nodes set requires_grad to the module's mode on every forward,
            # and in training the bounded module holds newer BatchNorm statistics than the model:
            # compare with the bounded module's buffers, then restore flags and buffers (and the
            # batch statistics BatchNorm nodes keep from the last clean forward for their bounds).
            flags = [(q, q.requires_grad) for q in self.traced.parameters()]
            stats = [
                (node, node.current_mean, node.current_var)
                for node in self.module.modules()
                if hasattr(node, "current_mean") and hasattr(node, "current_var")
            ]
            saved = []
            for bound, own in lirpa.buffer_pairs(self.module, self.traced):
                saved.append((own, own.clone()))
                own.copy_(bound)
            self.module.eval()
            self.traced.eval()
            try:
                traced = self.module(points)
                direct = self.traced(points)
            finally:
                self.module.train(modes[0])
                _restore(modes[1])
                for q, flag in flags:
                    q.requires_grad_(flag)
                for buf, value in saved:
                    buf.copy_(value)
                for node, mean, var in stats:
                    node.current_mean, node.current_var = mean, var
        scale = 1e-4 * (1 + direct.abs().max())
        if not torch.allclose(traced, direct, atol=float(scale), rtol=1e-4):
            raise UserError(
                "the graph auto_LiRPA traced from this model computes a different function than the "
                "model on points of the threat set (max difference "
                f"{float((traced - direct).abs().max()):.3g}): its forward has data-dependent "
                "control flow or an operation the tracer cannot follow. Certificates would describe "
                "another function; rewrite forward with tensor operations only."
            )
        if key != "box" and float(region.eps) > 0:
            self._check_lp_width(Region(center[:1], p, region.eps))
        self._checked_threats.add(key)

    def _constant_near(self, ball: Region) -> bool:
        """Is the traced network constant on random points of the ball (zero width is then sound)?"""
        center = ball.center
        gen = torch.Generator(device=center.device).manual_seed(0)
        delta = torch.randn(16, *center.shape[1:], generator=gen, device=center.device)
        norms = delta.flatten(1).norm(p=ball.p, dim=1).view(-1, *[1] * (center.dim() - 1))
        with torch.no_grad():
            out = self.traced(center + delta / norms * float(ball.eps))
            ref = self.traced(center)
        return bool(torch.allclose(out, ref.expand_as(out), atol=1e-6, rtol=0))

    def _to_bound_space(self, x: torch.Tensor) -> torch.Tensor:
        if self._shift is not None:
            x = x - self._shift
        if self._scale is not None:
            x = x / self._scale
        return x

    def _check_lp_width(self, ball: Region) -> None:
        """Refuse models whose lp-ball IBP bounds have zero width (the perturbation was dropped)."""
        with torch.no_grad():
            lo, hi = self.module.compute_bounds(x=(ball.bounded_tensor(),), method="IBP", C=None)
        if float((hi - lo).max()) <= 0 and not self._constant_near(ball):
            raise UserError(  # a last guard: lp_ball_droppers and InputIdentity should prevent it
                "l2/l1 bounds of this model have zero width: an operation before its first affine "
                "layer drops the lp-ball perturbation in auto_LiRPA, which would make every "
                "certificate unsound. Wrap the model as cure_lirpa.models.Classifier(body, mean, std) "
                "so the normalisation is folded, or move it into the first Linear/Conv layer."
            )

    def _check_input(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[1:]) != self.in_shape:
            raise UserError(
                f"input of shape {tuple(x.shape)} does not match the model's input shape "
                f"(B, {', '.join(map(str, self.in_shape))})"
            )
        if x.shape[0] != y.shape[0]:
            raise UserError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        if len(x) and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
            raise UserError(
                f"inputs must be images in [0, 1] (got values in [{float(x.min()):.9g}, "
                f"{float(x.max()):.9g}]): threat sets are clipped to [0, 1] and radii are in pixel "
                "units. Pass unnormalised images and put the normalisation in the model "
                "(cure_lirpa.models.Classifier(body, mean, std))."
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise UserError(
                f"labels must lie in [0, {self.num_classes - 1}] for a model with "
                f"{self.num_classes} outputs (got {int(y.min())}..{int(y.max())})"
            )
        return x.to(self.device), y.to(self.device)


class UnsupportedMethod(UserError):
    """A bound method cannot bound this model under this threat (the message says why)."""


def certified(lb: torch.Tensor) -> torch.Tensor:
    """Boolean (B,): all K-1 margin lower bounds are positive."""
    return (lb > 0).all(dim=1)
