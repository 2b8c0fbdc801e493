"""Soundness of bounds on models a user would write, not only the zoo.

* A user model whose first operation on the input is not affine (normalisation inside ``forward``
  next to a skip path from the raw input, a per-channel scale before the first conv, a ReLU on the
  input) would make auto_LiRPA drop an l2/l1 ball. The bounded classifier detects those nodes and
  prepends an identity affine layer: every bound must then contain sampled, corner and PGD margins,
  and the same harness must catch the unsound bounds when the fix is switched off.
* The identity layer keeps CROWN exactly as tight.
* A sample's CROWN bound does not depend on the other samples of its batch.
* A model wrapped in train mode is bounded in eval mode; inputs outside [0, 1] and models with
  data-dependent Python control flow are refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cure_lirpa.attacks import pgd
from cure_lirpa.bounds import lirpa
from cure_lirpa.bounds.classifier import BoundedClassifier, InputIdentity, margin_matrix
from cure_lirpa.errors import UserError
from cure_lirpa.threats.base import NormBall

IN_SHAPE = (1, 10, 10)
K = 4
MEAN, STD = 0.4, 0.1  # a small std: normalisation inside forward amplifies the input 10x


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(96, 16), nn.ReLU(),
        nn.Linear(16, K),
    )  # fmt: skip


class SkipNormalised(nn.Module):
    """``net((x - mean) / std) + Linear(x)``: the trap with a path from the raw input."""

    def __init__(self):
        super().__init__()
        self.net = _net()
        self.lin = nn.Sequential(nn.Flatten(), nn.Linear(100, K))

    def forward(self, x):
        return self.net((x - MEAN) / STD) + 0.1 * self.lin(x)


class ChannelAffine(nn.Module):
    """A per-channel scale and shift before the first conv (a normalisation written by hand)."""

    def __init__(self, learnt: bool = False):
        super().__init__()
        scale = torch.full((IN_SHAPE[0], 1, 1), 1 / STD)
        self.scale = nn.Parameter(scale) if learnt else nn.Buffer(scale)
        self.register_buffer("shift", torch.full((IN_SHAPE[0], 1, 1), -MEAN / STD))
        self.net = _net()

    def forward(self, x):
        return self.net(x * self.scale + self.shift)


class NormalisedMiddle(nn.Module):
    """A ReLU on the raw input, then a normalisation in the middle of the network."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, stride=2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(96, 16), nn.ReLU(), nn.Linear(16, K))

    def forward(self, x):
        h = self.conv(torch.relu(x - MEAN) * 8.0)
        return self.head((h - 0.2) / 0.5)


USER_MODELS = {
    "skip": SkipNormalised,
    "channel_affine": ChannelAffine,
    "learnt_affine": lambda: ChannelAffine(learnt=True),
    "middle": NormalisedMiddle,
}
THREATS = [NormBall(2.0, 0.3), NormBall(1.0, 1.0), NormBall(math.inf, 0.02)]


