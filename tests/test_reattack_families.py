"""benchmarks/reattack.py on patch and geometric certificates (generalisation runs): the dense attack
finds breaks that lie between grid points or inside a patch (not at its corners), reports a wrong
certificate of a run and passes honest ones (seconds in all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from benchmarks.harness import file_sha1
from benchmarks.reattack import FamilyAttack, attack_geometric, attack_patch, main
from cure_lirpa.data import load_dataset
from cure_lirpa.threats.base import parse_threat
from cure_lirpa.threats.geometry import transform
from cure_lirpa.verification.results import SampleRow, row_to_json

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

FAST = FamilyAttack(grid=61, grid_multi=21, random=0, refine=201, refine_top=4, chunk=512)
"""A coarse grid (1 degree for rotate:30), so that only the local refinement can find the breaks."""


class Template(nn.Module):
    """Label 0 unless the input's cosine similarity to ``template`` exceeds ``threshold``."""

    def __init__(self, template: torch.Tensor, threshold: float):
        super().__init__()
        self.register_buffer("w", template.flatten())
        self.threshold = threshold

    def similarity(self, z: torch.Tensor) -> torch.Tensor:
        z = z.flatten(1)
        return z @ self.w / (z.norm(dim=1) * self.w.norm()).clamp_min(1e-12)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = self.similarity(z)
        return torch.stack([torch.zeros_like(s), s - self.threshold], 1)


def digit() -> torch.Tensor:
    x = load_dataset("sample", "test")[0][0]
    return x.unsqueeze(0)  # (1, 1, 28, 28)


def at(x: torch.Tensor, **params: float) -> torch.Tensor:
    return transform(x, **{k: torch.tensor([v]) for k, v in params.items()})


@pytest.mark.parametrize(
    "text, target, delta",
    [
        ("rotate:30", {"angle": 10.437}, {"angle": 0.02}),
        ("rotate:2+shear:0.02", {"angle": 1.234, "shear": -0.0123}, {"angle": 0.02, "shear": 2e-4}),
        ("translate:2", {"tx": 2.0, "ty": -1.0}, {}),
    ],
)
def test_geometric_attack_finds_a_break_between_grid_points(text, target, delta):
    """The model misclassifies only near one parameter vector (off the grid): the grid alone misses
    it, the refinement (or, for integer shifts, the enumeration) finds it; the witness is a real
    counterexample; with the threshold out of reach nothing is broken."""
    x, y = digit(), torch.tensor([0])
    threat = parse_threat(text)
    probe = Template(at(x, **target), 0.0)
    if delta:  # broken only within about delta of the target
        near = [{**target, k: target[k] + sign * d} for k, d in delta.items() for sign in (-1, 1)]
        threshold = max(float(probe.similarity(at(x, **p))) for p in near)
    else:  # broken at the target shift only
        others = [at(x, tx=float(i), ty=float(j)) for i in range(-2, 3) for j in range(-2, 3)]
        sims = sorted(float(probe.similarity(o)) for o in others)
        assert sims[-1] == pytest.approx(1.0) and sims[-2] < 0.999
        threshold = (sims[-1] + sims[-2]) / 2
    model = Template(at(x, **target), threshold)
    gen = torch.Generator().manual_seed(0)
    found = attack_geometric(model, x, y, threat, FAST, gen)
    assert found.broken and found.margin < 0
    assert int(model(at(x, **found.witness)).argmax(1)) == 1  # the witness breaks the model
    if delta:
        grid_only = FamilyAttack(**{**FAST.__dict__, "refine_top": 0})
        assert not attack_geometric(model, x, y, threat, grid_only, gen).broken
    else:
        assert (found.witness["tx"], found.witness["ty"]) == (2.0, -1.0) and found.points == 25
    honest = attack_geometric(Template(at(x, **target), 1.001), x, y, threat, FAST, gen)
    assert not honest.broken and honest.margin > 0


