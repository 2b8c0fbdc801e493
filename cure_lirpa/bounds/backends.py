"""Bound methods as backends: one interface, one registry.

A backend bounds ``C f(z)`` from below over a :class:`~cure_lirpa.bounds.region.Region`, a threat set that
:class:`~cure_lirpa.bounds.classifier.BoundedClassifier` has already mapped into bound space; it never sees the
user's threat in pixel units, so it cannot skip that mapping. Before a backend runs, its
:meth:`Backend.supports` says whether it can bound a model under a threat (and why not); the cascade
skips the stages that cannot.

Backends: IBP (Gowal et al., 2018), CROWN-IBP (Zhang et al., ICLR 2020), CROWN (Zhang et al.,
NeurIPS 2018) and alpha-CROWN (Xu et al., ICLR 2021), all through auto_LiRPA; SDP-CROWN (Chiu et al.,
ICML 2025), :mod:`cure_lirpa.bounds.sdp_crown`. A new backend is registered with :func:`register` and is then
offered by every command and covered by the soundness tests, which enumerate :func:`names`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import torch

from ..errors import UserError
from ..threats.base import Threat
from . import lirpa
from .region import BoundResult, Region
from .sdp_crown import SdpCrown

if TYPE_CHECKING:
    from .classifier import BoundedClassifier


class Backend(Protocol):
    """A bound method. ``trainable``: its bounds can carry gradients to the model's parameters."""

    name: str
    trainable: bool

    def supports(self, bc: BoundedClassifier, threat: Threat) -> Optional[str]:
        """None if this backend can bound ``bc`` under ``threat``, else the reason it cannot."""
        ...

    def bound(self, bc: BoundedClassifier, region: Region, C: torch.Tensor) -> BoundResult:
        """Lower bounds (B, S) on ``C f(z)`` over ``region`` (B samples); ``C`` is (B, S, K)."""
        ...


class AutoLirpa:
    """One of auto_LiRPA's bound methods (:data:`cure_lirpa.bounds.lirpa.METHODS`)."""

    def __init__(self, name: str, trainable: bool = True):
        self.name = name
        self.trainable = trainable

    def supports(self, bc: BoundedClassifier, threat: Threat) -> Optional[str]:
        return None

    def bound(self, bc: BoundedClassifier, region: Region, C: torch.Tensor) -> BoundResult:
        return bc.lirpa_bounds(region, C, self.name)


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` under its name (replacing one of the same name)."""
    _REGISTRY[backend.name] = backend
    return backend


def names() -> tuple[str, ...]:
    """The registered bound methods, cheapest first."""
    return tuple(_REGISTRY)


def get(name: str) -> Backend:
    """The backend called ``name``; a :class:`UserError` naming the choices if there is none."""
    if name not in _REGISTRY:
        raise UserError(f"unknown bound method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


for _name in lirpa.METHODS:  # ibp, crown-ibp, crown, alpha-crown
    register(AutoLirpa(_name))
register(SdpCrown())
