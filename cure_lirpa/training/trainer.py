"""The certified-training loop: schedules, optimizer, gradient projection, checkpoints and resume.

:func:`train` runs a :class:`TrainConfig` and writes into an output folder:

* ``checkpoint.pt`` -- after every epoch, atomically (:func:`cure_lirpa.io.checkpoint.make_checkpoint`:
  arch, dataset, the *original* model's state_dict, the full config, versions, epoch and a
  ``trainer_state`` with the optimizer state, every RNG state and the metrics history);
* ``metrics.jsonl`` -- one JSON object per finished epoch (rewritten atomically with the checkpoint);
* ``config.json`` -- the resolved configuration (:class:`cure_lirpa.io.runs.Run`: a resume with other
  settings, except :data:`RUNTIME_KEYS`, is refused naming the keys).

The trainer does not know method names: it builds the method object with
:func:`cure_lirpa.training.objectives.make_method` and, per step, hands it the batch, the clean logits and the
current schedule values. Schedules (:mod:`cure_lirpa.training.schedules`) are pure functions of the global
step, counted in optimizer steps: warm-up at eps 0, smoothed eps ramp, natural-loss share kappa,
CROWN-IBP beta, step learning-rate decay.

Gradient projection (CURE paper, GP), in every epoch that starts after the eps ramp has ended:
save theta0 and the optimizer state; one certified epoch -> theta_c; back to theta0 and the saved
optimizer state, one natural epoch (cross-entropy only, gradients zeroed before every step) on the
same batches -> theta_n; ``theta = project_gradients(theta0, theta_c, theta_n, beta)``. Optimizer
state: the natural sub-epoch runs on a copy of the state saved at theta0 and is discarded; the merged
weights continue with the optimizer state of the certified sub-epoch (the certified update is the
primary one, and Adam's moments then keep describing the certified loss).

Resume: checkpoints are written only at epoch ends, and everything an epoch does is a function of
the saved state (weights, optimizer, the data-order generator, the method generator), so a run killed
anywhere -- also inside the natural half of a GP epoch -- and resumed with ``resume=True`` repeats the
unfinished epoch and ends with exactly the weights of an uninterrupted run (same device and threads).
The loop keeps no module-level state; data order comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..data import (
    DATASETS,
    DatasetInfo,
    TrainData,
    dataset_info,
    default_radii,
    load_dataset,
)
from ..distributed import METHOD_SEED_STRIDE, World, current_world
from ..errors import UserError
from ..io.checkpoint import (
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
    make_checkpoint,
)
from ..io.runs import Run, rng_state, set_rng_state
from ..models import build_model, ibp_init
from ..threats.base import check_radius, format_eps
from .losses import project_gradients
from .objectives import (
    L2_VARIANTS,
    LINF_VARIANTS,
    METHODS,
    NORMS,
    SINGLE_NORM_VARIANTS,
    MethodOptions,
    TrainingNetwork,
    is_multi_norm,
    make_method,
)
from .schedules import SHAPES, Ramp, crown_ibp_beta_at, eps_at, kappa_at, lr_at
from .step import StepResult, StepSchedule, TrainStep

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
DEFAULT_METHOD = "cure-joint"
RUNTIME_KEYS = ("data_root", "memory_mb", "train_cert", "epochs")
"""Config keys that may differ between a run and its resumption (``epochs`` extends a run)."""
STATE_FORMAT = "cure-lirpa-trainer/2"
INITS = ("default", "ibp")
"""Weight initialisations: the layers' own (``default``) or Shi et al.'s IBP initialisation."""


# ---------------------------------------------------------------------------------------------
# Configuration


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

    dataset: str = "sample"
    data_root: Optional[str] = None
    arch: str = "cnn-small"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = DEFAULT_METHOD
    linf_variant: str = "ibp"
    l2_variant: str = "ball"
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
    init: str = "default"
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
        if c.dataset not in DATASETS:
            raise UserError(f"unknown dataset {c.dataset!r}; choose one of {', '.join(DATASETS)}")
        if c.method not in METHODS:
            raise UserError(
                f"unknown training method {c.method!r}; choose one of {', '.join(METHODS)}"
            )
        if c.method in SINGLE_NORM_VARIANTS:
            norm, variant = SINGLE_NORM_VARIANTS[c.method]
            if norm == "linf":
                c.linf_variant = variant
            else:
                c.l2_variant = variant
        c.eps_linf, c.eps_l2 = resolved_radii(c)
        if c.linf_variant not in LINF_VARIANTS:
            raise UserError(f"--linf-variant must be one of {', '.join(LINF_VARIANTS)}")
        if c.l2_variant not in L2_VARIANTS:
            raise UserError(f"--l2-variant must be one of {', '.join(L2_VARIANTS)}")
        for name in ("eps_linf", "eps_l2", "train_eps_linf", "train_eps_l2"):
            v = getattr(c, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise UserError(
                    f"--{name.replace('_', '-')} must be a finite number >= 0 (pixel units), got {v}"
                )
        c.train_eps_linf = c.eps_linf if c.train_eps_linf is None else float(c.train_eps_linf)
        c.train_eps_l2 = c.eps_l2 if c.train_eps_l2 is None else float(c.train_eps_l2)
        in_shape = dataset_info(c.dataset).in_shape
        for name in ("eps_linf", "train_eps_linf", "eps_l2", "train_eps_l2"):
            check_radius(
                name.rpartition("_")[2], getattr(c, name), in_shape, f"--{name.replace('_', '-')}"
            )
        if c.ba_direction is None:
            c.ba_direction = "l2" if c.dataset in ("sample", "mnist") else "linf"
        if c.ba_direction not in NORMS:
            raise UserError(f"--ba-direction must be one of {', '.join(NORMS)}")
        if int(c.epochs) < 1 or int(c.epochs) != c.epochs:
            raise UserError(f"--epochs must be a whole number >= 1, got {c.epochs}")
        c.epochs = int(c.epochs)
        for name in ("warmup_epochs", "ramp_epochs"):
            if not (math.isfinite(getattr(c, name)) and getattr(c, name) >= 0):
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
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
        for name in (
            "kappa_start",
            "kappa_end",
            "sabr_lambda",
            "l2_lambda",
            "alpha",
            "gp_beta",
            "mtl_alpha_linf",
            "mtl_alpha_l2",
        ):
            if not 0.0 <= getattr(c, name) <= 1.0:
                raise UserError(
                    f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(c, name)}"
                )
        if c.ba_eta < 0:
            raise UserError(f"--ba-eta must be >= 0, got {c.ba_eta}")
        if int(c.mtl_attack_steps) != c.mtl_attack_steps or c.mtl_attack_steps < 1:
            raise UserError(
                f"--mtl-attack-steps must be a whole number >= 1, got {c.mtl_attack_steps}"
            )
        c.mtl_attack_steps = int(c.mtl_attack_steps)
        if c.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}, got {c.init!r}")
        if not (math.isfinite(c.ibp_reg) and c.ibp_reg >= 0):
            raise UserError(f"--ibp-reg must be >= 0, got {c.ibp_reg}")
        if not (math.isfinite(c.l1_reg) and c.l1_reg >= 0):
            raise UserError(f"--l1-reg must be >= 0, got {c.l1_reg}")
        if c.ibp_reg > 0 and "linf" not in make_method(c.method, c.method_options()).norms:
            raise UserError(
                f"--ibp-reg regularises the l∞ box bounds; {c.method!r} does not train l∞ "
                "(use it with an l∞ or cure-* method, or drop it)"
            )
        if c.ba_eta > 0 and not is_multi_norm(c.method):
            raise UserError(
                f"bound alignment (--ba-eta) needs a multi-norm method (cure-joint, cure-max, "
                f"cure-random), not {c.method!r}"
            )
        if c.gp_beta > 0 and c.method == "natural":
            raise UserError("gradient projection (--gp-beta) needs a certified method, not natural")
        if c.train_count is not None and c.train_count < 2:
            raise UserError(f"--train-count must be >= 2, got {c.train_count}")
        if c.train_count is not None and c.train_count < c.batch_size:
            c.batch_size = int(c.train_count)  # one batch of all the images (the CLI says so)
        if not c.memory_mb > 0:
            raise UserError(f"--memory-mb must be > 0, got {c.memory_mb}")
        if c.preset is not None and c.preset not in PRESETS:
            raise UserError(f"unknown preset {c.preset!r}; choose one of {', '.join(PRESETS)}")
        if c.preset == "cure-finetune" and not c.init_from:
            raise UserError(
                "the cure-finetune preset fine-tunes a pretrained model: pass --init-from "
                "CHECKPOINT (e.g. an ibp-linf or sabr-linf run's checkpoint.pt)"
            )
        return c

    def method_options(self) -> MethodOptions:
        return MethodOptions(
            linf_variant=self.linf_variant,
            l2_variant=self.l2_variant,
            sabr_lambda=self.sabr_lambda,
            l2_lambda=self.l2_lambda,
            alpha=self.alpha,
            ba_eta=self.ba_eta,
            ba_direction=self.ba_direction or "l2",
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


def resolved_radii(config: TrainConfig) -> tuple[float, float]:
    """``(eps_linf, eps_l2)`` of ``config``, each None replaced by the dataset's usual radius."""
    linf, l2 = default_radii(config.dataset) if config.dataset in DATASETS else (0.1, 0.5)
    return (
        linf if config.eps_linf is None else float(config.eps_linf),
        l2 if config.eps_l2 is None else float(config.eps_l2),
    )


