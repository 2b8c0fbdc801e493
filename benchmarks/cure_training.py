"""CURE on MNIST and CIFAR-10: single-norm baselines vs multi-norm training, certified under l∞,
l2 and l1.

For each row (one trained model) this script

1. trains the row's method on the dataset (``cure_lirpa.training.certified.train``; resumes a half-finished run,
   skips a finished one) into ``<results>/<row>/``;
2. certifies ``--test-count`` test images (default 1000; the first ones, classes interleaved for
   the class-sorted CIFAR-10 ImageFolder) under the dataset's three threats (MNIST linf:0.1, l2:0.5,
   l1:1; CIFAR-10 linf:2/255, l2:0.25, l1:0.5) with IBP (plus a PGD cross-check), CROWN and, under
   l2, SDP-CROWN (the library's cascade with these stages, ``cure_lirpa.verification.runner.certify_dataset``)
   into ``<results>/<row>/verify/`` (skipped when done for the same checkpoint and procedure); each
   method after IBP runs only on the images the earlier ones leave open, which gives the same
   best-of and union accuracy;
3. writes ``<results>/<row>/row.json`` and refreshes ``summary.md``, ``summary.json`` and
   ``union_accuracy.png`` from every row present in the results folder.

``--speed`` measures, on one batch of 256 training images, each row's optimizer-step time relative
to a natural step (targets: IBP l∞ or l2 <= 3x; joint/max/random with ball IBP <= 5x; BA <= +10%)
and writes ``speed.json`` / ``speed.md``.

Rows can run as separate invocations sharing one results folder (cure-finetune needs ibp-linf)::

    python -m benchmarks.cure_training --quick                     # a few minutes, built-in sample
    python -m benchmarks.cure_training --rows natural,ibp-linf
    python -m benchmarks.cure_training --rows cure-joint --rows cure-max
    python -m benchmarks.cure_training --speed --rows none         # step times only
    python -m benchmarks.cure_training --report-only
    python -m benchmarks.cure_training --dataset cifar10 --rows natural,ibp-linf,ibp-l2,cure-joint
    python -m benchmarks.cure_training --rows table --train-count 30000 --no-speed  # paper's table

``--rows table`` runs the dataset's table of :data:`TABLES`; :data:`MNIST_TABLE` holds the rows of the
CURE paper's MNIST table on today's blocks (batch 64; IBP / SABR / MTL-IBP l∞, IBP / MTL-IBP l2, CURE-Joint / Max / Random with an MTL-IBP l2
block, each with and without bound alignment, CURE-Scratch, CURE-Finetune from the best l∞ row).

Full mode: the whole MNIST training set from ``--data-root`` (default ../shared/data), cnn-small,
a CPU-sized schedule: 6 epochs (1 warm-up epoch, eps ramp over 3 epochs, lr 5e-4 decayed x0.2
for the last epoch, batch 256, natural-loss share kappa 0.5 -> 0), training eps linf 0.1 and l2 0.5
(``--train-l2-factor`` scales the l2 training eps). About two hours for the default rows on 2 CPU
cores (sabr-linf alone ~20 min: 8 PGD steps per batch; the optional l2-defence row costs the same);
``--train-count`` trains on a subset when time is short. The multi-norm rows use the certifiable
variants (l∞ IBP, exact l2-ball IBP); the ``cure-scratch`` row is Max + BA (eta 2, direction l2) +
GP (beta 0.8) on that schedule; ``cure-finetune`` starts from the ibp-linf row (2 natural epochs,
new ramp, Max + BA 0.5 + GP 0.5, Adam 5e-4) with the cure-finetune preset's schedule scaled to 4
epochs. The optional ``cure-joint-sabr`` row uses the public CURE code's blocks instead (SABR l∞
and CURE's l2 defence).

CIFAR-10 (``--dataset cifar10``, the JPEG archive or any layout :func:`cure_lirpa.data.load_dataset`
reads) is a reduced-scale run for a CPU: the same cnn-small and schedule (lr 1e-3), 20,000 training
images (2,000 per class), the CURE paper's smaller pair l∞ 2/255 and l2 0.25, SABR lambda 0.1 (the
paper trains CNN7 for 160 epochs on a GPU: ``examples/cifar10.py --paper``). Its goal: the best
CURE row beats the best single-norm row on union(l∞, l2) by at least 5 points; the rows of
:data:`CIFAR_ROWS` are the configurations tried for it (with ``cure-joint+shi`` and
``ibp-linf+shi``, the rows of Shi et al.'s recipe)::

    python -m benchmarks.cure_training --dataset cifar10 --no-speed \
        --rows cure-joint-l2mtl0.1,ibp-linf+shi,mtl-ibp-l2-a0.1

Radius pairs (``--pair``): MNIST 0.1 (l2 0.5, l1 1; the default) and 0.3 (l2 1, l1 2), CIFAR-10
2/255 (l2 0.25, l1 0.5; the default) and 8/255 (l2 0.5, l1 1), the CURE paper's pairs. A row trained
and certified at a pair other than the first lives in ``<row>@<pair>/`` (``/`` spelled ``-``), so one
results folder and one ``summary.md`` hold both tables; each pair gets its table, its plot and the
union gain of its best CURE row over its best single-norm row on the same images (95% interval and
sign test)::

    python -m benchmarks.cure_training --dataset cifar10 --pair 8/255 --rows table --no-speed
    python -m benchmarks.cure_training --pair 0.3 --train-count 30000 --no-speed \
        --rows mtl-ibp-linf-b64,mtl-ibp-l2-a0.3-b64,cure-joint-mtl2-b64

Rows certified by older versions of this script without the SDP-CROWN stage show no "SDP +x".
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import click
import torch

from benchmarks.harness import (
    RESULTS,
    data_root_option,
    log,
    reattack_cell,
    save_summary,
    split_commas,
)
from cure_lirpa.data import load_dataset, stack, take
from cure_lirpa.errors import UserError
from cure_lirpa.io.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    model_from_checkpoint,
    versions,
)
from cure_lirpa.threats.base import parse_threat
from cure_lirpa.training.certified import train
from cure_lirpa.training.config import TrainConfig, apply_preset
from cure_lirpa.training.timing import step_times
from cure_lirpa.training.trainer import CHECKPOINT
from cure_lirpa.vocabulary import AUTO, CIFAR10, CROWN, CROWN_IBP, IBP, MNIST, SDP_CROWN

PAIRS: dict[str, dict[str, tuple[str, str, str]]] = {
    MNIST: {"0.1": ("linf:0.1", "l2:0.5", "l1:1"), "0.3": ("linf:0.3", "l2:1", "l1:2")},
    CIFAR10: {
        "2/255": ("linf:2/255", "l2:0.25", "l1:0.5"),
        "8/255": ("linf:8/255", "l2:0.5", "l1:1"),
    },
}
"""The CURE paper's radius pairs per dataset, named by their l∞ radius: the three threats a row is
certified under; the first two are the training pair. The first pair is the default."""
THREATS = {name: next(iter(pairs.values())) for name, pairs in PAIRS.items()}
"""The default pair's threats per dataset."""
TITLE = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
STAGES = ((CROWN, None), (SDP_CROWN, 2.0))
"""The bound methods run after IBP, in order, each on the images still open: (method, the lp-ball
norm it runs for; None: every threat). SDP-CROWN (l2 balls only) is as tight as CROWN or tighter
and costs about ten CROWN calls, so it runs only on what CROWN leaves open."""
BOUND_METHODS = (IBP, *(m for m, _ in STAGES))
PROCEDURE = "ibp on all, then on the images still open: crown, sdp-crown (l2)"

