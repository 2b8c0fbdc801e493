#!/usr/bin/env python
"""TinyImageNet: a CURE multi-norm model against a single-norm baseline, certified under l∞ and l2.

Trains two models with the library's trainer (:func:`cure_lirpa.training.certified.train`), certifies both on
the same validation images with :func:`cure_lirpa.verification.runner.certify_dataset` and prints clean
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

Any ImageFolder tree of 64x64 images with ``train/<class>/`` and ``val/<class>/`` (the same 200
class folders) works: the labels are the class folders' indices in sorted order. A tree with another
number of class folders is refused (the models have TinyImageNet's 200 outputs).

Results go to ``--out`` (default ``runs/examples/tinyimagenet-<mode>``), laid out as ``mnist.py``
describes: per model a training run and its verification, and the comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from torchvision.datasets import DatasetFolder

from cure_lirpa.data import load_dataset
from cure_lirpa.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported by path
import common  # noqa: E402

DATASET = "tinyimagenet"
EPS_LINF, EPS_L2 = "1/255", "36/255"  # the CURE paper's TinyImageNet pair

# The modes (common.RGB_MODES). quick, a smoke run: one epoch over 2000 training images (10 per
# class: the ImageFolder's classes are interleaved), 50 validation images, a narrow network; it
# checks the pipeline. cpu: cnn-small (width 16) on the whole training set, 1 warm-up epoch, eps
# ramp over 4 epochs, 8 epochs in all, Adam 1e-3, batch 128; 1000 validation images. paper, GPU
# scale (CURE paper): CNN7 with BatchNorm, the schedule of the cure-scratch preset (160 epochs, ramp
# 2 -> 82, lr x0.2 at 120 and 140, batch 128, Adam 5e-4, gradient projection beta 0.5); 1000
# validation images certified with the cascade IBP -> CROWN-IBP -> CROWN -> alpha-CROWN.
MODES = common.RGB_MODES


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    data_root_help = (
        "folder with train/<wnid>/ and val/<wnid>/, or with tiny-imagenet-200/ holding them"
    )
    eps = (EPS_LINF, EPS_L2)
    return common.parse_args(
        argv, "TinyImageNet", MODES, eps, data_root_help, "patch:2, rotate:2", DATASET
    )


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
    return train_set, val


def load_test(args: argparse.Namespace) -> DatasetFolder:
    """The validation images, of which the first are certified (classes interleaved: sample_order);
    fails early, saying where it looked and what to do."""
    return load_data(args)[1]


def run(args: argparse.Namespace) -> int:
    return common.run_example(args, MODES, DATASET, load_test, images="validation")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
