"""Losses: each equals its formula on hand-made bounds."""

from __future__ import annotations

import math

import pytest
import torch

from cure_lirpa.errors import UserError
from cure_lirpa.training.losses import (
    bound_alignment,
    certified_ce,
    expressive_loss,
    ibp_regulariser,
    joint,
    max_loss,
    project_gradients,
    random_halves,
    random_loss,
    worst_case_logits,
)

LB = torch.tensor([[1.0, 2.0], [-0.5, 0.3], [0.0, 0.0]])


def test_worst_case_logits():
    assert torch.equal(
        worst_case_logits(LB), torch.tensor([[0.0, -1.0, -2.0], [0.0, 0.5, -0.3], [0.0, 0.0, 0.0]])
    )


def test_certified_ce_formula():
    expected = torch.tensor([math.log(1 + math.exp(-a) + math.exp(-b)) for a, b in LB.tolist()])
    assert torch.allclose(certified_ce(LB), expected)
    assert torch.allclose(certified_ce(LB, "mean"), expected.mean())
    # third row: all margins 0 -> uniform worst case over 3 classes
    assert certified_ce(LB)[2].item() == pytest.approx(math.log(3))
    # larger margins -> smaller loss; gradient pushes lb up
    lb = LB.clone().requires_grad_(True)
    certified_ce(lb, "mean").backward()
    assert (lb.grad < 0).all()
    with pytest.raises(UserError):
        certified_ce(LB, "sum")
    with pytest.raises(UserError):
        certified_ce(LB[0])


L_INF = torch.tensor([1.0, 4.0, 0.5, 2.0])
L_2 = torch.tensor([3.0, 1.0, 0.5, 6.0])


def test_joint_and_max():
    assert joint(L_INF, L_2).item() == pytest.approx(0.5 * 7.5 / 4 + 0.5 * 10.5 / 4)
    assert joint(L_INF, L_2, alpha=0.2).item() == pytest.approx(0.2 * 7.5 / 4 + 0.8 * 10.5 / 4)
    assert max_loss(L_INF, L_2).item() == pytest.approx((3 + 4 + 0.5 + 6) / 4)
    with pytest.raises(UserError):
        joint(L_INF, L_2, alpha=1.5)
    with pytest.raises(UserError):
        max_loss(L_INF, L_2[:3])


@pytest.mark.parametrize("b", [0, 1, 2, 7, 128])
def test_random_halves_partition(b):
    g = torch.Generator().manual_seed(b)
    a, c = random_halves(b, g)
    assert len(a) == b // 2 and len(c) == b - b // 2
    assert set(a.tolist()).isdisjoint(c.tolist())
    assert sorted(a.tolist() + c.tolist()) == list(range(b))


def test_random_halves_vary_with_generator():
    draws = {
        tuple(random_halves(16, torch.Generator().manual_seed(s))[0].tolist()) for s in range(5)
    }
    assert len(draws) > 1


def test_random_loss_formula():
    idx_a, idx_b = torch.tensor([1, 3]), torch.tensor([0, 2])
    assert random_loss(L_INF, L_2, idx_a, idx_b).item() == pytest.approx(
        (4.0 + 2.0 + 3.0 + 0.5) / 4
    )
    # unselected entries do not matter, even if infinite
    l_2 = L_2.clone()
    l_2[1] = math.inf
    assert math.isfinite(random_loss(L_INF, l_2, idx_a, idx_b).item())
    with pytest.raises(UserError):
        random_loss(L_INF, L_2, torch.tensor([0, 1]), torch.tensor([1, 2]))  # overlap
    with pytest.raises(UserError):
        random_loss(L_INF, L_2, torch.tensor([0]), torch.tensor([1, 2]))  # not covering


def _kl_rows(lb_q, lb_r):
    out = []
    for q, r in zip(lb_q.tolist(), lb_r.tolist()):
        zq = [0.0] + [-v for v in q]
        zr = [0.0] + [-v for v in r]
        pq = [math.exp(v) / sum(math.exp(u) for u in zq) for v in zq]
        pr = [math.exp(v) / sum(math.exp(u) for u in zr) for v in zr]
        out.append(sum(a * math.log(a / b) for a, b in zip(pq, pr)))
    return out


