"""``cure-lirpa train`` end to end: outputs, resume, and clean messages for user mistakes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cure_lirpa.cli import main
from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint

QUICK = [
    "--train-count",
    "128",
    "--width",
    "4",
    "--batch-size",
    "64",
    "--warmup-epochs",
    "0.5",
    "--ramp-epochs",
    "1",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--quiet",
]


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, ["train", *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def refused(result, *phrases: str) -> None:
    """Exit code != 0, the message names the problem, no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for p in phrases:
        assert p in result.output, result.output


def test_train_writes_checkpoint_metrics_and_config(tmp_path):
    out = tmp_path / "demo"
    result = run("--out", out, "--epochs", "2", *QUICK)
    ckpt_path = out / "checkpoint.pt"
    assert str(ckpt_path) in result.output and "certified" in result.output
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["arch"] == "cnn-small" and ckpt["arch_kwargs"] == {"width": 4}
    assert ckpt["config"]["method"] == "cure-joint" and ckpt["epoch"] == 2
    state = ckpt["trainer_state"]
    assert {"optimizer", "rng", "method_rng_by_rank"} <= set(state)
    assert {"torch", "numpy", "python", "generators"} <= set(state["rng"])
    assert model_from_checkpoint(ckpt)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"loss", "parts", "clean_accuracy", "certified", "eps", "lr", "seconds"} <= set(lines[0])
    record = json.loads((out / "config.json").read_text())
    assert record["kind"] == "train" and record["config"]["train_count"] == 128


def test_cli_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["--method", "cure-random", "--linf-variant", "sabr", *QUICK]
    run("--out", tmp_path / "full", "--epochs", "2", *args)
    run("--out", tmp_path / "part", "--epochs", "1", *args)
    run("--out", tmp_path / "part", "--epochs", "2", "--resume", *args)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mtl_ibp_blocks_and_shi_recipe_from_the_command_line(tmp_path):
    out = tmp_path / "mtl"
    args = ["--method", "cure-joint", "--linf-variant", "mtl-ibp", "--l2-variant", "mtl-ibp"]
    shi = ["--init", "ibp", "--ibp-reg", "0.5", "--l1-reg", "1e-6", "--mtl-alpha-l2", "0.7"]
    run("--out", out, "--epochs", "2", *args, *shi, *QUICK)
    cfg = load_checkpoint(out / "checkpoint.pt")["config"]
    assert (cfg["linf_variant"], cfg["l2_variant"], cfg["init"]) == ("mtl-ibp", "mtl-ibp", "ibp")
    assert (cfg["ibp_reg"], cfg["l1_reg"], cfg["mtl_alpha_l2"]) == (0.5, 1e-6, 0.7)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    assert "ibp_reg" in first["parts"] and "l1" in first["parts"]


def test_existing_output_and_config_changes_are_refused(tmp_path):
    out = tmp_path / "run"
    run("--out", out, "--epochs", "1", "--method", "ibp-linf", *QUICK)
    before = (out / "checkpoint.pt").read_bytes()
    refused(run("--out", out, "--method", "ibp-linf", *QUICK, ok=False), "--resume", "--overwrite")
    refused(
        run("--out", out, "--method", "ibp-linf", "--lr", "0.01", "--resume", *QUICK, ok=False),
        "other settings",
        "lr: run 0.001, now 0.01",
    )
    assert (out / "checkpoint.pt").read_bytes() == before
    run("--out", out, "--epochs", "1", "--method", "natural", "--overwrite", *QUICK)
    assert load_checkpoint(out / "checkpoint.pt")["config"]["method"] == "natural"


@pytest.mark.parametrize(
    "args,phrases",
    [
        (["--eps-linf", "-0.1"], ["--eps-linf"]),
        (["--method", "ibp-linf", "--ba-eta", "1"], ["multi-norm"]),
        (["--method", "ibp-linf", "--linf-variant", "sabr"], ["--linf-variant"]),
        (["--method", "natural", "--gp-beta", "0.5"], ["gradient projection"]),
        (["--preset", "cure-finetune"], ["--init-from"]),
        (["--init-from", "no/such/checkpoint.pt"], ["does not exist"]),
        (["--resume"], ["--resume", "holds no train run"]),
        (["--dataset", "mnist", "--data-root", "no/such/folder"], ["MNIST not found"]),
        (["--method", "pgd"], ["--method"]),
        (["--resume", "--overwrite"], ["contradict"]),
        (["--method", "mtl-ibp-l2", "--ibp-reg", "0.5"], ["--ibp-reg", "l∞"]),
        (["--method", "mtl-ibp-linf", "--mtl-alpha-linf", "1.5"], ["--mtl-alpha-linf"]),
        (["--init", "xavier"], ["--init"]),
    ],
)
def test_user_mistakes_give_clean_messages_and_no_output(tmp_path, args, phrases):
    out = tmp_path / "run"
    refused(run("--out", out, *args, *QUICK, ok=False), *phrases)
    assert not out.exists()


def test_preset_is_applied_under_explicit_options(tmp_path):
    base = tmp_path / "base"
    run("--out", base, "--epochs", "1", "--method", "ibp-linf", *QUICK)
    out = tmp_path / "ft"
    run(
        "--out",
        out,
        "--preset",
        "cure-finetune",
        "--init-from",
        base / "checkpoint.pt",
        "--epochs",
        "2",
        "--gp-beta",
        "0.3",
        *["--train-count", "128", "--batch-size", "64", "--device", "cpu", "--quiet"],
    )
    cfg = load_checkpoint(out / "checkpoint.pt")["config"]
    assert cfg["preset"] == "cure-finetune" and cfg["method"] == "cure-max"
    assert cfg["ba_eta"] == 0.5 and cfg["gp_beta"] == 0.3 and cfg["lr"] == 5e-4
    assert cfg["arch_kwargs"] == {"width": 4}  # taken from the --init-from checkpoint
    # the preset's schedule (2 natural epochs, 10-epoch ramp, decay at 15 of 20) scaled to 2 epochs
    assert (cfg["warmup_epochs"], cfg["ramp_epochs"], cfg["lr_milestones"]) == (0.2, 1.0, [1.5])