# row -> (description, TrainConfig overrides)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "natural": ("natural training", {"method": "natural"}),
    "ibp-linf": ("IBP l∞", {"method": "ibp-linf"}),
    "ibp-l2": ("IBP on the exact l2 ball", {"method": "ibp-l2"}),
    "l2-defence": ("CURE's l2 defence (lambda2 1e-5)", {"method": "l2-defence"}),
    "sabr-linf": ("SABR l∞", {"method": "sabr-linf"}),
    "cure-joint": ("CURE-Joint (alpha 0.5)", {"method": "cure-joint"}),
    "cure-max": ("CURE-Max", {"method": "cure-max"}),
    "cure-random": ("CURE-Random", {"method": "cure-random"}),
    "cure-max+ba": ("CURE-Max + BA (eta 2, q = l2)", {"method": "cure-max", "ba_eta": 2.0}),
    "cure-scratch": (
        "CURE-Scratch: Max + BA (eta 2) + GP (beta 0.8)",
        {"method": "cure-max", "ba_eta": 2.0, "gp_beta": 0.8},
    ),
    "cure-finetune": ("CURE-Finetune from ibp-linf: Max + BA 0.5 + GP 0.5", {}),
    "cure-joint-sabr": (
        "CURE-Joint with the public code's blocks: SABR l∞ + l2 defence",
        {"method": "cure-joint", "linf_variant": "sabr", "l2_variant": "defence"},
    ),
}
SHI = {"init": IBP, "ibp_reg": 0.5, "l1_reg": 1e-6, "kappa_start": 0.0}
"""Shi et al.'s IBP initialisation and warm-up regulariser (weight 0.5, decaying over the ramp), a
small L1 penalty and no natural-loss share beyond the warm-up: the recipe CTRAIN trains SABR and
MTL-IBP with (its SABR uses regulariser weight 1 and L1 1e-5)."""
MTL = {"linf_variant": "mtl-ibp", "l2_variant": "mtl-ibp"}
ROWS.update(
    {
        "sabr-linf+shi": (
            "SABR l∞ with IBP init, IBP regulariser (1.0) and L1 1e-5",
            {"method": "sabr-linf", **SHI, "ibp_reg": 1.0, "l1_reg": 1e-5},
        ),
        "sabr-linf+shi+fullbox": (
            "as sabr-linf+shi, with SABR boxes of full width 2 tau at pixels at 0 or 1",
            {"method": "sabr-linf", **SHI, "ibp_reg": 1.0, "l1_reg": 1e-5},
        ),
        "sabr-linf+shi-ctrain": (
            "SABR l∞ with CTRAIN's SABR defaults: lambda 0.2, regulariser 0.5, L1 1e-6, batch 64",
            {"method": "sabr-linf", **SHI, "sabr_lambda": 0.2, "batch_size": 64},
        ),
        "ibp-linf+shi": ("IBP l∞ with IBP init and regulariser", {"method": "ibp-linf", **SHI}),
        "ibp-linf+shi-b64": (
            "IBP l∞ with IBP init and regulariser, batch 64",
            {"method": "ibp-linf", **SHI, "batch_size": 64},
        ),
        "mtl-ibp-linf-b64": (
            "as mtl-ibp-linf, batch 64 (the default of CTRAIN's MNIST loader)",
            {"method": "mtl-ibp-linf", **SHI, "batch_size": 64},
        ),
        "mtl-ibp-linf": (
            "MTL-IBP l∞ (alpha 0.5, 1-step attack), IBP init and regulariser",
            {"method": "mtl-ibp-linf", **SHI},
        ),
        "mtl-ibp-linf-x1.5": (
            "MTL-IBP l∞ as mtl-ibp-linf, trained at 1.5x the l∞ radius",
            {"method": "mtl-ibp-linf", **SHI, "train_eps_linf": 0.15},
        ),
        "mtl-ibp-l2": (
            "MTL-IBP l2 (alpha 0.5, 1-step l2 attack), IBP init",
            {"method": "mtl-ibp-l2", **SHI, "ibp_reg": 0.0},
        ),
        "cure-joint+shi": (
            "CURE-Joint (IBP blocks) with IBP init and regulariser",
            {"method": "cure-joint", **SHI},
        ),
        "cure-joint-mtl": (
            "CURE-Joint with MTL-IBP blocks (alpha 0.5 both norms), IBP init and regulariser",
            {"method": "cure-joint", **MTL, **SHI},
        ),
        "cure-max-mtl": (
            "CURE-Max with MTL-IBP blocks (alpha 0.5 both norms), IBP init and regulariser",
            {"method": "cure-max", **MTL, **SHI},
        ),
    }
)
E12 = {"epochs": 12, "warmup_epochs": 1.0, "ramp_epochs": 6.0, "lr_milestones": (10.0,)}
"""The schedule of the rows aimed at the MNIST goal (at most 15 minutes of training): 12 epochs of
the suite's 30,000 images (1 warm-up, ramp over 6, lr x0.2 from epoch 10). CROWN-IBP mixing
(``--crown-ibp``) does not fit: one CROWN-IBP bound with gradients costs about ten IBP bounds, so
its ramp alone takes far longer than the budget."""
JOINT_MTL2 = {"method": "cure-joint", "l2_variant": "mtl-ibp", "mtl_alpha_l2": 0.3}
"""CURE-Joint over an IBP l∞ block and an MTL-IBP l2 block (alpha 0.3): the MNIST goal's rows."""
ROWS.update(
    {
        "cure-joint-e12": (
            "CURE-Joint (IBP blocks), 12 epochs",
            {"method": "cure-joint", **E12},
        ),
        "cure-joint-e12-mtl2": (
            "CURE-Joint, IBP l∞ block and MTL-IBP l2 block (alpha 0.3), 12 epochs",
            {**JOINT_MTL2, **E12},
        ),
        "cure-joint-mtl2-b64": (
            "CURE-Joint, IBP l∞ block and MTL-IBP l2 block (alpha 0.3), 6 epochs, batch 64",
            {**JOINT_MTL2, "batch_size": 64},
        ),
        "cure-joint-e12-mtl2-seed1": (
            "as cure-joint-e12-mtl2, seed 1 (data order, attack starts, initial weights)",
            {**JOINT_MTL2, **E12, "seed": 1},
        ),
    }
)
B64 = {"batch_size": 64}
"""Today's batch size for MNIST (CTRAIN's MNIST loader's; 4x the optimizer steps of batch 256)."""
TABLE_CURE = {"l2_variant": "mtl-ibp", "mtl_alpha_l2": 0.3, **B64}
"""The CURE rows of the MNIST table: an IBP l∞ block and an MTL-IBP l2 block (alpha 0.3)."""
ROWS.update(
    {
        "natural-b64": ("natural training, batch 64", {"method": "natural", **B64}),
        "ibp-l2-b64": (
            "IBP on the exact l2 ball, IBP init, batch 64",
            {"method": "ibp-l2", **SHI, "ibp_reg": 0.0, **B64},
        ),
        "mtl-ibp-l2-a0.3-b64": (
            "MTL-IBP l2 alone (alpha 0.3), IBP init, batch 64: the l2 block of the CURE rows",
            {"method": "mtl-ibp-l2", **SHI, "ibp_reg": 0.0, "mtl_alpha_l2": 0.3, **B64},
        ),
        **{
            f"{m}-mtl2-b64{ba}": (
                f"CURE-{m[5:].title()}, IBP l∞ + MTL-IBP l2 (alpha 0.3), batch 64"
                + (", bound alignment (eta 2, q = l2)" if ba else ""),
                {"method": m, **TABLE_CURE, **({"ba_eta": 2.0} if ba else {})},
            )
            for m in ("cure-max", "cure-random")
            for ba in ("", "+ba")
        },
        "cure-joint-mtl2-b64+ba": (
            "CURE-Joint, IBP l∞ + MTL-IBP l2 (alpha 0.3), batch 64, bound alignment (eta 2, q = l2)",
            {**JOINT_MTL2, **B64, "ba_eta": 2.0},
        ),
        "cure-finetune-b64": (
            "CURE-Finetune from mtl-ibp-linf-b64 (the best l∞ row at batch 64): Max + BA 0.5 + "
            "GP 0.5, batch 64",
            {"batch_size": 64},
        ),
        "cure-scratch-b64": (
            "CURE-Scratch with today's blocks: Max + BA (eta 2) + GP (beta 0.8), batch 64",
            {"method": "cure-max", **TABLE_CURE, "ba_eta": 2.0, "gp_beta": 0.8},
        ),
    }
)
MNIST_TABLE = (
    "natural-b64",
    "ibp-linf+shi-b64",
    "sabr-linf+shi-ctrain",
    "mtl-ibp-linf-b64",
    "ibp-l2-b64",
    "mtl-ibp-l2-a0.3-b64",
    "cure-joint-mtl2-b64",
    "cure-joint-mtl2-b64+ba",
    "cure-max-mtl2-b64",
    "cure-max-mtl2-b64+ba",
    "cure-random-mtl2-b64",
    "cure-random-mtl2-b64+ba",
    "cure-scratch-b64",
    "cure-finetune-b64",
)
"""The rows of the paper's MNIST table on today's blocks (``--rows table``): natural, every
single-norm block, CURE-Joint / Max / Random with and without bound alignment, CURE-Scratch."""
CIFAR_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "cure-joint-a0.8": (
        "CURE-Joint, alpha 0.8 (l∞ weight)",
        {"method": "cure-joint", "alpha": 0.8},
    ),
    "cure-joint-l2x0.5": (
        "CURE-Joint, l2 trained at half the radius",
        {"method": "cure-joint", "l2_scale": 0.5},
    ),
    "cure-joint-l2mtl": (
        "CURE-Joint: IBP l∞ + MTL-IBP l2 (alpha 0.2), IBP init and regulariser",
        {"method": "cure-joint", "l2_variant": "mtl-ibp", "mtl_alpha_l2": 0.2, **SHI},
    ),
    "cure-joint-l2mtl0.1": (
        "as cure-joint-l2mtl, MTL-IBP l2 alpha 0.1",
        {"method": "cure-joint", "l2_variant": "mtl-ibp", "mtl_alpha_l2": 0.1, **SHI},
    ),
    "mtl-ibp-l2-a0.2": (
        "MTL-IBP l2 alone (alpha 0.2), IBP init: the l2 block of cure-joint-l2mtl",
        {"method": "mtl-ibp-l2", **SHI, "ibp_reg": 0.0, "mtl_alpha_l2": 0.2},
    ),
    "mtl-ibp-l2-a0.1": (
        "MTL-IBP l2 alone (alpha 0.1), IBP init: the l2 block of cure-joint-l2mtl0.1",
        {"method": "mtl-ibp-l2", **SHI, "ibp_reg": 0.0, "mtl_alpha_l2": 0.1},
    ),
    "cure-joint-l2mtl0.1-b64": (
        "as cure-joint-l2mtl0.1, batch 64",
        {
            "method": "cure-joint",
            "l2_variant": "mtl-ibp",
            "mtl_alpha_l2": 0.1,
            **SHI,
            "batch_size": 64,
        },
    ),
    "mtl-ibp-l2-a0.1-b64": (
        "as mtl-ibp-l2-a0.1, batch 64",
        {"method": "mtl-ibp-l2", **SHI, "ibp_reg": 0.0, "mtl_alpha_l2": 0.1, "batch_size": 64},
    ),
}
"""Rows tried for the CIFAR-10 goal (CURE configurations that keep clean accuracy, and the
single-norm rows with the same blocks for a fair comparison). ``l2_scale`` trains l2 at that
fraction of the dataset's l2 radius."""
ROWS.update(CIFAR_ROWS)
CIFAR_MTL2 = {"l2_variant": "mtl-ibp", "mtl_alpha_l2": 0.1, **SHI, **B64}
"""The CURE blocks of the CIFAR-10 table: IBP l∞ and MTL-IBP l2 (alpha 0.1), Shi's recipe, batch 64
(those of cure-joint-l2mtl0.1-b64, the best CURE row at 2/255)."""
ROWS.update(
    {
        "cure-max-l2mtl0.1-b64+ba": (
            "CURE-Max + BA (eta 2, q = l2), IBP l∞ + MTL-IBP l2 (alpha 0.1), batch 64",
            {"method": "cure-max", **CIFAR_MTL2, "ba_eta": 2.0},
        ),
        "cure-scratch-l2mtl0.1-b64": (
            "CURE-Scratch (Max + BA eta 2 + GP beta 0.8), IBP l∞ + MTL-IBP l2 (alpha 0.1), batch 64",
            {"method": "cure-max", **CIFAR_MTL2, "ba_eta": 2.0, "gp_beta": 0.8},
        ),
        "cure-finetune-l2mtl0.1-b64": (
            "CURE-Finetune from ibp-linf+shi-b64: Max + BA 0.5 + GP 0.5 with an MTL-IBP l2 block "
            "(alpha 0.1), batch 64",
            {"l2_variant": "mtl-ibp", "mtl_alpha_l2": 0.1, **B64},
        ),
    }
)
CIFAR_TABLE = (
    "natural-b64",
    "ibp-linf+shi-b64",
    "mtl-ibp-l2-a0.1-b64",
    "cure-joint-l2mtl0.1-b64",
    "cure-max-l2mtl0.1-b64+ba",
    "cure-finetune-l2mtl0.1-b64",
    "mtl-ibp-linf-b64",
)
"""The rows of the paper's CIFAR-10 table on today's blocks (``--dataset cifar10 --rows table``):
natural, single-norm l∞ (IBP; MTL-IBP last) and l2 (MTL-IBP), CURE-Joint, CURE-Max + BA and
CURE-Finetune."""
TABLES = {MNIST: MNIST_TABLE, CIFAR10: CIFAR_TABLE}
FINETUNE_FROM = {
    "cure-finetune": "ibp-linf",
    "cure-finetune-b64": "mtl-ibp-linf-b64",
    "cure-finetune-l2mtl0.1-b64": "ibp-linf+shi-b64",
}
"""Fine-tuning rows -> the row whose model they start from (the best l∞ row of their table)."""
OPTIONAL_ROWS = (
    "l2-defence",
    "cure-joint-sabr",
    *(r for r in ROWS if "+shi" in r or "mtl" in r or "epochs" in ROWS[r][1]),
    *CIFAR_ROWS,
    *MNIST_TABLE,
    *CIFAR_TABLE,
    "cure-scratch-l2mtl0.1-b64",
)
DEFAULT_ROWS = tuple(r for r in ROWS if r not in OPTIONAL_ROWS)
"""Rows of a plain run; l2-defence and cure-joint-sabr (8 PGD steps per batch) only on request."""
SABR_LAMBDA = {"mnist": 0.4, "cifar10": 0.1}
"""SABR's lambda in the public CURE scripts (MNIST 0.1, CIFAR-10 2/255)."""