# ---------------------------------------------------------------------------------------------
# Presets: the CURE paper's settings and its public scripts, overridable option by option

PRESETS: dict[str, str] = {
    "cure-scratch": "CURE-Scratch: Max + bound alignment + gradient projection from scratch",
    "cure-finetune": "CURE-Finetune: from a pretrained l∞ model (--init-from), 2 natural epochs, "
    "new eps ramp, Max + BA (eta 0.5) + GP (beta 0.5), Adam lr 5e-4",
    "cure-mtl": "CURE-Joint with the blocks that certified the most union accuracy in this "
    "package's measurements: IBP for l∞, MTL-IBP for l2 (alpha 0.3 MNIST, 0.1 otherwise)",
}
SCHEDULE_KEYS = ("warmup_epochs", "ramp_epochs", "lr_milestones")


def _sabr_lambda(dataset: str, eps_linf: float) -> float:
    """CURE's scripts: 0.4 for MNIST 0.1, 0.6 for MNIST 0.3, 0.1 for CIFAR 2/255, 0.7 for 8/255."""
    if dataset in ("sample", "mnist"):
        return 0.4 if eps_linf <= 0.2 else 0.6
    return 0.1 if eps_linf <= 5 / 255 else 0.7


def preset_values(name: str, dataset: str = "sample", eps_linf: float = 0.1) -> dict[str, Any]:
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
    mnist = dataset in ("sample", "mnist")
    if name == "cure-mtl":
        return _mtl_preset(mnist)
    v: dict[str, Any] = {
        "method": "cure-max",
        "linf_variant": "sabr",
        "l2_variant": "defence",
        "sabr_lambda": _sabr_lambda(dataset, eps_linf),
        "l2_lambda": 1e-5,
        "ba_direction": "l2" if mnist else "linf",
        "lr": 5e-4,
        "lr_factor": 0.2,
        "batch_size": 256 if mnist else 128,
    }
    if name == "cure-scratch":
        v.update(
            ba_eta=0.5 if mnist and eps_linf > 0.2 else 2.0,
            gp_beta=0.5 if dataset == "tinyimagenet" else 0.8,
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
        "method": "cure-joint",
        "linf_variant": "ibp",
        "l2_variant": "mtl-ibp",
        "mtl_alpha_l2": 0.3 if mnist else 0.1,
        "lr_factor": 0.2,
        "batch_size": 256 if mnist else 128,
    }
    if mnist:
        v.update(epochs=12, warmup_epochs=1.0, ramp_epochs=6.0, lr_milestones=(10.0,), lr=5e-4)
    else:
        v.update(epochs=160, warmup_epochs=2.0, ramp_epochs=80.0, lr_milestones=(120.0, 140.0))
        v.update(lr=1e-3, init="ibp", ibp_reg=0.5, l1_reg=1e-6, kappa_start=0.0)
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
# Data


