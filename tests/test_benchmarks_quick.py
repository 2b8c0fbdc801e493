"""Smoke test of the benchmark machinery: the ``certificates`` suite on one tiny model.

One natural-trained MLP, six images, two threats, IBP and CROWN plus the cascade and PGD, every cell
in its own child process. Checks that the outputs exist and agree with each other: union accuracy
<= every per-threat certified accuracy, the cascade certifies a superset of every single method,
the "newly certified" counts match the per-sample flags, and a rerun resumes (recomputes nothing).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]  # on sys.path (tests/conftest.py): `benchmarks`

THREATS = ("linf:0.01", "l2:0.1")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from cure_lirpa.training.certified import train
    from cure_lirpa.training.config import TrainConfig

    out = tmp_path_factory.mktemp("tiny")
    cfg = TrainConfig(
        dataset="sample",
        arch="mlp",
        arch_kwargs={"width": 16, "depth": 1},
        method="natural",
        epochs=2,
        warmup_epochs=0.0,
        ramp_epochs=0.0,
        batch_size=100,
        lr=3e-3,
        train_count=1000,
        train_cert=False,
    )
    return train(cfg, out, progress=False, log=None).checkpoint


def test_registry_lists_suites():
    from benchmarks.__main__ import SUITES, cli

    res = CliRunner().invoke(cli, ["list"])
    assert res.exit_code == 0, res.output
    for name in ("certificates", "scaling", "cure_mnist", "cure_cifar10"):
        assert name in SUITES and name in res.output
    assert SUITES["cure_cifar10"].argv == ("--dataset", "cifar10")


def test_cure_training_report_uses_each_datasets_threats(tmp_path: Path):
    """The CIFAR-10 table is keyed by its own threats (2/255 has a normalised name) and says so."""
    from benchmarks.cure_training import THREATS, report, settings

    s = settings(quick=False, dataset="cifar10")
    assert s["threats"] == THREATS["cifar10"] and s["eps"] == (2 / 255, 0.25)
    for row, values in (("natural", (6.0, 0.0, 0.0)), ("cure-joint", (21.0, 19.5, 19.0))):
        (tmp_path / row).mkdir()
        out = {
            "row": row,
            "description": row,
            "test_images": 100,
            "clean": 50.0,
            "certified": dict(zip(THREATS["cifar10"], values)),
            "union": min(values),
            "union_linf_l2": min(values[:2]),
            "train_seconds": 1.0,
            "method": row,
            "epochs": 6,
            "config": {"train_count": 20000},
        }
        (tmp_path / row / "row.json").write_text(json.dumps(out))
    report(tmp_path, lambda msg: None, "cifar10")
    text = (tmp_path / "summary.md").read_text()
    assert "CURE on CIFAR-10" in text and "| l∞ 2/255 | l2 0.25 | l1 0.5 |" in text
    assert (
        "| cure-joint | cure-joint | 50.0 | 21.0 | 19.5 | 19.0 | 19.0 | 19.5 | - / - | not yet | "
        "1 s | - | 6 x 20000 |" in text
    )
    assert "needs at least one CURE and one single-norm row" in text
    assert (tmp_path / "union_accuracy.png").is_file()


def test_cure_training_report_shows_the_sdp_crown_share_and_cost(tmp_path: Path):
    """A row verified with the SDP-CROWN stage shows its l2 share in the cell and its cost per
    image; CPU training seconds appear beside wall-clock ones."""
    from benchmarks.cure_training import report

    (tmp_path / "cure-joint").mkdir()
    out = {
        "row": "cure-joint",
        "description": "joint",
        "test_images": 1000,
        "clean": 93.5,
        "certified": {"linf:0.1": 84.0, "l2:0.5": 80.0},
        "certified_by_method": {
            "linf:0.1": {"ibp": 83.0, "crown": 1.0, "sdp-crown": 0.0},
            "l2:0.5": {"ibp": 50.0, "crown": 26.5, "sdp-crown": 3.5},
        },
        "stage_images": {"crown": {"linf:0.1": 100, "l2:0.5": 400}, "sdp-crown": {"l2:0.5": 200}},
        "stage_seconds": {"crown": {"linf:0.1": 5.0, "l2:0.5": 80.0}, "sdp-crown": {"l2:0.5": 100}},
        "union": 80.0,
        "union_linf_l2": 79.5,
        "train_seconds": 1000.0,
        "train_cpu_seconds": 600.0,
        "verify_seconds_total": 50.0,
        "verify_cpu_seconds": 40.0,
        "soundness_violations": {"linf:0.1": 0, "l2:0.5": 0},
        "method": "cure-joint",
        "epochs": 12,
        "config": {"train_count": 30000},
    }
    (tmp_path / "cure-joint" / "row.json").write_text(json.dumps(out))
    report(tmp_path, lambda msg: None, "mnist")
    text = (tmp_path / "summary.md").read_text()
    assert "| 93.5 | 84.0 | 80.0 (SDP +3.5) | - |" in text
    assert "1000 s, CPU 600 s" in text and "| 50 s, CPU 40 s |" in text
    assert "cure-joint CROWN 0.20 s x 400, SDP-CROWN 0.50 s x 200" in text
    assert "met; best row cure-joint: union l∞+l2 79.5 at clean 93.5" in text


def test_cure_training_goal_lines_say_met_or_missed():
    from benchmarks.cure_training import goal_line

    def row(name, method, clean, u2, seconds=600.0, cpu=None, violations=0):
        return {
            "row": name,
            "method": method,
            "clean": clean,
            "union_linf_l2": u2,
            "train_seconds": seconds,
            "train_cpu_seconds": cpu,
            "soundness_violations": {"l2": violations},
        }

    mnist = [row("a", "cure-joint", 92.0, 80.0), row("b", "cure-joint", 95.0, 76.0)]
    assert goal_line(mnist, "mnist").startswith("Goal") and "met; best row b" in goal_line(
        mnist, "mnist"
    )
    assert "Tried" in goal_line(mnist, "mnist") and "a 80.0 / 92.0 in 600 s" in goal_line(
        mnist, "mnist"
    )
    assert "MISSED" in goal_line([row("a", "cure-joint", 92.0, 80.0)], "mnist")
    # over the 15-minute budget (CPU seconds count where recorded), or unsound: not the goal
    late = [row("b", "cure-joint", 95.0, 76.0, seconds=600.0, cpu=1000.0)]
    assert "MISSED" in goal_line(late, "mnist") and "(over budget)" in goal_line(late, "mnist")
    loaded = [row("b", "cure-joint", 95.0, 76.0, seconds=2000.0, cpu=800.0)]
    assert "met; best row b" in goal_line(loaded, "mnist")
    assert "MISSED" in goal_line([row("b", "cure-joint", 95.0, 76.0, violations=1)], "mnist")
    cifar = [row("s", "ibp-linf", 40.0, 24.0), row("c", "cure-max", 40.0, 28.0)]
    assert "MISSED" in goal_line(cifar, "cifar10") and "+4.0 points" in goal_line(cifar, "cifar10")
    cifar[1]["union_linf_l2"] = 29.5
    assert "met; best CURE row c 29.5" in goal_line(cifar, "cifar10")


def test_cure_training_staged_certification_equals_every_method_everywhere(tiny_checkpoint):
    """IBP on all images, then CROWN and (l2 only) SDP-CROWN on the images still open certify
    exactly what running IBP, CROWN and SDP-CROWN on every image certifies."""
    from benchmarks.cure_training import certify
    from cure_lirpa.data import load_dataset, take
    from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint
    from cure_lirpa.threats.base import parse_threat
    from cure_lirpa.verification.runner import certify_dataset

    ckpt = load_checkpoint(tiny_checkpoint)
    model = model_from_checkpoint(ckpt)
    in_shape = tuple(ckpt["dataset"]["in_shape"])
    test = take(load_dataset("sample", "test"), 0, 40)
    threats = [parse_threat("linf:0.02"), parse_threat("l2:0.4")]
    rows, summary = certify(model, test, threats, in_shape, {"attack_steps": 5})
    every, _ = certify_dataset(
        model, test, threats, ["ibp", "crown", "sdp-crown"], in_shape, attack=False
    )
    linf, l2 = (t.name for t in threats)
    assert "sdp-crown" in rows[0].certified[l2]
    assert linf not in summary["stage_images"]["sdp-crown"]  # l2 balls only
    for t in (linf, l2):
        staged = [r.best(t) for r in rows]
        assert staged == [r.correct and r.best(t) for r in every]
        assert summary["soundness_violations"][t] == 0
    # SDP-CROWN ran exactly on the correct images IBP and CROWN left open under l2
    open_l2 = sum(
        r.correct and not (r.certified[l2]["ibp"] or r.certified[l2]["crown"]) for r in rows
    )
    assert summary["stage_images"]["sdp-crown"][l2] == open_l2
    assert (
        0 < sum(r.best(l2) for r in rows) < sum(r.correct for r in rows)
    )  # radii that discriminate


def test_cure_training_reads_per_sample_flags_under_either_threat_spelling(tmp_path: Path):
    """Union flags and the soundness cross-check from samples.csv, for a file written with the
    decimal name of 2/255 (older results) and one with the fraction."""
    from benchmarks.cure_training import _union_flags, _violations, comparison_line, goal_line

    def write(row, name, flags):  # as verify writes it: methods ibp and crown, best-of, PGD
        cols = ["index", "label", "prediction", "correct"] + [
            f"{t}/{c}"
            for t in (name, "l2:0.25")
            for c in ("ibp/certified", "ibp/margin", "crown/certified", "crown/margin",
                      "certified", "pgd_robust")
        ]  # fmt: skip

        def cells(ibp, best, pgd):  # crown certifies what IBP leaves to the best-of flag
            return [ibp, 1 if ibp else -1, best, 1 if best else -1, best, pgd]

        lines = [",".join(cols)] + [
            ",".join(str(v) for v in [i, 0, 0, 1, *cells(*f[:3]), *cells(*f[3:])])
            for i, f in enumerate(flags)
        ]
        (tmp_path / row / "verify").mkdir(parents=True)
        (tmp_path / row / "verify" / "samples.csv").write_text("\n".join(lines) + "\n")

    # per image: linf (ibp, best, pgd), l2 (ibp, best, pgd)
    write("old", "linf:0.00784314", [(1, 1, 1, 0, 1, 1), (1, 1, 1, 0, 0, 1), (0, 0, 0, 0, 0, 0)])
    write("new", "linf:2/255", [(1, 1, 1, 1, 1, 1), (0, 1, 1, 0, 1, 1), (0, 1, 0, 0, 0, 1)])
    pair = ["linf:2/255", "l2:0.25"]
    assert _union_flags(tmp_path / "old" / "verify" / "samples.csv", pair) == {
        0: True,
        1: False,
        2: False,
    }
    assert _union_flags(tmp_path / "new" / "verify" / "samples.csv", pair) == {
        0: True,
        1: True,
        2: False,
    }
    assert _violations(tmp_path / "old", {"soundness_violations": {"l2:0.25": 2}}) == 2
    assert _violations(tmp_path / "new", {}) == 1  # image 2: certified under l∞, PGD broke it
    rows = [
        {"row": "old", "method": "ibp-linf", "clean": 50.0, "union_linf_l2": 100 / 3},
        {"row": "new", "method": "cure-joint", "clean": 50.0, "union_linf_l2": 200 / 3},
    ]
    assert "met; best CURE row new" in goal_line(rows, "cifar10", tmp_path)
    for r in rows:
        r.update(folder=r["row"], certified=dict.fromkeys(pair, 50.0))
    line = comparison_line(rows, tmp_path, pair)
    assert "union l∞+l2, best CURE row new 66.7 - best single-norm row old 33.3" in line
    assert "union l∞+l2, best CURE row new 66.7 - best l∞-trained row old 33.3" in line
    # 3 images, 1 discordant: gain 1/3, Wald interval 1/3 -/+ 1.96 sqrt((1/3 - 1/9) / 3)
    half = 196 * math.sqrt((1 / 3 - 1 / 9) / 3)
    assert f"= +33.3 points (95% interval {100 / 3 - half:+.1f} to {100 / 3 + half:+.1f}" in line
    assert "1 images certified by the CURE row only, 0 by the other only" in line
    assert "sign test p = 1)" in line  # one discordant image


def test_sign_test_is_the_exact_binomial_one():
    from benchmarks.cure_training import sign_test

    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)  # both tails of Binomial(5, 1/2)
    assert sign_test(54, 30) == pytest.approx(sign_test(30, 54)) and sign_test(54, 30) < 0.05


def _sample_test(n: int):
    from cure_lirpa.data import load_dataset, take

    return take(load_dataset("sample", "test", None), 0, n)


def test_cure_training_certify_withdraws_later_certificates_pgd_breaks(
    tiny_checkpoint: Path, monkeypatch
):
    """A (deliberately wrong) CROWN stage that certifies every open image: the images PGD broke
    count as soundness violations and lose the certificate."""
    from benchmarks.cure_training import certify
    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.bounds.region import BoundResult
    from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint
    from cure_lirpa.threats.base import parse_threat

    real = BoundedClassifier.bounds

    def wrong(self, x, y, threat, method="ibp"):  # the CROWN stage "certifies" every open image
        if method == "crown":
            return BoundResult.exact(torch.ones(len(x), self.num_classes - 1))
        return real(self, x, y, threat, method)

    monkeypatch.setattr(BoundedClassifier, "bounds", wrong)
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    threat = parse_threat("linf:0.1")
    rows, summary = certify(model, _sample_test(30), [threat], (1, 28, 28), {"attack_steps": 5})
    broken = [r for r in rows if r.correct and r.robust[threat.name] is False]
    assert broken, "the natural MLP should be broken by PGD at l∞ 0.1"
    assert summary["soundness_violations"][threat.name] == len(broken)
    assert not any(r.best(threat.name) for r in broken)


def test_certificates_suite_smoke(tiny_checkpoint: Path, tmp_path: Path):
    from benchmarks.certificates import main

    out = tmp_path / "cert"
    args = [
        "--quick",
        "--checkpoint",
        f"tiny={tiny_checkpoint}",
        "--method",
        "ibp",
        "--method",
        "crown",
        "--method",
        "sdp-crown",
        "--count",
        "6",
        "--out",
        str(out),
    ]
    for t in THREATS:
        args += ["--threat", t]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for name in ("results.json", "summary.md", "results.md", "certified.png", "cost.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "results.json").read_text())
    (mo,) = result["models"]
    assert mo["errors"] == {}
    assert mo["samples"] == 6 and mo["predictions_consistent"]
    cells = {}
    for t in THREATS:
        for m in ("ibp", "crown", "auto", "pgd"):
            slug_t = t.replace(":", "_")
            cells[(t, m)] = json.loads((out / "cells" / "tiny" / f"{slug_t}__{m}.json").read_text())
    sets = {
        k: {i for i, f in enumerate(c["certified"]) if f} for k, c in cells.items() if k[1] != "pgd"
    }
    for t in THREATS:
        row = mo["cells"][t]
        # the cascade certifies everything each single method certifies
        assert sets[(t, "auto")] >= sets[(t, "ibp")] | sets[(t, "crown")]
        assert row["auto"]["certified_pct"] >= max(
            row["ibp"]["certified_pct"], row["crown"]["certified_pct"]
        )
        # "newly certified" counts agree with the per-sample flags
        assert row["crown"]["prev"] == "ibp"
        assert row["crown"]["new_vs_prev"] == len(sets[(t, "crown")] - sets[(t, "ibp")])
        assert row["crown"]["lost_vs_prev"] == len(sets[(t, "ibp")] - sets[(t, "crown")])
        assert (
            row["crown"]["certified"] - row["ibp"]["certified"]
            == row["crown"]["new_vs_prev"] - row["crown"]["lost_vs_prev"]
        )
        assert row["auto"]["new_vs_cheaper"] == len(
            sets[(t, "auto")] - sets[(t, "ibp")] - sets[(t, "crown")]
        )
        assert row["ibp"]["new_vs_prev"] is None
        # timing and memory are recorded per cell
        assert row["crown"]["median_s"] > 0 and row["crown"]["peak_rss_mb"] > 0
        assert len(cells[(t, "crown")]["seconds"]) == 6
        casc = mo["cascade"][t]
        assert sum(casc["decided_by"].values()) == 6
        assert casc["certified_pct"] >= casc["best_single_pct"]
        # the stages before alpha-CROWN ran (IBP at least) and are part of the cascade's time
        ran = [m for m in ("ibp", "crown-ibp", "crown") if f"auto:{m}" in casc["stage_seconds"]]
        assert "ibp" in ran and 0 < casc["up_to_crown_s"] <= casc["total_s"] + 1e-6
        assert mo["pgd"][t]["soundness_violations"] == 0
    # union accuracy never exceeds the accuracy under any single threat
    for m in ("ibp", "crown", "auto"):
        assert mo["union"][m] <= min(mo["cells"][t][m]["certified_pct"] for t in THREATS)
        both = set.intersection(*(sets[(t, m)] for t in THREATS))
        assert mo["union"][m] == pytest.approx(100.0 * len(both) / 6)
    assert mo["union"]["best"] <= min(
        100.0 * len(sets[(t, "ibp")] | sets[(t, "crown")]) / 6 for t in THREATS
    )
    assert "| tiny" in (out / "summary.md").read_text()
    # SDP-CROWN runs under l2 only (l∞ would be CROWN's bound) and never loses a CROWN certificate
    assert not (out / "cells" / "tiny" / "linf_0.01__sdp-crown.json").exists()
    assert "sdp-crown" not in mo["cells"]["linf:0.01"] and set(mo["sdp"]) == {"l2:0.1"}
    sdp = json.loads((out / "cells" / "tiny" / "l2_0.1__sdp-crown.json").read_text())
    assert sets[("l2:0.1", "crown")] <= {i for i, f in enumerate(sdp["certified"]) if f}
    assert mo["sdp"]["l2:0.1"]["lost_vs_crown"] == 0
    assert "SDP-CROWN" in (out / "summary.md").read_text()

    # a rerun resumes: every cell is already on disk, nothing is recomputed
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")} == stamps


@pytest.mark.parametrize("suite", ["patches", "sharded_verify"])
def test_report_only_without_results_says_what_to_run(suite: str, tmp_path: Path, monkeypatch):
    import importlib

    module = importlib.import_module(f"benchmarks.{suite}")
    if suite == "patches":
        monkeypatch.setattr(module, "OUT", tmp_path)
        args = ["--report-only"]
    else:
        args = ["--report-only", "--out", str(tmp_path)]
    res = CliRunner().invoke(module.main, args)
    assert res.exit_code == 1 and "run the suite without --report-only first" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_reattack_reports_a_wrong_certificate(tiny_checkpoint: Path):
    """Every image of a natural model flagged certified at l∞ 0.3 (a wrong certificate): the strong
    attack breaks them, says so, and keeps them in reattack.json; an honest flag passes."""
    from benchmarks.reattack import main
    from cure_lirpa.data import load_dataset

    row = tiny_checkpoint.parent
    test = load_dataset("sample", "test")
    (row / "verify").mkdir(exist_ok=True)
    # the columns verify writes: per method, then best-of and PGD, then union
    head = "index,label,prediction,correct,linf:0.3/ibp/certified,linf:0.3/ibp/margin,"
    head += "linf:0.3/certified,linf:0.3/pgd_robust,union/certified"
    lines = [head] + [f"{i},{int(test[i][1])},{int(test[i][1])},1,1,0.5,1,1,1" for i in range(20)]
    (row / "verify" / "samples.csv").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(main, [str(row), "--steps", "20", "--restarts", "1"])
    assert res.exit_code == 1 and "wrong certificates" in res.output, res.output
    saved = json.loads((row / "verify" / "reattack.json").read_text())["threats"]["linf:0.3"]
    assert saved["certified"] == 20 and saved["broken"] >= 15
    assert len(saved["broken_indices"]) == saved["broken"]

    # an honest flag: images classified with a clear margin, at a radius no attack can use
    from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint)).eval()
    x = torch.stack([test[i][0] for i in range(20)])
    y = torch.tensor([int(test[i][1]) for i in range(20)])
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, dim=1).values
    sure = (logits.argmax(1) == y) & (top2[:, 0] - top2[:, 1] > 0.5)
    assert sure.sum() >= 5
    lines = [
        "index,label,prediction,correct,linf:1e-05/ibp/certified,linf:1e-05/ibp/margin,"
        "linf:1e-05/certified,linf:1e-05/pgd_robust,union/certified"
    ]
    lines += [
        f"{i},{int(y[i])},{int(y[i])},1,{int(s)},{0.5 if s else -0.5},{int(s)},1,{int(s)}"
        for i, s in enumerate(sure.tolist())
    ]
    (row / "verify" / "samples.csv").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(main, [str(row), "--steps", "5", "--restarts", "1"])
    assert res.exit_code == 0, res.output
    saved = json.loads((row / "verify" / "reattack.json").read_text())["threats"]["linf:1e-05"]
    assert saved == {**saved, "certified": int(sure.sum()), "broken": 0}


def test_bound_cost_times_every_l2_bound_against_a_natural_step(tmp_path: Path, tiny_checkpoint):
    """--bound-cost: one timing per bound method on the row's own model, the ratios to a natural
    step, and the table in the suite's summary."""
    import shutil

    from benchmarks.cure_training import BOUND_COST_METHODS, measure_bound_cost, report, settings

    (tmp_path / "natural").mkdir()
    shutil.copy(tiny_checkpoint, tmp_path / "natural" / "checkpoint.pt")
    s = settings(quick=True, dataset="mnist")
    out = measure_bound_cost("natural", s, tmp_path, None, 1.0, 0, lambda msg: None, batch=8)
    assert out["threat"] == "l2:0.5" and set(out["methods"]) == set(BOUND_COST_METHODS)
    for v in out["methods"].values():
        assert v["seconds"] > 0 and v["ratio"] == pytest.approx(
            v["seconds"] / out["natural_step_seconds"]
        )
    assert out["methods"]["sdp-crown"]["seconds"] > out["methods"]["ibp"]["seconds"]
    from benchmarks.cure_training import THREATS

    row = {"row": "natural", "description": "natural", "test_images": 10, "clean": 50.0}
    row.update(certified=dict.fromkeys(THREATS["mnist"], 0.0), union=0.0, union_linf_l2=0.0)
    row.update(train_seconds=1.0, method="natural", epochs=2, config={"train_count": 1000})
    (tmp_path / "natural" / "row.json").write_text(json.dumps(row))
    report(tmp_path, lambda msg: None, "mnist")
    text = (tmp_path / "summary.md").read_text()
    assert "## Cost of an l2 bound in training" in text and "| sdp-crown |" in text


