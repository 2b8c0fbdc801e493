"""Geometric threats: reference transformation, sound and tight hulls, parsing, certified soundness."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_sound, margins

from cure_lirpa.errors import UserError
from cure_lirpa.threats import geometry as G
from cure_lirpa.threats.base import BoxFamily, parse_threat

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # also while `trained` trains


def images(n: int = 3, shape=(1, 10, 12), seed: int = 0) -> torch.Tensor:
    """Random images with saturated and empty regions (strong edges make hulls wide)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    u = torch.rand(n, *shape, generator=g)
    x = torch.where(u < 0.3, torch.zeros_like(x), x)
    return torch.where(u > 0.8, torch.ones_like(x), x)


def corners(box: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Every corner of a parameter box (7, 2) as transform keyword arguments (scalars)."""
    choices = [sorted({float(lo), float(hi)}) for lo, hi in box]
    return [
        {p: torch.tensor(v) for p, v in zip(G.PARAMS, combo)}
        for combo in itertools.product(*choices)
    ]


def assert_inside(out: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    assert bool((out >= lo).all()), f"below hull by {float((lo - out).max()):.3g}"
    assert bool((out <= hi).all()), f"above hull by {float((out - hi).max()):.3g}"


# ----------------------------------------------------------------------------------------------
# Reference transformation and interval helpers
# ----------------------------------------------------------------------------------------------
def test_bilinear_matches_grid_sample_zero_padding():
    x = images(2, (3, 7, 9))
    g = torch.Generator().manual_seed(1)
    col = torch.rand(2, 1, 5, 6, generator=g) * 13 - 2  # many points outside the image
    row = torch.rand(2, 1, 5, 6, generator=g) * 11 - 2
    ours = G.bilinear(x, col, row)[:, 0]
    grid = torch.stack([col[:, 0] / 8 * 2 - 1, row[:, 0] / 6 * 2 - 1], -1)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_transform_identity_and_conventions():
    x = images(2, (2, 6, 6))
    assert torch.equal(G.transform(x), x)
    # integer translation by +1 column moves content right, zero fill on the left
    shifted = G.transform(x, tx=1.0)
    assert torch.allclose(shifted[..., 1:], x[..., :-1], atol=1e-6)
    assert bool((shifted[..., 0] == 0).all())
    # rotation by 90 degrees about the centre of a square image is a permutation of pixels
    # (clockwise on screen: the top-left corner goes to the top-right)
    rot = G.transform(x, angle=90.0)
    assert torch.allclose(rot, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-5)
    # photometric parameters act after the spatial part, and the result is clipped
    assert torch.allclose(G.transform(x, contrast=2.0, brightness=-0.5), (2 * x - 0.5).clamp(0, 1))


def test_transform_per_sample_parameters():
    x = images(3)
    angles = torch.tensor([0.0, 10.0, -20.0])
    batch = G.transform(x, angle=angles, tx=torch.tensor([0.0, 0.5, 1.0]))
    for i in range(3):
        single = G.transform(x[i : i + 1], angle=float(angles[i]), tx=0.5 * i)
        assert torch.allclose(batch[i : i + 1], single, atol=1e-6)


@pytest.mark.parametrize("fn,interval", [(torch.cos, G.cos_interval), (torch.sin, G.sin_interval)])
def test_trig_intervals_are_exact(fn, interval):
    g = torch.Generator().manual_seed(0)
    lo = (torch.rand(400, generator=g, dtype=torch.float64) - 0.5) * 30
    width = torch.rand(400, generator=g, dtype=torch.float64) ** 2 * 8
    hi = lo + width
    mn, mx = interval(lo, hi)
    ts = lo.unsqueeze(1) + width.unsqueeze(1) * torch.linspace(0, 1, 20001, dtype=torch.float64)
    vals = fn(ts)
    assert bool((vals.min(1).values >= mn - 1e-12).all())
    assert bool((vals.max(1).values <= mx + 1e-12).all())
    # exact up to the sampling resolution, not merely sound
    assert float((vals.min(1).values - mn).max()) < 1e-6
    assert float((mx - vals.max(1).values).max()) < 1e-6


def test_bilinear_range_is_exact_over_coordinate_boxes():
    """Continuous translation: the source box is exactly the parameter box, so the hull must equal
    the envelope of a dense parameter grid that contains every integer crossing."""
    x = images(2, (1, 8, 8))
    threat = G.parse_geometric("translate:1.5@3")
    lo, hi = next(threat.boxes(x, 100))
    boxes = threat.param_boxes()
    for k, box in enumerate(boxes):
        (tx0, tx1), (ty0, ty1) = box[3].tolist(), box[4].tolist()
        txs = torch.linspace(tx0, tx1, 21)
        tys = torch.linspace(ty0, ty1, 21)
        outs = torch.stack([G.transform(x, tx=a, ty=b) for a in txs for b in tys])
        assert_inside(outs, lo[:, k], hi[:, k])
        assert float((lo[:, k] - outs.min(0).values).abs().max()) < 1e-3
        assert float((hi[:, k] - outs.max(0).values).abs().max()) < 1e-3


# ----------------------------------------------------------------------------------------------
# Hull soundness for every kind and for combinations
# ----------------------------------------------------------------------------------------------
HULL_CASES = [
    ("rotate:30@7", (1, 10, 12)),
    ("rotate:180@3", (1, 9, 9)),
    ("shear:0.3@3", (1, 10, 12)),
    ("scale:0.4@3", (2, 9, 11)),
    ("translate:2", (1, 8, 9)),
    ("translate:1.5@3", (3, 8, 8)),
    ("translate:12@3", (1, 8, 8)),
    ("scale:0.99@2", (1, 8, 8)),
    ("contrast:0.5@3", (1, 6, 6)),
    ("brightness:0.2@3", (1, 6, 6)),
    ("rotate:2@2+shear:0.02@2", (3, 8, 8)),
    ("rotate:30@3+translate:1", (1, 8, 8)),
    (
        "scale:0.2@2+rotate:10@2+translate:1@2+shear:0.1@2+contrast:0.2@2+brightness:0.1@2",
        (1, 7, 7),
    ),
]


@pytest.mark.parametrize("text,shape", HULL_CASES)
def test_hull_contains_sampled_and_corner_transforms(text, shape):
    threat = parse_threat(text)
    assert isinstance(threat, BoxFamily)
    x = images(2, shape, seed=len(text))
    n = threat.num_boxes(shape)
    seen = 0
    boxes = threat.param_boxes()
    g = torch.Generator().manual_seed(0)
    for lo, hi in threat.boxes(x, 5):
        assert lo.shape[1] <= 5 and lo.shape == (2, lo.shape[1], *shape) and lo.dtype == x.dtype
        assert bool((lo <= hi).all()) and bool((lo >= 0).all()) and bool((hi <= 1).all())
        for j in range(lo.shape[1]):
            k = seen + j
            params = threat.sample_params(12, box=k, generator=g)
            xi = x.repeat_interleave(12, 0)
            outs = G.transform(xi, **{p: v.repeat(2) for p, v in params.items()})
            assert_inside(outs.view(2, 12, *shape), lo[:, j : j + 1], hi[:, j : j + 1])
            for corner in corners(boxes[k])[:64]:
                assert_inside(G.transform(x, **corner), lo[:, j], hi[:, j])
        seen += lo.shape[1]
    assert seen == n


@pytest.mark.parametrize(
    "text",
    [
        "rotate:10@3",
        "scale:0.1@5",
        "translate:1",
        "shear:0.1@1",
        "brightness:0.1@3+contrast:0.1@1",
        "rotate:4@2+translate:2@2",
    ],
)
def test_hull_contains_clean_image_when_identity_is_in_the_box(text):
    threat = G.parse_geometric(text)
    x = images(2, (1, 9, 9))
    boxes = threat.param_boxes()
    ident = torch.tensor(G.IDENTITY, dtype=torch.float64)
    holds = ((boxes[..., 0] <= ident) & (ident <= boxes[..., 1])).all(1)
    assert bool(holds.any())
    lo, hi = next(threat.boxes(x, 1000))
    for k in torch.nonzero(holds).flatten().tolist():
        assert_inside(x, lo[:, k], hi[:, k])


def test_param_boxes_cover_the_range():
    threat = G.parse_geometric("rotate:30@7+scale:0.1@2")
    boxes = threat.param_boxes()
    assert boxes.shape == (14, 7, 2)
    angles = sorted({tuple(b) for b in boxes[:, 0].tolist()})
    assert angles[0][0] == -30 and angles[-1][1] == 30
    assert all(a[1] == b[0] for a, b in zip(angles, angles[1:]))
    ints = G.parse_geometric("translate:2").param_boxes()
    assert ints.shape[0] == 25 and bool((ints[:, 3:5, 0] == ints[:, 3:5, 1]).all())


def test_smaller_sub_intervals_give_tighter_hulls():
    x = images(2, (1, 12, 12))
    widths = []
    for n in (1, 4, 16):
        threat = G.parse_geometric(f"rotate:8@{n}")
        w = sum(float((hi - lo).sum()) for lo, hi in threat.boxes(x, 100)) / n
        widths.append(w)
    assert widths[0] > widths[1] > widths[2]


def test_integer_translation_boxes_are_degenerate():
    x = images(2, (1, 8, 8))
    lo, hi = next(G.parse_geometric("translate:1").boxes(x, 100))
    assert float((hi - lo).max()) < 1e-3


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,name,count",
    [
        ("rotate:30", "rotate:30", 120),
        ("rotate:30@120", "rotate:30", 120),
        ("rotate:30@n=40", "rotate:30@40", 40),
        ("ROTATE:10@4", "rotate:10@4", 4),
        ("translate:2", "translate:2", 25),
        ("translate:2@4", "translate:2@4", 16),
        ("translate:0.5@2", "translate:0.5@2", 4),
        ("scale:0.1", "scale:0.1", 20),
        ("brightness:8/255@2", f"brightness:{8 / 255:g}@2", 2),
        ("translate:2+rotate:30@5", "rotate:30@5+translate:2", 125),
        ("rotate:2+shear:0.02", "rotate:2+shear:0.02", 32),
        ("rotate:0", "rotate:0", 1),
    ],
)
def test_parse_names_and_counts(text, name, count):
    threat = parse_threat(text)
    assert threat.name == name
    assert threat.num_boxes((1, 28, 28)) == count
    assert parse_threat(threat.name) == threat or "/" in text


@pytest.mark.parametrize(
    "text",
    [
        "rotate:abc",
        "rotate:-3",
        "rotate:200",
        "scale:1.0",
        "contrast:1.5",
        "translate:1.5",
        "rotate:3@0",
        "rotate:2+rotate:3",
        "rotate:2+patch:2",
        "rotate:2+wobble:1",
        "rotate:inf",
    ],
)
def test_parse_errors(text):
    with pytest.raises(UserError):
        parse_threat(text)


def test_huge_combinations_warn():
    with pytest.warns(UserWarning, match="boxes per sample"):
        G.parse_geometric("rotate:30@200+translate:2@20")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        G.parse_geometric("rotate:30")


# ----------------------------------------------------------------------------------------------
# Certified soundness on a small trained model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(small_trained_mlp):
    """The shared small trained MLP (tests/conftest.py) and 24 of its test images."""
    model, info, x, y = small_trained_mlp
    return model, info, x, y


def param_pgd(model, threat, x, y, steps: int = 5, starts: int = 8, seed: int = 0):
    """Worst margins found by random parameters plus projected gradient steps on the parameters."""
    boxes = threat.param_boxes()
    lo, hi = boxes[..., 0].min(0).values.float(), boxes[..., 1].max(0).values.float()
    g = torch.Generator().manual_seed(seed)
    worst = margins(model, x, y).detach()
    integer = any(c.integer for c in threat.components)
    for _ in range(starts):
        p = threat.sample_params(len(x), generator=g)
        vec = torch.stack([p[k] for k in G.PARAMS], 1)
        for step in range(steps + 1):
            vec = vec.detach().requires_grad_(not integer)
            m = margins(model, G.transform(x, **dict(zip(G.PARAMS, vec.unbind(1)))), y)
            worst = torch.minimum(worst, m.detach())
            if integer or step == steps:
                break
            (grad,) = torch.autograd.grad(m.min(1).values.sum(), vec)
            vec = torch.maximum(torch.minimum(vec - 0.25 * (hi - lo) * grad.sign(), hi), lo)
    return worst


SOUNDNESS = [
    "rotate:5",
    "translate:1",
    "translate:1@4",
    "scale:0.03",
    "shear:0.03",
    "brightness:0.03",
    "contrast:0.05",
    "rotate:2+shear:0.02",
    "rotate:2@4+translate:1",
]


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_certificates_are_never_broken(trained, method):
    from cure_lirpa.bounds.classifier import BoundedClassifier

    model, info, x, y = trained
    bc = BoundedClassifier(model, info.in_shape, memory_mb=64)
    total_certified = 0
    for text in SOUNDNESS:
        threat = parse_threat(text)
        lb = bc.margin_lower_bounds(x, y, threat, method)
        cert = assert_sound(lb, param_pgd(model, threat, x, y), text)
        total_certified += int(cert.sum())
        # boxes of the family: any point of any box keeps margins >= lb
        for x_lo, x_hi in threat.boxes(x, 4):
            mid = x_lo + torch.rand_like(x_lo) * (x_hi - x_lo)
            b, m = mid.shape[:2]
            inner = margins(model, mid.flatten(0, 1), y.repeat_interleave(m)).view(b, m, -1)
            assert bool((inner >= lb.unsqueeze(1) - 1e-4).all())
            break
    assert total_certified >= len(SOUNDNESS) * len(y) // 3  # the test can fail: much is certified


def test_chunk_size_does_not_change_bounds(trained):
    from cure_lirpa.bounds.classifier import BoundedClassifier

    model, info, x, y = trained
    threat = parse_threat("rotate:3@6+brightness:0.02@2")
    small = BoundedClassifier(model, info.in_shape, memory_mb=1).margin_lower_bounds(
        x[:6], y[:6], threat, "ibp"
    )
    large = BoundedClassifier(model, info.in_shape, memory_mb=512).margin_lower_bounds(
        x[:6], y[:6], threat, "ibp"
    )
    assert torch.allclose(small, large, atol=1e-5)
    assert not math.isinf(float(small.abs().max()))
