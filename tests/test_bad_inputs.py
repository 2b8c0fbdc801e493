"""Bad inputs to ``cure-lirpa train``: one clear line, a non-zero exit and nothing left behind."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cure_lirpa import checkpoint as checkpoint_module
from cure_lirpa.checkpoint import load_checkpoint
from cure_lirpa.cli import main
from cure_lirpa.data import load_dataset
from cure_lirpa.errors import UserError
from cure_lirpa.threats import parse_threat
from cure_lirpa.training import TrainConfig

QUICK = ["--train-count", "64", "--epochs", "1", "--device", "cpu", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def refused(result, *phrases: str) -> None:
    """A non-zero exit with a one-line message naming the problem, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for p in phrases:
        assert p in errors[0], result.output


def _images(folder: Path, classes: int, size: int, per_class: int = 1, odd: int = 0) -> None:
    """``folder/<class>/<i>.png`` RGB images of ``size`` pixels (``odd`` of them 40x40 instead)."""
    from PIL import Image

    for c in range(classes):
        (folder / f"c{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            s = 40 if c == 0 and i < odd else size
            Image.fromarray(np.full((s, s, 3), 7 * c + i, dtype=np.uint8)).save(
                folder / f"c{c:03d}" / f"{i}.png"
            )


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A module ``badmodels`` on sys.path with factories of wrong output shapes."""
    (tmp_path / "badmodels.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def seven(in_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))

            def two_by_five(in_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Unflatten(1, (2, 5)))

            def good(in_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("badmodels", None)


@pytest.mark.parametrize(
    "factory, phrase",
    [("seven", "returns (2, 7)"), ("two_by_five", "returns (2, 2, 5)")],
)
def test_user_model_with_wrong_output_shape_is_refused(tmp_path, user_models, factory, phrase):
    out = tmp_path / "run"
    refused(run("--arch", f"badmodels:{factory}", "--out", out, *QUICK), phrase, "(batch, 10)")
    assert not out.exists()


def test_user_model_with_right_output_shape_trains(tmp_path, user_models):
    out = tmp_path / "run"
    res = run("--arch", "badmodels:good", "--method", "natural", "--out", out, *QUICK)
    assert res.exit_code == 0, res.output
    assert (out / "checkpoint.pt").is_file()
    # --width goes to the factory as width=...; one without that parameter is explained
    out = tmp_path / "width"
    refused(
        run("--arch", "badmodels:good", "--width", 8, "--out", out, *QUICK), "width", "signature"
    )
    assert not out.exists()


@pytest.mark.parametrize("eps", ["1/0", "8/zero", "-1/255", "inf"])
def test_bad_eps_is_refused(tmp_path, eps):
    out = tmp_path / "run"
    refused(run("--eps-linf", eps, "--out", out, *QUICK), "--eps-linf")
    assert not out.exists()


def test_fractions_are_accepted_and_kept_in_names(tmp_path):
    out = tmp_path / "run"
    res = run("--eps-linf", "8/255", "--eps-l2", "36/255", "--out", out, *QUICK)
    assert res.exit_code == 0, res.output
    config = load_checkpoint(out / "checkpoint.pt")["config"]
    assert config["eps_linf"] == 8 / 255 and config["eps_l2"] == 36 / 255
    # messages name the radii as the user wrote them (here the ramp warning of a 1-epoch run)
    assert "(linf 8/255, l2 36/255)" in res.output


def test_threat_names_keep_fractions_and_parse_back():
    for text, name in [
        ("linf:2/255", "linf:2/255"),
        ("l2:36/255", "l2:36/255"),
        ("linf:0.1", "linf:0.1"),
        ("l1:1.0", "l1:1"),
        ("l2:0.00784313725490196", "l2:2/255"),
        ("linf:0.123456789", "linf:0.123456789"),
    ]:
        threat = parse_threat(text)
        assert threat.name == name
        assert parse_threat(threat.name) == threat  # the name is exact, not rounded
    with pytest.raises(UserError, match="divides by zero"):
        parse_threat("linf:1/0")


def test_default_radii_follow_the_dataset():
    for dataset, radii in [
        ("sample", (0.1, 0.5)),
        ("cifar10", (2 / 255, 0.25)),
        ("tinyimagenet", (1 / 255, 36 / 255)),
    ]:
        c = TrainConfig(dataset=dataset).validated()
        assert (c.eps_linf, c.eps_l2) == radii
        assert (c.train_eps_linf, c.train_eps_l2) == radii
    c = TrainConfig(dataset="cifar10", eps_l2=0.5).validated()
    assert (c.eps_linf, c.eps_l2) == (2 / 255, 0.5)


def test_warning_when_the_ramp_does_not_reach_the_target(tmp_path):
    res = run("--ramp-epochs", "4", "--out", tmp_path / "a", *QUICK)
    assert res.exit_code == 0, res.output
    assert "warning: the eps ramp ends at epoch 5" in res.output
    res = run("--warmup-epochs", "0", "--ramp-epochs", "1", "--out", tmp_path / "b", *QUICK)
    assert res.exit_code == 0, res.output
    assert "warning:" not in res.output


def test_imagefolder_with_the_wrong_class_count_is_refused(tmp_path):
    root = tmp_path / "tiny"
    _images(root / "train", classes=3, size=64)
    _images(root / "val", classes=3, size=64)
    out = tmp_path / "run"
    refused(
        run("--dataset", "tinyimagenet", "--data-root", root, "--out", out, *QUICK),
        "3 class folders",
        "200 classes",
    )
    assert not out.exists()


def test_tinyimagenet_without_val_is_refused_before_training(tmp_path):
    root = tmp_path / "tiny"
    _images(root / "train", classes=3, size=64)
    out = tmp_path / "run"
    refused(
        run("--dataset", "tinyimagenet", "--data-root", root, "--out", out, *QUICK),
        "no val/ folder",
    )
    assert not out.exists()


def test_an_image_of_another_size_is_named(tmp_path):
    root = tmp_path / "cifar"
    _images(root / "train", classes=10, size=32, per_class=2, odd=1)
    _images(root / "test", classes=10, size=32)
    out = tmp_path / "run"
    refused(
        run("--dataset", "cifar10", "--data-root", root, "--out", out, *QUICK),
        "c000/0.png is 40x40 pixels",
        "32x32",
    )
    assert not out.exists()
    with pytest.raises(UserError, match="40x40"):
        load_dataset("cifar10", "train", str(root))[0]


def test_empty_mnist_raw_folder_is_explained(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    out = tmp_path / "run"
    refused(
        run("--dataset", "mnist", "--data-root", tmp_path, "--out", out, *QUICK),
        "MNIST idx files not found",
        "t10k-images-idx3-ubyte",
    )
    assert not out.exists()


def test_full_disk_leaves_nothing_and_a_plain_rerun_works(tmp_path, monkeypatch):
    def full_disk(obj, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 128")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    out = tmp_path / "run"
    refused(run("--out", out, *QUICK), "cannot write", "checkpoint.pt", "disk space")
    assert not out.exists()  # no config.json, no temporary file, no empty folder
    monkeypatch.undo()
    res = run("--out", out, *QUICK)
    assert res.exit_code == 0, res.output


def test_leftovers_of_a_run_killed_in_its_first_epoch_do_not_block_a_rerun(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / ".checkpoint.pt.abc.tmp").write_bytes(b"half")
    refused(run("--out", out, "--resume", *QUICK), "holds no train run", "without --resume")
    res = run("--out", out, *QUICK)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
    ]
    # a folder with someone else's files is still refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused(run("--out", other, *QUICK), "notes.txt")


def test_unwritable_output_folder_is_one_line(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    out = tmp_path / "ro" / "run"
    monkeypatch.setattr(Path, "mkdir", read_only)
    refused(run("--out", out, *QUICK), "Permission denied", str(out))
    monkeypatch.undo()
    assert not out.exists()


def test_build_model_checks_user_models(tmp_path, user_models):
    from cure_lirpa.models import build_model

    with pytest.raises(UserError, match="returns"):
        build_model("badmodels:seven", (1, 28, 28), 10, (0.0,), (1.0,))
    model = build_model("badmodels:good", (1, 28, 28), 10, (0.0,), (1.0,))
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 2.0, float("nan")])
def test_clopper_pearson_refuses_alpha_outside_0_1(alpha):
    from cure_lirpa.smoothing.certifier import clopper_pearson_lower

    with pytest.raises(UserError, match="alpha must be in"):
        clopper_pearson_lower(50, 100, alpha)
