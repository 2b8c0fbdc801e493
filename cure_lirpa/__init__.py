"""cure-lirpa: certified robustness against several perturbation types at once.

Deterministic certification and certified training on auto_LiRPA (l∞, l2, l1, patch and geometric
threats, union accuracy, the CURE methods) and randomized smoothing for several norms (the NU paper).

The public API (the names docs/api.md shows)::

    from cure_lirpa import BoundedClassifier, parse_threat, verify, certify_dataset, train, TrainConfig

Names are resolved on first use, so ``import cure_lirpa`` (and the command line's start-up) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    # threats
    "Threat": "threats.base",
    "NormBall": "threats.base",
    "BoxFamily": "threats.base",
    "parse_threat": "threats.base",
    # bounds
    "BoundedClassifier": "bounds.classifier",
    "certified": "bounds.classifier",
    "margin_matrix": "bounds.classifier",
    # certification
    "verify": "verification.runner",
    "certify_dataset": "verification.runner",
    "certify_batch": "verification.runner",
    "write_results": "verification.results",
    "read_samples": "verification.results",
    "read_summary": "verification.results",
    # training
    "TrainConfig": "training.config",
    "train": "training.certified",
    "apply_preset": "training.config",
    # data, models, checkpoints, attacks
    "load_dataset": "data",
    "dataset_info": "data",
    "Classifier": "models",
    "build_model": "models",
    "load_checkpoint": "io.checkpoint",
    "model_from_checkpoint": "io.checkpoint",
    "pgd": "attacks",
    "UserError": "errors",
    # randomized smoothing
    "Smooth": "smoothing",
    "HybridSmooth": "smoothing",
    "GaussianNoise": "smoothing",
    "UniformNoise": "smoothing",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cure_lirpa' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