# ---------------------------------------------------------------------------------------------
# Building blocks of a run


def build_network(
    config: TrainConfig, info: DatasetInfo, device: torch.device, init: bool = True
) -> tuple[nn.Module, TrainingNetwork]:
    """The model (seeded with ``config.seed``; initialised from ``config.init_from`` if ``init``)
    and its :class:`TrainingNetwork`."""
    c = config
    torch.manual_seed(c.seed)
    model = build_model(
        c.arch, info.in_shape, info.num_classes, info.mean, info.std, **c.arch_kwargs
    )
    if c.init_from and init:
        load_init_weights(model, c, info)
    elif c.init == "ibp":
        ibp_init(model)
    net = TrainingNetwork(model, info.in_shape, device, memory_mb=c.memory_mb)
    return model, net


def load_init_weights(model: nn.Module, config: TrainConfig, info: DatasetInfo) -> None:
    """Load the weights of ``config.init_from`` into ``model`` (fine-tuning); the architecture and
    input shape must match."""
    ckpt = load_checkpoint(config.init_from)
    d = ckpt.get("dataset") or {}
    if ckpt.get("arch") != config.arch or dict(ckpt.get("arch_kwargs") or {}) != config.arch_kwargs:
        raise UserError(
            f"--init-from {config.init_from} holds a {ckpt.get('arch')!r} model with "
            f"{ckpt.get('arch_kwargs') or {}}, but this run builds {config.arch!r} with "
            f"{config.arch_kwargs}; pass the same --arch/--width (or leave them out)"
        )
    if (
        tuple(d.get("in_shape", ())) != tuple(info.in_shape)
        or d.get("num_classes") != info.num_classes
    ):
        raise UserError(
            f"--init-from {config.init_from} was trained on {d.get('name')!r} (input "
            f"{d.get('in_shape')}, {d.get('num_classes')} classes); this run uses {info.name!r}"
        )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"--init-from weights do not fit the model: {str(exc)[:300]}") from None


