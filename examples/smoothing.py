#!/usr/bin/env python
"""Randomized smoothing for l2 and l1: Gaussian, Uniform and the NU paper's hybrid certificate.

1. Trains a base classifier under Normal-Uniform noise with the similarity regulariser (NU paper,
   ``method='nu-rs'``; :func:`cure_lirpa.smoothing.training.train`).
2. Certifies test images with :class:`~cure_lirpa.smoothing.Smooth` (Cohen et al.'s CERTIFY) under
   Gaussian noise and under Uniform noise, each at failure probability ``alpha``, and with
   :class:`~cure_lirpa.smoothing.HybridSmooth`, which runs both at ``alpha / 2`` and combines them
   by Table 1 of the NU paper (so the hybrid certificate also holds with probability ``1 - alpha``).
3. Prints the hybrid's per-image certificates and, per certifier, certified accuracy at l2 and l1
   radii and the average certified radius (ACR), computed with :mod:`cure_lirpa.smoothing.analysis`.

    python examples/smoothing.py --quick        # 1 epoch on 4000 images, 10 images at n = 1000
    python examples/smoothing.py                # 4 epochs on 4000 images, 100 images at n = 10,000

A certificate is probabilistic: with probability at least ``1 - alpha`` over the noise drawn for
that image, the *smoothed* classifier returns the certified label everywhere in the l2 (l1) ball of
the printed radius. Radii are in [0, 1] pixel units. For whole datasets with resumable output files
use ``cure-lirpa smooth certify`` (:func:`cure_lirpa.smoothing.certify_dataset`): resumable,
shardable run folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from cure_lirpa.cli.common import resolve_device
from cure_lirpa.data import dataset_info, load_dataset
from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint
from cure_lirpa.smoothing import (
    Certificate,
    GaussianNoise,
    HybridSmooth,
    Smooth,
    UniformNoise,
    sample_seed,
)
from cure_lirpa.smoothing.metrics import average_certified_radius, certified_accuracy
from cure_lirpa.smoothing.training import CHECKPOINT, TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported by path
import common  # noqa: E402

RADII = (0.25, 0.5, 0.75, 1.0)
SHOWN = 10  # per-image rows printed


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = common.sample_parser(
        "Train a base classifier under noise and certify it with Gaussian, Uniform and hybrid "
        "randomized smoothing (l2 and l1 radii).",
        quick_help="smoke run: 1 epoch, 10 images, n 1000",
    )
    p.add_argument(
        "--method",
        choices=("gaussian", "uniform", "nu", "nu-rs", "consistency"),
        default="nu-rs",
        help="training noise / loss of the base classifier",
    )
    p.add_argument("--sigma", type=float, default=0.5, help="training and Gaussian sigma")
    p.add_argument(
        "--sigma-uniform",
        type=float,
        default=None,
        help="Uniform certification sigma [1.16 x --sigma, the ratio of the NU paper's Table 8]",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs [1 quick, 4]")
    p.add_argument("--count", type=int, default=None, help="test images [10 quick, 100]")
    p.add_argument("--n0", type=int, default=None, help="selection draws [64 quick, 100]")
    p.add_argument("--n", type=int, default=None, help="estimation draws [1000 quick, 10000]")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--batch-size", type=int, default=1000, help="noisy copies per forward pass")
    p.add_argument(
        "--out", default=None, help="run folder of the training [runs/examples/smoothing-<mode>]"
    )
    common.add_device_args(p)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def summary_table(certs: dict[str, list[Any]], labels: list[int]) -> str:
    """Per certifier: clean accuracy (radius 0), certified accuracy at RADII (l2 and l1), ACR."""
    head = ["certifier", "clean", *(f"l2 {r:g}" for r in RADII), "ACR l2"]
    head += [*(f"l1 {r:g}" for r in RADII), "ACR l1"]
    rows = [head]
    y = np.array(labels)
    for name, cs in certs.items():
        correct = np.array([c.label for c in cs]) == y
        row = [name, f"{100 * correct.mean():.1f}"]
        for norm in ("l2", "l1"):
            radius = np.array([getattr(c, f"radius_{norm}") for c in cs])
            row += [f"{100 * certified_accuracy(radius, correct, r):.1f}" for r in RADII]
            row.append(f"{average_certified_radius(radius, correct):.3f}")
        rows.append(row)
    return _table(rows)


def per_image_table(
    hybrid: list[tuple[Any, Certificate, Certificate]], labels: list[int], count: int
) -> str:
    """The hybrid's own Gaussian and Uniform certificates (each at alpha/2) and Table 1's result."""
    rows = [["image", "label", "G label", "G r_l2", "G r_l1", "U label", "U r_l2", "U r_l1"]]
    rows[0] += ["hybrid label", "hybrid r_l2", "hybrid r_l1", "rule"]
    for i, ((h, g, u), y) in enumerate(zip(hybrid[:count], labels)):
        rows.append(
            [str(i), str(y)]
            + [str(g.label), f"{g.radius_l2:.3f}", f"{g.radius_l1:.3f}"]
            + [str(u.label), f"{u.radius_l2:.3f}", f"{u.radius_l1:.3f}"]
            + [str(h.label), f"{h.radius_l2:.3f}", f"{h.radius_l1:.3f}", h.rule]
        )
    return _table(rows)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    quick = args.quick
    n0, n = args.n0 or (64 if quick else 100), args.n or (1000 if quick else 10_000)
    sigma_u = args.sigma_uniform or 1.16 * args.sigma
    out = Path(args.out or f"runs/examples/smoothing-{'quick' if quick else 'cpu'}")
    info = dataset_info(args.dataset)

    # 1. Train the base classifier (the library's smoothing trainer; a run folder with
    #    config.json, checkpoint.pt and metrics.jsonl).
    config = TrainConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        method=args.method,
        sigma=args.sigma,
        epochs=args.epochs or (1 if quick else 4),
        train_count=4000 if quick else None,
        eval_count=200,
        seed=args.seed,
    )
    print(f"1. training {config.method} (sigma {config.sigma:g}) on {args.dataset} ({device})")
    train(
        config, out, overwrite=True, device=device, progress=False, log=lambda m: print("   " + m)
    )
    model = model_from_checkpoint(load_checkpoint(out / CHECKPOINT)).to(device)

    # 2. Certify: Gaussian alone and Uniform alone at alpha, the hybrid at alpha/2 each.
    test = load_dataset(args.dataset, "test", args.data_root)
    count = min(args.count or (10 if quick else 100), len(test))
    k = info.num_classes
    gaussian = Smooth(model, k, GaussianNoise(args.sigma), device)
    uniform = Smooth(model, k, UniformNoise(sigma_u), device)
    hybrid = HybridSmooth(model, k, args.sigma, sigma_u, device)
    print(
        f"\n2. certifying {count} test images: n0 {n0}, n {n}, alpha {args.alpha:g}; "
        f"Gaussian sigma {args.sigma:g}, Uniform sigma {sigma_u:g}"
    )
    certs: dict[str, list[Any]] = {"gaussian": [], "uniform": [], "hybrid": []}
    hybrid_details = []
    labels = []
    for i in range(count):
        x, y = test[i]
        labels.append(int(y))
        # Seed each image's noise from (seed, image, stream): reproducible, independent streams.
        gaussian.manual_seed(sample_seed(args.seed, i, 0))
        uniform.manual_seed(sample_seed(args.seed, i, 1))
        hybrid.gaussian.manual_seed(sample_seed(args.seed, i, 2))
        hybrid.uniform.manual_seed(sample_seed(args.seed, i, 3))
        certs["gaussian"].append(gaussian.certify(x, n0, n, args.alpha, args.batch_size))
        certs["uniform"].append(uniform.certify(x, n0, n, args.alpha, args.batch_size))
        h, g, u = hybrid.certify(x, n0, n, args.alpha, args.batch_size)  # each at alpha / 2
        certs["hybrid"].append(h)
        hybrid_details.append((h, g, u))

    print(f"\nhybrid certificates of the first {min(count, SHOWN)} images (label -1 = abstain):\n")
    print(per_image_table(hybrid_details, labels, SHOWN))
    print(
        f"3. certified accuracy (%) at l2 and l1 radii, and ACR, on {count} images (abstentions "
        f"count as wrong; each certificate holds with probability >= {1 - args.alpha:g}):\n"
    )
    print(summary_table(certs, labels))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
