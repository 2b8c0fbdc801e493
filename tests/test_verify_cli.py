"""`cure-lirpa verify` end to end on the built-in sample, and its user errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from cure_lirpa.cli import main
from cure_lirpa.data import dataset_info, load_dataset, stack
from cure_lirpa.io.checkpoint import atomic_torch_save, make_checkpoint
from cure_lirpa.models import build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small MLP trained naturally for a few hundred steps on the sample (certifies at small eps)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    info = dataset_info("sample")
    model = build_model("mlp", info.in_shape, 10, info.mean, info.std, width=64, depth=2)
    x, y = stack(load_dataset("sample", "train"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    atomic_torch_save(
        make_checkpoint(
            model.eval(), "mlp", info, {"method": "natural"}, {"width": 64, "depth": 2}
        ),
        path,
    )
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_verify_end_to_end_is_sound(checkpoint, tmp_path):
    out = tmp_path / "v"
    res = _run(
        "verify",
        checkpoint,
        "--threat",
        "linf:0.01",
        "--threat",
        "l2:0.3",
        "--threat",
        "l1:1.0",
        "--method",
        "ibp",
        "--method",
        "crown",
        "--method",
        "auto",
        "--count",
        "40",
        "--batch-size",
        "16",
        "--out",
        out,
        "--quiet",
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 40
    assert summary["clean_accuracy"] > 0.7  # fractions of the samples
    assert summary["soundness_violations"] == {"linf:0.01": 0, "l2:0.3": 0, "l1:1": 0}
    # The test must be able to fail: some samples are certified, and CROWN beats IBP.
    cert = summary["certified"]
    assert cert["linf:0.01"]["crown"] > 0 and cert["l2:0.3"]["crown"] > 0
    assert cert["l2:0.3"]["crown"] >= cert["l2:0.3"]["ibp"]
    # auto (the cascade) certifies exactly what some single method certifies (here ibp or crown,
    # a subset of the cascade's methods), and at least as much as each of them.
    for t in cert:
        assert cert[t]["auto"] >= max(cert[t]["ibp"], cert[t]["crown"])
    # Union accuracy is at most every per-threat certified accuracy.
    assert summary["union"]["best"] <= min(summary["certified_best"].values())
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 40
    for r in rows:
        for t in ("linf:0.01", "l2:0.3", "l1:1"):
            if r[f"{t}/certified"] == "1":
                assert r[f"{t}/pgd_robust"] == "1", (t, r)  # every certified sample survives PGD
                assert r["correct"] == "1"
        assert r["union/certified"] == str(
            int(all(r[f"{t}/certified"] == "1" for t in ("linf:0.01", "l2:0.3", "l1:1")))
        )
    assert len((out / "samples.jsonl").read_text().splitlines()) == 40
    assert "union" in res.output


def test_verify_resume_continues_after_a_kill_mid_line(checkpoint, tmp_path):
    out = tmp_path / "r"
    args = [
        "verify",
        checkpoint,
        "--threat",
        "l2:0.3",
        "--method",
        "ibp",
        "--count",
        "24",
        "--batch-size",
        "8",
        "--out",
        out,
        "--quiet",
        "--no-attack",
        "--device",
        "cpu",
    ]
    assert _run(*args).exit_code == 0
    full = (out / "samples.csv").read_text()
    # Simulate a kill after two batches: keep 16 rows and half of a third line.
    (out / "summary.json").unlink()
    lines = []
    for row in list(csv.DictReader(full.splitlines()))[:16]:
        lines.append(
            json.dumps(
                {
                    "index": int(row["index"]),
                    "label": int(row["label"]),
                    "prediction": int(row["prediction"]),
                    "margins": {"l2:0.3": {"ibp": float(row["l2:0.3/ibp/margin"])}},
                    "certified": {"l2:0.3": {"ibp": row["l2:0.3/ibp/certified"] == "1"}},
                    "decided_by": {},
                    "robust": {"l2:0.3": None},
                }
            )
        )
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:20])
    res = _run(*args)
    assert res.exit_code != 0 and "--resume" in res.output
    res = _run(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert (out / "samples.csv").read_text() == full


@pytest.mark.parametrize(
    "args, message",
    [
        (["verify", "missing.pt"], "does not exist"),
        (["verify", "{ckpt}", "--threat", "l3:0.1"], "unknown threat kind"),
        (["verify", "{ckpt}", "--threat", "linf:abc"], "is not a number"),
        (["verify", "{ckpt}", "--threat", "l2:-1"], "eps must be"),
        (["verify", "{ckpt}", "--threat", "linf:1/0"], "divides by zero"),
        (["verify", "{smooth}"], "smooth certify"),
        (["verify", "{bad}"], "not a readable checkpoint"),
        (["verify", "{ckpt}", "--start", "5000"], "outside the dataset"),
        (["verify", "{ckpt}", "--dataset", "mnist", "--data-root", "{tmp}"], "MNIST not found"),
    ],
)
def test_verify_user_errors(checkpoint, tmp_path, args, message):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    smooth = tmp_path / "smooth.pt"  # a base classifier of 'smooth train' (its config has sigma)
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["config"] = {"method": "gaussian", "sigma": 0.5}
    torch.save(ckpt, smooth)
    out = tmp_path / "out"
    args = [a.format(ckpt=checkpoint, bad=bad, tmp=tmp_path, smooth=smooth) for a in args]
    res = CliRunner().invoke(main, [*args, "--out", str(out), "--quiet"])
    assert res.exit_code != 0
    assert message in res.output, res.output
    assert "Traceback" not in res.output
    assert not out.exists()  # no partial output left behind


def test_verify_refuses_wrong_input_shape(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["dataset"]["in_shape"] = [3, 28, 28]  # pretend the model takes 3 channels
    ckpt["arch_kwargs"] = {"width": 64, "depth": 2}
    bad = tmp_path / "shape.pt"
    torch.save(ckpt, bad)
    res = CliRunner().invoke(main, ["verify", str(bad), "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    assert "do not match" in res.output or "shape" in res.output
    assert not (tmp_path / "o").exists()


def test_verify_defaults_to_the_radii_the_checkpoint_was_trained_for(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["config"] = {"method": "ibp-linf", "eps_linf": 0.02, "eps_l2": 0.3}
    trained = tmp_path / "trained.pt"
    atomic_torch_save(ckpt, trained)
    for path, expected in (
        (trained, ["linf:0.02", "l2:0.3"]),
        (checkpoint, ["linf:0.1", "l2:0.5"]),
    ):
        out = tmp_path / f"v-{path.stem}"
        res = _run("verify", path, "--count", 4, "--method", "ibp", "--no-attack", "--out", out)
        assert res.exit_code == 0, res.output
        assert json.loads((out / "summary.json").read_text())["config"]["threats"] == expected


def test_a_certificate_the_attack_breaks_is_withdrawn_and_fails_the_run(
    checkpoint, tmp_path, monkeypatch
):
    """A deliberately unsound bound method (every margin bounded by +1): PGD breaks some of its
    "certificates"; those samples must count as not certified anywhere, and verify must fail."""
    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.bounds.region import BoundResult

    def unsound(self, x, y, threat, method="ibp"):
        return BoundResult.exact(torch.ones(len(x), self.num_classes - 1))

    monkeypatch.setattr(BoundedClassifier, "bounds", unsound)
    out = tmp_path / "v"
    res = CliRunner().invoke(
        main,
        ["verify", str(checkpoint), "--threat", "l2:2.0", "--method", "ibp", "--count", "16",
         "--out", str(out), "--quiet", "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code != 0
    assert "SOUNDNESS VIOLATION" in res.output and "bug" in res.output
    summary = json.loads((out / "summary.json").read_text())
    broken = summary["soundness_violations"]["l2:2"]
    assert broken > 0
    robust = summary["pgd_accuracy"]["l2:2"] * 16
    # only samples PGD could not break may still count as certified
    assert summary["certified"]["l2:2"]["ibp"] * 16 <= robust + 1e-9
    assert summary["union"]["best"] == summary["certified_best"]["l2:2"]
    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["l2:2/pgd_robust"] == "0":
            assert r["l2:2/certified"] == "0" and r["union/certified"] == "0"


def test_verify_keeps_fractions_writes_a_plot_and_a_clean_row(checkpoint, tmp_path):
    out = tmp_path / "v"
    args = ["--threat", "linf:2/255", "--threat", "l2:36/255", "--method", "ibp"]
    res = _run("verify", checkpoint, *args, "--count", 8, "--threads", 2, "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["certified"]) == ["linf:2/255", "l2:36/255"]
    table = (out / "summary.md").read_text().splitlines()
    clean = f"{100 * summary['clean_accuracy']:.1f}"  # fractions in JSON, percent in tables
    assert table[2] == f"| clean (no perturbation) | {clean} | {clean} | {clean} |"
    assert table[3].startswith("| linf:2/255 |") and table[4].startswith("| l2:36/255 |")
    png = (out / "certified_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert torch.get_num_threads() == 2  # --threads was applied (conftest restores it)


def test_verify_on_a_full_disk_says_so_and_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    import os

    from cure_lirpa.io import checkpoint as checkpoint_module

    def full(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(checkpoint_module.os, "replace", full)
    out = tmp_path / "v"
    res = CliRunner().invoke(
        main, ["verify", str(checkpoint), "--count", "4", "--out", str(out), "--quiet"]
    )
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert "cannot write" in res.output and "No space left on device" in res.output
    assert "Traceback" not in res.output
    monkeypatch.setattr(checkpoint_module.os, "replace", os.replace)
    assert not out.exists()


def test_verify_into_a_read_only_folder_is_one_line(checkpoint, tmp_path, monkeypatch):
    from pathlib import Path

    def read_only(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "ro" / "v"
    res = CliRunner().invoke(
        main, ["verify", str(checkpoint), "--count", "4", "--out", str(out), "--quiet"]
    )
    monkeypatch.undo()
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"{out}: Permission denied" in res.output and "Traceback" not in res.output
    assert not out.exists()