def make_ramp(config: TrainConfig, steps_per_epoch: int) -> Ramp:
    return Ramp.from_epochs(
        config.warmup_epochs, config.ramp_epochs, steps_per_epoch, shape=config.ramp_shape
    )


def schedule_at(config: TrainConfig, step: int, steps_per_epoch: int, ramp: Ramp) -> StepSchedule:
    """eps per norm, kappa, CROWN-IBP beta and learning rate at global optimizer step ``step``."""
    c = config
    eps = {
        "linf": eps_at(step, c.train_eps_linf, ramp),
        "l2": eps_at(step, c.train_eps_l2, ramp),
    }
    return StepSchedule(
        eps=eps,
        kappa=kappa_at(step, ramp, c.kappa_start, c.kappa_end),
        crown_ibp_beta=crown_ibp_beta_at(step, ramp) if c.crown_ibp else 0.0,
        lr=lr_at(step / steps_per_epoch, c.lr, c.lr_milestones, c.lr_factor),
        reg_weight=ibp_reg_weight_at(step, c, ramp),
    )


def ibp_reg_weight_at(step: float, config: TrainConfig, ramp: Ramp) -> float:
    """Weight of Shi et al.'s IBP regulariser: ``ibp_reg * (1 - eps / eps_max)`` (l∞) until the
    ramp ends, 0 afterwards."""
    c = config
    if c.ibp_reg <= 0 or ramp.ended(step) or not c.train_eps_linf:
        return 0.0
    return c.ibp_reg * (1.0 - eps_at(step, c.train_eps_linf, ramp) / c.train_eps_linf)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load(model: nn.Module, net: TrainingNetwork, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state)
    net.sync_from_model()


def _generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone().cpu()


