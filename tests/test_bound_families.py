"""Every registered bound method against the exact minimum, on models whose normalisation is folded
and on models whose normalisation is not.

Each model is affine on the threat ball (a large first-layer bias keeps every ReLU active), so the
exact minimum of each margin ``a_j^T x + b_j`` over the ball ``||x - x0||_p <= eps`` (inside [0, 1])
is ``a_j^T x0 + b_j - eps * ||a_j||_q`` (q the dual norm), attained at a known point that the test
evaluates to confirm the model is affine there. Every bound must be at most that minimum (1e-4
relative). With the margin then shifted to just below / above ``eps * ||a_j||_q``, no method may
certify a sample the package's own attack breaks, and the attack must break the ones below.

The methods come from :func:`cure_lirpa.bounds.backends.names`: a method registered later is tested here
without anyone adding it. A method that declares it cannot bound a model is skipped with its reason.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import torch
from torch import nn

from cure_lirpa.attacks import pgd
from cure_lirpa.bounds import backends
from cure_lirpa.bounds.classifier import BoundedClassifier
from cure_lirpa.models import Classifier
from cure_lirpa.threats.base import NormBall
from cure_lirpa.verification.runner import certify_batch

SHAPE = (3, 4, 4)
D = math.prod(SHAPE)
K = 3
MEAN, STD = [0.5, 0.4, 0.45], [0.1, 0.2, 0.15]
BIAS = 50.0  # keeps every first-layer ReLU active on the ball


def _mlp(first: list[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        *first, nn.Flatten(), nn.Linear(D, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
        nn.Linear(8, K),
    )  # fmt: skip


def _active(net: nn.Sequential) -> nn.Sequential:
    """Large biases on every hidden layer: the ReLUs stay active on small balls."""
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear) and layer.out_features != K:
                layer.bias.fill_(BIAS)
    return net


def _bn() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        bn.weight.copy_(torch.tensor([1.2, 0.7, -0.9]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    return bn


class NormaliseInForward(nn.Module):
    """A user model that normalises inside its own ``forward``."""

    def __init__(self):
        super().__init__()
        self.net = _active(_mlp([]))
        self.register_buffer("mean", torch.tensor(MEAN).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class RawSkip(nn.Module):
    """Normalised main path plus a linear path from the raw input."""

    def __init__(self):
        super().__init__()
        self.net = _active(_mlp([]))
        self.skip = nn.Linear(D, K)
        self.register_buffer("mean", torch.tensor(MEAN).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std) + self.skip(x.flatten(1))


class ConvFirst(nn.Module):
    """A Conv-first body (the Classifier folds 1/std into the convolution)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.net = _active(
            nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, K))
        )
        with torch.no_grad():
            self.conv.bias.fill_(BIAS)

    def forward(self, x):
        return self.net(self.conv(x))


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "folded-linear": lambda: Classifier(_active(_mlp([])), MEAN, STD),
    "folded-conv": lambda: Classifier(nn.Sequential(*ConvFirst().children()), MEAN, STD),
    "identity-first": lambda: Classifier(_active(_mlp([nn.Identity()])), MEAN, STD),
    "dropout-first": lambda: Classifier(_active(_mlp([nn.Dropout(0.3)])), MEAN, STD),
    "batchnorm-first": lambda: Classifier(_active(_mlp([_bn()])), MEAN, STD),
    "normalise-in-forward": NormaliseInForward,
    "raw-skip": RawSkip,
}
UNFOLDED = {"identity-first", "dropout-first", "batchnorm-first"}
"""Bounded in normalised space: an lp ball maps into the ball of radius eps / min(std) (sound, looser
than exact when the channels' stds differ, as here)."""
THREATS = [NormBall(math.inf, 0.02), NormBall(2.0, 0.3), NormBall(1.0, 0.5)]


def _model(family: str) -> nn.Module:
    torch.manual_seed(sum(map(ord, family)))
    return FAMILIES[family]().eval()


def _exact(model: nn.Module, x0: torch.Tensor, y: int, ball: NormBall):
    """Per margin j != y: the exact minimum over the ball and the point attaining it, (K-1,) and
    (K-1, *SHAPE), assuming the model is affine on the ball (checked by the caller)."""
    return _exact_for(model, x0, y, ball, K)


def _exact_for(model: nn.Module, x0: torch.Tensor, y: int, ball: NormBall, classes: int):
    mins, points = [], []
    for j in (k for k in range(classes) if k != y):
        x = x0.clone().requires_grad_(True)
        out = model(x)
        margin = out[0, y] - out[0, j]
        (a,) = torch.autograd.grad(margin, x)
        a = a[0]
        if ball.p == math.inf:
            step, dual = a.sign() * ball.eps, a.abs().sum()
        elif ball.p == 2.0:
            step, dual = a / a.norm() * ball.eps, a.norm()
        else:
            flat = torch.zeros_like(a).flatten()
            i = int(a.abs().flatten().argmax())
            flat[i] = a.flatten()[i].sign() * ball.eps
            step, dual = flat.view_as(a), a.abs().max()
        mins.append(float(margin.detach()) - ball.eps * float(dual))
        points.append(x0[0] - step)
    return torch.tensor(mins, dtype=torch.float64), torch.stack(points)