def settings(quick: bool, dataset: str = "mnist", pair: Optional[str] = None) -> dict[str, Any]:
    """Run sizes of full and quick mode for ``dataset`` ('mnist' or 'cifar10') at radius ``pair``
    (a key of :data:`PAIRS`; default the dataset's first); quick MNIST runs on the built-in
    sample."""
    pair = pair or next(iter(PAIRS[dataset]))
    if pair not in PAIRS[dataset]:
        raise click.BadParameter(
            f"{pair!r} is not a radius pair of {dataset}; choose from {', '.join(PAIRS[dataset])}",
            param_hint="--pair",
        )
    threats = PAIRS[dataset][pair]
    eps = tuple(parse_threat(t).eps for t in threats[:2])
    common = dict(family=dataset, pair=pair, pair_threats=threats, threats=threats, eps=eps)
    if quick:
        return dict(
            common,
            dataset="sample" if dataset == "mnist" else dataset,
            train_count=2048,
            batch_size=32,
            lr=1e-3,
            epochs=5 if dataset == "mnist" else 2,
            warmup_epochs=1.0 if dataset == "mnist" else 0.5,
            ramp_epochs=3.0 if dataset == "mnist" else 1.0,
            lr_milestones=(),
            finetune_epochs=3 if dataset == "mnist" else 1,
            test_count=50,
            attack_steps=5,
            speed_repeats=3,
        )
    return dict(
        common,
        dataset=dataset,
        train_count=None if dataset == "mnist" else 20000,
        batch_size=256,
        lr=5e-4 if dataset == "mnist" else 1e-3,
        epochs=6,
        warmup_epochs=1.0,
        ramp_epochs=3.0,
        lr_milestones=(5.0,),
        finetune_epochs=4,
        test_count=1000,
        attack_steps=20,
        speed_repeats=20,
    )


BA_ETA = {(MNIST, "0.3"): 0.5}
"""Bound alignment's weight from scratch where the CURE paper sets it apart from the rows' 2.0."""


def row_folder(row: str, s: dict[str, Any]) -> str:
    """The folder of ``row`` inside the results folder: the row's name at the dataset's first pair,
    ``<row>@<l∞ radius>`` at another (``ibp-linf+shi-b64@8-255``)."""
    if s["pair"] == next(iter(PAIRS[s["family"]])):
        return row
    return f"{row}@{s['pair'].replace('/', '-')}"


