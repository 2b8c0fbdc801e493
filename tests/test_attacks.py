"""PGD attacks: threat-set containment, analytic success on linear models, training boxes, side effects."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cure_lirpa.attacks import (
    l2_defence_box,
    l2_defence_point,
    margin_loss,
    pgd,
    random_delta,
    robust_accuracy,
    sabr_box,
    step_schedule,
)
from cure_lirpa.errors import UserError
from cure_lirpa.threats.base import NormBall

SHAPE = (1, 6, 6)


def tiny_net(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def corner_inputs(n: int, seed: int = 0) -> torch.Tensor:
    """Random images with many pixels exactly at / near 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    u = torch.rand(n, *SHAPE, generator=g)
    x = torch.where(u < 0.25, torch.zeros_like(x), x)
    x = torch.where(u > 0.75, torch.ones_like(x), x)
    x = torch.where((u > 0.6) & (u <= 0.75), 1 - 1e-4 * x, x)
    x = torch.where((u > 0.25) & (u <= 0.4), 1e-4 * x, x)
    return x


THREATS = [
    NormBall(math.inf, 0.1),
    NormBall(math.inf, 0.6),
    NormBall(2.0, 0.5),
    NormBall(2.0, 4.0),
    NormBall(1.0, 1.0),
    NormBall(1.0, 8.0),
]


@pytest.mark.parametrize("threat", THREATS, ids=str)
def test_pgd_outputs_inside_threat_set(threat):
    model = tiny_net()
    x = corner_inputs(24)
    y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x_adv = pgd(model, x, y, threat, steps=10, restarts=2, generator=g)
    assert x_adv.shape == x.shape
    assert threat.contains(x_adv, x).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    ok = robust_accuracy(model, x, y, threat, steps=5, restarts=1, generator=g)
    assert ok.dtype == torch.bool and ok.shape == (24,)


@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
def test_random_delta_inside_ball(p):
    like = torch.zeros(200, *SHAPE)
    d = random_delta(p, 0.7, like, torch.Generator().manual_seed(0))
    norms = d.flatten(1).norm(p=p, dim=1)
    assert (norms <= 0.7 * (1 + 1e-5)).all() and (norms > 0).all()


def linear_binary(w: torch.Tensor, b: float) -> nn.Module:
    """logits = [z, -z] with z = w.x + b: class 0 iff z > 0."""
    lin = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([w, -w]))
        lin.bias.copy_(torch.tensor([b, -b]))
    return nn.Sequential(nn.Flatten(), lin)