class _Meter:
    """Running sums for one sub-epoch's metrics (sample-weighted means)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, float] = {}
        self.correct = 0
        self.cert: dict[str, int] = {}
        self.cert_n = 0

    def add(self, name: str, value: float, b: int) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value * b

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def update(self, res: StepResult, y: torch.Tensor) -> None:
        """Add one step's loss, parts, clean accuracy and certified counts (``y`` its labels)."""
        b = len(y)
        self.n += b
        self.add("loss", res.loss, b)
        for k, v in res.parts.items():
            self.add(k, v, b)
        self.correct += int((res.logits.argmax(1) == y).sum())
        if res.masks:
            union = torch.ones(b, dtype=torch.bool, device=y.device)
            for norm in NORMS:
                if norm in res.masks:
                    self.cert[norm] = self.cert.get(norm, 0) + int(res.masks[norm].sum())
                    union &= res.masks[norm]
            if all(norm in res.masks for norm in NORMS):
                self.cert["union"] = self.cert.get("union", 0) + int(union.sum())
            self.cert_n += b


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What :func:`train` returns: paths, epochs done, the metrics history and this call's time."""

    out: Path
    checkpoint: Path
    metrics: Path
    epoch: int
    history: list[dict[str, Any]]
    seconds: float

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def train(
    config: TrainConfig,
    out: Union[str, Path],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: Union[str, torch.device] = "cpu",
    progress: Optional[bool] = None,
    log: Optional[Callable[[str], None]] = print,
    callback: Optional[Callable[[dict[str, Any]], None]] = None,
    stop_after: Optional[int] = None,
    world: Optional[World] = None,
) -> TrainResult:
    """Train with ``config``, writing ``checkpoint.pt``, ``metrics.jsonl``, ``config.json`` to ``out``.

    ``resume=True`` continues the run in ``out`` from its last completed epoch (refusing a
    checkpoint of another configuration, except for the keys in :data:`RUNTIME_KEYS`; a larger
    ``epochs`` extends the run). ``overwrite=True`` replaces this package's files in an existing
    ``out``. ``progress``: tqdm bars (None: only on a terminal). ``log``: receives one line per epoch
    (None: silent). ``callback`` sees ``{'epoch', 'phase', 'step'}`` after every optimizer step
    (``phase`` is ``'certified'`` or ``'natural'`` -- the GP sub-epoch); an exception it raises
    aborts the run like a kill. ``stop_after``: end this call after that many epochs.

    ``world``: this process's place in a data-parallel run (:mod:`cure_lirpa.distributed`; taken
    from an initialised process group when None). Every process then takes its slice of each global
    batch of ``batch_size`` samples, gradients are all-reduced, and only rank 0 writes ``out`` and
    logs.
    """
    opened: list[Run] = []
    try:
        return _train(config, out, opened, resume, overwrite, device, progress, log, callback,
                      stop_after, world)  # fmt: skip
    except BaseException:
        for run in opened:  # no epoch finished: leave nothing behind
            run.discard_if_empty()
        raise
    finally:
        for run in opened:
            run.close()


