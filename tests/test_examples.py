"""The examples in ``examples/`` run in their short mode and print tables that make sense.

Each example is imported from its file and its ``main(argv)`` called with ``--quick`` (one
subprocess checks the real exit status of a script). MNIST runs on the shared MNIST folder when it
exists, else on the built-in sample; CIFAR-10 and TinyImageNet run on tiny fake ImageFolder trees
made here, so the file needs no downloaded data.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED_DATA = ROOT.parent / "shared" / "data"


def _load(name: str):
    """Import ``examples/<name>.py`` as a module (registered, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown-style table in ``text`` as a list of rows (dicts keyed by the header)."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            head, rows = block[0], [r for r in block[1:] if not set("".join(r)) <= set("-")]
            tables.append([dict(zip(head, r)) for r in rows])
            block = []
    return tables


def _fake_imagefolder(root: Path, splits: tuple[str, str], size: int, classes: int) -> Path:
    """``root/<split>/<class>/*.png``: a few size x size RGB images per class, class-coloured
    (``classes`` must be the dataset's: 10 for CIFAR-10, 200 for TinyImageNet)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True)
            for i in range(2 if split == "train" else 1):
                pixels = rng.random((size, size, 3)) * 60 + (c * 90) % 190
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def _check_comparison(out: str, rows: tuple[str, str], threats: tuple[str, str]) -> None:
    """The comparison table has one row per model and union <= certified <= clean, PGD."""
    table = next(t for t in _tables(out) if t and "union" in t[0] and "clean" in t[0])
    assert [r["model"] for r in table] == list(rows)
    for r in table:
        certified = [float(r[t]) for t in threats]
        assert float(r["union"]) <= min(certified) + 1e-9
        for t, c in zip(threats, certified):
            assert 0.0 <= c <= float(r["clean"]) <= 100.0
            assert c <= float(r[f"PGD {t}"])  # a certified image is never broken by the attack
    assert "union accuracy, CURE minus baseline:" in out


def test_mnist_quick(tmp_path, capsys):
    mnist = _load("mnist")
    real = (SHARED_DATA / "MNIST" / "raw").is_dir()
    data = ["--data-root", str(SHARED_DATA)] if real else ["--dataset", "sample"]
    out = tmp_path / "run"
    argv = ["--quick", "--count", "20", "--threads", "1", "--device", "cpu", "--out", str(out)]
    assert mnist.main(argv + data) == 0
    printed = capsys.readouterr().out
    _check_comparison(printed, ("baseline: ibp-linf", "CURE: cure-joint"), ("linf:0.1", "l2:0.5"))
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["threats"] == ["linf:0.1", "l2:0.5"]
    for method in ("ibp-linf", "cure-joint"):
        assert (out / method / "checkpoint.pt").is_file()
        assert (out / method / "metrics.jsonl").is_file()
        summary = json.loads((out / method / "verify" / "summary.json").read_text())
        assert summary["samples"] == 20
        assert summary["soundness_violations"] == {"linf:0.1": 0, "l2:0.5": 0}


def _quick_on_a_fake_imagefolder(name, data, capsys, threats: tuple[str, str]) -> str:
    """``examples/<name>.py --quick`` on the tree ``data`` succeeds and prints a comparison that
    makes sense (rows: the default baseline and CURE method); what it printed."""
    example = _load(name)
    argv = ["--quick", "--data-root", str(data), "--threads", "1", "--device", "cpu"]
    assert example.main(argv + ["--out", str(data.parent / "run")]) == 0
    printed = capsys.readouterr().out
    _check_comparison(printed, ("baseline: ibp-linf", "CURE: cure-joint"), threats)
    return printed


def test_cifar10_quick_on_a_fake_imagefolder(tmp_path, capsys):
    data = _fake_imagefolder(tmp_path / "cifar", ("train", "test"), 32, classes=10)
    printed = _quick_on_a_fake_imagefolder("cifar10", data, capsys, ("linf:2/255", "l2:0.25"))
    assert "10 test images of cifar10" in printed  # 10 classes x 1 test image, all of them


def test_tinyimagenet_missing_data_exits_with_a_clear_message(tmp_path):
    script = EXAMPLES / "tinyimagenet.py"
    missing = tmp_path / "no-such-folder"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--data-root", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "TinyImageNet not found" in proc.stderr
    assert str(missing) in proc.stderr  # says where it looked
    assert "tiny-imagenet-200.zip" in proc.stderr  # and how to get the data
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_tinyimagenet_quick_on_a_fake_imagefolder(tmp_path, capsys):
    data = _fake_imagefolder(tmp_path / "tin", ("train", "val"), 64, classes=200)
    _quick_on_a_fake_imagefolder("tinyimagenet", data, capsys, ("linf:1/255", "l2:36/255"))


def test_tinyimagenet_refuses_mismatched_class_folders(tmp_path, capsys):
    tinyimagenet = _load("tinyimagenet")
    data = _fake_imagefolder(tmp_path / "tin", ("train", "val"), 64, classes=200)
    (data / "val" / "class002").rename(data / "val" / "other")
    assert tinyimagenet.main(["--quick", "--data-root", str(data)]) == 2
    assert "not the same ones" in capsys.readouterr().err


def test_own_model_quick(capsys):
    own_model = _load("own_model")
    assert own_model.main(["--quick", "--threads", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "(agree)" in printed  # by-hand certificates == certify_dataset's
    # the trap: detected at the normalisation and bounded soundly; CROWN nearly as tight as when
    # folded (only the IBP references of its intermediate bounds are looser)
    assert "nodes that would drop the l2 ball: Sub" in printed
    crown = next(line for line in printed.splitlines() if line.strip().startswith("crown:"))
    inline, folded = (float(v) for v in re.findall(r"-?\d+\.\d+", crown))
    assert inline <= folded + 1e-3 and folded - inline < 0.05 * abs(folded) + 0.01
    table = next(t for t in _tables(printed) if t and t[0].get("threat"))
    clean_row = "clean (no perturbation)"
    assert [r["threat"] for r in table] == [clean_row, "linf:0.1", "l2:0.5", "**union**"]
    by_threat = {r["threat"]: r for r in table}
    for method in ("ibp", "crown-ibp", "crown"):
        union = float(by_threat["**union**"][method])
        certified = [float(by_threat[t][method]) for t in ("linf:0.1", "l2:0.5")]
        assert union <= min(certified) and max(certified) <= float(by_threat[clean_row][method])
    for t in ("linf:0.1", "l2:0.5"):
        assert float(by_threat[t]["best"]) <= float(by_threat[t]["PGD"])


def test_smoothing_quick(tmp_path, capsys):
    smoothing = _load("smoothing")
    argv = ["--quick", "--count", "6", "--n", "400", "--threads", "1", "--device", "cpu"]
    assert smoothing.main(argv + ["--out", str(tmp_path / "model")]) == 0
    printed = capsys.readouterr().out
    per_image, summary = [t for t in _tables(printed) if t]
    assert len(per_image) == 6
    for r in per_image:  # Table 1 of the NU paper, applied to the printed certificates
        g, u, h = (int(r[k]) for k in ("G label", "U label", "hybrid label"))
        radii = {k: float(r[k]) for k in r if "r_l" in k}
        if r["rule"] == "agree":
            assert g == u == h
            for norm in ("l2", "l1"):
                assert radii[f"hybrid r_{norm}"] == max(radii[f"G r_{norm}"], radii[f"U r_{norm}"])
        elif r["rule"] == "uniform-abstained":
            assert (u, h) == (-1, g)
            assert radii["hybrid r_l2"] == radii["G r_l2"]
        elif r["rule"] == "gaussian-abstained":
            assert (g, h) == (-1, u)
            assert radii["hybrid r_l1"] == radii["U r_l1"]
        else:
            assert r["rule"] in ("both-abstained", "disagree")
            assert h == -1 and radii["hybrid r_l2"] == radii["hybrid r_l1"] == 0.0
    assert [r["certifier"] for r in summary] == ["gaussian", "uniform", "hybrid"]
    for r in summary:
        for norm in ("l2", "l1"):
            curve = [float(r["clean"])] + [float(r[f"{norm} {x:g}"]) for x in smoothing.RADII]
            assert all(a >= b for a, b in zip(curve, curve[1:]))  # certified accuracy falls with r
