"""Certified training's configuration: :class:`TrainConfig`, its checks and the paper's presets.

A :class:`TrainConfig` is everything that determines a run of :func:`cure_lirpa.training.certified.
train` (stored in the checkpoint as ``config`` and in the run folder's ``config.json``).
:meth:`TrainConfig.validated` resolves the defaults (radii of the dataset, training radii, BA
direction, the fixed variant of a single-norm method) and refuses impossible values;
:func:`apply_preset` sets the CURE paper's recipes; :func:`requested_config` turns the options of a
command line into a configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Optional, Sequence

from ..data import DATASETS, dataset_info, default_radii
from ..errors import UserError
from ..threats.base import check_radius
from ..vocabulary import (
    BALL,
    CURE_FINETUNE,
    CURE_JOINT,
    CURE_MAX,
    CURE_MTL,
    CURE_SCRATCH,
    DEFAULT_INIT,
    DEFAULT_OBJECTIVE,
    DEFENCE,
    IBP,
    INITS,
    L2,
    LINF,
    MNIST,
    MTL_IBP,
    MULTI_NORM_OBJECTIVES,
    NATURAL,
    SABR,
    SAMPLE,
    TINYIMAGENET,
)
from .objectives import (
    L2_VARIANTS,
    LINF_VARIANTS,
    METHODS,
    NORMS,
    SINGLE_NORM_VARIANTS,
    MethodOptions,
    is_multi_norm,
    make_method,
)
from .schedules import SHAPES

DEFAULT_METHOD = DEFAULT_OBJECTIVE
RUNTIME_KEYS = ("data_root", "memory_mb", "train_cert", "epochs")
"""Config keys that may differ between a run and its resumption (``epochs`` extends a run)."""
UNIT_FIELDS = (
    "kappa_start",
    "kappa_end",
    "sabr_lambda",
    "l2_lambda",
    "alpha",
    "gp_beta",
    "mtl_alpha_linf",
    "mtl_alpha_l2",
)
"""Fields that are weights or fractions in [0, 1]."""


def _option(name: str) -> str:
    """The command-line option of config field ``name``."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything that determines a certified-training run (stored in the checkpoint as ``config``).

    eps values are in [0, 1] pixel units. ``eps_linf`` / ``eps_l2`` are the target radii (what the
    model is meant to be certified at; None: the dataset's usual pair, :data:`cure_lirpa.data.
    DEFAULT_RADII`: MNIST 0.1 / 0.5, CIFAR-10 2/255 / 0.25, TinyImageNet 1/255 / 36/255); the
    training radii ``train_eps_linf`` / ``train_eps_l2`` default to them. Epoch counts may be
    fractional (the ramp is counted in optimizer steps).
    ``ba_direction=None`` picks the public default: l2 on MNIST, l∞ on CIFAR-10 / TinyImageNet.
    ``init='ibp'`` draws the weights with Shi et al.'s IBP initialisation; ``ibp_reg`` weighs Shi
    et al.'s IBP regulariser on the l∞ box during warm-up and ramp (times ``1 - eps / eps_max``);
    ``l1_reg`` weighs ``sum |w|`` over the weight matrices and kernels.
    """

    dataset: str = SAMPLE
    data_root: Optional[str] = None
    arch: str = "cnn-small"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = DEFAULT_METHOD
    linf_variant: str = IBP
    l2_variant: str = BALL
    eps_linf: Optional[float] = None
    eps_l2: Optional[float] = None
    train_eps_linf: Optional[float] = None
    train_eps_l2: Optional[float] = None
    epochs: int = 20
    warmup_epochs: float = 1.0
    ramp_epochs: float = 10.0
    ramp_shape: str = "smoothed"
    batch_size: int = 64
    lr: float = 1e-3
    lr_milestones: tuple[float, ...] = ()
    lr_factor: float = 0.2
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    kappa_start: float = 0.5
    kappa_end: float = 0.0
    crown_ibp: bool = False
    sabr_lambda: float = 0.4
    l2_lambda: float = 1e-5
    alpha: float = 0.5
    ba_eta: float = 0.0
    ba_direction: Optional[str] = None
    gp_beta: float = 0.0
    mtl_alpha_linf: float = 0.5
    mtl_alpha_l2: float = 0.5
    mtl_attack_steps: int = 1
    init: str = DEFAULT_INIT
    ibp_reg: float = 0.0
    l1_reg: float = 0.0
    init_from: Optional[str] = None
    seed: int = 0
    train_count: Optional[int] = None
    memory_mb: float = 2048.0
    train_cert: bool = True
    preset: Optional[str] = None

    def validated(self) -> TrainConfig:
        """A copy with defaults resolved (training eps, BA direction, variants of single-norm
        methods); raises :class:`UserError` for impossible values."""
        c = dataclasses.replace(
            self,
            arch_kwargs=dict(self.arch_kwargs),
            lr_milestones=tuple(float(m) for m in self.lr_milestones),
        )
        for check in (_check_method, _check_radii, _check_optimisation, _check_terms, _check_run):
            check(c)
        return c

    def method_options(self) -> MethodOptions:
        return MethodOptions(
            linf_variant=self.linf_variant,
            l2_variant=self.l2_variant,
            sabr_lambda=self.sabr_lambda,
            l2_lambda=self.l2_lambda,
            alpha=self.alpha,
            ba_eta=self.ba_eta,
            ba_direction=self.ba_direction or L2,
            mtl_alpha_linf=self.mtl_alpha_linf,
            mtl_alpha_l2=self.mtl_alpha_l2,
            mtl_attack_steps=int(self.mtl_attack_steps),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "lr_milestones" in kw:
            kw["lr_milestones"] = tuple(kw["lr_milestones"])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# The checks of TrainConfig.validated, in the order they run (each resolves what it checks)


def _check_method(c: TrainConfig) -> None:
    """Dataset, method and variants; a single-norm method fixes its norm's variant."""
    if c.dataset not in DATASETS:
        raise UserError(f"unknown dataset {c.dataset!r}; choose one of {', '.join(DATASETS)}")
    if c.method not in METHODS:
        raise UserError(f"unknown training method {c.method!r}; choose one of {', '.join(METHODS)}")
    if c.method in SINGLE_NORM_VARIANTS:
        norm, variant = SINGLE_NORM_VARIANTS[c.method]
        if norm == LINF:
            c.linf_variant = variant
        else:
            c.l2_variant = variant
    if c.linf_variant not in LINF_VARIANTS:
        raise UserError(f"--linf-variant must be one of {', '.join(LINF_VARIANTS)}")
    if c.l2_variant not in L2_VARIANTS:
        raise UserError(f"--l2-variant must be one of {', '.join(L2_VARIANTS)}")


def _check_radii(c: TrainConfig) -> None:
    """Target radii (the dataset's when None) and training radii (the targets when None)."""
    c.eps_linf, c.eps_l2 = resolved_radii(c)
    for name in ("eps_linf", "eps_l2", "train_eps_linf", "train_eps_l2"):
        v = getattr(c, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise UserError(f"{_option(name)} must be a finite number >= 0 (pixel units), got {v}")
    c.train_eps_linf = c.eps_linf if c.train_eps_linf is None else float(c.train_eps_linf)
    c.train_eps_l2 = c.eps_l2 if c.train_eps_l2 is None else float(c.train_eps_l2)
    in_shape = dataset_info(c.dataset).in_shape
    for name in ("eps_linf", "train_eps_linf", "eps_l2", "train_eps_l2"):
        check_radius(name.rpartition("_")[2], getattr(c, name), in_shape, _option(name))


def _check_optimisation(c: TrainConfig) -> None:
    """BA direction, epochs and schedule, batch size, optimizer settings, weights in [0, 1]."""
    if c.ba_direction is None:
        c.ba_direction = L2 if c.dataset in (SAMPLE, MNIST) else LINF
    if c.ba_direction not in NORMS:
        raise UserError(f"--ba-direction must be one of {', '.join(NORMS)}")
    if int(c.epochs) < 1 or int(c.epochs) != c.epochs:
        raise UserError(f"--epochs must be a whole number >= 1, got {c.epochs}")
    c.epochs = int(c.epochs)
    for name in ("warmup_epochs", "ramp_epochs"):
        if not (math.isfinite(getattr(c, name)) and getattr(c, name) >= 0):
            raise UserError(f"{_option(name)} must be >= 0")
    if c.ramp_shape not in SHAPES:
        raise UserError(f"ramp shape must be one of {', '.join(SHAPES)}")
    if int(c.batch_size) < 2:
        raise UserError(f"--batch-size must be >= 2, got {c.batch_size}")
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise UserError(f"--lr must be > 0, got {c.lr}")
    if not c.lr_factor > 0:
        raise UserError(f"--lr-factor must be > 0, got {c.lr_factor}")
    if any(m < 0 for m in c.lr_milestones):
        raise UserError("--lr-milestones must be epochs >= 0")
    if c.weight_decay < 0 or c.grad_clip < 0:
        raise UserError("--weight-decay and --grad-clip must be >= 0")
    for name in UNIT_FIELDS:
        if not 0.0 <= getattr(c, name) <= 1.0:
            raise UserError(f"{_option(name)} must be in [0, 1], got {getattr(c, name)}")


def _check_terms(c: TrainConfig) -> None:
    """Bound alignment, MTL-IBP attack, initialisation, regularisers, gradient projection: each
    only with a method it applies to."""
    if c.ba_eta < 0:
        raise UserError(f"--ba-eta must be >= 0, got {c.ba_eta}")
    if int(c.mtl_attack_steps) != c.mtl_attack_steps or c.mtl_attack_steps < 1:
        raise UserError(f"--mtl-attack-steps must be a whole number >= 1, got {c.mtl_attack_steps}")
    c.mtl_attack_steps = int(c.mtl_attack_steps)
    if c.init not in INITS:
        raise UserError(f"--init must be one of {', '.join(INITS)}, got {c.init!r}")
    if not (math.isfinite(c.ibp_reg) and c.ibp_reg >= 0):
        raise UserError(f"--ibp-reg must be >= 0, got {c.ibp_reg}")
    if not (math.isfinite(c.l1_reg) and c.l1_reg >= 0):
        raise UserError(f"--l1-reg must be >= 0, got {c.l1_reg}")
    if c.ibp_reg > 0 and LINF not in make_method(c.method, c.method_options()).norms:
        raise UserError(
            f"--ibp-reg regularises the l∞ box bounds; {c.method!r} does not train l∞ "
            "(use it with an l∞ or cure-* method, or drop it)"
        )
    if c.ba_eta > 0 and not is_multi_norm(c.method):
        raise UserError(
            f"bound alignment (--ba-eta) needs a multi-norm method "
            f"({', '.join(MULTI_NORM_OBJECTIVES)}), not {c.method!r}"
        )
    if c.gp_beta > 0 and c.method == NATURAL:
        raise UserError(f"gradient projection (--gp-beta) needs a certified method, not {NATURAL}")


def _check_run(c: TrainConfig) -> None:
    """Training-set size (a smaller one lowers the batch size), memory budget, preset."""
    if c.train_count is not None and c.train_count < 2:
        raise UserError(f"--train-count must be >= 2, got {c.train_count}")
    if c.train_count is not None and c.train_count < c.batch_size:
        c.batch_size = int(c.train_count)  # one batch of all the images (the CLI says so)
    if not c.memory_mb > 0:
        raise UserError(f"--memory-mb must be > 0, got {c.memory_mb}")
    if c.preset is not None and c.preset not in PRESETS:
        raise UserError(f"unknown preset {c.preset!r}; choose one of {', '.join(PRESETS)}")
    if c.preset == CURE_FINETUNE and not c.init_from:
        raise UserError(
            "the cure-finetune preset fine-tunes a pretrained model: pass --init-from "
            "CHECKPOINT (e.g. an ibp-linf or sabr-linf run's checkpoint.pt)"
        )


def resolved_radii(config: TrainConfig) -> tuple[float, float]:
    """``(eps_linf, eps_l2)`` of ``config``, each None replaced by the dataset's usual radius."""
    linf, l2 = default_radii(config.dataset if config.dataset in DATASETS else MNIST)
    return (
        linf if config.eps_linf is None else float(config.eps_linf),
        l2 if config.eps_l2 is None else float(config.eps_l2),
    )


# ---------------------------------------------------------------------------------------------
# Presets: the CURE paper's settings and its public scripts, overridable option by option

PRESETS: dict[str, str] = {
    CURE_SCRATCH: "CURE-Scratch: Max + bound alignment + gradient projection from scratch",
    CURE_FINETUNE: "CURE-Finetune: from a pretrained l∞ model (--init-from), 2 natural epochs, "
    "new eps ramp, Max + BA (eta 0.5) + GP (beta 0.5), Adam lr 5e-4",
    CURE_MTL: "CURE-Joint with the blocks that certified the most union accuracy in this "
    "package's measurements: IBP for l∞, MTL-IBP for l2 (alpha 0.3 MNIST, 0.1 otherwise)",
}
SCHEDULE_KEYS = ("warmup_epochs", "ramp_epochs", "lr_milestones")


def _sabr_lambda(dataset: str, eps_linf: float) -> float:
    """CURE's scripts: 0.4 for MNIST 0.1, 0.6 for MNIST 0.3, 0.1 for CIFAR 2/255, 0.7 for 8/255."""
    if dataset in (SAMPLE, MNIST):
        return 0.4 if eps_linf <= 0.2 else 0.6
    return 0.1 if eps_linf <= 5 / 255 else 0.7


def preset_values(name: str, dataset: str = SAMPLE, eps_linf: float = 0.1) -> dict[str, Any]:
    """The options preset ``name`` sets for ``dataset`` and l∞ radius ``eps_linf``.

    Both presets use the public CURE recipe: SABR for l∞ (lambda by dataset and eps), the l2 defence
    (lambda2 1e-5), CURE-Max, Adam lr 5e-4, batch 256 (MNIST) / 128, lr x0.2 at the milestones.
    cure-scratch: BA eta 2.0 (0.5 for MNIST 0.3), GP beta 0.8 (0.5 on TinyImageNet); MNIST 70 epochs
    with the ramp from epoch 2 to 22 and milestones 50, 60; CIFAR-10 / TinyImageNet 160 epochs, ramp
    2 -> 82, milestones 120, 140. cure-finetune: BA eta 0.5, GP beta 0.5, 2 natural epochs, then a
    10-epoch ramp, 20 epochs with a decay at 15 (the epoch counts of fine-tuning are this package's
    choice; the paper does not fix them).
    """
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    mnist = dataset in (SAMPLE, MNIST)
    if name == CURE_MTL:
        return _mtl_preset(mnist)
    v: dict[str, Any] = {
        "method": CURE_MAX,
        "linf_variant": SABR,
        "l2_variant": DEFENCE,
        "sabr_lambda": _sabr_lambda(dataset, eps_linf),
        "l2_lambda": 1e-5,
        "ba_direction": L2 if mnist else LINF,
        "lr": 5e-4,
        "lr_factor": 0.2,
        "batch_size": 256 if mnist else 128,
    }
    if name == CURE_SCRATCH:
        v.update(
            ba_eta=0.5 if mnist and eps_linf > 0.2 else 2.0,
            gp_beta=0.5 if dataset == TINYIMAGENET else 0.8,
            epochs=70 if mnist else 160,
            warmup_epochs=2.0,
            ramp_epochs=20.0 if mnist else 80.0,
            lr_milestones=(50.0, 60.0) if mnist else (120.0, 140.0),
        )
    else:
        v.update(
            ba_eta=0.5,
            gp_beta=0.5,
            epochs=20,
            warmup_epochs=2.0,
            ramp_epochs=10.0,
            lr_milestones=(15.0,),
        )
    return v


def _mtl_preset(mnist: bool) -> dict[str, Any]:
    """cure-mtl: CURE-Joint (alpha 0.5) with IBP for l∞ and the expressive MTL-IBP loss (De Palma
    et al., ICLR 2024) for l2. Measured (docs/results.md): on MNIST (l∞ 0.1, l2 0.5) alpha 0.3 and
    12 epochs gave union 80.7 at clean 93.4; on CIFAR-10 (l∞ 2/255, l2 0.25, with Shi et al.'s IBP
    initialisation and regulariser) alpha 0.1 gave the best union of every row tried: 7 points
    above IBP l∞, but only 0.6 above the MTL-IBP l2 block trained alone (within noise).
    MNIST keeps that 12-epoch schedule; other datasets take the CURE paper's 160 epochs."""
    v: dict[str, Any] = {
        "method": CURE_JOINT,
        "linf_variant": IBP,
        "l2_variant": MTL_IBP,
        "mtl_alpha_l2": 0.3 if mnist else 0.1,
        "lr_factor": 0.2,
        "batch_size": 256 if mnist else 128,
    }
    if mnist:
        v.update(epochs=12, warmup_epochs=1.0, ramp_epochs=6.0, lr_milestones=(10.0,), lr=5e-4)
    else:
        v.update(epochs=160, warmup_epochs=2.0, ramp_epochs=80.0, lr_milestones=(120.0, 140.0))
        v.update(lr=1e-3, init=IBP, ibp_reg=0.5, l1_reg=1e-6, kappa_start=0.0)
    return v


def apply_preset(
    config: TrainConfig, name: Optional[str], explicit: Sequence[str] = ()
) -> TrainConfig:
    """``config`` with preset ``name`` applied to every field not named in ``explicit``.

    When ``epochs`` is explicit, the preset's warm-up, ramp and milestones (unless explicit too)
    are scaled by ``epochs / preset epochs``, so a shorter run keeps the schedule's proportions.
    """
    if not name:
        return config
    values = preset_values(name, config.dataset, resolved_radii(config)[0])
    explicit = set(explicit)
    scale = config.epochs / values["epochs"] if "epochs" in explicit else 1.0
    out = dataclasses.replace(config, preset=name)
    for key, value in values.items():
        if key in explicit:
            continue
        if key in SCHEDULE_KEYS and scale != 1.0:
            value = (
                tuple(round(m * scale, 4) for m in value)
                if key == "lr_milestones"
                else round(value * scale, 4)
            )
        setattr(out, key, value)
    return out


# ---------------------------------------------------------------------------------------------
# A command line's request


def requested_config(
    fields: dict[str, Any], explicit: Collection[str] = (), preset: Optional[str] = None
) -> TrainConfig:
    """The configuration a command line asks for (not yet :meth:`TrainConfig.validated`).

    ``fields``: :class:`TrainConfig` fields; ``explicit``: the ones the user gave (the others are
    defaults). A variant that contradicts a single-norm method is refused; with ``init_from``, the
    checkpoint's architecture and dataset are used unless given; ``preset`` is applied to every
    field not explicit (:func:`apply_preset`).
    """
    explicit = set(explicit)
    method = fields.get("method", DEFAULT_METHOD)
    if method in SINGLE_NORM_VARIANTS:
        norm, variant = SINGLE_NORM_VARIANTS[method]
        key = f"{norm}_variant"
        if key in explicit and fields.get(key) != variant:
            raise UserError(
                f"--method {method} fixes the {norm} variant to {variant!r}; drop "
                f"{_option(key)} {fields.get(key)} or use a cure-* method"
            )
    fields = dict(fields)
    if fields.get("init_from"):
        fields.update(_init_from_fields(fields["init_from"], explicit))
        fields["init_from"] = str(Path(fields["init_from"]).resolve())
    return apply_preset(TrainConfig(**fields), preset, explicit)


def _init_from_fields(path: str, explicit: set[str]) -> dict[str, Any]:
    """Architecture and dataset of the checkpoint at ``path``, for the fields not explicit."""
    from ..io.checkpoint import load_checkpoint

    init = load_checkpoint(path)
    out: dict[str, Any] = {}
    if "arch" not in explicit and "arch_kwargs" not in explicit:
        out.update(arch=init["arch"], arch_kwargs=dict(init.get("arch_kwargs") or {}))
    if "dataset" not in explicit:
        dataset = (init.get("dataset") or {}).get("name")
        if dataset is not None:
            out["dataset"] = dataset
    return out


__all__ = [
    "DEFAULT_METHOD",
    "INITS",
    "PRESETS",
    "RUNTIME_KEYS",
    "TrainConfig",
    "apply_preset",
    "preset_values",
    "requested_config",
    "resolved_radii",
]