def _train(
    config: TrainConfig,
    out: Union[str, Path],
    opened: list[Run],
    resume: bool,
    overwrite: bool,
    device: Union[str, torch.device],
    progress: Optional[bool],
    log: Optional[Callable[[str], None]],
    callback: Optional[Callable[[dict[str, Any]], None]],
    stop_after: Optional[int],
    world: Optional[World],
) -> TrainResult:
    c = config.validated()
    device = torch.device(device)
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if world is None:
        world = current_world(device)
    main = world is None or world.is_main
    say = (log if main else None) or (lambda _msg: None)
    if not main:
        progress, callback = False, None

    def prepare() -> Optional[dict[str, Any]]:
        """Open the run folder; the checkpoint to resume from, if any (rank 0 only)."""
        opened.append(
            Run.open(
                out, "train", c.to_dict(), resume=resume, overwrite=overwrite, mutable=RUNTIME_KEYS
            )
        )
        if not ckpt_path.is_file():  # a fresh run, or one killed before its first epoch ended
            return None
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        _check_resume(ckpt, device, ckpt_path)
        return ckpt

    ckpt = prepare() if world is None else world.on_main(prepare)

    info = dataset_info(c.dataset)
    data = TrainData(load_dataset(c.dataset, "train", c.data_root), c.train_count)
    if data.size < 2:
        raise UserError(f"the training set of {c.dataset!r} has fewer than 2 samples")
    load_dataset(c.dataset, "test", c.data_root)  # fail now, not at verify, when it is missing
    model, net = build_network(c, info, device, init=ckpt is None)
    method = make_method(c.method, c.method_options())
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    steps = data.steps_per_epoch(c.batch_size)
    ramp = make_ramp(c, steps)
    data_gen = torch.Generator().manual_seed(c.seed)
    rank = 0 if world is None else world.rank
    method_gen = torch.Generator(device=device).manual_seed(c.seed + 1 + METHOD_SEED_STRIDE * rank)
    history: list[dict[str, Any]] = []
    start = 0
    if ckpt is not None:
        state = ckpt["trainer_state"]
        _load(model, net, ckpt["state_dict"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], {"data": data_gen})
        ranks_rng = state["method_rng_by_rank"]
        if rank < len(ranks_rng) and len(ranks_rng) == (1 if world is None else world.size):
            method_gen.set_state(ranks_rng[rank])
        else:
            say(
                f"note: the checkpoint was trained with {len(ranks_rng)} process(es); the methods' "
                "random draws continue from fresh seeds (not bit-identical to an uninterrupted run)"
            )
            if rank == 0:
                method_gen.set_state(ranks_rng[0])
        history = list(state["history"])
        start = int(ckpt["epoch"])
        say(f"resuming {out} after epoch {start} of {c.epochs}")
    elif resume:
        say(f"resuming {out}: no epoch had finished, starting at epoch 1")
    if ramp.end > c.epochs * steps:
        reached = eps_at(c.epochs * steps - 1, 1.0, ramp)
        say(
            f"warning: the eps ramp ends at epoch {c.warmup_epochs + c.ramp_epochs:g} but the run "
            f"has {c.epochs} epochs, so training reaches only {100 * reached:.0f}% of the target "
            f"radii (linf {format_eps(c.train_eps_linf)}, l2 {format_eps(c.train_eps_l2)}); raise "
            "--epochs or lower --warmup-epochs / --ramp-epochs"
        )

    def run_epochs() -> TrainResult:
        if main:
            if history:  # a kill between the checkpoint and the metrics file leaves them behind
                atomic_write_text(out / METRICS, "".join(json.dumps(h) + "\n" for h in history))
        result = TrainResult(out, ckpt_path, out / METRICS, start, history, 0.0)
        if start >= c.epochs:
            say(f"{out} is already trained for {start} epochs (of {c.epochs}); nothing to do")
            return result

        if world is not None:
            world.check_batches([len(i) for i in data.order(c.batch_size, None)])
        step = TrainStep(net, method, opt, c.grad_clip, c.train_cert, world, l1_reg=c.l1_reg)
        t_call = time.perf_counter()
        warned = False
        ctx = _Loop(c, net, step, data, ramp, steps, method_gen, device, progress, callback, world)
        for epoch in range(start, c.epochs):
            if stop_after is not None and epoch - start >= stop_after:
                say(f"stopping after {stop_after} epoch(s) as asked; continue with --resume")
                break
            record = ctx.epoch(epoch, data_gen)
            prev = history[-1]["train_seconds"] if history else 0.0
            record["train_seconds"] = round(prev + record["seconds"], 2)
            history.append(record)
            method_rngs = [_generator_state(method_gen)]
            if world is not None:
                world.average_buffers(net.bounded.module)
                method_rngs = world.gather(method_rngs[0])
                record["processes"] = world.size
            net.sync_to_model()
            if not main:
                result.epoch = epoch + 1
                continue
            trainer_state = {
                "format": STATE_FORMAT,
                "optimizer": opt.state_dict(),
                "rng": rng_state({"data": data_gen}),
                "method_rng_by_rank": method_rngs,
                "device_type": device.type,
                "steps_per_epoch": steps,
                "global_step": (epoch + 1) * steps,
                # Checkpoints are written between epochs only, so no GP sub-epoch is ever half done;
                # 'next_epoch_gp' says whether the next epoch will run gradient projection.
                "gp": {
                    "phase": "between-epochs",
                    "next_epoch_gp": _gp_epoch(c, epoch + 1, steps, ramp),
                    "epochs_done": sum(1 for h in history if h.get("gp")),
                },
                "history": history,
            }
            ck = make_checkpoint(
                model, c.arch, info, c.to_dict(), c.arch_kwargs, epoch + 1, trainer_state
            )
            atomic_torch_save(ck, ckpt_path)
            atomic_write_text(out / METRICS, "".join(json.dumps(h) + "\n" for h in history))
            result.epoch = epoch + 1
            say(format_record(record, c.epochs))
            if _collapsed(record, info.num_classes, epoch + 1, c.warmup_epochs) and not warned:
                warned = True
                say(
                    "warning: the model classifies the training batches at chance level -- certified "
                    "training has collapsed to a (nearly) constant classifier. Try a longer "
                    "--ramp-epochs, a smaller --batch-size (more steps), or keep "
                    "some natural loss with --kappa-end 0.2."
                )
        result.seconds = round(time.perf_counter() - t_call, 2)
        return result

    return run_epochs()


def _collapsed(record: dict[str, Any], num_classes: int, epochs_done: int, warmup: float) -> bool:
    """Clean training accuracy at chance level after the warm-up: a collapsed classifier."""
    return epochs_done > warmup + 1 and record["clean_accuracy"] < 1.5 / num_classes


