#!/usr/bin/env python
"""MNIST: a CURE multi-norm model against a single-norm baseline, certified under l∞ and l2.

Trains two models with the library's trainer (:func:`cure_lirpa.training.certified.train`), certifies both on
the same test images with :func:`cure_lirpa.verification.runner.certify_dataset` and prints clean accuracy,
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
import sys
from pathlib import Path
from typing import Optional, Sequence

from torch.utils.data import Dataset

from cure_lirpa.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported by path
import common  # noqa: E402

EPS_LINF, EPS_L2 = 0.1, 0.5  # the CURE paper's first MNIST pair (the other one: 0.3 / 1.0)

MODES = common.modes(
    # Smoke run: one epoch over 4000 images, 50 test images; checks the pipeline, numbers are noisy.
    quick=dict(train_count=4000),
    # A CPU-sized run: whole training set, 1 warm-up epoch, eps ramp over 3 epochs,
    # Adam 5e-4, batch 256, CURE's l2 trained at 1.5x the evaluation radius; 1000 test images.
    cpu=dict(epochs=6, ramp_epochs=3.0, batch_size=256, lr=5e-4, l2_factor=1.5),
    # GPU scale (CURE paper): CNN7 with BatchNorm, the schedule of the cure-scratch preset (70 epochs,
    # ramp 2 -> 22, lr x0.2 at 50 and 60, batch 256, Adam 5e-4); the first 1000 test images
    # certified with the cascade IBP -> CROWN-IBP -> CROWN -> alpha-CROWN.
)


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        choices=("mnist", "sample"),
        default="mnist",
        help="'mnist': torchvision layout DATA_ROOT/MNIST/raw; 'sample': the built-in "
        "4000/1000 real-MNIST sample",
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    data_root_help = "folder holding MNIST/raw"
    out_name = "<dataset>"  # mnist or sample
    eps = (EPS_LINF, EPS_L2)
    return common.parse_args(
        argv, "MNIST", MODES, eps, data_root_help, "l1:1, patch:2", out_name, add_dataset_args
    )


def load_test(args: argparse.Namespace) -> Dataset:
    """The test split; its first images are certified (the CURE paper's protocol)."""
    return load_dataset(args.dataset, "test", args.data_root)


def run(args: argparse.Namespace) -> int:
    return common.run_example(args, MODES, args.dataset, load_test)


def hint(exc: Exception) -> str:
    return " Or use the built-in sample: --dataset sample." if "MNIST not found" in str(exc) else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_main(run, parse_args(argv), hint)


if __name__ == "__main__":
    sys.exit(main())