def _margins(model: nn.Module, points: torch.Tensor, y: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(points).double()
    others = [k for k in range(K) if k != y]
    return torch.stack([out[i, y] - out[i, j] for i, j in enumerate(others)])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_is_below_the_exact_minimum(family: str):
    model = _model(family)
    bc = BoundedClassifier(model, SHAPE, alpha_iterations=5)
    x0 = torch.full((1, *SHAPE), 0.5)
    y = int(model(x0).argmax(1))
    checked = 0
    for ball in THREATS:
        exact, worst = _exact(model, x0, y, ball)
        assert ball.contains(worst, x0.expand_as(worst)).all()
        # the model is affine on the ball: the predicted minimiser attains the predicted minimum
        assert torch.allclose(_margins(model, worst, y), exact, rtol=1e-5, atol=1e-4)
        for method in backends.names():
            if bc.supports(method, ball) is not None:
                continue
            lb = bc.margin_lower_bounds(x0, torch.tensor([y]), ball, method)[0].double()
            slack = 1e-4 * (1 + exact.abs())
            assert (lb <= exact + slack).all(), (family, ball.name, method, lb, exact)
            checked += 1
    assert checked >= 4 * len(THREATS)  # at least the four auto_LiRPA methods ran everywhere


def _shifted(model: nn.Module, x0: torch.Tensor, y: int, ball: NormBall, factor: float):
    """A copy of ``model`` whose logits are shifted so that every margin at x0 equals ``factor``
    times the margin's drop over the ball (factor < 1: the exact minimum is negative)."""
    exact, _ = _exact(model, x0, y, ball)
    margins = _margins(model, x0.expand(K - 1, *SHAPE), y)
    drop = margins - exact
    shift = torch.zeros(K)
    for i, j in enumerate(k for k in range(K) if k != y):
        shift[j] = float(margins[i] - factor * drop[i])

    shifted = copy.deepcopy(model)
    head = [m for m in shifted.modules() if isinstance(m, nn.Linear) and m.out_features == K][-1]
    with torch.no_grad():
        head.bias.add_(shift)
    return shifted.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("factor", [0.97, 1.03])
def test_no_certificate_the_attack_breaks(family: str, factor: float):
    """Margins 3% short of (or 3% beyond) their drop over the ball: every method and the cascade,
    through the certification loop, against the package's PGD on the same threat."""
    base = _model(family)
    x0 = torch.full((1, *SHAPE), 0.5)
    y = int(base(x0).argmax(1))
    methods = [*backends.names(), "auto"]
    for ball in THREATS:
        model = _shifted(base, x0, y, ball, factor)
        bc = BoundedClassifier(model, SHAPE, alpha_iterations=5)
        usable = [m for m in methods if m == "auto" or bc.supports(m, ball) is None]
        (row,) = certify_batch(bc, model, x0, torch.tensor([y]), [ball], usable, attack_steps=50)
        assert row.violations == [], (family, ball.name, row.certified)
        x_adv = pgd(model, x0, torch.tensor([y]), ball, steps=100, restarts=3)
        broken = bool(model(x_adv).argmax(1) != y)
        if factor < 1:
            assert broken, (family, ball.name)  # the exact minimum is negative: PGD must find it
            assert not row.best(ball.name), (family, ball.name, row.certified[ball.name])
        else:
            assert not broken
            if family not in UNFOLDED:  # CROWN is exact on a net affine on the ball
                assert row.certified[ball.name]["crown"], (family, ball.name, row.margins)


def test_sdp_crown_on_an_unfolded_classifier_regression():
    """The case that certified wrongly when sdp-crown mapped the threat itself (raw radius on a
    model bounded in normalised space): every bound now at most the exact minimum."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        body[2].bias.fill_(50.0)
    model = Classifier(body, [0.5], [0.1]).eval()
    x = torch.full((1, 1, 4, 4), 0.5)
    y = int(model(x).argmax(1))
    bc = BoundedClassifier(model, (1, 4, 4))
    for eps in (0.1, 0.3):
        ball = NormBall(2.0, eps)
        exact, _ = _exact_for(model, x, y, ball, classes=2)
        lb = bc.margin_lower_bounds(x, torch.tensor([y]), ball, "sdp-crown")[0].double()
        assert (lb <= exact + 1e-4 * (1 + exact.abs())).all(), (eps, lb, exact)
        assert (lb >= exact - 1e-3 * exact.abs()).all()  # and still tight (the net is affine)