def test_cure_training_radius_pairs_have_their_own_folders_tables_and_plots(tmp_path: Path):
    """A row at the second radius pair lives in <row>@<pair>/, fine-tunes the base row of the same
    pair, and the report gives each pair its own table, paired comparison and plot."""
    from benchmarks.cure_training import PAIRS, report, row_config, row_folder, settings

    s1, s3 = settings(False, "mnist"), settings(False, "mnist", "0.3")
    assert s3["eps"] == (0.3, 1.0) and s3["threats"] == ("linf:0.3", "l2:1", "l1:2")
    assert row_folder("ibp-l2-b64", s1) == "ibp-l2-b64"
    assert row_folder("ibp-l2-b64", s3) == "ibp-l2-b64@0.3"
    assert row_folder("natural-b64", settings(False, "cifar10", "8/255")) == "natural-b64@8-255"
    tuned = row_config("cure-finetune-b64", s3, tmp_path, None, 1.0, 0)
    assert tuned.init_from == str(tmp_path / "mtl-ibp-linf-b64@0.3" / "checkpoint.pt")
    # bound alignment from scratch weighs 0.5 at MNIST 0.3 in the CURE paper, 2 elsewhere
    assert row_config("cure-max-mtl2-b64+ba", s1, tmp_path, None, 1.0, 0).ba_eta == 2.0
    assert row_config("cure-max-mtl2-b64+ba", s3, tmp_path, None, 1.0, 0).ba_eta == 0.5
    with pytest.raises(click.BadParameter, match="not a radius pair of mnist"):
        settings(False, "mnist", "8/255")
    for s, row, method, values in (
        (s1, "ibp-linf+shi-b64", "ibp-linf", (90.0, 5.0, 0.0)),
        (s1, "cure-joint-mtl2-b64", "cure-joint", (85.0, 70.0, 1.0)),
        (s3, "ibp-linf+shi-b64", "ibp-linf", (60.0, 2.0, 0.0)),
    ):
        folder = tmp_path / row_folder(row, s)
        folder.mkdir()
        out = {"row": row, "pair": s["pair"], "description": row, "test_images": 10}
        out.update(clean=95.0, certified=dict(zip(s["threats"], values)), union=min(values))
        out.update(union_linf_l2=min(values[:2]), train_seconds=1.0, method=method, epochs=6)
        (folder / "row.json").write_text(json.dumps({**out, "config": {"train_count": 30000}}))
    (tmp_path / "ibp-linf+shi-b64" / "verify").mkdir()
    reattacked = {
        "linf:0.1": {"certified": 9, "broken": 0},
        "l2:0.5": {"certified": 1, "broken": 0},
    }
    (tmp_path / "ibp-linf+shi-b64" / "verify" / "reattack.json").write_text(
        json.dumps({"threats": reattacked})
    )
    report(tmp_path, lambda msg: None, "mnist")
    text = (tmp_path / "summary.md").read_text()
    first, second = text.split("## l∞ 0.3, l2 1, l1 2")
    assert "| 90.0 | 5.0 | 0.0 | 0.0 | 5.0 | - / - | 0 / 10 |" in first
    assert "| 60.0 | 2.0 | 0.0 | 0.0 | 2.0 | - / - | not yet |" in second
    assert "## l∞ 0.1, l2 0.5, l1 1 (the first 10 test images)" in first
    assert "| ibp-linf+shi-b64 | ibp-linf+shi-b64 | 95.0 | 90.0 | 5.0 | 0.0 |" in first
    assert (
        "best CURE row cure-joint-mtl2-b64 70.0 - best single-norm row ibp-linf+shi-b64 5.0"
        in first
    )
    assert "| ibp-linf+shi-b64 | ibp-linf+shi-b64 | 95.0 | 60.0 | 2.0 | 0.0 |" in second
    assert "needs at least one CURE and one single-norm row" in second.split("![")[0]
    assert "anchors at this pair SABR 98.1, IBP 97.1; here the best single-norm l∞ row" in first
    assert "SABR 93.4" in second and "ibp-linf+shi-b64, certifies 60.0" in second
    assert (tmp_path / "union_accuracy.png").is_file()
    assert (tmp_path / "union_accuracy@0.3.png").is_file()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["pairs"] == json.loads(json.dumps(PAIRS["mnist"]))
    assert [(r["folder"], r["pair"]) for r in saved["rows"]] == [
        ("ibp-linf+shi-b64", "0.1"),
        ("cure-joint-mtl2-b64", "0.1"),
        ("ibp-linf+shi-b64@0.3", "0.3"),
    ]


def test_fragments_links_are_rewritten_for_the_docs_page():
    """A suite's plot, linked next to its summary.md, still shows when the fragment is copied into
    docs/results.md; web links and anchors stay as they are."""
    from benchmarks.harness import RESULTS, relinked

    text = (
        "![u](union_accuracy.png) [t](../../../docs/training.md#sabr) [w](https://x.org/a) [a](#b)"
    )
    got = relinked(text, RESULTS / "cure_mnist", REPO / "docs")
    assert got == (
        "![u](../benchmarks/results/cure_mnist/union_accuracy.png) [t](training.md#sabr) "
        "[w](https://x.org/a) [a](#b)"
    )