def _gp_epoch(c: TrainConfig, epoch: int, steps: int, ramp: Ramp) -> bool:
    """Gradient projection applies to epochs that start after the eps ramp has ended."""
    return c.gp_beta > 0 and ramp.ended(epoch * steps)


class _Loop:
    """One run's epochs (kept as an object so that no state lives at module level)."""

    def __init__(self, c, net, step, data, ramp, steps, gen, device, progress, callback, world):
        self.c, self.net, self.step, self.opt = c, net, step, step.opt
        self.data, self.ramp, self.steps, self.gen = data, ramp, steps, gen
        self.device, self.progress, self.callback, self.world = device, progress, callback, world

    def epoch(self, epoch: int, data_gen: torch.Generator) -> dict[str, Any]:
        from tqdm.auto import tqdm

        c, net, model = self.c, self.net, self.net.model
        t0, cpu0 = time.perf_counter(), time.process_time()
        chunks = self.data.order(c.batch_size, data_gen)
        gp = _gp_epoch(c, epoch, self.steps, self.ramp)
        bar = tqdm(
            total=len(chunks) * (2 if gp else 1),
            desc=f"epoch {epoch + 1}/{c.epochs}" + (" (gp)" if gp else ""),
            disable=None if self.progress is None else not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        try:
            net.train(True)
            if gp:
                net.sync_to_model()
                theta0 = _state(model)
                opt0 = copy.deepcopy(self.opt.state_dict())
            meter, sched = self._run(epoch, chunks, "certified", bar)
            record = self._record(epoch, meter, sched)
            if gp:
                net.sync_to_model()
                theta_c = _state(model)
                opt_c = copy.deepcopy(self.opt.state_dict())
                _load(model, net, theta0)
                self.opt.load_state_dict(copy.deepcopy(opt0))
                nat, _ = self._run(epoch, chunks, "natural", bar)
                net.sync_to_model()
                theta_n = _state(model)
                _load(model, net, project_gradients(theta0, theta_c, theta_n, c.gp_beta))
                self.opt.load_state_dict(opt_c)
                record["gp"] = True
                record["gp_natural_loss"] = nat.means().get("loss", 0.0)
                record["gp_natural_accuracy"] = nat.correct / max(nat.n, 1)
        finally:
            bar.close()
        record["seconds"] = round(time.perf_counter() - t0, 2)
        record["cpu_seconds"] = round(time.process_time() - cpu0, 2)  # this process only
        return record

    def _run(self, epoch: int, chunks, phase: str, bar) -> tuple[_Meter, StepSchedule]:
        meter = _Meter()
        sched = None
        for i, idx in enumerate(chunks):
            sched = schedule_at(self.c, epoch * self.steps + i, self.steps, self.ramp)
            size = len(idx)
            if self.world is not None:
                idx = self.world.slice(idx)  # this process's part of the global batch
            x, y = self.data.batch(idx)
            x, y = x.to(self.device), y.to(self.device)
            res = self.step(x, y, sched, self.gen, phase, global_size=size)
            if not math.isfinite(res.loss):
                raise UserError(
                    f"the training loss became {res.loss} in epoch {epoch + 1}; lower --lr or "
                    "the training eps, or raise --ramp-epochs"
                )
            meter.update(res, y)
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.3f}", refresh=False)
            if self.callback is not None:
                self.callback({"epoch": epoch, "phase": phase, "step": i})
        if self.world is not None:
            self.world.reduce_meter(meter)
        return meter, sched

    def _record(self, epoch: int, meter: _Meter, sched: StepSchedule) -> dict[str, Any]:
        means = meter.means()
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": means.pop("loss", 0.0),
            "parts": means,
            "clean_accuracy": meter.correct / max(meter.n, 1),
            "certified": {k: v / max(meter.cert_n, 1) for k, v in meter.cert.items()},
            "eps": dict(sched.eps),
            "kappa": sched.kappa,
            "crown_ibp_beta": sched.crown_ibp_beta,
            "lr": sched.lr,
            "gp": False,
        }
        return rec


def format_record(r: dict[str, Any], epochs: int) -> str:
    """One human line per epoch."""
    cert = " ".join(f"{k} {v:.3f}" for k, v in r.get("certified", {}).items())
    parts = " ".join(f"{k} {v:.3f}" for k, v in r.get("parts", {}).items())
    eps = " ".join(f"{k} {v:.4g}" for k, v in r["eps"].items())
    gp = " [gp]" if r.get("gp") else ""
    return (
        f"epoch {r['epoch']}/{epochs}{gp}  eps {eps}  loss {r['loss']:.4f} ({parts})  "
        f"clean {r['clean_accuracy']:.3f}  certified {cert or '-'}  lr {r['lr']:.2g}  "
        f"{r['seconds']:.1f}s"
    )


