"""Patch threats: parsing, box construction, and certificates that no patch content can break."""

from __future__ import annotations

import pytest
import torch

from cure_lirpa.errors import UserError
from cure_lirpa.methods import exact_margins
from cure_lirpa.patches import PatchThreat, parse_patch
from cure_lirpa.threats import BoxFamily, parse_threat


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add contention on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Parsing and boxes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,name,count",
    [
        ("patch:2", "patch:2x2@1", 27 * 27),
        ("patch:5x5@1", "patch:5x5@1", 24 * 24),
        ("patch:5", "patch:5x5@1", 24 * 24),
        ("patch:3x4@2", "patch:3x4@2", 13 * 13),
        ("patch:2@3", "patch:2x2@3", 9 * 9),
        ("patch:28", "patch:28x28@1", 1),
        ("PATCH: 1x28", "patch:1x28@1", 28),
    ],
)
def test_parse_names_and_counts(text, name, count):
    threat = parse_threat(text)
    assert isinstance(threat, PatchThreat) and isinstance(threat, BoxFamily)
    assert threat.name == name
    assert threat.num_boxes((1, 28, 28)) == count
    assert len(threat.locations((1, 28, 28))) == count
    assert parse_threat(threat.name) == threat


@pytest.mark.parametrize(
    "text", ["patch:0", "patch:x", "patch:2x", "patch:2@0", "patch:-1", "patch:2.5"]
)
def test_parse_errors(text):
    with pytest.raises(UserError):
        parse_threat(text)


def test_patch_larger_than_image_is_a_user_error():
    with pytest.raises(UserError, match="does not fit"):
        parse_patch("5").num_boxes((1, 4, 8))


def test_boxes_cover_every_location_exactly_once():
    threat = PatchThreat(2, 3, 2)
    shape = (3, 7, 8)
    x = torch.rand(2, *shape)
    locs = threat.locations(shape)
    n = threat.num_boxes(shape)
    assert n == 3 * 3 and locs.tolist()[:3] == [[0, 0], [0, 2], [0, 4]]
    seen = 0
    for lo, hi in threat.boxes(x, 4):
        m = lo.shape[1]
        assert 1 <= m <= 4 and lo.shape == hi.shape == (2, m, *shape)
        for j in range(m):
            top, left = locs[seen + j].tolist()
            inside = torch.zeros(shape, dtype=torch.bool)
            inside[:, top : top + 2, left : left + 3] = True
            assert bool((lo[:, j][:, inside] == 0).all()) and bool((hi[:, j][:, inside] == 1).all())
            assert torch.equal(lo[:, j][:, ~inside], x[:, ~inside])
            assert torch.equal(hi[:, j][:, ~inside], x[:, ~inside])
        seen += m
    assert seen == n


def test_apply_stays_in_its_box():
    threat = parse_patch("3x2@1")
    x = torch.rand(2, 1, 6, 6)
    content = torch.rand(2, 1, 3, 2)
    lo, hi = next(threat.boxes(x, 1000))
    for k in (0, 7, threat.num_boxes((1, 6, 6)) - 1):
        out = threat.apply(x, k, content)
        assert bool((out >= lo[:, k]).all()) and bool((out <= hi[:, k]).all())
        assert int((out != x).sum()) <= 2 * 6


# ----------------------------------------------------------------------------------------------
# Certified soundness on a small trained model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(small_trained_mlp):
    """The shared small trained MLP (tests/conftest.py) and 12 of its test images."""
    model, info, x, y = small_trained_mlp
    return model, info, x[:12], y[:12]


def margins(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Margins f_y - f_j (B, K-1) in the order of cure_lirpa.bounds.margin_matrix."""
    return exact_margins(model(x), y)


def patch_attack(model, threat: PatchThreat, x, y, steps: int = 5, seed: int = 0) -> torch.Tensor:
    """Worst margins (B, K-1) over every location: constant 0 / 1 / 0.5 patches, random and
    checkerboard contents, and a few signed-gradient steps on the patch contents from a random start."""
    shape = tuple(x.shape[1:])
    n = threat.num_boxes(shape)
    masks = threat.masks(shape).to(x.dtype)  # (n, 1, H, W)
    g = torch.Generator().manual_seed(seed)
    worst = margins(model, x, y).detach()
    yy = y.repeat_interleave(n)

    def score(contents: torch.Tensor) -> torch.Tensor:  # contents (B, n, C, H, W) -> (B*n, K-1)
        imgs = x.unsqueeze(1) * (1 - masks) + contents * masks
        return margins(model, imgs.flatten(0, 1), yy)

    full = (len(x), n, *shape)
    checker = ((torch.arange(shape[1]).view(-1, 1) + torch.arange(shape[2])) % 2).to(x.dtype)
    candidates = [
        torch.zeros(full),
        torch.ones(full),
        torch.full(full, 0.5),
        checker.expand(full),
        1 - checker.expand(full),
        torch.rand(full, generator=g),
    ]
    for c in candidates:
        worst = torch.minimum(worst, score(c).view(len(x), n, -1).min(1).values.detach())
    z = torch.rand(full, generator=g)
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        m = score(z)
        worst = torch.minimum(worst, m.view(len(x), n, -1).min(1).values.detach())
        (grad,) = torch.autograd.grad(m.min(1).values.sum(), z)
        z = (z - 0.3 * grad.sign()).clamp(0, 1)
    return torch.minimum(worst, score(z.detach()).view(len(x), n, -1).min(1).values.detach())


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_certificates_are_never_broken(trained, method):
    from cure_lirpa.bounds import BoundedClassifier, certified

    model, info, x, y = trained
    bc = BoundedClassifier(model, info.in_shape, memory_mb=64)
    total = 0
    for text in ("patch:1", "patch:2", "patch:3x2@2"):
        threat = parse_threat(text)
        lb = bc.margin_lower_bounds(x, y, threat, method)
        found = patch_attack(model, threat, x, y)
        assert bool((found >= lb - 1e-4).all()), f"{text}: a margin fell below its lower bound"
        cert = certified(lb)
        assert bool((found[cert] > 0).all()), f"{text}: a certified sample was broken"
        total += int(cert.sum())
    assert total >= len(y)  # many samples are certified, so the test can fail


def test_larger_patches_certify_less(trained):
    from cure_lirpa.bounds import BoundedClassifier, certified

    model, info, x, y = trained
    bc = BoundedClassifier(model, info.in_shape, memory_mb=64)
    rates = [
        float(certified(bc.margin_lower_bounds(x, y, parse_threat(t), "ibp")).float().mean())
        for t in ("patch:1", "patch:3", "patch:8")
    ]
    assert rates[0] >= rates[1] >= rates[2] and rates[0] > rates[2]
