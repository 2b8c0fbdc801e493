"""Options and helpers shared by the click commands."""

from __future__ import annotations

import click
import torch

from ..errors import UserError
from ..threats import Threat, parse_eps, parse_threat

DEVICE_CHOICE = click.Choice(["auto", "cpu", "cuda"])


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu"
        )
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


THREADS_HELP = (
    "torch CPU threads. One is fastest for the small zoo models and on shared machines; "
    "raise it for large models on a dedicated machine."
)


class EpsType(click.ParamType):
    """A radius in [0, 1] pixel units: ``0.1`` or a fraction such as ``8/255``."""

    name = "EPS"

    def convert(self, value, param, ctx) -> float:
        if isinstance(value, (int, float)):
            value = str(value)
        try:
            return parse_eps(value)
        except UserError as exc:
            self.fail(str(exc), param, ctx)


class ThreatType(click.ParamType):
    """A click type for threat strings such as ``linf:0.1``, ``l2:0.5``, ``patch:2``."""

    name = "THREAT"

    def convert(self, value, param, ctx) -> Threat:
        if isinstance(value, Threat):
            return value
        try:
            return parse_threat(value)
        except UserError as exc:
            self.fail(str(exc), param, ctx)