def test_bound_alignment_formula_and_direction():
    lb_q = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.2], [0.1, 0.1]])
    lb_r = torch.tensor([[-1.0, 0.5], [0.0, 0.0], [1.0, -2.0], [0.3, 0.1]])
    mask = torch.tensor([True, False, True, True])
    kl = _kl_rows(lb_q, lb_r)
    expected = (kl[0] + kl[2] + kl[3]) / 3
    assert bound_alignment(lb_q, lb_r, mask).item() == pytest.approx(expected, rel=1e-5)
    # direction switch: KL(P_r || P_q) on the same subset, a different number
    kl_rev = _kl_rows(lb_r, lb_q)
    switched = bound_alignment(lb_r, lb_q, mask).item()
    assert switched == pytest.approx((kl_rev[0] + kl_rev[2] + kl_rev[3]) / 3, rel=1e-5)
    assert abs(switched - expected) > 1e-3
    # identical bounds -> 0
    assert bound_alignment(lb_q, lb_q, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(
        0.0, abs=1e-7
    )


def test_bound_alignment_empty_subset_is_zero_and_differentiable():
    lb_q = torch.randn(5, 9, requires_grad=True)
    lb_r = torch.randn(5, 9, requires_grad=True)
    loss = bound_alignment(lb_q, lb_r, torch.zeros(5, dtype=torch.bool))
    assert loss.item() == 0.0
    (loss + certified_ce(lb_r, "mean")).backward()
    assert torch.isfinite(lb_q.grad).all() and torch.isfinite(lb_r.grad).all()
    assert torch.count_nonzero(lb_q.grad) == 0


def test_bound_alignment_gradients_and_detach():
    lb_q = torch.tensor([[1.0, 2.0]], requires_grad=True)
    lb_r = torch.tensor([[-1.0, 0.5]], requires_grad=True)
    bound_alignment(lb_q, lb_r, torch.tensor([True]), detach_q=True).backward()
    assert lb_q.grad is None and torch.isfinite(lb_r.grad).all() and lb_r.grad.abs().sum() > 0


def test_project_gradients_formula():
    t0 = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0, 0.0, 0.0]), "n": torch.tensor(5)}
    tc = {"w": torch.tensor([2.0, 1.0]), "b": torch.tensor([1.0, 0.0, 0.0]), "n": torch.tensor(7)}
    # w: g_c = (1, 0), g_n = (1, 1) -> cos = 1/sqrt(2); b: g_c = (1,0,0), g_n = (-2,0,0) -> cos = -1
    tn = {"w": torch.tensor([2.0, 2.0]), "b": torch.tensor([-2.0, 0.0, 0.0]), "n": torch.tensor(9)}
    beta = 0.8
    out = project_gradients(t0, tc, tn, beta)
    s = 1 / math.sqrt(2)
    exp_w = torch.tensor([1.0 + 0.2 * 1 + beta * s * 1, 1.0 + beta * s * 1])
    assert torch.allclose(out["w"], exp_w)
    # negative cosine: the natural update is dropped, only (1 - beta) * g_c remains
    assert torch.allclose(out["b"], torch.tensor([0.2, 0.0, 0.0]))
    # integer buffer: theta_c's value
    assert out["n"].item() == 7 and out["n"].dtype == torch.int64


def test_project_gradients_zero_norm_and_extremes():
    t0 = {"w": torch.ones(3)}
    tc = {"w": torch.ones(3)}  # g_c = 0
    tn = {"w": torch.tensor([2.0, 3.0, 4.0])}
    out = project_gradients(t0, tc, tn, 0.5)
    assert torch.equal(out["w"], torch.ones(3))  # s = 0 -> theta0
    tc2 = {"w": torch.tensor([2.0, 0.0, 1.0])}
    assert torch.allclose(project_gradients(t0, tc2, tn, 0.0)["w"], tc2["w"])  # beta 0 -> theta_c
    with pytest.raises(UserError):
        project_gradients(t0, tc, {"v": torch.ones(3)}, 0.5)
    with pytest.raises(UserError):
        project_gradients(t0, tc, tn, 1.5)


def test_expressive_loss_is_the_mtl_ibp_convex_combination():
    adv, cert = torch.tensor([0.2, 1.0, 3.0]), torch.tensor([0.5, 4.0, 3.0])
    assert torch.allclose(expressive_loss(adv, cert, 0.25), 0.75 * adv + 0.25 * cert)
    assert torch.equal(expressive_loss(adv, cert, 0.0), adv)
    assert torch.equal(expressive_loss(adv, cert, 1.0), cert)
    with pytest.raises(UserError, match="alpha"):
        expressive_loss(adv, cert, 1.5)
    with pytest.raises(UserError, match="same shape"):
        expressive_loss(adv, cert[:2], 0.5)


def test_ibp_regulariser_formula():
    # one layer, four neurons: two surely active, one surely inactive, one unstable
    lower = torch.tensor([[1.0, 2.0, -3.0, -1.0]])
    upper = torch.tensor([[3.0, 4.0, -1.0, 1.0]])
    r0 = torch.tensor(0.25)
    c = (lower + upper) / 2  # [2, 3, -2, 0]
    r = ((upper - lower) / 2).mean()  # 1
    tight = max(0.5 - 0.25 / r.item(), 0) / 0.5  # 0.5
    m_act, m_inact = (2 + 3) / 4, -2 / 4
    ratio_m = min(m_act / -m_inact, -m_inact / m_act)  # 0.4
    dev = (c - c.mean()) ** 2  # mean 0.75
    v_act, v_inact = float(dev[0, 0] + dev[0, 1]), float(dev[0, 2])
    ratio_v = min(v_act / v_inact, v_inact / v_act)
    relu = (max(0.5 - ratio_m, 0) + max(0.5 - ratio_v, 0)) / 0.5
    assert ibp_regulariser(r0, [(lower, upper)]).item() == pytest.approx(tight + relu, rel=1e-6)
    # two identical layers: the average over layers is the same value
    two = ibp_regulariser(r0, [(lower, upper), (lower, upper)])
    assert two.item() == pytest.approx(tight + relu, rel=1e-6)
    # tight, balanced bounds are not penalised
    lo, up = torch.tensor([[1.0, -1.1]]), torch.tensor([[1.1, -1.0]])
    assert ibp_regulariser(torch.tensor(1.0), [(lo, up)]).item() == pytest.approx(0.0, abs=1e-6)
    # a network without ReLU layers has nothing to regularise
    with pytest.raises(UserError, match="ReLU"):
        ibp_regulariser(r0, [])