def row_config(
    row: str,
    s: dict[str, Any],
    results: Path,
    data_root: Optional[str],
    l2_factor: float,
    seed: int,
) -> TrainConfig:
    """The :class:`TrainConfig` of ``row`` under settings ``s``."""
    base = TrainConfig(
        dataset=s["dataset"],
        data_root=data_root,
        arch="cnn-small",
        epochs=s["epochs"],
        warmup_epochs=s["warmup_epochs"],
        ramp_epochs=s["ramp_epochs"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        lr_milestones=tuple(s["lr_milestones"]),
        lr_factor=0.2,
        kappa_start=0.5,
        kappa_end=0.0,
        eps_linf=s["eps"][0],
        eps_l2=s["eps"][1],
        train_eps_l2=s["eps"][1] * l2_factor,
        train_count=s["train_count"],
        sabr_lambda=SABR_LAMBDA[s["family"]],
        seed=seed,
        memory_mb=2048.0,
    )
    if row in FINETUNE_FROM:
        overrides = {"linf_variant": IBP, "l2_variant": "ball", **ROWS[row][1]}
        c = dataclasses.replace(
            base,
            **overrides,
            epochs=s["finetune_epochs"],
            init_from=str(results / row_folder(FINETUNE_FROM[row], s) / CHECKPOINT),
        )
        # The preset's method, BA, GP and lr; keep the row's blocks (by default the certifiable
        # variants) and this schedule's proportions (the preset's 20-epoch schedule scaled to
        # finetune_epochs).
        explicit = {"epochs", "sabr_lambda", *overrides}
        return apply_preset(c, "cure-finetune", explicit).validated()
    overrides = dict(ROWS[row][1])
    if overrides.get("ba_eta"):
        overrides["ba_eta"] = BA_ETA.get((s["family"], s["pair"]), overrides["ba_eta"])
    if "l2_scale" in overrides:
        overrides["train_eps_l2"] = s["eps"][1] * overrides.pop("l2_scale")
    return dataclasses.replace(base, **overrides).validated()


# ---------------------------------------------------------------------------------------------


def run_row(
    row: str,
    cfg: TrainConfig,
    results: Path,
    s: dict[str, Any],
    log,
    stop_after_epoch: Optional[int] = None,
) -> dict[str, Any]:
    """Train (or resume) and certify one row; write ``<row>/row.json``. ``stop_after_epoch``
    ends training at that epoch of the schedule (for a time budget)."""
    from cure_lirpa.verification.results import read_summary, to_percent, write_results

    folder = results / row_folder(row, s)
    ckpt_path = folder / CHECKPOINT
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise click.ClickException(
            f"row {row} fine-tunes {cfg.init_from}; run the {FINETUNE_FROM[row]} row first"
        )
    resume = ckpt_path.is_file()
    done = load_checkpoint(ckpt_path).get("epoch", 0) if resume else 0
    target = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    if done >= target:
        log(f"[{row}] already trained ({done} epochs)")
    else:
        log(f"[{row}] training {ROWS[row][0]} ({'resuming' if resume else 'from scratch'})")
    result = train(
        cfg,
        folder,
        resume=resume,
        progress=None,
        log=lambda m: log(f"[{row}] {m}"),
        stop_after=None if stop_after_epoch is None else max(0, target - done),
    )
    history = result.history
    train_seconds = history[-1].get("train_seconds", 0.0) if history else 0.0
    cpus = [h.get("cpu_seconds") for h in history]
    # CPU seconds of the training process (one thread): not inflated by other jobs' time slices
    train_cpu_seconds = sum(cpus) if cpus and None not in cpus else None

    ckpt = load_checkpoint(ckpt_path)
    verify_dir = folder / "verify"
    summary_path = verify_dir / "summary.json"
    stamp = {
        "epoch": ckpt["epoch"],
        "test_count": s["test_count"],
        "threats": list(s["threats"]),
        "procedure": PROCEDURE,
    }
    base = {
        "row": row,
        "pair": s["pair"],
        "folder": folder.name,
        "description": ROWS[row][0],
        "method": cfg.method,
        "config": cfg.to_dict(),
        "epochs": ckpt["epoch"],
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "last_epoch_train_metrics": history[-1] if history else {},
    }
    summary = None
    if summary_path.is_file():
        old = read_summary(summary_path)  # accuracies as fractions, also from older files
        if old.get("stamp") == stamp:
            summary = old
            log(f"[{row}] already verified")
    if summary is None:
        log(
            f"[{row}] certifying {s['test_count']} test images: {', '.join(s['threats'])} x "
            "ibp, then on the open images " + ", ".join(m for m, _ in STAGES)
        )
        model = model_from_checkpoint(ckpt)
        test = take(load_dataset(cfg.dataset, "test", cfg.data_root), 0, s["test_count"])
        threats = [parse_threat(t) for t in s["threats"]]
        cpu0 = time.process_time()
        try:
            rows, summary = certify(model, test, threats, tuple(ckpt["dataset"]["in_shape"]), s)
        except UserError as exc:  # e.g. a collapsed (constant) model refused by the bounds
            log(f"[{row}] certification failed: {exc}")
            out = dict(base, error=str(exc))
            save_summary(folder / "row.json", out)
            return out
        summary["stamp"] = stamp
        summary["cpu_seconds"] = time.process_time() - cpu0  # one thread: not other jobs' time
        write_results(verify_dir, rows, summary, threats, list(BOUND_METHODS))
    summary = to_percent(summary)  # row.json keeps this suite's percent
    best = summary["certified_best"]
    out = {
        **base,
        "test_images": summary["samples"],
        "clean": summary["clean_accuracy"],
        "threats": list(s["threats"]),
        "certified": {t: best[parse_threat(t).name] for t in s["threats"]},
        "certified_ibp": summary["certified"][IBP] if IBP in summary["certified"] else None,
        "certified_by_method": summary["certified"],
        "crown_images": summary.get("crown_images"),
        "stage_images": summary.get("stage_images"),
        "stage_seconds": summary.get("stage_seconds"),
        "union": summary["union"]["best"],
        "union_by_method": {m: summary["union"].get(m) for m in BOUND_METHODS},
        "union_linf_l2": _union_of(
            verify_dir / "samples.csv", [parse_threat(t).name for t in s["pair_threats"][:2]]
        ),
        "pgd_accuracy": summary.get("pgd_accuracy", {}),
        "soundness_violations": summary.get("soundness_violations", {}),
        "verify_seconds_total": summary.get("seconds_total"),
        "verify_cpu_seconds": summary.get("cpu_seconds"),
        "versions": versions(),
    }
    save_summary(folder / "row.json", out)
    return out


def stages(threat: Any) -> tuple[str, ...]:
    """This suite's cascade stages under ``threat``: IBP, then those of :data:`STAGES` that apply."""
    return (IBP, *(m for m, norm in STAGES if norm is None or getattr(threat, "p", None) == norm))


def certify(model, test, threats, in_shape, s: dict[str, Any]):
    """IBP (and a PGD cross-check) on every test image, then each of :data:`STAGES` per threat,
    only on the images that are correctly classified and not certified by an earlier stage under
    that threat (the library's cascade with :func:`stages`, no time budget): best-of and union
    accuracy are exactly those of running every method on every image, at a fraction of the cost.
    A method's column therefore counts its certificates among the images it ran on (its margin is
    recorded where it decided an image, nan elsewhere). Every certificate is checked against PGD
    (a certified image that PGD breaks is a soundness violation, and its certificate is withdrawn)."""
    from cure_lirpa.verification.results import summarize
    from cure_lirpa.verification.runner import certify_dataset

    t0 = time.perf_counter()
    rows, run = certify_dataset(model, test, threats, [AUTO], in_shape, batch_size=100,
                                memory_mb=2048.0, attack_steps=s["attack_steps"],
                                attack_restarts=1, budget=None, stages=stages)  # fmt: skip
    stage_images: dict[str, dict[str, int]] = {m: {} for m, _ in STAGES}
    stage_seconds: dict[str, dict[str, float]] = {m: {} for m, _ in STAGES}
    for threat in threats:
        t, order = threat.name, stages(threat)
        for m in order[1:]:
            stage_images[m][t] = sum(_open_at(r, t, order, m) for r in rows)
            spent = run.get("seconds_per_image", {}).get(f"{t}/auto:{m}")
            if spent is not None:
                stage_seconds[m][t] = spent * len(rows)
        for r in rows:  # the cascade's column as one column per stage
            by, margin, ok = r.decided_by[t], r.margins[t].pop(AUTO), r.certified[t].pop(AUTO)
            r.margins[t].update(dict.fromkeys(BOUND_METHODS, float("nan")))
            r.certified[t].update(dict.fromkeys(BOUND_METHODS, False))
            if by in order:
                r.margins[t][by], r.certified[t][by] = margin, ok
    summary = summarize(rows, threats, list(BOUND_METHODS), seconds=time.perf_counter() - t0)
    summary["stage_images"] = stage_images
    summary["stage_seconds"] = stage_seconds
    summary["crown_images"] = stage_images[CROWN]
    summary["note"] = (
        "after IBP, each method ran per threat only on the images correctly classified and not "
        "certified by an earlier one (crown, then sdp-crown for l2); best-of and union numbers "
        "equal those of running every method on every image"
    )
    return rows, summary


def _open_at(r: Any, t: str, order: Sequence[str], stage: str) -> bool:
    """Whether image ``r`` was still open under ``t`` when the cascade reached ``stage``."""
    by = r.decided_by[t]
    earlier = by in order and order.index(by) < order.index(stage)
    return r.correct and not (earlier and r.margins[t][AUTO] > 0)


def _lookup(d: dict[str, Any], threat: str) -> Any:
    """``d[threat]``, also for a key naming the same ball differently (``linf:0.00784314`` and
    ``linf:2/255`` in results written before fractions were kept in names)."""
    if threat in d:
        return d[threat]
    want = parse_threat(threat)
    for k, v in d.items():
        got = parse_threat(k)
        if got.norm == want.norm and abs(got.eps - want.eps) <= 1e-6:
            return v
    return None


def _violations(folder: Path, row: dict[str, Any]) -> int:
    """Certified images that PGD broke: those counted (and withdrawn) by the certification, plus
    any certified image in ``samples.csv`` whose PGD flag says broken (results written before
    the CROWN certificates were cross-checked too)."""
    from cure_lirpa.verification.results import read_samples

    n = sum((row.get("soundness_violations") or {}).values())
    path = folder / "verify" / "samples.csv"
    if path.is_file():
        n += sum(
            r.best(t) and r.robust.get(t) is False for r in read_samples(path) for t in r.robust
        )
    return n


def _union_flags(csv_path: Path, threats: Sequence[str]) -> dict[int, bool]:
    """Test-image index -> certified under every threat of ``threats``, from the per-sample CSV
    (threats matched by norm and radius, whatever their spelling); empty if one is missing."""
    from cure_lirpa.verification.results import read_samples

    rows = read_samples(csv_path) if csv_path.is_file() else []
    if not rows:
        return {}
    picked = [_lookup({k: k for k in rows[0].certified}, t) for t in threats]
    if any(c is None for c in picked):
        return {}
    return {r.index: all(r.best(c) for c in picked) for r in rows}


def _union_of(csv_path: Path, threats: Sequence[str]) -> Optional[float]:
    """Union accuracy (%) over a subset of the threats, from the per-sample CSV."""
    from cure_lirpa.verification.results import read_samples

    rows = read_samples(csv_path) if csv_path.is_file() else []
    if not rows:
        return None
    if any(t not in rows[0].certified for t in threats):
        return None  # a threat of the pair was not certified for this row
    hit = sum(all(r.best(t) for t in threats) for r in rows)
    return 100.0 * hit / len(rows)


# ---------------------------------------------------------------------------------------------


def measure_speed(
    rows: Sequence[str], s: dict[str, Any], results: Path, data_root, l2_factor, seed, log
) -> dict[str, Any]:
    """Seconds per optimizer step of each row's method on one batch of 256, and the ratio to a
    natural step on the same batch (same process, same threads)."""
    ds = load_dataset(s["dataset"], "train", data_root)
    x, y = stack(take(ds, 0, 256))
    reps = s["speed_repeats"]
    load_before = os.getloadavg()
    configs = {"natural (reference)": row_config("natural", s, results, data_root, l2_factor, seed)}
    for row in rows:
        if row not in FINETUNE_FROM:  # the same step as cure-max+ba with other weights
            configs[row] = row_config(row, s, results, data_root, l2_factor, seed)
    log(f"[speed] timing {len(configs)} methods on one batch of 256, {reps} interleaved rounds")
    times = step_times(configs, x, y, rounds=reps, clock="cpu")
    t_nat = times.pop("natural (reference)")
    out: dict[str, Any] = {
        "batch": 256,
        "rounds": reps,
        "clock": "cpu",
        "natural_seconds": t_nat,
        "rows": {},
    }
    for row, t in times.items():
        out["rows"][row] = {"seconds": t, "ratio": t / t_nat}
        log(f"[speed] {row}: {t:.3f} s/step = {t / t_nat:.2f}x natural")
    ratios = {r: v["ratio"] for r, v in out["rows"].items()}
    if "cure-max" in ratios and "cure-max+ba" in ratios:
        out["ba_overhead"] = ratios["cure-max+ba"] / ratios["cure-max"] - 1.0
    targets = {
        "ibp-linf": 3.0,
        "ibp-l2": 3.0,
        "cure-joint": 5.0,
        "cure-max": 5.0,
        "cure-random": 5.0,
    }
    out["targets"] = {
        r: {"target": t, "ratio": ratios[r], "met": ratios[r] <= t}
        for r, t in targets.items()
        if r in ratios
    }
    if "ba_overhead" in out:
        out["targets"]["ba_overhead"] = {
            "target": 0.10,
            "ratio": out["ba_overhead"],
            "met": out["ba_overhead"] <= 0.10,
        }
    out["threads"] = torch.get_num_threads()
    out["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    out["load_average"] = {"start": load_before[0], "end": os.getloadavg()[0]}
    save_summary(results / "speed.json", out)
    lines = [
        f"Optimizer-step CPU time on one batch of 256 images, {torch.get_num_threads()} "
        f"thread(s), fastest of {reps} rounds; natural step {t_nat:.3f} CPU s. The step is the "
        "training loop's "
        "own, as the rows train: gradient clipping and the no-grad IBP pass that reports certified "
        "accuracy on the batch for the norms the loss does not bound (`train_cert`, on by default; "
        "a natural step pays it for both norms). Each round times one step of every row in turn, "
        "and CPU time leaves out the waits for a core, so the load of the shared machine (load "
        f"average {out['load_average']['start']:.1f} at the start, "
        f"{out['load_average']['end']:.1f} at the end, {os.cpu_count()} CPUs) hits all rows "
        "alike: compare the ratios; the seconds still depend on the machine and its load.",
        "",
        "| row | CPU s / step | x natural | target |",
        "|---|---|---|---|",
    ]
    for r, v in out["rows"].items():
        tgt = targets.get(r)
        lines.append(
            f"| {r} | {v['seconds']:.3f} | {v['ratio']:.2f} | "
            + (f"<= {tgt:g}x {'met' if v['ratio'] <= tgt else 'MISSED'}" if tgt else "-")
            + " |"
        )
    if "ba_overhead" in out:
        ok = "met" if out["ba_overhead"] <= 0.10 else "MISSED"
        lines.append(
            f"\nBound alignment overhead (max+ba over max): {100 * out['ba_overhead']:+.1f}% "
            f"(target <= +10%, {ok})."
        )
    atomic_write_text(results / "speed.md", "\n".join(lines) + "\n")
    return out


BOUND_COST_METHODS = (IBP, CROWN_IBP, CROWN, SDP_CROWN)


def measure_bound_cost(
    row: str, s: dict[str, Any], results: Path, data_root, l2_factor, seed, log, batch: int = 64
) -> dict[str, Any]:
    """What an l2 bound term in training would cost: CPU seconds of one margin lower bound (no
    backward pass) of a training batch under the dataset's l2 threat, per bound method, on
    ``row``'s trained model, against one natural optimizer step on the same batch (same process,
    interleaved rounds, fastest round). Writes ``bound_cost.json`` / ``bound_cost.md``."""
    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.io.checkpoint import dataset_info_of

    ckpt = load_checkpoint(results / row_folder(row, s) / CHECKPOINT)
    model = model_from_checkpoint(ckpt).eval()
    bounded = BoundedClassifier(model, dataset_info_of(ckpt).in_shape, memory_mb=4096.0)
    threat = parse_threat(s["pair_threats"][1])
    x, y = stack(take(load_dataset(s["dataset"], "train", data_root), 0, batch))
    natural = {"natural": row_config("natural", s, results, data_root, l2_factor, seed)}
    reps = max(2, min(5, s["speed_repeats"]))
    times: dict[str, list[float]] = {m: [] for m in ("natural", *BOUND_COST_METHODS)}
    log(f"[bound cost] {row}: {threat} bounds of {batch} images, {reps} interleaved rounds")
    for _ in range(reps):
        times["natural"].append(step_times(natural, x, y, rounds=1, clock="cpu")["natural"])
        for method in BOUND_COST_METHODS:
            t0 = time.process_time()
            if method == SDP_CROWN:  # optimises its own parameters with autograd
                bounded.margin_lower_bounds(x, y, threat, method)
            else:
                with torch.no_grad():
                    bounded.margin_lower_bounds(x, y, threat, method)
            times[method].append(time.process_time() - t0)
    t_nat = min(times.pop("natural"))
    out = {
        "row": row,
        "threat": str(threat),
        "batch": batch,
        "rounds": reps,
        "natural_step_seconds": t_nat,
        "methods": {m: {"seconds": min(t), "ratio": min(t) / t_nat} for m, t in times.items()},
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    save_summary(results / "bound_cost.json", out)
    lines = [
        f"What an l2 bound term in training would cost: CPU seconds of one margin lower bound "
        f"under {threat} of a batch of {batch} training images (no backward pass), on the trained "
        f"model of `{row}`, against one natural optimizer step on the same batch "
        f"({t_nat:.3f} CPU s); fastest of {reps} interleaved rounds, "
        f"{torch.get_num_threads()} thread(s).",
        "",
        "| bound | CPU s / batch | x natural step |",
        "|---|---|---|",
    ]
    for m, v in out["methods"].items():
        lines.append(f"| {m} | {v['seconds']:.3f} | {v['ratio']:.1f} |")
    atomic_write_text(results / "bound_cost.md", "\n".join(lines) + "\n")
    for m, v in out["methods"].items():
        log(f"[bound cost] {m}: {v['seconds']:.3f} s = {v['ratio']:.1f}x a natural step")
    return out


# ---------------------------------------------------------------------------------------------


TRAIN_SIZE = {"mnist": 60000, "sample": 4000, "cifar10": 50000}


def _step_ratios(results: Path) -> dict[str, float]:
    """Each row's optimizer-step time in natural steps, from ``speed.json`` (empty if not
    measured)."""
    import json

    path = results / "speed.json"
    if not path.is_file():
        return {}
    return {r: v["ratio"] for r, v in json.loads(path.read_text()).get("rows", {}).items()}


def _time(row: dict[str, Any], ratios: dict[str, float]) -> str:
    """``1850 s (7000 nat.)``: wall-clock training time and, if the row's step-time ratio is known,
    the training cost in natural steps (``steps x ratio``), which does not depend on the load."""
    out = f"{row['train_seconds']:.0f} s"
    if row.get("train_cpu_seconds") is not None:
        out += f", CPU {row['train_cpu_seconds']:.0f} s"
    cfg = row.get("config") or {}
    ratio = ratios.get(row["row"])
    if ratio is None or not cfg.get("batch_size"):
        return out
    n = cfg.get("train_count") or TRAIN_SIZE.get(cfg.get("dataset"), 0)
    steps = row.get("epochs", 0) * -(-n // cfg["batch_size"])
    return f"{out} ({steps * ratio:,.0f} nat.)"


def _certified_cell(row: dict[str, Any], threat: str) -> str:
    """``74.3 (SDP +3.1)``: best-of certified accuracy under ``threat`` and, where SDP-CROWN ran on
    the images IBP and CROWN left open, the share it added."""
    value = row["certified"].get(threat)
    if value is None:
        return "-"
    name = parse_threat(threat).name
    if name not in ((row.get("stage_images") or {}).get(SDP_CROWN) or {}):
        return f"{value:.1f}"
    gain = row["certified_by_method"][name][SDP_CROWN]
    return f"{value:.1f} (SDP +{gain:.1f})"


def stage_cost_line(rows: list[dict[str, Any]]) -> str:
    """One sentence: seconds per image of CROWN and SDP-CROWN under l2 on the images they ran on,
    for the rows whose verification recorded them ('' if none did)."""
    parts = []
    for r in rows:
        seconds, images = r.get("stage_seconds") or {}, r.get("stage_images") or {}
        cells = []
        for method, label in ((CROWN, "CROWN"), (SDP_CROWN, "SDP-CROWN")):
            for t, n in (images.get(method) or {}).items():
                if t.startswith("l2:") and n and t in (seconds.get(method) or {}):
                    cells.append(f"{label} {seconds[method][t] / n:.2f} s x {n}")
        if cells:
            parts.append(f"{r['row']} {', '.join(cells)}")
    if not parts:
        return ""
    return (
        "l2 verification cost, seconds per image on the images each method ran on (one thread, "
        "batches of 50, shared machine): " + "; ".join(parts) + "."
    )


def _size(row: dict[str, Any]) -> str:
    """``6 x 30000``: epochs and training images of a row ('all' when the whole set was used)."""
    n = row.get("config", {}).get("train_count")
    return f"{row.get('epochs', '?')} x {n if n else 'all'}"


def _label(threat: str) -> str:
    """``linf:2/255`` -> ``l∞ 2/255`` (table headers)."""
    return threat.replace("linf:", "l∞ ").replace("l2:", "l2 ").replace("l1:", "l1 ")


def found_rows(results: Path, dataset: str) -> list[dict[str, Any]]:
    """Every finished row's ``row.json`` in ``results``, pair by pair, the dataset's table rows
    first (rows written before pairs existed are at the dataset's first pair)."""
    import json

    found = []
    order = [*TABLES[dataset], *(r for r in ROWS if r not in TABLES[dataset])]
    for pair in PAIRS[dataset]:
        for row in order:
            path = results / row_folder(row, {"family": dataset, "pair": pair}) / "row.json"
            if path.is_file():
                r = json.loads(path.read_text())
                r.setdefault("pair", pair)
                r.setdefault("folder", path.parent.name)
                found.append(r)
    return found


def pair_table(
    rows: list[dict[str, Any]], threats: Sequence[str], ratios: dict[str, float], results: Path
):
    """The Markdown table of one radius pair's rows (certified accuracy in %)."""
    lines = [
        "| row | method | clean | "
        + " | ".join(_label(t) for t in threats)
        + " | union | union l∞+l2 | PGD l∞ / l2 | reattack | training time | verify time | "
        "epochs x images |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(
                f"| {r['row']} | {r['description']} | certification failed: "
                f"{r['error'][:80]}... | | | | | | | | {r['train_seconds']:.0f} s | | {_size(r)} |"
            )
            continue
        c = r["certified"]
        u2 = r.get("union_linf_l2")
        union = f"{r['union']:.1f}" if all(t in c for t in threats) else "-"
        pgd = r.get("pgd_accuracy") or {}
        pgd_cell = " / ".join(
            "-" if _lookup(pgd, t) is None else f"{_lookup(pgd, t):.1f}" for t in threats[:2]
        )
        verify = r.get("verify_seconds_total")
        verify_cell = "-" if verify is None else f"{verify:.0f} s"
        if r.get("verify_cpu_seconds") is not None:
            verify_cell += f", CPU {r['verify_cpu_seconds']:.0f} s"
        lines.append(
            f"| {r['row']} | {r['description']} | {r['clean']:.1f} | "
            + " | ".join(_certified_cell(r, t) for t in threats)
            + f" | {union} | {'-' if u2 is None else f'{u2:.1f}'} | {pgd_cell} | "
            f"{reattack_cell(results / r['folder'])} | {_time(r, ratios)} | "
            f"{verify_cell} | {_size(r)} |"
        )
    return lines


NOTES = (
    "union = certified under all three threats at once; union l∞+l2 = under the pair's first "
    "two threats ('-': the row was not certified for every threat involved).",
    "Certified = by IBP or CROWN (and, where a cell says SDP +x, by SDP-CROWN, which then "
    "certified x% of all images beyond IBP and CROWN); each method runs, per threat, only on "
    "the images the earlier ones leave open (correct and not certified under that threat), "
    "which gives the same best-of and union numbers. PGD = empirical robust accuracy (20 "
    "steps), an upper bound on certified accuracy; a certified image that PGD breaks would be "
    "a soundness violation (summary.json, per row). Reattack = certificates a far stronger "
    "attack broke out of those it attacked (python -m benchmarks.reattack: 200 steps x 5 "
    "restarts, margin and cross-entropy losses; must be 0).",
    "Training time = wall-clock seconds on the shared machine, then the training process's "
    "CPU seconds where recorded (one thread; other jobs' time slices are not counted, though "
    "contention still slows each step); in brackets, where the step time was measured (speed "
    "table), the cost in natural steps of the same batch: optimizer steps x the step-time "
    "ratio at the end of the ramp; multiply by an idle machine's natural step time for an "
    "idle-machine estimate. Verify = wall-clock seconds of the whole certification (IBP, PGD, "
    "CROWN and SDP-CROWN on the open images; one thread), then its CPU seconds where recorded.",
    "Per-method numbers, PGD accuracy and soundness checks: summary.json and "
    "<row>/verify/summary.md.",
)


def report(results: Path, log, dataset: str = "mnist") -> None:
    """Refresh summary.md / summary.json and one union_accuracy plot per radius pair from every
    row.json present."""
    found = found_rows(results, dataset)
    if not any(not r.get("error") for r in found):
        log("no certified rows yet")
        return
    ratios = _step_ratios(results)
    lines = [
        f"# CURE on {TITLE[dataset]}: certified accuracy (%), best of the bound methods run "
        "(IBP, CROWN; SDP-CROWN under l2 where marked)"
    ]
    for pair, threats in PAIRS[dataset].items():
        rows = [r for r in found if r["pair"] == pair]
        if not rows:
            continue
        done = [r for r in rows if not r.get("error")]
        which = "the first " if dataset == "mnist" else ""
        n = max(r["test_images"] for r in done) if done else 0
        lines += [
            "",
            f"## {', '.join(_label(t) for t in threats)} ({which}{n} test images)",
            "",
            *pair_table(rows, threats, ratios, results),
            "",
            comparison_line(done, results, threats),
            "",
            paper_line(done, dataset, pair),
        ]
        if done:
            plot(done, results / plot_name(pair, dataset), dataset, threats)
            lines += ["", f"![union accuracy]({plot_name(pair, dataset)})"]
    lines += ["", *NOTES]
    done = [r for r in found if not r.get("error")]
    cost = stage_cost_line(done)
    if cost:
        lines.append(cost)
    bad = {r["folder"]: _violations(results / r["folder"], r) for r in done}
    lines.append(
        "Soundness cross-check (certified images PGD broke, any threat, any bound method): "
        + (
            "0 in every row."
            if not any(bad.values())
            else ", ".join(f"{k} {v}" for k, v in bad.items() if v) + " (must be 0)."
        )
    )
    first = next(iter(PAIRS[dataset]))
    lines += ["", goal_line([r for r in done if r["pair"] == first], dataset, results)]
    speed = results / "speed.md"
    if speed.is_file():
        lines += ["", "## Training step time", "", speed.read_text().strip()]
    cost = results / "bound_cost.md"
    if cost.is_file():
        lines += ["", "## Cost of an l2 bound in training", "", cost.read_text().strip()]
    atomic_write_text(results / "summary.md", "\n".join(lines) + "\n")
    save_summary(results / "summary.json", {"pairs": PAIRS[dataset], "rows": found})
    log(f"wrote {results / 'summary.md'}")


def plot_name(pair: str, dataset: str) -> str:
    """``union_accuracy.png`` for the dataset's first pair, ``union_accuracy@0.3.png`` else."""
    first = pair == next(iter(PAIRS[dataset]))
    return "union_accuracy.png" if first else f"union_accuracy@{pair.replace('/', '-')}.png"


def is_single_norm(row: dict[str, Any]) -> bool:
    """A row trained against one threat (not natural, not CURE)."""
    return not row["method"].startswith("cure-") and row["method"] != "natural"


def paired_gain(results: Path, a: dict[str, Any], b: dict[str, Any], threats: Sequence[str]):
    """Union accuracy of row ``a`` minus row ``b`` (points) on the same test images, under every
    threat of ``threats``: ``(gain, low, high, p, a_only, b_only, n)`` with a 95% Wald interval
    of the paired difference and the two-sided sign test on the discordant images; None if the
    rows' images differ."""
    fa = _union_flags(results / a["folder"] / "verify" / "samples.csv", threats)
    fb = _union_flags(results / b["folder"] / "verify" / "samples.csv", threats)
    if not fa or fa.keys() != fb.keys():
        return None
    n = len(fa)
    a_only = sum(fa[i] and not fb[i] for i in fa)
    b_only = sum(fb[i] and not fa[i] for i in fa)
    d = (a_only - b_only) / n
    se = math.sqrt(max((a_only + b_only) / n - d * d, 0.0) / n)
    return (100 * d, 100 * (d - 1.96 * se), 100 * (d + 1.96 * se), sign_test(a_only, b_only),
            a_only, b_only, n)  # fmt: skip


PAPER_UNION_GAIN = {MNIST: 32.0, CIFAR10: 25.8}
"""The CURE paper's headline: union accuracy up to this many points above single-norm certified
training (CNN7 trained on a GPU for 70 (MNIST) / 160+ (CIFAR-10) epochs, certified with
alpha-CROWN on the first 1000 test images)."""
PAPER_LINF_ANCHORS = {
    (MNIST, "0.1"): "SABR 98.1, IBP 97.1",
    (MNIST, "0.3"): "SABR 93.4, IBP 91.8, CROWN-IBP 93.3",
    (CIFAR10, "2/255"): "SABR 62.8",
    (CIFAR10, "8/255"): "SABR 35.1",
}
"""Certified l∞ accuracy (%) of single-norm training at GPU scale (CNN7) in the SABR paper, per
dataset and pair: the anchor for this suite's best single l∞ row."""


def paper_line(rows: list[dict[str, Any]], dataset: str, pair: str) -> str:
    """One sentence: the paper's numbers at this pair next to this table's, and what the reduced
    scale (cnn-small, 6 epochs on a CPU) changes."""
    single = [r for r in rows if is_single_norm(r) and r["certified"].get(PAIRS[dataset][pair][0])]
    best = max(single, key=lambda r: r["certified"][PAIRS[dataset][pair][0]], default=None)
    here = (
        ""
        if best is None
        else f"; here the best single-norm l∞ row, {best['row']}, certifies "
        f"{best['certified'][PAIRS[dataset][pair][0]]:.1f}"
    )
    return (
        f"The paper at GPU scale (CNN7, {'70' if dataset == MNIST else '160+'} epochs, "
        f"alpha-CROWN): union accuracy up to +{PAPER_UNION_GAIN[dataset]:.1f} points over "
        f"single-norm training on {TITLE[dataset]}; single-norm l∞ anchors at this pair "
        f"{PAPER_LINF_ANCHORS[(dataset, pair)]}{here}. This table is the same comparison at a "
        "CPU's scale (cnn-small, 6 epochs, CROWN and SDP-CROWN instead of alpha-CROWN): the "
        "absolute accuracies are not comparable with the paper's, the gain of CURE over "
        "single-norm rows of the same scale is."
    )


def comparison_line(rows: list[dict[str, Any]], results: Path, threats: Sequence[str]) -> str:
    """The best CURE row against the best single-norm row, and against the best row trained for
    l∞ alone (the single-norm baseline of most certified-training papers), on the same images:
    union l∞+l2 and union of all three, with the 95% interval of the gain and the sign test."""
    cure = [r for r in rows if r["method"].startswith("cure-")]
    single = [r for r in rows if is_single_norm(r)]
    if not cure or not single:
        return "Union gain of CURE: needs at least one CURE and one single-norm row."
    parts = []
    for label, key, picked in (
        ("l∞+l2", "union_linf_l2", threats[:2]),
        ("all three", "union", threats),
    ):

        def have(r: dict[str, Any], key: str = key, picked: Sequence[str] = picked) -> bool:
            return r.get(key) is not None and all(t in r["certified"] for t in picked)

        cs, ss = [r for r in cure if have(r)], [r for r in single if have(r)]
        if not cs or not ss:
            continue
        bc = max(cs, key=lambda r: r[key])
        linf = [r for r in ss if r["method"].endswith("-linf")]
        for who, pool in (("single-norm", ss), ("l∞-trained", linf)):
            if not pool:
                continue
            bs = max(pool, key=lambda r: r[key])
            parts.append(
                f"union {label}, best CURE row {bc['row']} {bc[key]:.1f} - best {who} row "
                f"{bs['row']} {bs[key]:.1f}"
                + _gain_text(paired_gain(results, bc, bs, [parse_threat(t).name for t in picked]))
            )
    return "Union gain of CURE on the same images: " + "; ".join(parts) + "."


def _gain_text(g: Optional[tuple]) -> str:
    """`` = +2.4 points (95% interval ...)`` from :func:`paired_gain` ('' without paired data)."""
    if g is None:
        return ""
    return (
        f" = {g[0]:+.1f} points (95% interval {g[1]:+.1f} to {g[2]:+.1f}; {g[4]} images certified "
        f"by the CURE row only, {g[5]} by the other only, sign test p = {g[3]:.2g})"
    )


GOALS = {
    "mnist": "union l∞+l2 >= 75% with clean >= 93% (at most 15 minutes of training per model)",
    "cifar10": "the best CURE row beats the best single-norm row on union l∞+l2 by >= 5 points",
}


MNIST_BUDGET = 900.0
"""Training seconds allowed per model for the MNIST goal (CPU seconds of the training process where
recorded, wall-clock otherwise)."""


def _budget_seconds(row: dict[str, Any]) -> float:
    """The training time the MNIST goal counts: CPU seconds if recorded, else wall-clock."""
    cpu = row.get("train_cpu_seconds")
    return row["train_seconds"] if cpu is None else cpu


def _mnist_goal(done: list[dict[str, Any]]) -> str:
    """The MNIST goal sentence: met or missed, by which row, and every row tried (union / clean,
    training time), so the table says what was tried."""
    violations = lambda r: sum((r.get("soundness_violations") or {}).values())  # noqa: E731
    in_budget = [r for r in done if _budget_seconds(r) <= MNIST_BUDGET and not violations(r)]
    ok = [r for r in in_budget if r["clean"] >= 93.0]
    pool = ok or in_budget or done
    best = max(pool, key=lambda r: r["union_linf_l2"])
    met = bool(ok) and best["union_linf_l2"] >= 75.0
    why = ""
    if not in_budget:
        why = " (no row trained within the budget)"
    elif not ok:
        why = " (no row within the budget reaches clean 93)"
    tried = "; ".join(
        f"{r['row']} {r['union_linf_l2']:.1f} / {r['clean']:.1f} in {_budget_seconds(r):.0f} s"
        + ("" if _budget_seconds(r) <= MNIST_BUDGET else " (over budget)")
        for r in sorted(done, key=lambda r: -r["union_linf_l2"])
    )
    return (
        f"Goal ({GOALS['mnist']}): {'met' if met else 'MISSED'}; best row {best['row']}: union "
        f"l∞+l2 {best['union_linf_l2']:.1f} at clean {best['clean']:.1f}, "
        f"{_budget_seconds(best):.0f} s of training"
        + (
            ""
            if best.get("train_cpu_seconds") is None
            else f" (CPU; {best['train_seconds']:.0f} s wall-clock on the shared machine)"
        )
        + f"{why}. Tried (union l∞+l2 / clean, training "
        f"seconds: CPU where recorded, else wall-clock): {tried}."
    )


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test of ``a`` against ``b`` discordant pairs (binomial, p = 1/2)."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def goal_line(rows: list[dict[str, Any]], dataset: str, results: Optional[Path] = None) -> str:
    """One sentence: is the dataset's goal met by the rows of its first pair, and by which row
    (the paired statistics of the CIFAR-10 gap are in :func:`comparison_line`)."""
    done = [r for r in rows if r.get("union_linf_l2") is not None]
    if not done:
        return f"Goal ({GOALS[dataset]}): no rows yet."
    if dataset == "mnist":
        return _mnist_goal(done)
    cure = [r for r in done if r["method"].startswith("cure-")]
    single = [r for r in done if is_single_norm(r)]
    if not cure or not single:
        return f"Goal ({GOALS[dataset]}): needs at least one CURE and one single-norm row."
    bc = max(cure, key=lambda r: r["union_linf_l2"])
    bs = max(single, key=lambda r: r["union_linf_l2"])
    gap = bc["union_linf_l2"] - bs["union_linf_l2"]
    return (
        f"Goal ({GOALS[dataset]}): {'met' if gap >= 5.0 else 'MISSED'}; best CURE row "
        f"{bc['row']} {bc['union_linf_l2']:.1f} against best single-norm row {bs['row']} "
        f"{bs['union_linf_l2']:.1f} ({gap:+.1f} points)."
    )


def plot(rows: list[dict[str, Any]], path: Path, dataset: str, threats: Sequence[str]) -> None:
    """Grouped bars: certified accuracy per threat and union accuracy, one group per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows]
    series = [(_label(t), [r["certified"].get(t) or 0.0 for r in rows]) for t in threats] + [
        ("union l∞+l2", [r.get("union_linf_l2") or 0.0 for r in rows]),
        ("union (all)", [r["union"] for r in rows]),
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.0))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        color = {"union l∞+l2": "dimgrey", "union (all)": "black"}.get(label)
        ax.bar(xs, vals, width, label=label, color=color)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(
        f"{TITLE[dataset]} at {', '.join(_label(t) for t in threats)}: certified and union "
        "accuracy (best of IBP, CROWN, SDP-CROWN)"
    )
    ax.legend(ncol=5, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------


@click.command()
@click.option(
    "--dataset",
    type=click.Choice(sorted(THREATS)),
    default="mnist",
    show_default=True,
    help="MNIST (the paper's setting) or the reduced-scale CIFAR-10 run.",
)
@click.option(
    "--rows",
    "rows_opt",
    multiple=True,
    help="Rows to run (repeatable or comma-separated; 'none' for no row; 'table' for the rows of "
    "the paper's table of the dataset on today's blocks) [default: all but the optional rows]: "
    + ", ".join(ROWS),
)
@click.option(
    "--pair",
    type=click.Choice([p for pairs in PAIRS.values() for p in pairs]),
    default=None,
    help="The radius pair, by its l∞ radius: MNIST 0.1 (l2 0.5, l1 1) or 0.3 (l2 1, l1 2); "
    "CIFAR-10 2/255 (l2 0.25, l1 0.5) or 8/255 (l2 0.5, l1 1). Rows at a pair other than the "
    "first go to <row>@<pair>/ (e.g. ibp-linf+shi-b64@8-255) [default: the dataset's first].",
)
@click.option("--quick", is_flag=True, help="A smoke run on the built-in sample (minutes).")
@data_root_option(
    help="Folder holding MNIST/raw (and/or cifar10-jpeg.tar.gz, cifar-10-batches-py)."
)
@click.option(
    "--results",
    type=click.Path(file_okay=False),
    default=None,
    help="Results folder [default: benchmarks/results/cure_<dataset>, or cure_<dataset>-quick].",
)
@click.option(
    "--train-count",
    type=click.IntRange(min=2),
    default=None,
    help="Train on N training images (the first N of MNIST, classes interleaved for "
    "CIFAR-10's ImageFolder) [default: all of MNIST, 20,000 of CIFAR-10].",
)
@click.option(
    "--test-count", type=click.IntRange(min=1), default=None, help="Test images to certify."
)
@click.option(
    "--train-l2-factor",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="l2 training eps = factor x 0.5 (1.5 trains l2 at 0.75).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Training epochs of every row (full mode: 6); warm-up, ramp and lr milestones scale "
    "with it (e.g. 12: warm-up 2, ramp 6, decay at 10).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="torch CPU threads (one is fastest for cnn-small, especially on a shared machine).",
)
@click.option(
    "--speed/--no-speed",
    default=None,
    help="Measure step times relative to a natural step [default: on for a run of all rows].",
)
@click.option(
    "--stop-after-epoch",
    type=click.IntRange(min=1),
    default=None,
    help="Train each row at most up to this epoch of its schedule, then certify that checkpoint "
    "(the table's epochs column shows it); a later run without it continues the schedule.",
)
@click.option(
    "--threats",
    "threats_opt",
    default=None,
    help="Comma-separated threats to certify, a subset of the dataset's three (e.g. linf:0.1 for "
    "l∞-only rows, to save CROWN time) [default: all three].",
)
@click.option(
    "--speed-rows",
    default=None,
    help="Comma-separated rows whose step time --speed measures [default: every row].",
)
@click.option(
    "--bound-cost",
    "bound_cost_row",
    default=None,
    help="Time one l2 bound per bound method (IBP, CROWN-IBP, CROWN, SDP-CROWN) of a training "
    "batch of 64 on this finished row's model against a natural step (bound_cost.md).",
)
@click.option("--report-only", is_flag=True, help="Only rebuild the summary from finished rows.")
def main(
    dataset: str,
    rows_opt: Sequence[str],
    pair: Optional[str],
    quick: bool,
    data_root: str,
    results: Optional[str],
    train_count: Optional[int],
    test_count: Optional[int],
    train_l2_factor: float,
    epochs: Optional[int],
    seed: int,
    threads: int,
    speed: Optional[bool],
    stop_after_epoch: Optional[int],
    threats_opt: Optional[str],
    speed_rows: Optional[str],
    bound_cost_row: Optional[str],
    report_only: bool,
) -> None:
    """Train and certify the CURE rows on MNIST or CIFAR-10; write the table, the plot and step
    times."""
    torch.set_num_threads(threads)
    s = settings(quick, dataset, pair)
    if train_count is not None:
        s["train_count"] = train_count
    if test_count is not None:
        s["test_count"] = test_count
    if threats_opt:
        picked_threats = tuple(split_commas(threats_opt))
        bad = [t for t in picked_threats if t not in s["pair_threats"]]
        if bad or not picked_threats:
            raise click.BadParameter(
                f"--threats {threats_opt!r}: choose among {', '.join(s['pair_threats'])}"
            )
        s["threats"] = tuple(t for t in s["pair_threats"] if t in picked_threats)
    if epochs is not None:
        scale = epochs / s["epochs"]
        s["epochs"] = epochs
        s["warmup_epochs"] *= scale
        s["ramp_epochs"] *= scale
        s["lr_milestones"] = tuple(m * scale for m in s["lr_milestones"])
    folder = Path(results) if results else RESULTS / f"cure_{dataset}{'-quick' if quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    if report_only:
        report(folder, log, dataset)
        return
    picked = [r for r in (split_commas(*rows_opt) if rows_opt else DEFAULT_ROWS) if r != "none"]
    if "table" in picked:  # the paper's table on today's blocks
        at = picked.index("table")
        picked[at : at + 1] = [r for r in TABLES[dataset] if r not in picked]
    unknown = [r for r in picked if r not in ROWS]
    if unknown:
        raise click.BadParameter(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    for tuned, base_row in FINETUNE_FROM.items():  # the base model first
        if base_row in picked and tuned in picked:
            picked.remove(tuned)
            picked.insert(picked.index(base_row) + 1, tuned)
    root = None if s["dataset"] == "sample" else data_root
    if speed is None:
        speed = not rows_opt
    if speed:
        timed = split_commas(speed_rows) if speed_rows else list(ROWS)
        unknown = [r for r in timed if r not in ROWS]
        if unknown:
            raise click.BadParameter(
                f"unknown --speed-rows {unknown}; choose from {', '.join(ROWS)}"
            )
        measure_speed(timed, s, folder, root, train_l2_factor, seed, log)
    if bound_cost_row:
        if not (folder / bound_cost_row / CHECKPOINT).is_file():
            raise click.BadParameter(
                f"no trained model {folder / bound_cost_row / CHECKPOINT}; run that row first",
                param_hint="--bound-cost",
            )
        measure_bound_cost(bound_cost_row, s, folder, root, train_l2_factor, seed, log)
    t0 = time.perf_counter()
    for row in picked:
        cfg = row_config(row, s, folder, root, train_l2_factor, seed)
        out = run_row(row, cfg, folder, s, log, stop_after_epoch)
        if out.get("error"):
            report(folder, log, dataset)
            continue
        per_threat = ", ".join(f"{_label(t)} {out['certified'][t]:.1f}" for t in s["threats"])
        log(
            f"[{row}] clean {out['clean']:.1f}, {per_threat}, union {out['union']:.1f} "
            f"({out['train_seconds']:.0f} s training)"
        )
        report(folder, log, dataset)
    report(folder, log, dataset)
    log(f"done in {time.perf_counter() - t0:.0f} s; results in {folder}")


if __name__ == "__main__":
    main()
