#!/usr/bin/env python
"""TinyImageNet: a CURE multi-norm model against a single-norm baseline, certified under l∞ and l2.

Trains two models with the library's trainer (:func:`cure_lirpa.training.train`), certifies both on
the same validation images with :func:`cure_lirpa.certification.certify_dataset` and prints clean
accuracy, certified accuracy per threat (best of the bound methods), **union accuracy** (certified
under every threat at once) and PGD accuracy side by side.

    python examples/tinyimagenet.py --data-root DIR --quick     # smoke run: 2000 images, 1 epoch
    python examples/tinyimagenet.py --data-root DIR             # whole training set, cnn-small
    python examples/tinyimagenet.py --data-root DIR --paper --device cuda   # GPU scale: CNN7

TinyImageNet is not shipped with the package and torchvision cannot download it. Get
``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip), unpack it, and arrange
the validation images by class as ``val/<wnid>/*.JPEG`` with ``val/val_annotations.txt`` (the
training images need no change: ImageFolder finds ``train/<wnid>/images/*.JPEG``). ``--data-root``
is the folder that holds ``train/`` and ``val/``, or the folder that holds ``tiny-imagenet-200/``.
Without the data the script says where it looked and exits with status 2.

Any ImageFolder tree of 64x64 images with ``train/<class>/`` and ``val/<class>/`` (the same class
folders, at most 200) works: the models keep TinyImageNet's 200 outputs and the labels are the
class folders' indices in sorted order.

Results go to ``--out`` (default ``runs/examples/tinyimagenet-<mode>``): per model a training run
(``<method>/checkpoint.pt``, ``metrics.jsonl``, ``config.json``) and its verification
(``<method>/verify/samples.csv``, ``summary.json``, ``summary.md``), and the comparison
(``comparison.md``, ``comparison.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import DatasetFolder

from cure_lirpa.certification import certify_dataset, write_results
from cure_lirpa.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    model_from_checkpoint,
)
from cure_lirpa.cli.common import resolve_device
from cure_lirpa.data import dataset_info, load_dataset
from cure_lirpa.errors import UserError
from cure_lirpa.threats import NormBall, Threat, parse_threat
from cure_lirpa.training import TrainConfig, apply_preset, train

DATASET = "tinyimagenet"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("CURE_LIRPA_DATA") or str(REPO.parent / "shared" / "data")
EPS_LINF, EPS_L2 = "1/255", "36/255"  # the CURE paper's TinyImageNet pair


@dataclass(frozen=True)
class Mode:
    """Training and verification settings of one mode (the schedule is in epochs)."""

    arch: str
    width: Optional[int] = None  # None: the architecture's own width
    train_count: Optional[int] = None  # None: the whole training set
    epochs: int = 1
    warmup_epochs: float = 0.0
    ramp_epochs: float = 0.0
    batch_size: int = 64
    lr: float = 1e-3
    l2_factor: float = 1.0  # CURE's l2 training radius over the evaluation radius
    count: int = 50  # test images
    methods: tuple[str, ...] = ("ibp", "crown-ibp")
    attack_steps: int = 50


MODES = {
    # Smoke run: one epoch over the first 2000 training images, 50 validation images, a narrow
    # network. It checks the pipeline; the first 2000 images of the class-sorted ImageFolder are
    # only 4 of the 200 classes.
    "quick": Mode(
        arch="cnn-small",
        width=8,
        train_count=2000,
        epochs=1,
        warmup_epochs=0.4,
        ramp_epochs=0.6,
        batch_size=16,
        count=50,
        attack_steps=10,
    ),
    # A CPU run: cnn-small (width 16) on the whole training set, 1 warm-up epoch, eps ramp over
    # 4 epochs, 8 epochs in all, Adam 1e-3, batch 128; 1000 validation images.
    "cpu": Mode(
        arch="cnn-small",
        epochs=8,
        warmup_epochs=1.0,
        ramp_epochs=4.0,
        batch_size=128,
        count=1000,
        methods=("ibp", "crown-ibp", "crown"),
    ),
    # GPU scale (CURE paper): CNN7 with BatchNorm, the schedule of the cure-scratch preset (160
    # epochs, ramp 2 -> 82, lr x0.2 at 120 and 140, batch 128, Adam 5e-4, gradient projection
    # beta 0.5); 1000 validation images certified with the cascade IBP -> CROWN-IBP -> CROWN ->
    # alpha-CROWN.
    "paper": Mode(arch="cnn7", count=1000, methods=("auto",)),
}


def radius(text: str) -> float:
    """A radius in [0, 1] pixel units: a number or a fraction such as ``1/255``."""
    num, _, den = text.partition("/")
    try:
        return float(num) / float(den or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a CURE multi-norm model and a single-norm baseline on TinyImageNet, "
        "certify both under l∞ and l2, and compare their union accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke run: 2000 images, 1 epoch")
    mode.add_argument("--paper", action="store_true", help="the paper's settings (GPU scale)")
    p.add_argument(
        "--data-root",
        default=DEFAULT_DATA,
        help="folder with train/<wnid>/ and val/<wnid>/ (or with tiny-imagenet-200/ holding "
        "them); default: $CURE_LIRPA_DATA, else the repo's ../shared/data",
    )
    p.add_argument("--eps-linf", type=radius, default=EPS_LINF, help="l∞ radius, pixel units")
    p.add_argument("--eps-l2", type=radius, default=EPS_L2, help="l2 radius, pixel units")
    p.add_argument(
        "--extra-threat",
        action="append",
        default=[],
        metavar="THREAT",
        help="another threat to certify (e.g. patch:2, rotate:2); repeatable, enters the union",
    )
    p.add_argument(
        "--cure-method",
        choices=("cure-joint", "cure-max", "cure-random"),
        default="cure-joint",
        help="multi-norm method (--paper: the cure-scratch preset)",
    )
    p.add_argument(
        "--baseline",
        choices=("ibp-linf", "sabr-linf", "ibp-l2", "l2-defence", "natural"),
        default="ibp-linf",
        help="single-norm method (--paper: sabr-linf)",
    )
    p.add_argument("--epochs", type=int, default=None, help="override the mode's epochs")
    p.add_argument("--train-count", type=int, default=None, help="train on the first N images")
    p.add_argument("--count", type=int, default=None, help="number of test images to certify")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated bound methods: ibp, crown-ibp, crown, alpha-crown, auto",
    )
    p.add_argument(
        "--memory-mb",
        type=float,
        default=4096.0,
        help="memory budget of one bound computation (batches are split to fit)",
    )
    p.add_argument("--out", default=None, help="output folder [runs/examples/tinyimagenet-<mode>]")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue killed training runs in --out (otherwise they are replaced)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_configs(args: argparse.Namespace, mode: Mode) -> dict[str, TrainConfig]:
    """TrainConfigs of the baseline and of the CURE model, keyed by their row in the table."""
    common: dict[str, Any] = dict(
        dataset=DATASET,
        data_root=args.data_root,
        arch=mode.arch,
        arch_kwargs={"width": mode.width} if mode.width else {},
        eps_linf=args.eps_linf,
        eps_l2=args.eps_l2,
        seed=args.seed,
        memory_mb=args.memory_mb,
    )
    if args.paper:
        # The preset fills every field not named in `explicit`; an explicit --epochs scales the
        # preset's warm-up, ramp and lr milestones along.
        explicit = {"epochs"} if args.epochs else set()
        if args.epochs:
            common["epochs"] = args.epochs
        cure = apply_preset(TrainConfig(**common), "cure-scratch", explicit)
        # The baseline: the same recipe and schedule without the multi-norm parts (SABR l∞ alone).
        base = apply_preset(
            TrainConfig(method="sabr-linf", **common),
            "cure-scratch",
            explicit | {"method", "ba_eta", "gp_beta"},
        )
        return {
            "baseline: sabr-linf": dataclasses.replace(base, preset=None),
            "CURE: cure-scratch": cure,
        }
    schedule = dict(
        epochs=args.epochs or mode.epochs,
        warmup_epochs=mode.warmup_epochs,
        ramp_epochs=mode.ramp_epochs,
        batch_size=mode.batch_size,
        lr=mode.lr,
        train_count=args.train_count or mode.train_count,
    )
    base = TrainConfig(method=args.baseline, **common, **schedule)
    cure = TrainConfig(
        method=args.cure_method, train_eps_l2=mode.l2_factor * args.eps_l2, **common, **schedule
    )
    return {f"baseline: {args.baseline}": base, f"CURE: {args.cure_method}": cure}


def eval_images(test: Dataset, count: int) -> Dataset:
    """``count`` images evenly spaced over the (class-sorted) validation split."""
    n = len(test)
    return Subset(test, sorted({i * n // count for i in range(count)}) if count < n else range(n))


HOW_TO_GET = (
    "TinyImageNet is not shipped with cure-lirpa and torchvision cannot download it: get "
    "http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it, sort val/images/*.JPEG into "
    "val/<wnid>/ with val/val_annotations.txt, and pass --data-root DIR (DIR holding train/ and "
    "val/, or tiny-imagenet-200/). See the top of examples/tinyimagenet.py."
)


def load_data(args: argparse.Namespace) -> tuple[DatasetFolder, DatasetFolder]:
    """The training and validation ImageFolders; a UserError that says how to get them if not."""
    try:
        train_set = load_dataset(DATASET, "train", args.data_root)
        val = load_dataset(DATASET, "test", args.data_root)  # the 'test' split is val/
    except UserError as exc:
        raise UserError(f"{exc}\n{HOW_TO_GET}") from None
    if train_set.classes != val.classes:
        raise UserError(
            f"train/ has {len(train_set.classes)} class folders and val/ {len(val.classes)}, not "
            "the same ones: labels are the folders' sorted indices, so both need the same folders"
        )
    if len(train_set.classes) > dataset_info(DATASET).num_classes:
        raise UserError(
            f"{len(train_set.classes)} class folders, more than TinyImageNet's 200 outputs"
        )
    return train_set, val


def comparison_table(results: dict[str, dict[str, Any]], threats: Sequence[Threat]) -> str:
    """One row per model: clean, certified per threat (best of the methods), union, PGD per threat."""
    names = [t.name for t in threats]
    rows = [["model", "clean", *names, "union", *(f"PGD {n}" for n in names)]]
    for label, s in results.items():
        pgd = s["pgd_accuracy"]
        rows.append(
            [label, f"{s['clean_accuracy']:.1f}"]
            + [f"{s['certified_best'][n]:.1f}" for n in names]
            + [f"{s['union']['best']:.1f}"]
            + [f"{pgd[n]:.1f}" if n in pgd else "-" for n in names]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    name = "paper" if args.paper else "quick" if args.quick else "cpu"
    mode = MODES[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out or f"runs/examples/{DATASET}-{name}")
    threats: list[Threat] = [NormBall(math.inf, args.eps_linf), NormBall(2.0, args.eps_l2)]
    threats += [parse_threat(t) for t in args.extra_threat]
    methods = tuple(args.methods.split(",")) if args.methods else mode.methods
    info = dataset_info(DATASET)
    train_set, val = load_data(args)  # fails early, saying where it looked and what to do
    test = eval_images(val, args.count or mode.count)
    configs = make_configs(args, mode)
    print(f"{name} run on {DATASET} ({device}); results in {out}")
    classes = len(train_set.classes)
    if classes < info.num_classes:
        print(
            f"note: {classes} class folders; the models keep TinyImageNet's {info.num_classes} "
            f"outputs and use labels 0..{classes - 1}"
        )
    count = min(len(train_set), next(iter(configs.values())).train_count or len(train_set))
    seen = len(set(train_set.targets[:count]))
    if seen < classes:
        print(
            f"note: the first {count} training images hold {seen} of the {classes} classes "
            "(ImageFolder data are sorted by class); certified accuracies of this run say little "
            "beyond 'the pipeline works'"
        )

    results: dict[str, dict[str, Any]] = {}
    for label, config in configs.items():
        run_dir = out / config.method
        print(f"\n== {label}: training {config.arch} for {config.epochs} epoch(s)")
        result = train(
            config,
            run_dir,
            resume=args.resume and (run_dir / "checkpoint.pt").exists(),
            overwrite=True,
            device=device,
            log=lambda msg: print("   " + msg),
        )
        model = model_from_checkpoint(load_checkpoint(result.checkpoint))
        print(f"== {label}: certifying {len(test)} validation images ({', '.join(methods)}, PGD)")
        rows, summary = certify_dataset(
            model,
            test,
            threats,
            methods,
            info.in_shape,
            device=device,
            memory_mb=args.memory_mb,
            attack_steps=mode.attack_steps,
            attack_restarts=1,
        )
        write_results(run_dir / "verify", rows, summary, threats, methods)
        results[label] = summary

    table = comparison_table(results, threats)
    (_, base), (_, cure) = results.items()
    gain = cure["union"]["best"] - base["union"]["best"]
    print(
        f"\nCertified accuracy (%) on {len(test)} validation images of {DATASET}, best of "
        f"{', '.join(methods)}; union = certified under all {len(threats)} threats at once\n"
    )
    print(table)
    print(f"union accuracy, CURE minus baseline: {gain:+.1f} points")
    atomic_write_text(out / "comparison.md", table)
    atomic_write_json(
        out / "comparison.json",
        {
            "mode": name,
            "threats": [t.name for t in threats],
            "methods": list(methods),
            "results": results,
        },
    )
    print(f"files: {out}/comparison.md, {out}/<method>/verify/summary.md (per bound method)")
    bad = {k: v for s in results.values() for k, v in s["soundness_violations"].items() if v}
    if bad:  # a certified image broken by PGD would be a bug in the bounds: say so loudly
        print(f"SOUNDNESS VIOLATION (certified but broken by PGD): {bad}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
