"""Options and helpers shared by the click commands."""

from __future__ import annotations

import re

import click
import torch

from ..errors import UserError
from ..threats.base import Threat, parse_threat
from ..vocabulary import AUTO_DEVICE


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (GPU number N)."""

    name = "device"

    def get_metavar(self, param, ctx=None) -> str:
        return "[auto|cpu|cuda|cuda:N]"

    def convert(self, value, param, ctx) -> str:
        text = str(value).strip().lower()
        if text in (AUTO_DEVICE, "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
            return text
        self.fail(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N (e.g. cuda:1)")


DEVICE_CHOICE = DeviceType()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` / ``cuda:N`` without that GPU is a user
    error."""
    if name == AUTO_DEVICE:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name} was asked for but no CUDA GPU is available; use --device cpu"
            )
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: there are only {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def train_count_message(train_count: int, batch_size: int) -> str:
    """What ``train`` and ``smooth train`` say when ``--train-count`` is below ``--batch-size``."""
    return (
        f"--train-count {train_count} is below --batch-size {batch_size}: each epoch is one "
        f"batch of all {train_count} images (batch size lowered to {train_count})"
    )


THREADS_HELP = (
    "torch CPU threads. One is fastest for the small zoo models and on shared machines; "
    "raise it for large models on a dedicated machine."
)


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
