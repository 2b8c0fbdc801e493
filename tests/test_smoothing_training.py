"""Smoothing training: loss formulas and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_NETWORK
from torch import nn

from cure_lirpa.errors import UserError
from cure_lirpa.io.checkpoint import load_checkpoint
from cure_lirpa.smoothing.noise import NormalUniformNoise
from cure_lirpa.smoothing.training import (
    ConsistencyRegularised,
    SimilarityRegularised,
    TrainConfig,
    make_method,
    train,
)

torch.set_num_threads(1)


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))


def test_similarity_regulariser_formula():
    """NU paper Eq. 3 with fresh draws in the order NU (its N then U part), N, U."""
    model = _tiny()
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    noise = NormalUniformNoise(0.5, 0.4)
    method = SimilarityRegularised(noise, beta=2.0)
    loss, logits = method.loss(model, x, y, torch.Generator().manual_seed(9))

    g = torch.Generator().manual_seed(9)
    nu = noise.gaussian.sample(x.shape, g) + noise.uniform.sample(x.shape, g)
    n = noise.gaussian.sample(x.shape, g)
    u = noise.uniform.sample(x.shape, g)
    p_nu = F.softmax(model(x + nu), 1)
    p_n, p_u = F.softmax(model(x + n), 1), F.softmax(model(x + u), 1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(1).mean()

    expected = F.cross_entropy(model(x + nu), y) + 2.0 * (kl(p_nu, p_n) + kl(p_nu, p_u))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logits, model(x + nu), atol=1e-6)
    loss.backward()  # differentiable end to end


def test_consistency_regulariser_formula():
    model = _tiny()
    x, y = torch.rand(3, 3, 2, 2), torch.tensor([1, 0, 4])
    method = make_method(TrainConfig(method="consistency", sigma=0.3, consistency_m=3).validated())
    assert isinstance(method, ConsistencyRegularised)
    loss, _ = method.loss(model, x, y, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    ps, ce = [], 0.0
    for _ in range(3):
        logit = model(x + method.noise.sample(x.shape, g))
        ps.append(F.softmax(logit, 1))
        ce = ce + F.cross_entropy(logit, y) / 3
    avg = sum(ps) / 3
    kl = sum((avg * (avg.log() - p.log())).sum(1).mean() for p in ps) / 3
    ent = -(avg * avg.log()).sum(1).mean()
    assert loss.item() == pytest.approx((ce + 10.0 * kl + 0.5 * ent).item(), rel=1e-5)


def test_config_validation():
    c = TrainConfig(method="nu-rs", sigma=0.5).validated()
    assert c.sigma_u == pytest.approx(math.sqrt(3) / 2 * 0.5)
    assert TrainConfig(method="gaussian", sigma_u=0.3).validated().sigma_u is None
    with pytest.raises(UserError, match="unknown training method"):
        TrainConfig(method="macer").validated()
    with pytest.raises(UserError, match="positive"):
        TrainConfig(sigma=0.0).validated()


CFG = dict(
    dataset="sample",
    **TINY_NETWORK,
    sigma=0.5,
    epochs=2,
    batch_size=64,
    train_count=256,
    eval_count=64,
    seed=3,
)


@pytest.mark.parametrize("method", ["nu-rs", "gaussian"])
def test_resume_equals_uninterrupted(tmp_path, method):
    cfg = TrainConfig(method=method, schedule="cosine", **CFG)
    full = tmp_path / "full"
    part = tmp_path / "part"
    train(cfg, full, log=lambda s: None, progress=False)
    train(cfg, part, stop_after=1, log=lambda s: None, progress=False)
    assert load_checkpoint(part / "checkpoint.pt")["epoch"] == 1
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 1
    train(cfg, part, resume=True, log=lambda s: None, progress=False)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert b["epoch"] == 2
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["trainer_state"]["history"][-1]["loss"] == b["trainer_state"]["history"][-1]["loss"]
    assert (full / "metrics.jsonl").read_text().count("\n") == 2


def test_resume_refuses_other_config_and_a_failed_run_leaves_nothing(tmp_path):
    cfg = TrainConfig(method="gaussian", **{**CFG, "epochs": 1, "eval_count": 0})
    out = tmp_path / "m"
    train(cfg, out, log=lambda s: None, progress=False)
    with pytest.raises(UserError, match="already holds a smooth-train run"):
        train(cfg, out, log=lambda s: None)
    other = TrainConfig(method="gaussian", **{**CFG, "epochs": 1, "eval_count": 0, "sigma": 0.25})
    with pytest.raises(UserError, match="other settings.*sigma: run 0.5, now 0.25"):
        train(other, out, resume=True, log=lambda s: None)
    bad = TrainConfig(method="gaussian", **{**CFG, "dataset": "mnist", "data_root": str(tmp_path)})
    with pytest.raises(UserError):
        train(bad, tmp_path / "bad", log=lambda s: None)
    assert not (tmp_path / "bad").exists()
