"""Soundness and exactness of margin bounds (cure_lirpa.bounds.classifier).

* bounds contain the margins of many points sampled in each ball (boundary included) and of PGD points,
  for every method and norm, on an MLP, a CNN and a CNN with BatchNorm, with and without normalisation;
* on a linear classifier every method must return the analytic minimum margin (an independent reference
  that catches a wrong eps scaling, e.g. the l2 normalisation trap);
* IBP equals an independent interval propagation written in plain torch to 1e-5;
* a model whose normalisation would drop the l2 perturbation is refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cure_lirpa.attacks import pgd
from cure_lirpa.bounds.classifier import BoundedClassifier, margin_matrix
from cure_lirpa.errors import UserError
from cure_lirpa.models import Classifier, Normalize
from cure_lirpa.threats.base import NormBall

IN_SHAPE = (2, 8, 8)
K = 5
MEAN, STD = (0.45, 0.5), (0.22, 0.3)  # two channels with different std: the hard case


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, K)
    )


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 20),
        nn.ReLU(),
        nn.Linear(20, K),
    )


def _cnn_bn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 4, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 20),
        nn.BatchNorm1d(20),
        nn.ReLU(),
        nn.Linear(20, K),
    )


def _make(kind: str, normalised: bool) -> nn.Module:
    torch.manual_seed({"mlp": 0, "cnn": 1, "cnn_bn": 2}[kind])
    body = {"mlp": _mlp, "cnn": _cnn, "cnn_bn": _cnn_bn}[kind]()
    model = Classifier(body, MEAN, STD) if normalised else body
    if kind == "cnn_bn":  # give BatchNorm non-trivial statistics
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(32, *IN_SHAPE))
    return model.eval()


def _sample_ball(x: torch.Tensor, threat: NormBall, n: int, gen: torch.Generator) -> torch.Tensor:
    """n points per sample in the threat set, most of them on the sphere / at corners."""
    b = x.shape[0]
    shape = (n, b, *x.shape[1:])
    if threat.p == math.inf:
        delta = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        delta[: n // 4] = torch.rand(shape, generator=gen)[: n // 4] * 2 - 1
        delta = delta * threat.eps
    elif threat.p == 2.0:
        delta = torch.randn(shape, generator=gen)
        delta = delta / delta.flatten(2).norm(dim=2).view(n, b, 1, 1, 1) * threat.eps
    else:  # l1: sparse points on the sphere (vertices and random faces)
        delta = torch.zeros(shape).flatten(2)
        idx = torch.randint(0, delta.shape[2], (n, b, 3), generator=gen)
        w = torch.rand(n, b, 3, generator=gen)
        w[: n // 2, :, 1:] = 0
        w = w / w.sum(-1, keepdim=True) * threat.eps
        sign = torch.randint(0, 2, (n, b, 3), generator=gen).float() * 2 - 1
        delta.scatter_add_(2, idx, w * sign)
        delta = delta.view(shape)
    return (x.unsqueeze(0) + delta).clamp(0, 1)  # clipping keeps points inside the set


def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(x)
    return torch.einsum("bjk,bk->bj", margin_matrix(y, K), logits)


THREATS = [NormBall(math.inf, 0.03), NormBall(2.0, 0.3), NormBall(1.0, 0.8)]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn_bn"])
@pytest.mark.parametrize("normalised", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
def test_bounds_contain_sampled_and_attacked_margins(kind, normalised, trainable):
    model = _make(kind, normalised)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, *IN_SHAPE, generator=gen)
    y = torch.tensor([0, 1, 2, 3])
    bc = BoundedClassifier(model, IN_SHAPE, trainable=trainable).train(False)
    methods = ["ibp", "crown-ibp", "crown"] + ([] if trainable else ["alpha-crown"])
    for threat in THREATS:
        pts = _sample_ball(x, threat, 64, gen)
        assert bool(threat.contains(pts.flatten(0, 1), x.repeat(64, 1, 1, 1)).all())
        sampled = _margins(model, pts.flatten(0, 1), y.repeat(64)).view(64, 4, K - 1).min(0).values
        x_adv = pgd(model, x, (y + 1) % K, threat, steps=20, restarts=1)  # push towards y+1
        sampled = torch.minimum(sampled, _margins(model, x_adv, y))
        crown = None
        for method in methods:
            with torch.no_grad():
                lb = bc.margin_lower_bounds(x, y, threat, method)
            assert lb.shape == (4, K - 1)
            assert torch.all(lb <= sampled + 1e-4), (kind, threat.name, method)
            if method == "crown":
                crown = lb
            if method == "alpha-crown":
                assert torch.all(lb >= crown - 1e-4)  # alpha-CROWN starts from CROWN


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.name)
@pytest.mark.parametrize("trainable", [False, True])
def test_linear_classifier_bounds_are_exact(threat, trainable):
    """For an affine classifier the minimum margin over an lp ball (away from the [0,1] border) is
    c.f(x) - eps * ||c W diag(1/std)||_q, q the dual norm; every method must return it."""
    torch.manual_seed(3)
    lin = nn.Linear(128, K)
    std1 = (0.3, 0.3)  # one std: normalised-space bounds are exact too
    for std in (STD,) if not trainable else (std1,):
        model = Classifier(nn.Sequential(nn.Flatten(), lin), MEAN, std).eval()
        x = 0.4 + 0.2 * torch.rand(3, *IN_SHAPE)  # far enough from 0 and 1
        y = torch.tensor([0, 2, 4])
        C = margin_matrix(y, K)
        inv = (1 / torch.tensor(std)).repeat_interleave(64)
        cw = torch.einsum("bjk,kd->bjd", C, lin.weight * inv)
        q = {math.inf: 1.0, 2.0: 2.0, 1.0: math.inf}[threat.p]
        exact = _margins(model, x, y) - threat.eps * cw.norm(p=q, dim=2)
        bc = BoundedClassifier(model, IN_SHAPE, trainable=trainable)
        for method in ("ibp", "crown-ibp", "crown"):
            lb = bc.margin_lower_bounds(x, y, threat, method).detach()
            torch.testing.assert_close(lb, exact, atol=1e-4, rtol=1e-4)


def _reference_ibp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: NormBall):
    """Interval bound propagation in plain torch (center/radius form), independent of auto_LiRPA.

    l∞: the clipped box. lp: the first affine layer maps the ball to an interval with radius
    eps * ||row||_q (dual norm). The last linear layer is merged with the margin matrix.
    """
    layers = list(model.children())
    if isinstance(model, Classifier):
        layers = [model.normalize, *model.body.children()]
    lo, hi = None, None
    center = x
    pending_ball = threat.p != math.inf
    if not pending_ball:
        lo, hi = (x - threat.eps).clamp(0, 1), (x + threat.eps).clamp(0, 1)
    scale = torch.ones(1, x.shape[1], 1, 1)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        if isinstance(layer, Normalize):
            if pending_ball:
                center, scale = layer(center), 1 / layer.std.view(1, -1, 1, 1)
            else:
                lo, hi = layer(lo), layer(hi)
            continue
        if isinstance(layer, nn.Flatten):
            if pending_ball:
                center, scale = layer(center), layer(scale.expand_as(center))[:1]
            else:
                lo, hi = layer(lo), layer(hi)
            continue
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            w = layer.weight
            if last:
                w = torch.einsum("bjk,kd->bjd", margin_matrix(y, K), w)
                b = torch.einsum("bjk,k->bj", margin_matrix(y, K), layer.bias)
                c, r = (lo + hi) / 2, (hi - lo) / 2
                return torch.einsum("bjd,bd->bj", w, c) + b - torch.einsum("bjd,bd->bj", w.abs(), r)
            if pending_ball:
                q = {2.0: 2.0, 1.0: math.inf}[threat.p]
                if isinstance(layer, nn.Linear):
                    ws = w * scale.view(1, -1)
                    rad = threat.eps * ws.norm(p=q, dim=1)
                    c = nn.functional.linear(center, w, layer.bias)
                    lo, hi = c - rad, c + rad
                else:
                    ws = w * scale.view(1, -1, 1, 1)
                    rad = threat.eps * ws.flatten(1).norm(p=q, dim=1).view(1, -1, 1, 1)
                    c = layer(center)
                    lo, hi = c - rad, c + rad
                pending_ball = False
                continue
            c, r = (lo + hi) / 2, (hi - lo) / 2
            if isinstance(layer, nn.Linear):
                c, r = layer(c), r @ w.abs().t()
            else:
                c = layer(c)
                r = nn.functional.conv2d(r, w.abs(), None, layer.stride, layer.padding)
            lo, hi = c - r, c + r
        elif isinstance(layer, nn.ReLU):
            lo, hi = lo.clamp_min(0), hi.clamp_min(0)
        else:
            raise AssertionError(f"reference IBP does not handle {layer}")
    raise AssertionError("no final linear layer")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("normalised", [False, True])
@pytest.mark.parametrize("threat", THREATS[:2], ids=lambda t: t.name)
def test_ibp_equals_independent_reference(kind, normalised, threat):
    model = _make(kind, normalised)
    x = torch.rand(4, *IN_SHAPE, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([4, 3, 2, 1])
    lb = BoundedClassifier(model, IN_SHAPE).margin_lower_bounds(x, y, threat, "ibp")
    with torch.no_grad():
        ref = _reference_ibp(model, x, y, threat)
    torch.testing.assert_close(lb, ref, atol=1e-5, rtol=1e-5)


class _RawNormalised(nn.Module):
    """A user model that normalises inside forward (not a cure_lirpa Classifier)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, -1, 1, 1))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, K))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def test_normalisation_trap_is_refused_or_sound():
    """auto_LiRPA drops an l2 ball behind (x - mean) / std; we must never return such a bound."""
    torch.manual_seed(0)
    model = _RawNormalised().eval()
    x = torch.rand(2, *IN_SHAPE)
    y = torch.tensor([0, 1])
    bc = BoundedClassifier(model, IN_SHAPE)
    threat = NormBall(2.0, 0.5)
    try:
        lb = bc.margin_lower_bounds(x, y, threat, "ibp")
    except UserError as exc:
        assert "zero width" in str(exc)
        return
    pts = _sample_ball(x, threat, 256, torch.Generator().manual_seed(0))
    sampled = _margins(model, pts.flatten(0, 1), y.repeat(256)).view(256, 2, K - 1).min(0).values
    assert torch.all(lb <= sampled + 1e-4)


