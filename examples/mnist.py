#!/usr/bin/env python
"""MNIST: a CURE multi-norm model against a single-norm baseline, certified under l∞ and l2.

Trains two models with the library's trainer (:func:`cure_lirpa.training.train`), certifies both on
the same test images with :func:`cure_lirpa.certification.certify_dataset` and prints clean accuracy,
certified accuracy per threat (best of the bound methods), **union accuracy** (certified under every
threat at once) and PGD accuracy side by side.

    python examples/mnist.py --quick                   # smoke run, well under a minute on a CPU
    python examples/mnist.py --quick --dataset sample  # the built-in sample: no data folder needed
    python examples/mnist.py                           # full MNIST, cnn-small, 6 epochs per model
    python examples/mnist.py --paper --device cuda     # GPU scale: CNN7, CURE-Scratch vs SABR

Results go to ``--out`` (default ``runs/examples/<dataset>-<mode>``): per model a training run
(``<method>/checkpoint.pt``, ``metrics.jsonl``, ``config.json``) and its verification
(``<method>/verify/samples.csv``, ``summary.json``, ``summary.md``, as written by
``cure-lirpa verify``), and the comparison (``comparison.md``, ``comparison.json``).
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("CURE_LIRPA_DATA") or str(REPO.parent / "shared" / "data")
EPS_LINF, EPS_L2 = 0.1, 0.5  # the CURE paper's first MNIST pair (the other one: 0.3 / 1.0)


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
    # Smoke run: one epoch over 4000 images, 50 test images; checks the pipeline, numbers are noisy.
    "quick": Mode(
        arch="cnn-small",
        train_count=4000,
        epochs=1,
        warmup_epochs=0.4,
        ramp_epochs=0.6,
        batch_size=16,
        count=50,
        attack_steps=10,
    ),
    # The SPEC pilot on a CPU: whole training set, 1 warm-up epoch, eps ramp over 3 epochs,
    # Adam 5e-4, batch 256, CURE's l2 trained at 1.5x the evaluation radius; 1000 test images.
    "cpu": Mode(
        arch="cnn-small",
        epochs=6,
        warmup_epochs=1.0,
        ramp_epochs=3.0,
        batch_size=256,
        lr=5e-4,
        l2_factor=1.5,
        count=1000,
        methods=("ibp", "crown-ibp", "crown"),
    ),
    # GPU scale (CURE paper): CNN7 with BatchNorm, the schedule of the cure-scratch preset (70 epochs,
    # ramp 2 -> 22, lr x0.2 at 50 and 60, batch 256, Adam 5e-4); the first 1000 test images
    # certified with the cascade IBP -> CROWN-IBP -> CROWN -> alpha-CROWN.
    "paper": Mode(arch="cnn7", count=1000, methods=("auto",)),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a CURE multi-norm model and a single-norm baseline on MNIST, certify "
        "both under l∞ and l2, and compare their union accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke run: 4000 images, 1 epoch")
    mode.add_argument("--paper", action="store_true", help="the paper's settings (GPU scale)")
    p.add_argument(
        "--dataset",
        choices=("mnist", "sample"),
        default="mnist",
        help="'mnist': torchvision layout DATA_ROOT/MNIST/raw; 'sample': the built-in "
        "4000/1000 real-MNIST sample",
    )
    p.add_argument(
        "--data-root",
        default=DEFAULT_DATA,
        help="folder holding MNIST/raw (default: $CURE_LIRPA_DATA, else the repo's ../shared/data)",
    )
    p.add_argument("--eps-linf", type=float, default=EPS_LINF, help="l∞ radius, pixel units")
    p.add_argument("--eps-l2", type=float, default=EPS_L2, help="l2 radius, pixel units")
    p.add_argument(
        "--extra-threat",
        action="append",
        default=[],
        metavar="THREAT",
        help="another threat to certify (e.g. l1:1, patch:2); repeatable, enters the union",
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
    p.add_argument("--out", default=None, help="output folder [runs/examples/<dataset>-<mode>]")
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
        dataset=args.dataset,
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


def eval_images(args: argparse.Namespace, count: int) -> Dataset:
    """The first ``count`` test images (the CURE paper's protocol; MNIST's test order is mixed)."""
    test = load_dataset(args.dataset, "test", args.data_root)
    return Subset(test, range(min(count, len(test))))


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
    out = Path(args.out or f"runs/examples/{args.dataset}-{name}")
    threats: list[Threat] = [NormBall(math.inf, args.eps_linf), NormBall(2.0, args.eps_l2)]
    threats += [parse_threat(t) for t in args.extra_threat]
    methods = tuple(args.methods.split(",")) if args.methods else mode.methods
    info = dataset_info(args.dataset)
    test = eval_images(args, args.count or mode.count)  # fails early when the data are missing
    print(f"{name} run on {args.dataset} ({device}); results in {out}")

    results: dict[str, dict[str, Any]] = {}
    for label, config in make_configs(args, mode).items():
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
        print(f"== {label}: certifying {len(test)} test images ({', '.join(methods)}, PGD)")
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
    print(
        f"\nCertified accuracy (%) on {len(test)} test images of {args.dataset}, best of "
        f"{', '.join(methods)}; union = certified under all {len(threats)} threats at once\n"
    )
    print(table)
    print(
        f"union accuracy, CURE minus baseline: {cure['union']['best'] - base['union']['best']:+.1f} points"
    )
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
        hint = (
            " Or use the built-in sample: --dataset sample."
            if "MNIST not found" in str(exc)
            else ""
        )
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
