"""``cure-lirpa train``: certified training (single-norm baselines and the CURE methods).

A thin layer over :func:`cure_lirpa.training.certified.train`: parse the options into a
:class:`~cure_lirpa.training.config.TrainConfig` (:func:`~cure_lirpa.training.config.requested_config`
applies a preset to the options not given explicitly), train, print one line per epoch and a summary.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Optional

import click
from click.core import ParameterSource

from .. import distributed
from ..data import DATASETS
from ..errors import UserError
from ..threats.base import format_eps
from ..training.certified import train as run_training
from ..training.config import INITS, PRESETS, TrainConfig, requested_config
from ..training.objectives import L2_VARIANTS, LINF_VARIANTS, METHODS, NORMS
from ..training.trainer import CHECKPOINT
from ..vocabulary import CERTIFIED, CLEAN_ACCURACY, L2, LINF
from . import options as opt
from .common import resolve_device, train_count_message
from .options import RADIUS

_D = TrainConfig()  # the library's defaults, shown in --help
NONNEG = click.FloatRange(min=0.0)
UNIT = click.FloatRange(0.0, 1.0)
POSITIVE = click.FloatRange(min=0.0, min_open=True)
EPS = RADIUS


class FloatList(click.ParamType):
    """Comma-separated non-negative numbers, e.g. ``50,60``; an empty string is the empty list."""

    name = "EPOCHS"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[float, ...]:
        if isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
        try:
            out = tuple(float(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(
                f"{value!r} is not a comma-separated list of numbers (e.g. 50,60)", param, ctx
            )
        if any(not math.isfinite(v) or v < 0 for v in out):
            self.fail(f"{value!r} must hold numbers >= 0", param, ctx)
        return out


# CLI option name -> TrainConfig field (options not listed map to themselves, dashes -> underscores)
_FIELD = {"width": "arch_kwargs"}


def _shown(name: str, type: Any, help: Optional[str] = None) -> opt.Decorator:
    """Option ``name`` whose default is the :class:`TrainConfig` field of that name, shown in --help."""
    field = name[2:].replace("-", "_")
    return click.option(name, type=type, default=getattr(_D, field), show_default=True, help=help)


EPILOG = """
\b
Examples:
  cure-lirpa train --out runs/demo
      (cure-joint on the built-in MNIST sample, cnn-small, about a minute on one CPU core)
  cure-lirpa verify runs/demo/checkpoint.pt --threat linf:0.1 --threat l2:0.5
  cure-lirpa train --method ibp-linf --dataset mnist --data-root ../shared/data --out runs/ibp
  cure-lirpa train --dataset cifar10 --data-root DIR --eps-linf 8/255 --eps-l2 0.5 --out runs/c8
      (radii default to the dataset's pair: CIFAR-10 2/255 and 0.25)
  cure-lirpa train --method cure-max --ba-eta 2 --gp-beta 0.8 --out runs/max-ba-gp
  cure-lirpa train --preset cure-scratch --epochs 10 --dataset mnist --out runs/scratch
  cure-lirpa train --preset cure-finetune --init-from runs/ibp/checkpoint.pt --out runs/ft
  cure-lirpa train --out runs/demo --resume          (continue after a kill)
"""


@click.command("train", epilog=EPILOG)
@_shown(
    "--dataset",
    click.Choice(DATASETS),
    "Training data; 'sample' is the built-in 4000/1000 real MNIST sample.",
)
@opt.typed_option(
    "--data-root",
    click.Path(),
    None,
    "Folder with the dataset (e.g. ../shared/data for MNIST/raw); not needed for 'sample'.",
)
@_shown("--arch", None, "mlp, cnn-small, cnn5, cnn7, or a user model 'package.module:factory'.")
@opt.typed_option(
    "--width",
    click.IntRange(min=1),
    None,
    "Width of the zoo architecture [default: the architecture's own, e.g. 16 for cnn-small].",
)
@_shown(
    "--method",
    click.Choice(list(METHODS)),
    "Training method. Single-norm: natural, ibp-linf, ibp-l2, sabr-linf, l2-defence, "
    "mtl-ibp-linf, mtl-ibp-l2. Multi-norm (CURE): cure-joint, cure-max, cure-random.",
)
@_shown(
    "--linf-variant",
    click.Choice(LINF_VARIANTS),
    "l∞ loss of the cure-* methods: 'ibp' (whole box), 'sabr' (small box around a PGD point) "
    "or 'mtl-ibp' (MTL-IBP: (1-a) CE at a PGD point + a IBP loss, a = --mtl-alpha-linf).",
)
@_shown(
    "--l2-variant",
    click.Choice(L2_VARIANTS),
    "l2 loss of the cure-* methods: 'ball' (exact l2-ball IBP), 'defence' (CURE's l2 "
    "defence: box around an l2 PGD point) or 'mtl-ibp' (MTL-IBP on the l2 ball, a = --mtl-alpha-l2).",
)
@opt.typed_option(
    "--preset",
    click.Choice(list(PRESETS)),
    None,
    "The paper's settings: cure-scratch (Max+BA+GP) or cure-finetune (needs --init-from). "
    "Options given explicitly override the preset; with --epochs the preset's schedule is scaled.",
)
@opt.typed_option(
    "--eps-linf",
    EPS,
    None,
    "Target l∞ radius in [0, 1] pixel units, e.g. 0.1 or 8/255 [default: the dataset's: "
    "MNIST and sample 0.1, CIFAR-10 2/255, TinyImageNet 1/255].",
)
@opt.typed_option(
    "--eps-l2",
    EPS,
    None,
    "Target l2 radius, e.g. 0.5 or 36/255 [default: the dataset's: MNIST and sample 0.5, "
    "CIFAR-10 0.25, TinyImageNet 36/255].",
)
@opt.typed_option(
    "--train-eps-linf", EPS, None, "l∞ radius used for training [default: --eps-linf]."
)
@opt.typed_option(
    "--train-eps-l2",
    EPS,
    None,
    "l2 radius used for training [default: --eps-l2]; e.g. 0.75 = 1.5x trains for l2 0.5.",
)
@_shown("--epochs", click.IntRange(min=1))
@_shown(
    "--warmup-epochs",
    NONNEG,
    "Epochs of natural training at eps 0 before the ramp (may be fractional).",
)
@_shown(
    "--ramp-epochs", NONNEG, "Epochs over which eps ramps (smoothed) from 0 to the training eps."
)
@opt.batch_size_option(_D.batch_size, "Training images per optimizer step.", min=2)
@_shown("--lr", POSITIVE, "Adam learning rate.")
@click.option(
    "--lr-milestones",
    type=FloatList(),
    default="",
    help="Epochs at which the learning rate is multiplied by --lr-factor, e.g. 50,60 [default: none].",
)
@_shown("--lr-factor", POSITIVE)
@_shown("--weight-decay", NONNEG)
@_shown("--grad-clip", NONNEG, "Clip the gradient norm to this value (0 = off).")
@_shown(
    "--kappa-start",
    UNIT,
    "Natural-loss share at the start of the ramp: loss = kappa*CE + (1-kappa)*certified.",
)
@_shown("--kappa-end", UNIT, "Natural-loss share from the end of the ramp on (linear in between).")
@click.option(
    "--crown-ibp/--no-crown-ibp",
    default=_D.crown_ibp,
    show_default=True,
    help="Mix CROWN-IBP into the ball bounds, beta going 1 -> 0 over the ramp.",
)
@_shown(
    "--sabr-lambda",
    UNIT,
    "SABR box radius as a fraction of eps (CURE: 0.4 MNIST 0.1, 0.6 MNIST 0.3, "
    "0.1 CIFAR 2/255, 0.7 CIFAR 8/255).",
)
@_shown("--l2-lambda", UNIT, "l2-defence box radius as a fraction of eps (CURE's scripts: 1e-5).")
@_shown("--alpha", UNIT, "cure-joint weight of the l∞ loss: alpha*L_inf + (1-alpha)*L_2.")
@_shown(
    "--ba-eta",
    NONNEG,
    "Bound-alignment weight (0 = off; CURE: 2.0 from scratch, 0.5 fine-tuning). cure-* only.",
)
@opt.typed_option(
    "--ba-direction",
    click.Choice(NORMS),
    None,
    "Norm q whose certified samples are aligned: KL(P_q || P_r) "
    "[default: l2 on MNIST, linf on CIFAR-10/TinyImageNet].",
)
@_shown(
    "--gp-beta",
    UNIT,
    "Gradient projection weight after the ramp (0 = off; CURE: 0.8, 0.5 fine-tuning).",
)
@_shown(
    "--mtl-alpha-linf",
    UNIT,
    "MTL-IBP weight of the IBP loss for l∞ (0 = adversarial training, 1 = IBP), e.g. 0.3.",
)
@_shown("--mtl-alpha-l2", UNIT, "MTL-IBP weight of the IBP loss for l2.")
@_shown(
    "--mtl-attack-steps",
    click.IntRange(min=1),
    "PGD steps of the MTL-IBP attack (1: a random start and one step to the ball's boundary).",
)
@_shown(
    "--init",
    click.Choice(INITS),
    "Weight initialisation: the layers' own, or 'ibp' (Shi et al.: N(0, 2 pi / fan_in^2)).",
)
@_shown(
    "--ibp-reg",
    NONNEG,
    "Weight of Shi et al.'s IBP regulariser (bound tightness, ReLU balance) on the l∞ box "
    "during the ramp, e.g. 0.5 (0 = off).",
)
@_shown(
    "--l1-reg",
    NONNEG,
    "Weight of the L1 penalty sum |w| on weight matrices and kernels, e.g. 1e-6 (0 = off).",
)
@opt.typed_option(
    "--init-from",
    click.Path(dir_okay=False),
    None,
    "Start from this checkpoint's weights (fine-tuning); its --arch/--width/--dataset are "
    "used unless given.",
)
@opt.out_option("Run folder: checkpoint.pt, metrics.jsonl, config.json.")
@opt.resume_option("Continue the run in --out from its last epoch.")
@opt.overwrite_option("Replace the run in an existing --out.")
@opt.seed_option("Seed of the weights, the data order and the methods' random draws.", _D.seed)
@opt.device_option(
    "auto, cpu, cuda or cuda:N. Under torchrun, cuda (or auto with GPUs) means "
    "cuda:LOCAL_RANK, one GPU per process."
)
@opt.typed_option(
    "--train-count",
    click.IntRange(min=2),
    None,
    "Train on N training images only (quick runs): the first N, classes interleaved for "
    "class-sorted ImageFolder data [default: all].",
)
@_shown(
    "--memory-mb", POSITIVE, "Memory budget of one bound computation (larger batches are split)."
)
@click.option(
    "--train-cert/--no-train-cert",
    default=_D.train_cert,
    show_default=True,
    help="Report certified accuracy of the training batches for every norm (an extra no-grad IBP "
    "pass for norms the method's loss does not certify, e.g. SABR).",
)
@opt.threads_option()
@opt.quiet_option("No progress bars and no per-epoch lines (warnings still show).")
@click.pass_context
def train_command(ctx: click.Context, **opts: Any) -> None:
    """Certified training against l∞ and l2 perturbations (CURE and single-norm baselines).

    Trains with eps ramped from 0 to the training radii, writes a checkpoint after every epoch
    (resumable with --resume), logs loss parts, clean accuracy and certified accuracy of the
    training batches per norm and for their union to metrics.jsonl, and prints the checkpoint path.
    """
    try:
        _run(ctx, opts)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None


def _explicit(ctx: click.Context) -> set[str]:
    """Config fields the user set on the command line (not defaults)."""
    out = set()
    for name in ctx.params:
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            out.add(_FIELD.get(name, name))
    return out


def _fields(o: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields among the options (``--width`` is ``arch_kwargs``)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset", "arch_kwargs"}
    fields = {k: v for k, v in o.items() if k in names}
    fields["arch_kwargs"] = {"width": o["width"]} if o["width"] else {}
    fields["lr_milestones"] = tuple(o["lr_milestones"])
    return fields


def _run(ctx: click.Context, o: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(o["threads"])
    asked = requested_config(_fields(o), _explicit(ctx), o["preset"])
    config = asked.validated()
    if config.batch_size != asked.batch_size:  # --train-count below --batch-size
        click.echo(
            f"warning: {train_count_message(config.train_count, asked.batch_size)}", err=True
        )
    world = None
    if distributed.launched():  # started by torchrun: one process of a data-parallel run
        device = distributed.process_device(o["device"])
        world = distributed.init_from_environment(device)
    else:
        device = resolve_device(o["device"])
    quiet = o["quiet"] or (world is not None and not world.is_main)
    finished = False
    try:
        if not quiet:
            click.echo(_header(config, o["out"], device, world), err=True)
        result = run_training(
            config,
            o["out"],
            resume=o["resume"],
            overwrite=o["overwrite"],
            device=device,
            progress=False if quiet else None,
            log=_warn if quiet else _log,
            world=world,
        )
        finished = True
    finally:
        distributed.shutdown(finished)
    if world is None or world.is_main:
        _summary(result, config, quiet)


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _warn(msg: str) -> None:
    """The log under --quiet: warnings only."""
    if msg.startswith("warning"):
        _log(msg)


def _header(config: TrainConfig, out: str, device, world) -> str:
    extra = f", preset {config.preset}" if config.preset else ""
    return (
        f"training {config.method} ({config.arch}, {config.dataset}{extra}) for "
        f"{config.epochs} epochs on {device}{_processes(world)}; eps linf "
        f"{format_eps(config.train_eps_linf)}, l2 {format_eps(config.train_eps_l2)} -> "
        f"{Path(out) / CHECKPOINT}"
    )


def _summary(result, config: TrainConfig, quiet: bool) -> None:
    """The checkpoint path (stdout), the last epoch's figures and the next command."""
    last = result.last
    click.echo(str(result.checkpoint))
    if last:
        cert = ", ".join(f"{k} {100 * v:.1f}%" for k, v in last.get(CERTIFIED, {}).items())
        click.echo(
            f"epochs {result.epoch}/{config.epochs}, training time "
            f"{last.get('train_seconds', 0):.0f} s; last epoch on training batches (eps linf "
            f"{format_eps(last['eps'][LINF])}, l2 {format_eps(last['eps'][L2])}): clean "
            f"{100 * last[CLEAN_ACCURACY]:.1f}%" + (f", certified {cert}" if cert else "")
        )
    if not quiet:
        click.echo(
            f"next: cure-lirpa verify {result.checkpoint} "
            f"--threat {LINF}:{format_eps(config.eps_linf)} --threat {L2}:{format_eps(config.eps_l2)}",
            err=True,
        )


def _processes(world) -> str:
    return "" if world is None else f" (x{world.size} processes, {world.size} slices per batch)"


train = train_command
"""The click command (``from cure_lirpa.cli.train import train``)."""

if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_command())
