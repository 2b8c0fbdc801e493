"""The cascade (``--method auto``) on a model some stages cannot bound, its stages per norm, and its
per-sample time budget."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cure_lirpa.attacks import pgd
from cure_lirpa.bounds import backends
from cure_lirpa.bounds.classifier import BoundedClassifier, margin_matrix
from cure_lirpa.threats.base import NormBall, parse_threat
from cure_lirpa.verification.cascade import TIMEOUT, cascade_for
from cure_lirpa.verification.results import summarize
from cure_lirpa.verification.runner import certify_batch

SHAPE = (1, 8, 8)
K = 4


class _Block(nn.Module):
    """A residual block a user would write."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.relu(self.fc(h))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.block = _Block(32)
        self.out = nn.Linear(32, K)

    def forward(self, x):
        return self.out(self.block(torch.relu(self.inp(x.flatten(1)))))


def _data(model: nn.Module, n: int = 6):
    gen = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(n, *SHAPE, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


@pytest.fixture
def residual():
    torch.manual_seed(3)
    return Residual().eval()


@pytest.mark.parametrize("threat", ["l2:0.5", "linf:0.02", "l1:2.0"])
def test_auto_finishes_when_a_stage_refuses_the_model(residual, threat, monkeypatch):
    """A stage whose backend declares it cannot bound the model is skipped and recorded, with its
    reason, for the samples still open when it came up; the other stages still certify."""
    reason = "refuses this model (a stand-in for a backend that lacks one of its layers)"
    monkeypatch.setattr(type(backends.get("sdp-crown")), "supports", lambda self, bc, t: reason)
    ball = parse_threat(threat)
    bc = BoundedClassifier(residual, SHAPE)
    x, y = _data(residual)
    rows = certify_batch(bc, residual, x, y, [ball], ["crown", "auto"])
    summary = summarize(rows, [ball], ["crown", "auto"])
    for r in rows:
        assert r.certified[ball.name]["auto"] >= r.certified[ball.name]["crown"]
    skipped = summary["cascade"][ball.name]["skipped"]
    if ball.p == math.inf:  # no sdp-crown stage under l∞
        assert "sdp-crown" not in cascade_for(ball) and skipped == {}
        return
    reached = [r for r in rows if r.decided_by[ball.name] == "alpha-crown"]
    assert reached, "the test needs samples that reach the last stages"
    for r in rows:
        assert ("sdp-crown" in r.skipped.get(ball.name, {})) == (r in reached)
    assert skipped["sdp-crown"] == {"samples": len(reached), "reason": reason}


@pytest.mark.parametrize("threat", ["l2:0.5", "l1:1.0"])
def test_sdp_crown_bounds_a_residual_model_soundly_and_tighter_than_crown(residual, threat):
    ball = parse_threat(threat)
    bc = BoundedClassifier(residual, SHAPE)
    x, y = _data(residual)
    assert bc.supports("sdp-crown", ball) is None
    sdp = bc.margin_lower_bounds(x, y, ball, "sdp-crown")
    crown = bc.margin_lower_bounds(x, y, ball, "crown")
    assert torch.all(sdp >= crown - 1e-6)
    if ball.p == 2.0:
        assert float((sdp - crown).mean()) > 1e-3, "SDP-CROWN no tighter than CROWN"
    x_adv = pgd(residual, x, y, ball, steps=100, restarts=3, loss="margin")
    with torch.no_grad():
        out = residual(torch.cat([x, x_adv]))
    C = margin_matrix(torch.cat([y, y]), K)
    margins = torch.einsum("bsk,bk->bs", C, out).view(2, len(x), K - 1).min(0).values
    assert torch.all(sdp <= margins + 1e-5)


def test_l1_and_l2_cascades_have_the_sdp_crown_stage():
    for threat in (NormBall(2.0, 0.5), NormBall(1.0, 1.0)):
        stages = cascade_for(threat)
        assert stages.index("crown") < stages.index("sdp-crown") < stages.index("alpha-crown")
    assert "sdp-crown" not in cascade_for(NormBall(math.inf, 0.1))


def test_a_spent_budget_records_timeouts_never_certified(residual):
    ball = parse_threat("l2:2.0")  # large: IBP certifies nothing, every sample stays open
    bc = BoundedClassifier(residual, SHAPE)
    x, y = _data(residual)
    rows = certify_batch(bc, residual, x, y, [ball], ["auto"], attack=False, budget=1e-9)
    summary = summarize(rows, [ball], ["auto"])
    timed_out = [r for r in rows if r.decided_by[ball.name] == TIMEOUT]
    assert timed_out, [r.decided_by for r in rows]
    assert all(not r.certified[ball.name]["auto"] for r in timed_out)
    assert summary["cascade"][ball.name]["timeouts"] == len(timed_out)
    # without a budget the same samples go through every stage
    rows = certify_batch(bc, residual, x, y, [ball], ["auto"], attack=False, budget=None)
    assert all(r.decided_by[ball.name] != TIMEOUT for r in rows)
