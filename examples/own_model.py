#!/usr/bin/env python
"""Your own ``nn.Module``: wrap it, bound its margins and certify it under two norms at once.

The core is :func:`certify_by_hand` (about a dozen lines): wrap the model as a
:class:`~cure_lirpa.bounds.classifier.BoundedClassifier`, ask for lower bounds on the K-1 margins
``f_y - f_j`` under each threat, and call a sample certified when all of them are positive; the
union is the samples certified under every threat. :func:`cure_lirpa.verification.runner.certify_dataset`
does the same over a dataset, for several bound methods, with a PGD cross-check.

The script first trains the model for a short while so that there is something to certify (a plain
loop: natural cross-entropy plus the certified loss of both norms from the library's bounds), then
certifies it both ways and finally shows the l2 normalisation trap: the same network with its
normalisation written inline, where auto_LiRPA would drop an l2 ball, is detected and bounded soundly
(an identity layer in front: CROWN as tight as for the folded model, IBP with the enclosing box).

    python examples/own_model.py --quick        # 1 epoch on 4000 images of the built-in sample
    python examples/own_model.py                # 3 epochs, 200 test images
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cure_lirpa.bounds.classifier import BoundedClassifier, certified
from cure_lirpa.cli.common import resolve_device
from cure_lirpa.data import load_dataset, stack, take
from cure_lirpa.models import Classifier
from cure_lirpa.threats.base import NormBall, Threat, parse_threat
from cure_lirpa.training.losses import certified_ce
from cure_lirpa.verification.results import markdown_table
from cure_lirpa.verification.runner import certify_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported by path
import common  # noqa: E402

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class SmallNet(nn.Module):
    """A user's network: two convolutions and two linear layers, written as a plain Module."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 4, stride=2)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(32 * 5 * 5, 100)
        self.fc2 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()  # a module (not F.relu): the memory model counts nn.ReLU outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


class InlineNormalised(nn.Module):
    """The same network normalising its input inline -- the form auto_LiRPA gets wrong for l2."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - MNIST_MEAN[0]) / MNIST_STD[0])


# ------------------------------------------------------------------------------------------------
# The core: wrap, bound, certify under several threats, union.


def certify_by_hand(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threats: Sequence[Threat], method: str
) -> dict[str, torch.Tensor]:
    """Boolean (B,) certified masks per threat name, and their intersection under ``'union'``."""
    bc = BoundedClassifier(model, in_shape=x.shape[1:])  # an auto_LiRPA BoundedModule inside
    masks = {}
    for threat in threats:
        lb = bc.margin_lower_bounds(x, y, threat, method)  # (B, K-1): lb <= f_y - f_j on the set
        masks[threat.name] = certified(lb)  # every margin > 0 (implies x itself is correct)
    masks["union"] = torch.stack(list(masks.values())).all(0)
    return masks


# ------------------------------------------------------------------------------------------------
# Training, so that something certifies: natural loss + the certified loss of both norms (IBP).


def train_briefly(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threats: Sequence[NormBall],
    epochs: int,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
) -> None:
    """Adam on ``0.5 CE + 0.5 mean_p certified_ce(lb_p)`` with IBP bounds ``lb_p``; natural training
    for the first 40% of the first epoch, then the radii ramp linearly to their values by 90%."""
    bc = BoundedClassifier(model, x.shape[1:], device=device, trainable=True).train(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = math.ceil(len(x) / batch_size)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            frac = min(1.0, max(0.0, ((epoch * steps + i) / steps - 0.4) / 0.5))
            loss = F.cross_entropy(model(xb), yb)
            if frac > 0:
                robust = [
                    certified_ce(bc.margin_lower_bounds(xb, yb, t.scaled(frac * t.eps), "ibp"))
                    for t in threats
                ]
                loss = 0.5 * loss + 0.5 * torch.stack(robust).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
        print(f"   epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = common.sample_parser(
        "Certify your own nn.Module under l∞ and l2 with cure_lirpa's Python API.",
        quick_help="smoke run: 1 epoch, 20 test images",
    )
    p.add_argument(
        "--threat",
        action="append",
        default=None,
        help="threat to certify (repeatable) [linf:0.1 and l2:0.5]",
    )
    p.add_argument("--method", default="crown", help="bound method of the by-hand certificate")
    p.add_argument("--count", type=int, default=None, help="test images [20 quick, 200]")
    common.add_device_args(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    threats = [parse_threat(t) for t in (args.threat or ["linf:0.1", "l2:0.5"])]
    balls = [t for t in threats if isinstance(t, NormBall)]
    x_train, y_train = stack(take(load_dataset(args.dataset, "train", args.data_root), 0, 4000))
    test = take(
        load_dataset(args.dataset, "test", args.data_root),
        0,
        args.count or (20 if args.quick else 200),
    )
    x, y = stack(test)

    torch.manual_seed(0)
    # The normalisation goes into a Classifier, which BoundedClassifier recognises and folds into
    # the first convolution; SmallNet itself sees normalised inputs.
    model = Classifier(SmallNet(), mean=MNIST_MEAN, std=MNIST_STD).to(device)
    print(f"1. training SmallNet on {len(x_train)} images of {args.dataset} ({device})")
    train_briefly(model, x_train, y_train, balls, epochs=1 if args.quick else 3, device=device)
    model.eval()

    print(f"\n2. certifying {len(x)} test images by hand with {args.method}")
    with torch.no_grad():
        masks = certify_by_hand(model, x.to(device), y.to(device), threats, args.method)
        clean = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
    print(f"   clean accuracy {100 * clean:.1f}%")
    for name, mask in masks.items():
        print(f"   {name:>10}: {100 * mask.float().mean().item():5.1f}% certified")

    methods = list(dict.fromkeys(["ibp", "crown-ibp", args.method]))
    print(f"\n3. the same with certify_dataset ({', '.join(methods)}, PGD cross-check):\n")
    rows, summary = certify_dataset(
        model, test, threats, methods, in_shape=x.shape[1:], device=device, attack_steps=20
    )
    print(markdown_table(summary, methods))
    by_hand = 100 * masks["union"].float().mean().item()
    n_dataset = round(summary["union"][args.method] * len(x))  # a fraction of the images
    same = "agree" if int(masks["union"].sum()) == n_dataset else "DISAGREE"
    print(
        f"   union with {args.method}: by hand {by_hand:.1f}%, certify_dataset "
        f"{100 * summary['union'][args.method]:.1f}% ({same})\n"
    )

    print("4. the l2 normalisation trap: the same network normalising inline")
    inline = InlineNormalised(model.body)
    ball = NormBall(2.0, 0.5)
    bc_inline = BoundedClassifier(inline, x.shape[1:], device=device)
    bc_folded = BoundedClassifier(model, x.shape[1:], device=device)
    print(f"   nodes that would drop the l2 ball: {', '.join(bc_inline.lp_droppers)}")
    for method in ("ibp", "crown"):
        a = bc_inline.margin_lower_bounds(x[:8], y[:8], ball, method).min(1).values.mean()
        b = bc_folded.margin_lower_bounds(x[:8], y[:8], ball, method).min(1).values.mean()
        print(f"   {method}: mean margin bound inline {float(a):.3f}, folded {float(b):.3f}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