def _data(model: nn.Module, n: int = 6, seed: int = 0):
    """Images in [0.2, 0.6] and the model's own predictions as labels (positive clean margins)."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.4 * torch.rand(n, *IN_SHAPE, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.einsum("bjk,bk->bj", margin_matrix(y, K), model(x))


def _worst_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: NormBall):
    """Per sample and class, the smallest margin over sampled points, corners and PGD points."""
    gen = torch.Generator().manual_seed(1)
    n, d = 64, math.prod(IN_SHAPE)
    cands = []
    if threat.p == math.inf:
        cands.append(x + threat.eps * (torch.randint(0, 2, (n, *x.shape), generator=gen) * 2 - 1))
    elif threat.p == 2.0:
        delta = torch.randn(n, *x.shape, generator=gen)
        cands.append(x + threat.eps * delta / delta.flatten(2).norm(dim=2)[..., None, None, None])
    else:  # the l1 ball's vertices: one pixel moved by +-eps
        eye = torch.eye(d).view(d, 1, *IN_SHAPE) * threat.eps
        cands += [x + eye, x - eye]
    worst = torch.stack(
        [_margins(model, c.clamp(0, 1).flatten(0, 1), y.repeat(len(c))).view(len(c), *y.shape, -1)
         .min(0).values for c in cands]
    ).min(0).values  # fmt: skip
    for target in range(1, K):
        x_adv = pgd(model, x, (y + target) % K, threat, steps=30, restarts=1, loss="ce")
        worst = torch.minimum(worst, _margins(model, x_adv, y))
    x_adv = pgd(model, x, y, threat, steps=30, restarts=2)
    return torch.minimum(worst, _margins(model, x_adv, y))


@pytest.mark.parametrize("name", sorted(USER_MODELS))
def test_dropped_perturbation_is_detected_and_made_sound(name):
    torch.manual_seed(0)
    model = USER_MODELS[name]().eval()
    bc = BoundedClassifier(model, IN_SHAPE)
    assert bc.lp_droppers, "the node that drops the lp ball must be found"
    assert isinstance(bc.traced[0], InputIdentity)
    x, y = _data(model)
    for threat in THREATS:
        worst = _worst_margins(model, x, y, threat)
        for method in ("ibp", "crown-ibp", "crown"):
            try:
                lb = bc.margin_lower_bounds(x, y, threat, method)
            except UserError as exc:
                # auto_LiRPA 0.3 has no CROWN through a product with a broadcast buffer/parameter:
                # a clear refusal is fine, a traceback or an unsound bound is not. IBP always works.
                assert method != "ibp" and f"cannot compute {method} bounds" in str(exc)
                continue
            assert torch.all(lb <= worst + 1e-4), (name, threat.name, method)


def test_harness_catches_the_trap_when_the_fix_is_off(monkeypatch):
    """With detection switched off, the same checks find unsound IBP bounds on the skip model."""
    monkeypatch.setattr(lirpa, "lp_ball_droppers", lambda module: [])
    monkeypatch.setattr(BoundedClassifier, "_check_lp_width", lambda *a: None)
    torch.manual_seed(0)
    model = SkipNormalised().eval()
    bc = BoundedClassifier(model, IN_SHAPE)
    x, y = _data(model)
    threat = NormBall(2.0, 0.3)
    lb = bc.margin_lower_bounds(x, y, threat, "ibp")
    assert bool((lb > _worst_margins(model, x, y, threat) + 1e-4).any())


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.name)
def test_identity_layer_keeps_crown_exact(threat):
    torch.manual_seed(2)
    net = _net().eval()
    x, y = _data(net)
    plain = BoundedClassifier(net, IN_SHAPE)
    assert not plain.lp_droppers
    wrapped = BoundedClassifier(nn.Sequential(InputIdentity(IN_SHAPE), net).eval(), IN_SHAPE)
    torch.testing.assert_close(
        plain.margin_lower_bounds(x, y, threat, "crown"),
        wrapped.margin_lower_bounds(x, y, threat, "crown"),
        atol=1e-4,
        rtol=1e-4,
    )


def test_flat_inputs_get_a_linear_identity():
    layer = InputIdentity((7,))
    x = torch.rand(3, 7)
    torch.testing.assert_close(layer(x), x)
    assert not any(p.requires_grad for p in layer.parameters())


def _ibp_trained_like_cnn() -> nn.Sequential:
    """A CNN with mostly stable ReLUs and IBP-friendly weights, where CROWN is looser than IBP on
    some neurons (as on IBP-trained networks): the case in which auto_LiRPA's sparse intermediate
    bounds made a sample's bound depend on its batch."""
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(72, 20), nn.ReLU(), nn.Linear(20, K),
    )  # fmt: skip
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.add_(0.3)
    return net.eval()


