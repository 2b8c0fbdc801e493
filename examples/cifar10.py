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

Results go to ``--out`` (default ``runs/examples/cifar10-<mode>``), laid out as ``mnist.py``
describes: per model a training run and its verification, and the comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from torch.utils.data import Dataset

from cure_lirpa.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported by path
import common  # noqa: E402

DATASET = "cifar10"
EPS_LINF, EPS_L2 = "2/255", "0.25"  # the CURE paper's first CIFAR-10 pair (the other: 8/255, 0.5)

# The modes (common.RGB_MODES). quick, a smoke run: one epoch over 2000 training images (classes
# interleaved for the class-sorted ImageFolder data, so all ten classes), 50 test images, a narrow
# network. cpu: cnn-small (width 16) on the whole training set, 1 warm-up epoch, eps ramp over 4
# epochs, 8 epochs in all, Adam 1e-3, batch 128; 1000 test images. paper, GPU scale (CURE paper):
# CNN7 with BatchNorm, the schedule of the cure-scratch preset (160 epochs, ramp 2 -> 82, lr x0.2 at
# 120 and 140, batch 128, Adam 5e-4); 1000 test images certified with the cascade IBP -> CROWN-IBP
# -> CROWN -> alpha-CROWN.
MODES = common.RGB_MODES


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    data_root_help = (
        "folder with cifar-10-batches-py, train/ and test/ class folders, or cifar10-jpeg.tar.gz"
    )
    eps = (EPS_LINF, EPS_L2)
    return common.parse_args(
        argv, "CIFAR-10", MODES, eps, data_root_help, "l1:0.5, patch:2, rotate:2", DATASET
    )


def load_test(args: argparse.Namespace) -> Dataset:
    """The test split (its first images are certified, classes interleaved for ImageFolder data:
    cure_lirpa.data.sample_order); fails early, with the places it looked in, when missing."""
    return load_dataset(DATASET, "test", args.data_root)


def run(args: argparse.Namespace) -> int:
    return common.run_example(args, MODES, DATASET, load_test)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
