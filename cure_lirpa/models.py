"""Model zoo: classifiers that take images in [0, 1] pixel space and carry their normalisation.

Every zoo model is a :class:`Classifier`: a :class:`Normalize` layer followed by a plain
``nn.Sequential`` body. Keeping the normalisation a separate, recognisable layer lets
:mod:`cure_lirpa.bounds.classifier` fold it into the first affine layer before auto_LiRPA sees the graph
(the l2 zero-width trap: a normalisation layer in front of the first affine layer would make
auto_LiRPA's l2 IBP bounds zero-width).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .errors import UserError

ARCHITECTURES = ("mlp", "cnn-small", "cnn5", "cnn7")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for inputs of shape (B, C, H, W) in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise UserError(f"normalisation mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise UserError(f"normalisation std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a grayscale image would broadcast silently against an RGB mean (not checked in a trace,
        # where shapes are tensors: the run checks its shapes before it traces)
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            self._check_channels(x)
        return (x - self.mean) / self.std

    def _check_channels(self, x: torch.Tensor) -> None:
        channels = int(self.mean.shape[0])
        if channels > 1 and (x.dim() < 2 or x.shape[1] != channels):
            shape = "x".join(str(d) for d in x.shape[1:])
            raise UserError(
                f"images of shape {shape} do not fit this model: its normalisation has "
                f"{channels} channels, so it takes {channels}xHxW images; use a dataset of "
                f"{channels}-channel images or a model built for {shape}"
            )


class Classifier(nn.Module):
    """``body(normalize(x))``: a zoo classifier on [0, 1] inputs; returns logits of shape (B, K)."""

    def __init__(self, body: nn.Sequential, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


def _flat_size(in_shape: Sequence[int], layers: nn.Sequential) -> int:
    with torch.no_grad():
        return int(layers(torch.zeros(1, *in_shape)).numel())


def mlp(
    in_shape: Sequence[int], num_classes: int, width: int = 256, depth: int = 3
) -> nn.Sequential:
    """Fully connected net: ``depth`` hidden layers of ``width`` ReLU units."""
    d = 1
    for s in in_shape:
        d *= s
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def _conv_relu_net(
    in_shape: Sequence[int],
    num_classes: int,
    convs: Sequence[tuple[int, int, int, int]],
    hidden: int,
) -> nn.Sequential:
    """Conv-ReLU layers ``(out channels, kernel, stride, padding)``, then fc ``hidden`` - fc K."""
    layers: list[nn.Module] = []
    c = in_shape[0]
    for out, kernel, stride, padding in convs:
        layers += [nn.Conv2d(c, out, kernel, stride=stride, padding=padding), nn.ReLU()]
        c = out
    body = nn.Sequential(*layers, nn.Flatten())
    n = _flat_size(in_shape, body)
    return nn.Sequential(*body, nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def cnn_small(in_shape: Sequence[int], num_classes: int, width: int = 16) -> nn.Sequential:
    """conv(w, 4x4, s2) - conv(2w, 4x4, s1) - fc100 - fc K (w = 16: this package's CPU network)."""
    return _conv_relu_net(in_shape, num_classes, [(width, 4, 2, 0), (2 * width, 4, 1, 0)], 100)


def cnn5(in_shape: Sequence[int], num_classes: int, width: int = 16) -> nn.Sequential:
    """Three convolutions (w, 2w, 4w; the last two stride 2) and two linear layers (256, K)."""
    convs = [(width, 3, 1, 1), (2 * width, 4, 2, 1), (4 * width, 4, 2, 1)]
    return _conv_relu_net(in_shape, num_classes, convs, 256)


def cnn7(in_shape: Sequence[int], num_classes: int, width: int = 64) -> nn.Sequential:
    """CURE's / SABR's CNN7 with BatchNorm: conv w-w-2w-2w-2w (3x3, the third stride 2), fc 512.

    ``width=64`` is the paper's network; smaller widths keep CPU runs affordable.
    """
    c = in_shape[0]
    w1, w2 = width, 2 * width

    def block(i: int, o: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, stride=stride, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    convs = nn.Sequential(
        *block(c, w1),
        *block(w1, w1),
        *block(w1, w2, 2),
        *block(w2, w2),
        *block(w2, w2),
        nn.Flatten(),
    )
    n = _flat_size(in_shape, convs)
    return nn.Sequential(
        *convs, nn.Linear(n, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_classes)
    )


_FACTORIES: dict[str, Callable[..., nn.Sequential]] = {
    "mlp": mlp,
    "cnn-small": cnn_small,
    "cnn5": cnn5,
    "cnn7": cnn7,
}


@torch.no_grad()
def ibp_init(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Shi et al. (NeurIPS 2021)'s IBP initialisation, in place: every weight matrix or kernel but
    the last one drawn from ``N(0, sigma^2)`` with ``sigma = sqrt(2 pi) / fan_in``, so that IBP
    bound widths neither explode nor vanish with depth at initialisation. Biases and the last layer
    keep their values; returns ``model``."""
    weights = [p for name, p in model.named_parameters() if p.dim() > 1 and name.endswith("weight")]
    for w in weights[:-1]:
        fan_in = w[0].numel()
        w.normal_(0.0, math.sqrt(2 * math.pi) / fan_in, generator=generator)
    return model


def build_model(
    arch: str,
    in_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    **kwargs,
) -> nn.Module:
    """Build a zoo :class:`Classifier` or a user model given as ``package.module:factory``.

    A user factory is called as ``factory(in_shape=..., num_classes=..., **kwargs)`` and must return
    an ``nn.Module`` that maps [0, 1] images of shape (B, *in_shape) to logits (B, num_classes).
    User models get no normalisation layer added: they handle their own.
    """
    if ":" in arch:
        model = load_user_model(arch, in_shape=in_shape, num_classes=num_classes, **kwargs)
        check_output_shape(model, arch, in_shape, num_classes)
        return model
    if arch not in _FACTORIES:
        raise UserError(
            f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)} "
            "or give a user model as 'package.module:factory'"
        )
    body = _FACTORIES[arch](tuple(in_shape), num_classes, **kwargs)
    return Classifier(body, mean, std)


def check_output_shape(
    model: nn.Module, name: str, in_shape: Sequence[int], num_classes: int
) -> None:
    """Refuse a model that does not map (B, *in_shape) images to logits of shape (B, num_classes).

    Runs one forward pass on two black images in eval mode (BatchNorm statistics stay untouched).
    """
    shape = "x".join(str(d) for d in in_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *in_shape))
    except UserError as exc:
        raise UserError(f"model {name!r}: {exc}") from None
    except Exception as exc:
        raise UserError(
            f"model {name!r} fails on a batch of two {shape} images: {type(exc).__name__}: "
            f"{_one_line(exc)[:200]}"
        ) from None
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise UserError(
            f"model {name!r} returns {got} for a batch of two {shape} images; it must return "
            f"logits of shape (batch, {num_classes}), one per class of the dataset"
        )


def _factory_arguments(factory: Callable, spec: str, kwargs: dict) -> dict:
    """``kwargs`` when ``factory`` accepts them, else no arguments when it takes none; a
    :class:`UserError` naming the signature otherwise."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: just try the keywords
        return kwargs
    try:
        sig.bind(**kwargs)
        return kwargs
    except TypeError as exc:
        try:
            sig.bind()
            return {}
        except TypeError:
            given = ", ".join(f"{k}=..." for k in kwargs)
            raise UserError(
                f"user model {spec!r} cannot be called as {spec.partition(':')[2]}({given}): "
                f"{exc}; its signature is {sig} (--width is passed as width=...)"
            ) from None


def load_user_model(spec: str, **kwargs) -> nn.Module:
    """Import ``package.module:factory`` and call the factory with ``kwargs``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"user model {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"cannot import module {module_name!r} for user model {spec!r}: {exc}. "
            "Check that the module is on PYTHONPATH."
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UserError(f"module {module_name!r} has no callable {attr!r}")
    arguments = _factory_arguments(factory, spec, kwargs)
    try:
        model = factory(**arguments)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"user model {spec!r}: {attr}() raised {type(exc).__name__}: {_one_line(exc)}"
            f"{_where(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or "(no message)"


def _where(exc: BaseException) -> str:
    """`` (at file:line)``: where the exception was raised, or "" when unknown."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
