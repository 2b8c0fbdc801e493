"""Bad inputs to ``cure-lirpa train``: one clear line, a non-zero exit and nothing left behind."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cure_lirpa.cli import main
from cure_lirpa.data import load_dataset
from cure_lirpa.errors import UserError
from cure_lirpa.io import checkpoint as checkpoint_module
from cure_lirpa.io.checkpoint import load_checkpoint
from cure_lirpa.threats.base import parse_threat
from cure_lirpa.training.config import TrainConfig

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


def refused_data(tmp_path, dataset: str, root: Path, *phrases: str) -> None:
    """``train --dataset DATASET --data-root ROOT`` is :func:`refused` and leaves no run folder."""
    out = tmp_path / "run"
    refused(run("--dataset", dataset, "--data-root", root, "--out", out, *QUICK), *phrases)
    assert not out.exists()


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

            from cure_lirpa.models import Classifier

            def seven(in_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))

            def two_by_five(in_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Unflatten(1, (2, 5)))

            def good(in_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))

            def _pooled(channels, num_classes):
                return nn.Sequential(
                    nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(4, num_classes),
                )

            def rgb(in_shape, num_classes):  # an RGB model: its normalisation has 3 channels
                rgb_mean = (0.49, 0.48, 0.45)
                return Classifier(_pooled(3, num_classes), rgb_mean, (0.25, 0.24, 0.26))

            def gray(in_shape, num_classes):  # a grayscale model
                return Classifier(_pooled(1, num_classes), (0.13,), (0.31,))

            def boom(in_shape, num_classes):
                raise ValueError("hidden size must be even, got 7")

            def dropout(in_shape, num_classes):
                return nn.Sequential(
                    nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Dropout(0.2),
                    nn.Linear(32, num_classes),
                )
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
    refused_data(tmp_path, "tinyimagenet", root, "3 class folders", "200 classes")


def test_tinyimagenet_without_val_is_refused_before_training(tmp_path):
    root = tmp_path / "tiny"
    _images(root / "train", classes=3, size=64)
    refused_data(tmp_path, "tinyimagenet", root, "no val/ folder")


def test_an_image_of_another_size_is_named(tmp_path):
    root = tmp_path / "cifar"
    _images(root / "train", classes=10, size=32, per_class=2, odd=1)
    _images(root / "test", classes=10, size=32)
    refused_data(tmp_path, "cifar10", root, "c000/0.png is 40x40 pixels", "32x32")
    with pytest.raises(UserError, match="40x40"):
        load_dataset("cifar10", "train", str(root))[0]


def test_empty_mnist_raw_folder_is_explained(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    phrases = ("MNIST idx files not found", "t10k-images-idx3-ubyte")
    refused_data(tmp_path, "mnist", tmp_path, *phrases)


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


# ---------------------------------------------------------------------------------------------
# Silent wrong runs and unclear errors (issue 17, section 4): one clear line each


def _checkpoint(path: Path, dataset: str = "sample") -> Path:
    """An untrained cnn-small (width 4) checkpoint of ``dataset``."""
    from cure_lirpa.data import dataset_info
    from cure_lirpa.io.checkpoint import make_checkpoint
    from cure_lirpa.models import build_model

    info = dataset_info(dataset)
    torch.manual_seed(0)
    model = build_model("cnn-small", info.in_shape, info.num_classes, info.mean, info.std, width=4)
    torch.save(make_checkpoint(model, "cnn-small", info, {}, {"width": 4}), path)
    return path


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def test_sequential_max_n_below_n0_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.pt")
    out = tmp_path / "cert"
    res = cli("smooth", "certify", "-c", ckpt, "--sigma", "1/2", "--sequential", "decide",
              "--n0", 100, "--max-n", 50, "--count", 2, "-q", "--device", "cpu", "--out", out)  # fmt: skip
    refused(res, "--max-n 50 is below --n0 100")
    assert not out.exists()


def test_a_ball_that_covers_the_input_box_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.pt")
    out = tmp_path / "v"
    # l∞ >= 1 covers [0, 1]^d whatever d: refused while parsing, by every command
    refused(cli("verify", ckpt, "--threat", "linf:5", "--out", out),
            "linf:5", "covers the whole input box", "did you mean 5/255?")  # fmt: skip
    with pytest.raises(UserError, match="covers the whole input box"):
        parse_threat("linf:1")
    assert parse_threat("l2:30").eps == 30  # l2 / l1 need the input size: checked per command
    # l2 >= sqrt(d) (28 on 1x28x28), l1 >= d (784)
    for threat in ("l2:28", "l1:784"):
        res = cli("verify", ckpt, "--threat", threat, "--count", 2, "-q", "--out", out)
        refused(res, threat, "covers the whole input box [0, 1]^784")
    assert not out.exists()
    refused(run("--eps-l2", "30", "--out", out, *QUICK), "--eps-l2", "[0, 1]^784")
    refused(run("--eps-linf", "1", "--out", out, *QUICK), "--eps-linf", "covers the whole")
    assert not out.exists()
    res = cli("verify", ckpt, "--threat", "l2:27.9", "--count", 2, "-q", "--no-attack",
              "--method", "ibp", "--device", "cpu", "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output


def test_a_model_for_other_channels_is_refused_with_both_shapes(tmp_path, user_models):
    out = tmp_path / "run"
    # grayscale images into an RGB model (its 3-channel normalisation would broadcast silently)
    refused(run("--arch", "badmodels:rgb", "--out", out, *QUICK), "1x28x28", "3xHxW")
    res = cli("smooth", "train", "--arch", "badmodels:rgb", "--train-count", 16, "--epochs", 1,
              "--eval-count", 0, "-q", "--device", "cpu", "--out", out)  # fmt: skip
    refused(res, "1x28x28", "3xHxW")
    assert not out.exists()
    # RGB images into a grayscale model
    root = tmp_path / "cifar"
    _images(root / "train", classes=10, size=32)
    _images(root / "test", classes=10, size=32)
    res = run("--arch", "badmodels:gray", "--dataset", "cifar10", "--data-root", root,
              "--out", out, *QUICK)  # fmt: skip
    refused(res, "3x32x32", "channels")
    assert not out.exists()
    # a checkpoint certified on a dataset of other images
    ckpt = _checkpoint(tmp_path / "cifar.pt", "cifar10")
    res = cli("verify", ckpt, "--dataset", "sample", "--count", 2, "-q", "--out", out)
    refused(res, "(1, 28, 28)", "(3, 32, 32)")


def test_train_count_below_batch_size_trains_one_batch_and_says_so(tmp_path):
    out = tmp_path / "run"
    res = run("--train-count", 40, "--batch-size", 64, "--width", 4, "--epochs", 1,
              "--device", "cpu", "--quiet", "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "warning: --train-count 40 is below --batch-size 64" in res.output
    assert load_checkpoint(out / "checkpoint.pt")["config"]["batch_size"] == 40
    out = tmp_path / "smooth"
    res = cli("smooth", "train", "--train-count", 40, "--width", 4, "--epochs", 1,
              "--eval-count", 0, "-q", "--device", "cpu", "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "--train-count 40 is below --batch-size 256" in res.output
    assert load_checkpoint(out / "checkpoint.pt")["config"]["batch_size"] == 40


def test_a_model_with_dropout_trains_with_certificates(tmp_path, user_models):
    out = tmp_path / "run"
    res = run("--arch", "badmodels:dropout", "--method", "cure-random", "--crown-ibp",
              "--warmup-epochs", 0, "--ramp-epochs", 0.5, "--train-count", 128,
              "--batch-size", 32, "--epochs", 1, "--device", "cpu", "--quiet",
              "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    last = load_checkpoint(out / "checkpoint.pt")["trainer_state"]["history"][-1]
    assert last["eps"]["linf"] > 0 and set(last["certified"]) >= {"linf", "l2", "union"}


def test_a_factory_that_raises_is_one_line(tmp_path, user_models):
    out = tmp_path / "run"
    refused(
        run("--arch", "badmodels:boom", "--out", out, *QUICK),
        "'badmodels:boom': boom() raised ValueError: hidden size must be even, got 7",
        "badmodels.py:",
    )
    assert not out.exists()


def test_input_range_errors_name_the_range_to_the_last_digit():
    from torch import nn

    from cure_lirpa.attacks import pgd
    from cure_lirpa.bounds.classifier import BoundedClassifier

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.full((1, 1, 2, 2), 0.5)
    x[0, 0, 0, 0] = 1.0000015  # float32 1.00000155: '.3g' would print 1
    y = torch.zeros(1, dtype=torch.long)
    threat = parse_threat("linf:0.1")
    with pytest.raises(UserError, match=r"\[0\.5, 1\.0000015"):
        BoundedClassifier(model, (1, 2, 2)).margin_lower_bounds(x, y, threat, "ibp")
    with pytest.raises(UserError, match=r"\[0\.5, 1\.0000015"):
        pgd(model, x, y, threat, steps=1, restarts=1)


# ---------------------------------------------------------------------------------------------
# One convention per option (issue 17, section 5)


def _commands() -> dict:
    smooth = main.commands["smooth"]
    return {
        "train": main.commands["train"],
        "verify": main.commands["verify"],
        "merge": main.commands["merge"],
        **{f"smooth {name}": cmd for name, cmd in smooth.commands.items()},
    }


SHARED = {
    "quiet": ["--quiet", "-q"],
    "out": ["--out", "-o"],
    "device": ["--device"],
    "seed": ["--seed"],
    "batch_size": ["--batch-size"],
    "threads": ["--threads"],
    "resume": ["--resume"],
    "overwrite": ["--overwrite"],
}
RUN_COMMANDS = ["train", "verify", "smooth train", "smooth certify", "smooth predict"]


@pytest.mark.parametrize("name", RUN_COMMANDS)
def test_shared_options_are_the_same_on_every_run_command(name):
    reference = {p.name: p for p in _commands()["train"].params}
    params = {p.name: p for p in _commands()[name].params}
    for key, opts in SHARED.items():
        assert key in params, f"{name} has no {opts[0]}"
        p, ref = params[key], reference[key]
        assert sorted(p.opts) == sorted(opts), (name, p.opts)
        assert type(p.type) is type(ref.type) and p.is_flag == ref.is_flag, (name, key)
        if isinstance(p.type, click.IntRange):
            assert p.type.min == ref.type.min or key == "batch_size", (name, key)
    for name, cmd in _commands().items():  # and wherever else they appear, they are the same
        for p in cmd.params:
            if p.name in SHARED and p.name != "out":
                assert sorted(p.opts) == sorted(SHARED[p.name]), (name, p.opts)


def test_every_radius_option_accepts_the_same_forms():
    from cure_lirpa.cli.common import ThreatType

    found = []
    for name, cmd in _commands().items():
        for p in cmd.params:
            words = set(p.name.split("_"))
            radius = bool(words & {"eps", "sigma", "radius", "radii", "precision"})
            if not isinstance(p, click.Option) or not radius or p.name.endswith("_norm"):
                continue
            found.append(f"{name} {p.opts[0]}")
            for text, value in [("0.25", 0.25), ("1/4", 0.25), ("8/255", 8 / 255)]:
                got = p.type.convert(text, p, None)
                assert (got[0] if isinstance(got, list) else got) == pytest.approx(value), found[-1]
    assert {"train --eps-l2", "smooth certify --sigma", "smooth train --sigma",
            "smooth certify --radii", "smooth analyze --max-radius"} <= set(found)  # fmt: skip
    assert ThreatType().convert("l2:1/4", None, None).eps == 0.25