class Needle(nn.Module):
    """Label 0 unless pixels (10, 10) and (11, 11) are near 0.37 and 0.81 at once: only the patch
    location (10, 10) of a 2x2 patch reaches both, and only with content inside (0, 1)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a, b = z[:, 0, 10, 10] - 0.37, z[:, 0, 11, 11] - 0.81
        s = 1 - 50 * (a * a + b * b)
        return torch.stack([torch.zeros_like(s), s], 1)


def test_patch_attack_finds_a_content_the_corners_miss():
    x, y = torch.zeros(1, 1, 28, 28), torch.tensor([0])
    threat = parse_threat("patch:2x2@1")
    lo, hi = (b[0] for b in threat.boxes_at(x, torch.arange(threat.num_boxes((1, 28, 28)))))
    model = Needle()
    assert bool((model(lo).argmax(1) == 0).all() and (model(hi).argmax(1) == 0).all())
    s = FamilyAttack(patch_steps=30, patch_restarts=2, patch_screen_steps=3, patch_top=8)
    found = attack_patch(model, x, y, threat, s, torch.Generator().manual_seed(0))
    assert found.broken and found.witness == {"row": 10, "col": 10}
    one_pixel = parse_threat("patch:1x1@1")
    far = attack_patch(model, x, y, one_pixel, s, torch.Generator().manual_seed(0))
    assert not far.broken and far.margin > 0  # one pixel cannot reach both


def write_run(folder: Path, checkpoint: Path, rows: list[SampleRow], threats: list[str]) -> Path:
    """A generalisation run folder (model.json, verify/config.json, verify/samples.jsonl)."""
    (folder / "verify").mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha1": file_sha1(checkpoint),
            "dataset": "sample"}  # fmt: skip
    (folder / "model.json").write_text(json.dumps(meta))
    config = {"format": "cure-lirpa-run/1", "kind": "verify",
              "config": {"dataset": "sample", "split": "test", "threats": threats}}  # fmt: skip
    (folder / "verify" / "config.json").write_text(json.dumps(config))
    text = "".join(row_to_json(r) + "\n" for r in rows)
    (folder / "verify" / "samples.jsonl").write_text(text)
    return folder


def sample_rows(model, x, y, flags: dict[str, list[bool]], bounds=None) -> list[SampleRow]:
    """Rows certified per ``flags`` (method ``auto``), with the margin lower bounds ``bounds``
    (per threat a list of floats) when given."""
    with torch.no_grad():
        pred = model(x).argmax(1)
    rows = []
    for i in range(len(y)):
        r = SampleRow(
            i, int(y[i]), int(pred[i]), certified={t: {"auto": f[i]} for t, f in flags.items()}
        )
        if bounds is not None:
            r.margins = {t: {"auto": b[i]} for t, b in bounds.items()}
        rows.append(r)
    return rows


FLAGS = ["--grid", "301", "--random", "50", "--refine", "41", "--patch-steps", "10",
         "--patch-restarts", "2", "--patch-top", "8"]  # fmt: skip


def test_cli_reports_wrong_certificates_of_a_generalisation_run(
    tmp_path: Path, small_trained_mlp, mlp_checkpoint
):
    """Every correct image flagged certified under rotation by 30 degrees and a 10x10 patch (wrong
    for a naturally trained MLP): the run is detected, the attack breaks them and says so."""
    model, _, x, y = small_trained_mlp
    x, y = x[:12], y[:12]
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).tolist()
    threats = ["rotate:30", "patch:10x10@3"]
    rows = sample_rows(model, x, y, dict.fromkeys(threats, correct))
    run = write_run(tmp_path / "run", mlp_checkpoint, rows, threats)
    res = CliRunner().invoke(main, [str(run), *FLAGS])
    assert res.exit_code == 1 and "wrong certificates" in res.output, res.output
    saved = json.loads((run / "verify" / "reattack.json").read_text())["threats"]
    for t in threats:
        assert f"run {t}: {sum(correct)} certified, {saved[t]['broken']} broken" in res.output
        assert saved[t]["certified"] == sum(correct) and saved[t]["broken"] >= sum(correct) // 2
        assert len(saved[t]["broken_indices"]) == saved[t]["broken"]
    assert saved["rotate:30"]["attack"]["grid"] == 301
    for i in saved["rotate:30"]["broken_indices"]:  # each witness is a real counterexample
        params = saved["rotate:30"]["witnesses"][str(i)]
        assert int(model(at(x[i : i + 1], **params)).argmax(1)) != int(y[i])

    # a label that is not the test split's, and a checkpoint changed since the run: refused
    rows = sample_rows(model, x, y, dict.fromkeys(threats, correct))
    rows[3].label = (rows[3].label + 1) % 10
    write_run(run, mlp_checkpoint, rows, threats)
    res = CliRunner().invoke(main, [str(run), *FLAGS])
    assert res.exit_code == 1 and "labels differ from the test split" in res.output
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "checkpoint_sha1": "0" * 40}))
    res = CliRunner().invoke(main, [str(run), *FLAGS])
    assert res.exit_code == 1 and "changed since the run" in res.output


def test_cli_passes_the_packages_own_certificates(
    tmp_path: Path, small_trained_mlp, mlp_checkpoint
):
    """IBP certificates of the small MLP (some images certified under every threat): 0 broken and
    no margin below its bound; the same certificates claiming bounds 1 higher: bound violations."""
    from cure_lirpa.bounds.classifier import BoundedClassifier, certified

    model, info, x, y = small_trained_mlp
    threats = ["rotate:3", "translate:1", "patch:2x2@2"]
    bc = BoundedClassifier(model, info.in_shape, memory_mb=64)
    lbs = {t: bc.margin_lower_bounds(x, y, parse_threat(t), "ibp") for t in threats}
    flags = {t: certified(lb).tolist() for t, lb in lbs.items()}
    bounds = {t: lb.min(1).values.tolist() for t, lb in lbs.items()}
    assert all(sum(f) >= 3 for f in flags.values()), flags  # the test can fail
    rows = sample_rows(model, x, y, flags, bounds)
    run = write_run(tmp_path / "honest", mlp_checkpoint, rows, threats)
    res = CliRunner().invoke(main, [str(run), *FLAGS])
    assert res.exit_code == 0, res.output
    saved = json.loads((run / "verify" / "reattack.json").read_text())
    for t in threats:
        entry = saved["threats"][t]
        assert entry["certified"] == sum(flags[t]) and entry["broken"] == 0
        assert entry["bounds_compared"] == sum(flags[t]) and entry["bound_violations"] == 0
        assert entry["lowest_margin"] >= entry["smallest_gap_to_bound"] > 0
        for i, m in entry["lowest_margins"].items():
            assert m >= bounds[t][int(i)] - 1e-4
    assert saved["dataset"] == "sample" and saved["samples"] == len(y)

    inflated = {t: [b + 1.0 for b in bs] for t, bs in bounds.items()}
    write_run(run, mlp_checkpoint, sample_rows(model, x, y, flags, inflated), threats)
    res = CliRunner().invoke(main, [str(run), *FLAGS])
    assert res.exit_code == 1 and "below its certified lower bound" in res.output, res.output
    saved = json.loads((run / "verify" / "reattack.json").read_text())["threats"]
    assert sum(saved[t]["bound_violations"] for t in threats) >= 3
    assert all(saved[t]["broken"] == 0 for t in threats)