@pytest.mark.parametrize("threat", [NormBall(2.0, 0.6), NormBall(math.inf, 0.05)], ids=str)
def test_crown_bound_does_not_depend_on_the_batch(threat):
    net = _ibp_trained_like_cnn()
    x, y = _data(net, n=12, seed=3)
    bc = BoundedClassifier(net, IN_SHAPE)
    batch = bc.margin_lower_bounds(x, y, threat, "crown")
    alone = torch.cat([bc.margin_lower_bounds(x[i : i + 1], y[i : i + 1], threat, "crown")
                       for i in range(len(x))])  # fmt: skip
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)
    # ... and each is at least as tight as IBP and as auto_LiRPA's own CROWN on that sample alone
    ibp = bc.margin_lower_bounds(x, y, threat, "ibp")
    assert torch.all(batch >= torch.minimum(ibp, batch) - 1e-5)


def test_a_model_in_train_mode_is_bounded_in_eval_mode():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(384, K)
    ).train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(5):
            net(torch.rand(32, *IN_SHAPE) * 0.3)
    x = torch.rand(8, *IN_SHAPE)
    bc = BoundedClassifier(net, IN_SHAPE)  # wrapped while in train mode
    assert net.training and not bc.module.training
    bc.train(True)  # a verification classifier stays in eval mode
    assert not bc.module.training
    net.eval()
    with torch.no_grad():
        y = net(x).argmax(1)
    threat = NormBall(2.0, 0.2)
    worst = _worst_margins(net, x, y, threat)
    net.train()
    for method in ("ibp", "crown"):
        assert torch.all(bc.margin_lower_bounds(x, y, threat, method) <= worst + 1e-4)


def test_inputs_outside_the_unit_box_are_refused():
    bc = BoundedClassifier(_net().eval(), IN_SHAPE)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        bc.margin_lower_bounds(torch.rand(2, *IN_SHAPE) * 2 - 0.5, y, NormBall(math.inf, 0.1))
    with pytest.raises(UserError, match="labels"):
        bc.margin_lower_bounds(torch.rand(2, *IN_SHAPE), y + K, NormBall(math.inf, 0.1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _net(), _net()

    def forward(self, x):
        if x.mean() > 0.5:  # a Python branch on tensor values: the trace freezes one side
            return self.a(x)
        return self.b(x)


def test_data_dependent_control_flow_is_refused():
    with pytest.raises(UserError, match="Python decision"):
        BoundedClassifier(DataDependent().eval(), IN_SHAPE)


class Stateful(nn.Module):
    """Traces without a warning, but Python state baked into the trace makes the graph differ."""

    def __init__(self):
        super().__init__()
        self.net = _net()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x) + (1.0 if self.calls == 2 else 0.0)  # call 2 is auto_LiRPA's trace


def test_graph_that_disagrees_with_the_model_is_refused():
    model = Stateful().eval()
    bc = BoundedClassifier(model, IN_SHAPE)
    with pytest.raises(UserError, match="different function"):
        bc.margin_lower_bounds(torch.rand(3, *IN_SHAPE), torch.zeros(3, dtype=torch.long),
                               NormBall(2.0, 0.1), "ibp")  # fmt: skip


def test_conv_ibp_of_an_l1_ball_uses_the_dual_norm():
    """A conv whose kernel covers the image is a linear map; IBP of an l1 ball must give each
    output ``w.x + b ± eps * max|w|`` (the l∞ dual norm), not the l2 norm of the filter."""
    torch.manual_seed(6)
    conv = nn.Conv2d(1, K, IN_SHAPE[1])
    model = nn.Sequential(conv, nn.Flatten()).eval()
    x, y = _data(model)
    eps = 0.5
    with torch.no_grad():
        logits = model(x)
    radius = eps * conv.weight.abs().flatten(1).amax(1)
    others = margin_matrix(y, K)
    exact_ibp = torch.einsum("bjk,bk->bj", others, logits) - torch.einsum(
        "bjk,k->bj", others.abs(), radius
    )
    lb = BoundedClassifier(model, IN_SHAPE).margin_lower_bounds(x, y, NormBall(1.0, eps), "ibp")
    torch.testing.assert_close(lb, exact_ibp, atol=1e-5, rtol=1e-5)
