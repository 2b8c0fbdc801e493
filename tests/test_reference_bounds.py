"""Stored reference bounds: a net that catches any change of behaviour of the bound methods.

In the style of auto_LiRPA's ``tests/testcase.py``: for every model below (the zoo, and user-model
families: unfolded Classifiers whose body starts with Identity / Dropout / BatchNorm2d, a model
that normalises inside its own ``forward``, one with a skip path from the raw input, and a folded
Conv-first Classifier) x every bound method x one threat of each kind (l∞, l2, l1, a patch, a
rotation), the margin lower bounds on three fixed samples are stored in
``tests/data/reference_bounds.json`` and must be reproduced to 1e-6 (absolute + relative). Where a
method refuses a model or threat with a :class:`~cure_lirpa.errors.UserError`, the refusal is
stored, and a method that starts or stops refusing fails the test too.

Models are built from fixed seeds (BatchNorm running statistics set by a few seeded training-mode
forwards); their clean logits on the samples are stored as well, so that a change in how torch
initialises layers shows up as such and not as a change of the bounds.

After an intended change of behaviour, regenerate (and say in the commit why the bounds moved)::

    CURE_LIRPA_REGENERATE_REFERENCES=1 python -m pytest tests/test_reference_bounds.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from cure_lirpa.bounds.classifier import METHODS, BoundedClassifier
from cure_lirpa.errors import UserError
from cure_lirpa.models import Classifier, build_model
from cure_lirpa.threats.base import parse_threat

REFERENCE = Path(__file__).parent / "data" / "reference_bounds.json"
REGENERATE = os.environ.get("CURE_LIRPA_REGENERATE_REFERENCES") == "1"
TOL = 1e-6  # absolute + relative: |got - ref| <= TOL * (1 + |ref|)

IN_SHAPE = (2, 10, 10)  # the user-model families and cnn-small (which needs 10x10)
SMALL_SHAPES = {"zoo-cnn5": (2, 6, 6), "zoo-cnn7": (2, 4, 4)}  # deeper nets: alpha-CROWN quick
K = 5
MEAN, STD = (0.4, 0.5), (0.3, 0.2)  # two channels with different stds: min(std) matters
THREATS = ("linf:0.01", "l2:0.1", "l1:0.5", "patch:3@3", "rotate:1@2")
N_SAMPLES = 3
ALPHA_ITERATIONS = 5


def _head(c: int = IN_SHAPE[0]) -> list[nn.Module]:
    """conv(4, 3x3, s2) - fc 16 - fc K on IN_SHAPE (the body of the user-model families)."""
    return [
        nn.Conv2d(c, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.ReLU(),
        nn.Linear(16, K),
    ]


def _channel(t: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(t).view(-1, 1, 1)


class NormalisesInside(nn.Module):
    """``net((x - mean) / std)`` written in ``forward``: no recognisable Normalize layer. With
    per-channel buffers (auto_LiRPA 0.3 then refuses CROWN-type bounds) or with Python floats."""

    def __init__(self, per_channel: bool = True):
        super().__init__()
        self.per_channel = per_channel
        self.register_buffer("mean", _channel(MEAN))
        self.register_buffer("std", _channel(STD))
        self.net = nn.Sequential(*_head())

    def normalise(self, x):
        if self.per_channel:
            return (x - self.mean) / self.std
        return (x - MEAN[0]) / STD[0]

    def forward(self, x):
        return self.net(self.normalise(x))


class RawSkip(NormalisesInside):
    """``net((x - mean) / std) + 0.1 * Linear(x)``: a residual path from the raw input."""

    def __init__(self, per_channel: bool = True):
        super().__init__(per_channel)
        self.skip = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(IN_SHAPE), K))

    def forward(self, x):
        return self.net(self.normalise(x)) + 0.1 * self.skip(x)


def _zoo(arch: str, in_shape: tuple[int, ...] = IN_SHAPE, **kwargs):
    return lambda: build_model(arch, in_shape, K, MEAN, STD, **kwargs)


MODELS = {
    "zoo-mlp": _zoo("mlp", width=16, depth=2),
    "zoo-cnn-small": _zoo("cnn-small", width=4),
    "zoo-cnn5": _zoo("cnn5", SMALL_SHAPES["zoo-cnn5"], width=4),
    "zoo-cnn7": _zoo("cnn7", SMALL_SHAPES["zoo-cnn7"], width=2),
    "classifier-identity-first": lambda: Classifier(
        nn.Sequential(nn.Identity(), *_head()), MEAN, STD
    ),
    "classifier-dropout-first": lambda: Classifier(
        nn.Sequential(nn.Dropout(0.2), *_head()), MEAN, STD
    ),
    "classifier-batchnorm-first": lambda: Classifier(
        nn.Sequential(nn.BatchNorm2d(IN_SHAPE[0]), *_head()), MEAN, STD
    ),
    "normalises-inside-forward": NormalisesInside,
    "normalises-inside-forward-scalar": lambda: NormalisesInside(per_channel=False),
    "raw-input-skip": RawSkip,
    "raw-input-skip-scalar": lambda: RawSkip(per_channel=False),
    "classifier-folded-conv-first": lambda: Classifier(nn.Sequential(*_head()), MEAN, STD),
}


def _build(name: str) -> nn.Module:
    """The model ``name`` from seed 0, BatchNorm statistics moved by three seeded batches."""
    torch.manual_seed(0)
    model = MODELS[name]()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.5
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(0.2 + 0.6 * torch.rand(16, *SMALL_SHAPES.get(name, IN_SHAPE)))
    return model.eval()


def _samples(model: nn.Module, in_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Three fixed images in [0.1, 0.9] and the model's own predictions as labels."""
    gen = torch.Generator().manual_seed(1)
    x = 0.1 + 0.8 * torch.rand(N_SAMPLES, *in_shape, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def _entry(model: nn.Module, in_shape, x, y, method: str, threat: str) -> dict:
    """``{"lb": [[...]]}`` (N_SAMPLES, K-1), or ``{"refused": message}``. A fresh bounded classifier
    per entry: entries do not depend on the order they are computed in."""
    try:
        bc = BoundedClassifier(model, in_shape, alpha_iterations=ALPHA_ITERATIONS)
        lb = bc.margin_lower_bounds(x, y, parse_threat(threat), method)
    except UserError as exc:
        return {"refused": str(exc).splitlines()[0][:200]}
    return {"lb": lb.detach().double().tolist()}


def _compute(name: str) -> dict:
    model, in_shape = _build(name), SMALL_SHAPES.get(name, IN_SHAPE)
    x, y = _samples(model, in_shape)
    with torch.no_grad():
        logits = model(x)
    entries = {
        f"{method} {threat}": _entry(model, in_shape, x, y, method, threat)
        for method in METHODS
        for threat in THREATS
    }
    return {"labels": y.tolist(), "logits": logits.double().tolist(), "bounds": entries}


def _load() -> dict:
    if REFERENCE.is_file():
        return json.loads(REFERENCE.read_text())
    if not REGENERATE:
        pytest.fail(f"{REFERENCE} is missing; create it with CURE_LIRPA_REGENERATE_REFERENCES=1")
    return {}


def _save(data: dict) -> None:
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _far(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    same_inf = torch.isinf(got) & (got == ref)
    close = (got - ref).abs() <= TOL * (1 + ref.abs())
    return ~(close | same_inf | (torch.isnan(got) & torch.isnan(ref)))


def _differences(got: dict, ref: dict) -> list[str]:
    """One line per entry whose refusal or bounds differ from the reference."""
    out = []
    for key in sorted(set(got) | set(ref)):
        g, r = got.get(key), ref.get(key)
        if g is None or r is None:
            out.append(f"{key}: {'not stored' if r is None else 'not computed'}")
        elif ("refused" in g) != ("refused" in r):
            if "refused" in g:
                out.append(f"{key}: now refused ({g['refused']}); the reference has bounds")
            else:
                out.append(f"{key}: now bounded; the reference refused ({r['refused']})")
        elif "lb" in g:
            lb, lb_ref = torch.tensor(g["lb"]), torch.tensor(r["lb"])
            if lb.shape != lb_ref.shape:
                out.append(f"{key}: shape {tuple(lb.shape)}, reference {tuple(lb_ref.shape)}")
            elif bool(_far(lb, lb_ref).any()):
                diff = (lb - lb_ref)[_far(lb, lb_ref)]
                out.append(
                    f"{key}: {int(diff.numel())} of {lb.numel()} bounds differ, "
                    f"got - reference in [{float(diff.min()):.3g}, {float(diff.max()):.3g}]"
                    " (negative: looser)"
                )
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bounds_equal_the_stored_reference(name):
    torch.manual_seed(0)
    got = _compute(name)
    data = _load()
    if REGENERATE:
        data[name] = got
        _save(data)
        return
    assert name in data, (
        f"no reference for {name}; regenerate with CURE_LIRPA_REGENERATE_REFERENCES=1"
    )
    ref = data[name]
    assert got["labels"] == ref["labels"], "the seeded model or samples changed (torch's RNG?)"
    logits, logits_ref = torch.tensor(got["logits"]), torch.tensor(ref["logits"])
    assert not bool(_far(logits, logits_ref).any()), (
        "the seeded model computes other logits than when the reference was stored (a change in "
        "torch's initialisation or RNG, not in cure_lirpa): regenerate the reference"
    )
    diffs = _differences(got["bounds"], ref["bounds"])
    assert not diffs, f"{name}: {len(diffs)} entries differ from {REFERENCE.name}:\n" + "\n".join(
        diffs
    )


def test_reference_holds_exactly_these_models():
    data = _load()
    if REGENERATE:
        stale = set(data) - set(MODELS)
        if stale:
            _save({k: v for k, v in data.items() if k not in stale})
        return
    assert set(data) == set(MODELS)
    for name in MODELS:
        assert set(data[name]["bounds"]) == {f"{m} {t}" for m in METHODS for t in THREATS}
