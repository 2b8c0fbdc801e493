#!/usr/bin/env python
"""CIFAR-10: a CURE multi-norm model against a single-norm baseline, certified under l∞ and l2.

Trains two models with the library's trainer (:func:`cure_lirpa.training.certified.train`), certifies both on
the same test images with :func:`cure_lirpa.verification.runner.certify_dataset` and prints clean accuracy,
certified accuracy per threat (best of the bound methods), **union accuracy** (certified under every
threat at once) and PGD accuracy side by side.

    python examples/cifar10.py --quick                  # smoke run, well under a minute on a CPU
    python examples/cifar10.py                          # whole training set, cnn-small, 8 epochs
    python examples/cifar10.py --paper --device cuda    # GPU scale: CNN7, CURE-Scratch vs SABR
    python examples/cifar10.py --eps-linf 8/255 --eps-l2 0.5 --extra-threat patch:2

Data (``--data-root``, read by :func:`cure_lirpa.data.load_dataset`): the torchvision layout
``DATA_ROOT/cifar-10-batches-py``, an ImageFolder tree ``DATA_ROOT/train/<class>/``,
``DATA_ROOT/test/<class>/``, or the archive ``DATA_ROOT/cifar10-jpeg.tar.gz`` (extracted once to
``~/.cache/cure_lirpa/cifar10-jpeg``). ImageFolder data are sorted by class, so the test images are
taken with the classes interleaved (``cure_lirpa.data.sample_order``; with the torchvision layout:
the first ones, as in the paper).

Results go to ``--out`` (default ``runs/examples/cifar10-<mode>``): per model a training run
(``<method>/checkpoint.pt``, ``metrics.jsonl``, ``config.json``) and its verification
(``<method>/verify/samples.csv``, ``summary.json``, ``summary.md``), and the comparison
(``comparison.md``, ``comparison.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from cure_lirpa.data import dataset_info, load_dataset, take
from cure_lirpa.training.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported by path
import common  # noqa: E402
from common import Mode, radius  # noqa: E402

DATASET = "cifar10"
DEFAULT_DATA = common.DEFAULT_DATA
EPS_LINF, EPS_L2 = "2/255", "0.25"  # the CURE paper's first CIFAR-10 pair (the other: 8/255, 0.5)

MODES = {
    # Smoke run: one epoch over 2000 training images (classes interleaved for the class-sorted
    # ImageFolder data, so all ten classes), 50 test images, a narrow network.
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
    # 4 epochs, 8 epochs in all, Adam 1e-3, batch 128; 1000 test images.
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
    # epochs, ramp 2 -> 82, lr x0.2 at 120 and 140, batch 128, Adam 5e-4); 1000 test images
    # certified with the cascade IBP -> CROWN-IBP -> CROWN -> alpha-CROWN.
    "paper": Mode(arch="cnn7", count=1000, methods=("auto",)),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return common.parse_args(
        argv,
        description="Train a CURE multi-norm model and a single-norm baseline on CIFAR-10, "
        "certify both under l∞ and l2, and compare their union accuracy.",
        quick_help="smoke run: 2000 images, 1 epoch",
        data_root_help="folder with cifar-10-batches-py, train/ and test/ class folders, or "
        "cifar10-jpeg.tar.gz (default: $CURE_LIRPA_DATA, else the repo's ../shared/data)",
        eps_type=radius,
        eps_defaults=(EPS_LINF, EPS_L2),
        extra_threat_help="another threat to certify (e.g. l1:0.5, patch:2, rotate:2); "
        "repeatable, enters the union",
        out_help="output folder [runs/examples/cifar10-<mode>]",
    )


def make_configs(args: argparse.Namespace, mode: Mode) -> dict[str, TrainConfig]:
    """TrainConfigs of the baseline and of the CURE model, keyed by their row in the table."""
    return common.make_configs(args, mode, DATASET)


def run(args: argparse.Namespace) -> int:
    s = common.prepare(args, MODES, DATASET)
    info = dataset_info(DATASET)
    # Fails early, with the places it looked in, when the data are missing.
    # the first images, classes interleaved for ImageFolder data (cure_lirpa.data.sample_order)
    test = take(load_dataset(DATASET, "test", args.data_root), 0, args.count or s.mode.count)
    configs = make_configs(args, s.mode)
    print(f"{s.name} run on {DATASET} ({s.device}); results in {s.out}")
    return common.train_and_compare(args, s, DATASET, configs, test, info.in_shape)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