def _check_resume(ckpt: dict[str, Any], device: torch.device, path: Path) -> None:
    """The checkpoint holds a trainer state made on ``device``'s type (the run layer has checked
    the configuration already)."""
    state = ckpt.get("trainer_state") or {}
    if state.get("format") != STATE_FORMAT:
        raise UserError(
            f"--resume: {path} has no certified-training state of this version to resume from; "
            "start a new run in another --out"
        )
    if state.get("device_type") != device.type:
        raise UserError(
            f"--resume: {path} was trained on {state.get('device_type')}; resume it with "
            f"--device {state.get('device_type')} (results are only reproducible on one device)"
        )


# ---------------------------------------------------------------------------------------------
# Timing (for benchmarks): one method's optimizer step against a natural step


def step_times(
    configs: dict[str, TrainConfig],
    x: torch.Tensor,
    y: torch.Tensor,
    rounds: int = 5,
    device: Union[str, torch.device] = "cpu",
    statistic: str = "min",
    clock: str = "wall",
) -> dict[str, float]:
    """Seconds of one optimizer step for each named config on the batch ``(x, y)``, at the end of
    the ramp (full training eps, ``kappa_end``, the initial learning rate).

    The step is the training loop's own :class:`cure_lirpa.training.step.TrainStep`: forward, bounds,
    backward, the training-certificate pass (``train_cert``), gradient clipping (``grad_clip``),
    the optimizer step. All models are built first; then each round times one step of every config
    in turn (after one untimed warm-up step each). ``statistic``: ``'min'`` (the fastest round) or
    ``'median'`` over the rounds; interleaving keeps the comparison fair on a shared machine.
    ``clock``: ``'wall'`` (``time.perf_counter``) or, on the CPU, ``'cpu'`` (``time.process_time``,
    this process's CPU seconds: a loaded machine inflates them far less than wall time, since the
    time the process waits for a core is not counted; use it with one torch thread).
    """
    if statistic not in ("min", "median"):
        raise UserError(f"statistic must be 'min' or 'median', got {statistic!r}")
    if clock not in ("wall", "cpu"):
        raise UserError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    device = torch.device(device)
    if clock == "cpu" and device.type != "cpu":
        raise UserError(f"clock='cpu' times CPU work only; use clock='wall' on {device.type}")
    now = time.process_time if clock == "cpu" else time.perf_counter
    x, y = x.to(device), y.to(device)
    steps: dict[str, Callable[[], float]] = {}
    for name, config in configs.items():
        c = dataclasses.replace(config, init_from=None).validated()
        model, net = build_network(c, dataset_info(c.dataset), device)
        method = make_method(c.method, c.method_options())
        opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        step = TrainStep(net, method, opt, c.grad_clip, c.train_cert, l1_reg=c.l1_reg)
        gen = torch.Generator(device=device).manual_seed(c.seed + 1)
        values = StepSchedule(
            eps={"linf": c.train_eps_linf, "l2": c.train_eps_l2},
            kappa=c.kappa_end,
            crown_ibp_beta=0.0,
            lr=c.lr,
        )

        def one(step=step, gen=gen, values=values) -> float:
            t0 = now()
            step(x, y, values, gen)
            return now() - t0

        one()
        steps[name] = one
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(1, rounds)):
        for name, one in steps.items():
            times[name].append(one())
    pick = min if statistic == "min" else statistics.median
    return {name: float(pick(ts)) for name, ts in times.items()}


def step_time(
    config: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    repeats: int = 5,
    device: Union[str, torch.device] = "cpu",
) -> float:
    """Seconds of one optimizer step of ``config`` (the fastest of ``repeats``, see
    :func:`step_times`)."""
    return step_times({"run": config}, x, y, repeats, device)["run"]


__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "DEFAULT_METHOD",
    "METRICS",
    "PRESETS",
    "RUNTIME_KEYS",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "apply_preset",
    "build_network",
    "format_record",
    "make_ramp",
    "preset_values",
    "schedule_at",
    "step_time",
    "step_times",
    "train",
]
