"""Helpers shared by several test files (pytest puts ``tests/`` on sys.path: ``from helpers import``)."""

from __future__ import annotations

import torch

from cure_lirpa.bounds.classifier import certified
from cure_lirpa.training.config import TrainConfig
from cure_lirpa.training.objectives import exact_margins

TINY_NETWORK = {"arch": "cnn-small", "arch_kwargs": {"width": 4}}
"""The network of the few-second training runs: cnn-small of width 4."""


def tiny_config(kappa: float, eps: tuple[float, float], **kw) -> TrainConfig:
    """A certified-training run of a few seconds on the built-in sample: :data:`TINY_NETWORK`, no
    warm-up and no eps ramp, Adam 5e-3, the natural-loss share ``kappa`` throughout and training
    radii ``eps`` (l∞, l2); ``kw`` sets (or overrides) any other field."""
    schedule = dict(warmup_epochs=0.0, ramp_epochs=0.0, lr=5e-3)
    radii = dict(kappa_start=kappa, kappa_end=kappa, train_eps_linf=eps[0], train_eps_l2=eps[1])
    return TrainConfig(**{**TINY_NETWORK, **schedule, **radii, **kw})


def margins(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Margins f_y - f_j (B, K-1) in the order of cure_lirpa.bounds.classifier.margin_matrix."""
    return exact_margins(model(x), y)


def assert_sound(lb: torch.Tensor, found: torch.Tensor, what: str) -> torch.Tensor:
    """No margin an attack ``found`` (B, K-1) lies below its lower bound ``lb`` and no certified
    sample is broken; the certified samples (B,)."""
    assert bool((found >= lb - 1e-4).all()), f"{what}: a margin fell below its lower bound"
    cert = certified(lb)
    assert bool((found[cert] > 0).all()), f"{what}: a certified sample was broken"
    return cert
