"""The options several commands share, declared once, and the one parser of radii.

Every command that has one of these options takes it from here, so that its name, short form,
type and range are the same everywhere: ``-q/--quiet``, ``-o/--out``, ``--device``, ``--seed``,
``--batch-size``, ``--threads``, ``--resume``, ``--overwrite``. A command passes only what is its
own: the help text, and for ``--batch-size`` / ``--seed`` the default.

Every radius (``--eps-*``, ``--sigma*``, ``--radii``, ``--precision``, ``--max-radius`` and the
radii of ``--threat``) is read by :func:`cure_lirpa.threats.base.parse_eps`, so ``0.25``, ``1/4`` and
``8/255`` are accepted by each of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import click

from ..errors import UserError
from ..threats.base import parse_eps
from ..vocabulary import AUTO_DEVICE
from .common import DEVICE_CHOICE, THREADS_HELP

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class RadiusType(click.ParamType):
    """A radius in [0, 1] pixel units: ``0.25``, ``1/4`` or ``8/255``; ``positive`` refuses 0."""

    name = "RADIUS"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = repr(float(value))
        try:
            radius = parse_eps(value)
        except UserError as exc:
            self.fail(str(exc), param, ctx)
        if self.positive and radius <= 0:
            self.fail(f"{value!r} must be > 0 (e.g. 0.25, 1/4 or 64/255)", param, ctx)
        return radius


class RadiusListType(click.ParamType):
    """Comma-separated radii, each as :class:`RadiusType` reads it: ``0.25,0.5,1`` or
    ``36/255,72/255``."""

    name = "RADII"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        if isinstance(value, (list, tuple)):
            return [float(v) for v in value]
        try:
            out = [parse_eps(v.strip()) for v in str(value).split(",") if v.strip()]
        except UserError:
            self.fail(
                f"{value!r} is not a comma-separated list of radii (e.g. 0.25,1/2,64/255)",
                param,
                ctx,
            )
        if not out or any(not math.isfinite(v) or v < 0 for v in out):
            self.fail(f"{value!r} must hold one or more radii >= 0", param, ctx)
        return out


RADIUS = RadiusType()
POSITIVE_RADIUS = RadiusType(positive=True)
RADII = RadiusListType()

DEVICE_HELP = "auto, cpu, cuda or cuda:N."


def typed_option(name: str, type: Any, default: Any, help: Optional[str] = None) -> Decorator:
    """``name`` of ``type`` with ``default`` (the shape most of the commands' options share)."""
    return click.option(name, type=type, default=default, help=help)


def quiet_option(
    help: str = "No progress bars and no progress lines (warnings still show).",
) -> Decorator:
    """``-q/--quiet``."""
    return click.option("--quiet", "-q", is_flag=True, help=help)


def out_option(help: str, required: bool = True) -> Decorator:
    """``-o/--out``: the run folder (a :class:`pathlib.Path`)."""
    return click.option(
        "--out",
        "-o",
        required=required,
        default=None,
        type=click.Path(file_okay=False, path_type=Path),
        help=help,
    )


def device_option(help: str = DEVICE_HELP) -> Decorator:
    """``--device`` (auto, cpu, cuda, cuda:N)."""
    return click.option(
        "--device", type=DEVICE_CHOICE, default=AUTO_DEVICE, show_default=True, help=help
    )


def seed_option(help: str, default: int = 0) -> Decorator:
    """``--seed``: a whole number >= 0."""
    return click.option(
        "--seed", type=click.IntRange(min=0), default=default, show_default=True, help=help
    )


def batch_size_option(default: int, help: Optional[str] = None, min: int = 1) -> Decorator:
    """``--batch-size``: a whole number >= ``min``."""
    return click.option(
        "--batch-size",
        type=click.IntRange(min=min),
        default=default,
        show_default=True,
        help=help,
    )


def threads_option() -> Decorator:
    """``--threads``: torch CPU threads."""
    return click.option(
        "--threads", type=click.IntRange(min=1), default=1, show_default=True, help=THREADS_HELP
    )


def resume_option(help: str = "Continue the run in --out (same options).") -> Decorator:
    """``--resume``."""
    return click.option("--resume", is_flag=True, help=help)


def overwrite_option(help: str = "Replace the run in --out.") -> Decorator:
    """``--overwrite``."""
    return click.option("--overwrite", is_flag=True, help=help)


def options(*decorators: Decorator) -> Decorator:
    """Apply ``decorators`` in the order given (the first is the first in ``--help``)."""

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn

    return apply


__all__ = [
    "POSITIVE_RADIUS",
    "RADII",
    "RADIUS",
    "RadiusListType",
    "RadiusType",
    "batch_size_option",
    "device_option",
    "options",
    "out_option",
    "overwrite_option",
    "quiet_option",
    "resume_option",
    "seed_option",
    "threads_option",
    "typed_option",
]