@pytest.mark.parametrize("p,q", [(math.inf, 1.0), (2.0, 2.0), (1.0, math.inf)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pgd_matches_analytic_distance_on_linear_model(p, q, seed):
    # distance of x to the hyperplane z = 0 in lp is z / ||w||_q (q the dual norm); the points are
    # chosen so that the optimal perturbation at 1.1x that distance stays inside [0, 1].
    g = torch.Generator().manual_seed(seed)
    d = 16
    w = torch.randn(d, generator=g)
    x = 0.35 + 0.3 * torch.rand(4, 1, 4, 4, generator=g)
    z0 = x.flatten(1) @ w
    target = 0.2 * w.abs().max()  # z = 0.2 max|w|: l1 distance 0.2, all others smaller
    model = linear_binary(w, float(target - z0[0]))
    x = x[:1]
    y = torch.zeros(1, dtype=torch.long)
    dist = float(target / w.norm(p=q))
    for factor, expect_robust in ((1.1, False), (0.9, True)):
        threat = NormBall(p, factor * dist)
        x_adv = pgd(model, x, y, threat, steps=50, restarts=2, generator=g)
        assert threat.contains(x_adv, x).all()
        robust = bool(model(x_adv).argmax(1).item() == 0)
        assert robust == expect_robust, (factor, dist)


def test_pgd_does_not_touch_model_state():
    model = tiny_net(bn=True)
    model.train()
    model[-1].eval()  # a module with its own mode must keep it
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = corner_inputs(8)
    y = torch.zeros(8, dtype=torch.long)
    for threat in (NormBall(math.inf, 0.1), NormBall(2.0, 0.5), NormBall(1.0, 1.0)):
        pgd(model, x, y, threat, steps=3, restarts=1)
    sabr_box(model, x, y, 0.1, 0.04)
    l2_defence_box(model, x, y, 0.5, 0.1)
    assert model.training and model[0].training and not model[-1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_pgd_inside_no_grad_and_errors():
    model = tiny_net()
    x = corner_inputs(4)
    y = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        x_adv = pgd(model, x, y, NormBall(2.0, 0.5), steps=3, restarts=1)
    assert NormBall(2.0, 0.5).contains(x_adv, x).all()
    with pytest.raises(UserError):
        pgd(model, x * 2 + 1, y, NormBall(2.0, 0.5))
    with pytest.raises(UserError):
        pgd(model, x, y, NormBall(2.0, 0.5), loss="hinge")
    with pytest.raises(UserError):
        sabr_box(model, x, y, 0.1, 0.2)
    assert torch.equal(pgd(model, x, y, NormBall(1.0, 0.0)), x)


def test_margin_loss():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([-1.0, 3.0]))


def test_sabr_box_inside_linf_threat_set():
    model = tiny_net()
    x = corner_inputs(64, seed=3)
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    for eps, lam in ((0.1, 0.4), (0.3, 0.6), (8 / 255, 0.7), (0.5, 1.0), (0.2, 0.0)):
        tau = lam * eps
        x_l, x_u = sabr_box(model, x, y, eps, tau, generator=g)
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        assert (x_l >= lo).all() and (x_u <= hi).all() and (x_l <= x_u).all()
        assert ((x_u - x_l) <= 2 * tau + 1e-6).all()
        # full width wherever the clipped threat set allows it (pixels at 0 or 1 included)
        roomy = (hi - lo) >= 2 * tau
        assert torch.allclose((x_u - x_l)[roomy], torch.full_like(x_u[roomy], 2 * tau), atol=1e-6)
        if lam == 1.0:  # the box is the whole threat set
            assert torch.allclose(x_l, lo) and torch.allclose(x_u, hi)


def test_step_schedule():
    assert step_schedule(0.2, 8) == pytest.approx([0.2] * 4 + [0.02] * 2 + [0.002, 0.0002])


@pytest.mark.parametrize("eps,lam", [(0.5, 1e-5), (1.0, 0.3), (3.0, 0.1)])
def test_l2_defence_iterates_stay_in_ball(eps, lam):
    model = tiny_net(seed=1)
    x = corner_inputs(64, seed=6)
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(7))
    tau = lam * eps
    seen = []

    def record(i, x_adv):
        seen.append(x_adv)

    point = l2_defence_point(
        model, x, y, eps, tau, generator=torch.Generator().manual_seed(8), callback=record
    )
    assert len(seen) == 9
    for it in seen + [point]:
        assert (it >= 0).all() and (it <= 1).all()
        assert ((it - x).flatten(1).norm(dim=1) <= (eps - tau) * (1 + 1e-5)).all()
    # the attack moves the point (non-trivial) and the box is the l∞ tau-box around it in [0, 1]
    assert (point - x).flatten(1).norm(dim=1).max() > 0.1 * (eps - tau)
    x_l, x_u = l2_defence_box(model, x, y, eps, tau, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(x_l, (point - tau).clamp(0, 1)) and torch.allclose(
        x_u, (point + tau).clamp(0, 1)
    )


def test_l2_defence_increases_loss():
    model = tiny_net(seed=2)
    x = corner_inputs(32, seed=9)
    with torch.no_grad():
        y = model(x).argmax(1)
    point = l2_defence_point(model, x, y, 1.0, 1e-5, random_start=False)
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model(point), y) > ce(model(x), y)
    assert torch.equal(l2_defence_point(model, x, y, 0.5, 0.5), x)


class _Pixel(nn.Module):
    """Two classes decided by one pixel: class 1 iff x[row, col] > 0.5 (margin 4 |x - 0.5|)."""

    def __init__(self, row: int, col: int):
        super().__init__()
        self.row, self.col = row, col

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0, self.row, self.col] - 0.5
        return torch.stack([-2 * v, 2 * v], 1)


def test_family_attack_finds_the_patch_and_the_rotation_that_flip_a_pixel():
    """A patch over the deciding pixel and a rotation that moves a bright dot off it break the
    sample; a threat that leaves the pixel alone does not (no false alarms)."""
    from cure_lirpa.attacks import family_attack
    from cure_lirpa.threats.base import parse_threat

    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 4:7, 13:16] = 1.0  # a bright dot near the top, centred on column 14
    y = torch.tensor([1])
    model = _Pixel(5, 14)
    assert model(x).argmax(1).item() == 1
    shape = (1, 28, 28)
    for text, broken in (("patch:2", True), ("rotate:30", True), ("rotate:1", False)):
        robust = family_attack(model, x, y, parse_threat(text), shape)
        assert robust is not None and bool(robust[0]) is not broken, text