def test_chunking_gives_the_same_bounds():
    model = _make("cnn", True)
    x = torch.rand(7, *IN_SHAPE, generator=torch.Generator().manual_seed(2))
    y = torch.arange(7) % K
    big = BoundedClassifier(model, IN_SHAPE, memory_mb=4096)
    small = BoundedClassifier(model, IN_SHAPE, memory_mb=64)
    small.bytes_per_sample = lambda method: 2**20 * 30  # force chunks of 2 samples
    assert small.chunk_size("crown") == 2
    for threat in THREATS[:2]:
        torch.testing.assert_close(
            big.margin_lower_bounds(x, y, threat, "crown"),
            small.margin_lower_bounds(x, y, threat, "crown"),
        )


def test_trainable_bounds_give_gradients_to_model_parameters():
    model = _make("cnn", True).train()
    bc = BoundedClassifier(model, IN_SHAPE, trainable=True)
    x, y = torch.rand(4, *IN_SHAPE), torch.tensor([0, 1, 2, 3])
    lb = bc.margin_lower_bounds(x, y, NormBall(2.0, 0.3), "ibp")
    lb.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bad_input_shape_is_a_user_error():
    bc = BoundedClassifier(_make("mlp", True), IN_SHAPE)
    with pytest.raises(UserError, match="does not match"):
        bc.margin_lower_bounds(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), THREATS[0], "ibp")
    with pytest.raises(UserError, match="unknown bound method"):
        bc.margin_lower_bounds(torch.rand(2, *IN_SHAPE), torch.tensor([0, 1]), THREATS[0], "lp")
