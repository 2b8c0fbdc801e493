"""Patch threats: parsing, box construction, and certificates that no patch content can break."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_sound, margins

from cure_lirpa.errors import UserError
from cure_lirpa.threats.base import BoxFamily, parse_threat
from cure_lirpa.threats.patches import PatchThreat, parse_patch

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # also while `trained` trains


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
    from cure_lirpa.bounds.classifier import BoundedClassifier

    model, info, x, y = trained
    bc = BoundedClassifier(model, info.in_shape, memory_mb=64)
    total = 0
    for text in ("patch:1", "patch:2", "patch:3x2@2"):
        threat = parse_threat(text)
        lb = bc.margin_lower_bounds(x, y, threat, method)
        cert = assert_sound(lb, patch_attack(model, threat, x, y), text)
        total += int(cert.sum())
    assert total >= len(y)  # many samples are certified, so the test can fail


def test_larger_patches_certify_less(trained):
    from cure_lirpa.bounds.classifier import BoundedClassifier, certified

    model, info, x, y = trained
    bc = BoundedClassifier(model, info.in_shape, memory_mb=64)
    rates = [
        float(certified(bc.margin_lower_bounds(x, y, parse_threat(t), "ibp")).float().mean())
        for t in ("patch:1", "patch:3", "patch:8")
    ]
    assert rates[0] >= rates[1] >= rates[2] and rates[0] > rates[2]


# ----------------------------------------------------------------------------------------------
# Incremental IBP (cure_lirpa.bounds.patch_ibp) equals plain IBP on the same boxes
# ----------------------------------------------------------------------------------------------
def _cnn(seed: int, batchnorm: bool) -> torch.nn.Module:
    """A random CNN with strides, paddings, BatchNorm (eval) and a conv that shrinks nothing."""
    from torch import nn

    from cure_lirpa.models import Classifier

    torch.manual_seed(seed)
    bn2 = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
    bn1 = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
    body = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        bn2,
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 4, stride=1, padding=0), nn.ReLU()),
        nn.Conv2d(6, 5, 3, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 7 * 7, 16),
        bn1,
        nn.ReLU(),
        nn.Linear(16, 10),
    )
    model = Classifier(body, [0.13], [0.31])
    if batchnorm:  # non-trivial running statistics
        with torch.no_grad():
            model.train()
            model(torch.rand(64, 1, 28, 28))
    return model.eval()


@pytest.mark.parametrize("text", ["patch:1", "patch:2", "patch:3x5@2", "patch:7@3", "patch:28"])
@pytest.mark.parametrize("kind", ["cnn", "cnn-bn", "mlp", "linear"])
def test_incremental_ibp_equals_plain_ibp(trained, kind, text):
    from torch import nn

    from cure_lirpa.bounds.classifier import BoundedClassifier

    mlp, info, x, y = trained
    if kind == "linear":  # a user model (no Classifier) whose only layer is the last one
        torch.manual_seed(2)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    else:
        model = mlp if kind == "mlp" else _cnn(1, kind == "cnn-bn")
    threat = parse_threat(text)
    bc = BoundedClassifier(model, info.in_shape, memory_mb=64)
    assert bc._patch_ibp(threat, "ibp") is not None  # the incremental path applies
    fast = bc.box_margins(x[:4], y[:4], threat, "ibp")
    bc.incremental_ibp = False
    plain = bc.box_margins(x[:4], y[:4], threat, "ibp")
    scale = float(plain.abs().max())
    assert fast.shape == (4, threat.num_boxes(info.in_shape))
    assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-5 * scale), float(
        (fast - plain).abs().max()
    )


def test_incremental_ibp_only_when_it_applies(trained):
    from torch import nn

    from cure_lirpa.bounds import patch_ibp
    from cure_lirpa.bounds.classifier import BoundedClassifier

    _, info, x, y = trained
    pooled = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(338, 10)
    )
    assert patch_ibp.build(pooled, info.in_shape) is None
    assert patch_ibp.build(nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2)), info.in_shape) is None
    bc = BoundedClassifier(pooled, info.in_shape, memory_mb=64)
    threat = parse_threat("patch:3@5")
    assert bc._patch_ibp(threat, "ibp") is None and bc._patch_ibp(threat, "crown") is None
    lb = bc.box_margins(x[:2], y[:2], threat, "ibp")  # auto_LiRPA's IBP instead
    assert torch.isfinite(lb).all()
    bn = BoundedClassifier(_cnn(3, batchnorm=True), info.in_shape, memory_mb=64)
    assert bn._patch_ibp(threat, "ibp") is not None
    bn.train(True)  # a verification classifier stays in eval mode: still incremental
    assert not bn.module.training and bn._patch_ibp(threat, "ibp") is not None
    training = BoundedClassifier(_cnn(3, batchnorm=True), info.in_shape, trainable=True)
    with torch.no_grad():  # BatchNorm on batch statistics: not incremental
        assert training.train(True)._patch_ibp(threat, "ibp") is None


def test_box_margins_match_margin_lower_bounds_and_respect_open(trained):
    from cure_lirpa.bounds.classifier import BoundedClassifier

    model, info, x, y = trained
    bc = BoundedClassifier(model, info.in_shape, memory_mb=64)
    threat = parse_threat("patch:4@3")
    per_box = bc.box_margins(x[:5], y[:5], threat, "crown-ibp")
    per_class = bc.margin_lower_bounds(x[:5], y[:5], threat, "crown-ibp")
    assert torch.allclose(per_box.min(1).values, per_class.min(1).values, atol=1e-5)
    open_ = torch.rand(per_box.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    some = bc.box_margins(x[:5], y[:5], threat, "crown-ibp", open_)
    assert torch.isinf(some[~open_]).all()
    assert torch.allclose(some[open_], per_box[open_], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The per-box cascade (method auto)
# ----------------------------------------------------------------------------------------------
def test_box_pgd_points_stay_in_their_boxes_and_score_what_they_claim(trained):
    from cure_lirpa.attacks import box_pgd

    model, info, x, y = trained
    threat = parse_threat("patch:6@4")
    lo, hi = threat.boxes_at(x[:6], torch.arange(0, 36, 5))
    lo, hi = lo.flatten(0, 1), hi.flatten(0, 1)
    yy = y[:6].repeat_interleave(8)
    found, points = box_pgd(model, lo, hi, yy, steps=5)
    assert bool((points >= lo).all()) and bool((points <= hi).all())
    with torch.no_grad():
        assert torch.allclose(margins(model, points, yy).min(1).values, found, atol=1e-5)


@pytest.mark.parametrize("refute", [True, False])
@pytest.mark.parametrize("text", ["patch:2", "patch:3x2@2"])
def test_cascade_certificates_survive_an_attack_on_every_location(
    trained, text, refute, monkeypatch
):
    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.verification import cascade
    from cure_lirpa.verification.runner import certify_batch

    model, info, x, y = trained
    if not refute:  # every open box then goes through CROWN-IBP, CROWN and alpha-CROWN
        monkeypatch.setattr(cascade, "_refuted", lambda *args: [])
    threat = parse_threat(text)
    bc = BoundedClassifier(model, info.in_shape, memory_mb=64)
    rows = certify_batch(bc, model, x, y, [threat], ["ibp", "crown-ibp", "auto"], attack=False)
    auto = torch.tensor([r.margins[threat.name]["auto"] for r in rows])
    cert = torch.tensor([r.certified[threat.name]["auto"] for r in rows])
    found = patch_attack(model, threat, x, y).min(1).values
    correct = torch.tensor([r.correct for r in rows])
    # the cascade's margin is a lower bound over the whole threat set, for every sample
    assert bool((found[correct] >= auto[correct] - 1e-4).all())
    assert bool((found[cert] > 0).all()), "a certified sample was broken"
    for r in rows:  # at least as strong as each single method, and never certifies a wrong one
        c = r.certified[threat.name]
        assert c["auto"] >= max(c["ibp"], c["crown-ibp"])
        assert r.correct or (not c["auto"] and r.decided_by[threat.name] == "none")
        if r.decided_by[threat.name] == "attack":
            assert not c["auto"] and not c["crown-ibp"]
    assert 0 < int(cert.sum()) < len(rows)  # the test can fail either way
    deciders = {r.decided_by[threat.name] for r in rows}
    assert ("attack" in deciders) == refute
    assert refute or "alpha-crown" in deciders


# ----------------------------------------------------------------------------------------------
# The memory budget holds for box families, for every method
# ----------------------------------------------------------------------------------------------
_MEMORY_PROBE = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from cure_lirpa.bounds.classifier import BoundedClassifier
from cure_lirpa.data import dataset_info, load_dataset, stack, take
from cure_lirpa.models import build_model
from cure_lirpa.threats.base import parse_threat

budget, cases = float(sys.argv[1]), json.loads(sys.argv[2])
info = dataset_info("sample")
x, y = stack(take(load_dataset("sample", "test"), 0, 12))
torch.manual_seed(0)
model = build_model("cnn-small", info.in_shape, 10, info.mean, info.std).eval()
bc = BoundedClassifier(model, info.in_shape, memory_mb=budget, alpha_iterations=2)
results = []
for method, text in cases:
    threat = parse_threat(text)
    n = threat.num_boxes(info.in_shape)
    warm = torch.zeros(len(x), n, dtype=torch.bool)
    warm[0, :2] = True
    bc.box_margins(x, y, threat, method, warm)  # first calls allocate caches that stay
    chunk = bc.box_chunk_size(method, threat)
    pairs = min(len(x) * n, 2 * chunk + 1)  # at least three chunks
    todo = torch.zeros(len(x) * n, dtype=torch.bool)
    todo[:pairs] = True
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current resident size
    bc.box_margins(x, y, threat, method, todo.view(len(x), n))
    with open("/proc/self/status") as f:  # not getrusage: it keeps the pre-exec parent's peak
        peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    results.append(dict(method=method, threat=text, growth_mb=peak - before, chunk=chunk, pairs=pairs))
print(json.dumps(results))
"""

MEMORY_CASES = [
    ("ibp", "patch:14@2"),
    ("ibp", "rotate:10@80"),
    ("crown-ibp", "patch:14@2"),
    ("crown", "patch:20@4"),
    ("alpha-crown", "patch:20@4"),
]


def test_memory_budget_holds_for_box_families():
    """Peak resident memory of each box-family bound computation stays under --memory-mb.

    Runs in a fresh process on a demo-sized CNN with large patches (many unstable neurons: near
    the worst case) and enough boxes for three chunks; the peak is reset before each computation.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak resident size")
    budget = 128
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(budget), json.dumps(MEMORY_CASES)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == len(MEMORY_CASES)
    for res in results:
        assert res["pairs"] > 2 * res["chunk"], res  # the budget, not the problem, limits a call
        assert res["growth_mb"] <= budget, res
