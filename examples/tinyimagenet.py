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

Results go to ``--out`` (default ``runs/examples/tinyimagenet-<mode>``): per model a training run
(``<method>/checkpoint.pt``, ``metrics.jsonl``, ``config.json``) and its verification
(``<method>/verify/samples.csv``, ``summary.json``, ``summary.md``), and the comparison
(``comparison.md``, ``comparison.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from torchvision.datasets import DatasetFolder

from cure_lirpa.data import dataset_info, load_dataset, take
from cure_lirpa.errors import UserError
from cure_lirpa.training.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported by path
import common  # noqa: E402
from common import Mode, radius  # noqa: E402

DATASET = "tinyimagenet"
DEFAULT_DATA = common.DEFAULT_DATA
EPS_LINF, EPS_L2 = "1/255", "36/255"  # the CURE paper's TinyImageNet pair

MODES = {
    # Smoke run: one epoch over 2000 training images (10 per class: the ImageFolder's classes are
    # interleaved), 50 validation images, a narrow network; it checks the pipeline.
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return common.parse_args(
        argv,
        description="Train a CURE multi-norm model and a single-norm baseline on TinyImageNet, "
        "certify both under l∞ and l2, and compare their union accuracy.",
        quick_help="smoke run: 2000 images, 1 epoch",
        data_root_help="folder with train/<wnid>/ and val/<wnid>/ (or with tiny-imagenet-200/ "
        "holding them); default: $CURE_LIRPA_DATA, else the repo's ../shared/data",
        eps_type=radius,
        eps_defaults=(EPS_LINF, EPS_L2),
        extra_threat_help="another threat to certify (e.g. patch:2, rotate:2); repeatable, enters "
        "the union",
        out_help="output folder [runs/examples/tinyimagenet-<mode>]",
    )


def make_configs(args: argparse.Namespace, mode: Mode) -> dict[str, TrainConfig]:
    """TrainConfigs of the baseline and of the CURE model, keyed by their row in the table."""
    return common.make_configs(args, mode, DATASET)


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


def run(args: argparse.Namespace) -> int:
    s = common.prepare(args, MODES, DATASET)
    info = dataset_info(DATASET)
    train_set, val = load_data(args)  # fails early, saying where it looked and what to do
    test = take(val, 0, args.count or s.mode.count)  # classes interleaved (sample_order)
    configs = make_configs(args, s.mode)
    print(f"{s.name} run on {DATASET} ({s.device}); results in {s.out}")

    return common.train_and_compare(
        args, s, DATASET, configs, test, info.in_shape, images="validation"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
