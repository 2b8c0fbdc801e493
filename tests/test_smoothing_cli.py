"""End to end through the ``smooth`` click group on the built-in MNIST sample."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cure_lirpa.smoothing.certifier import read_tsv
from cure_lirpa.smoothing.cli import smooth

torch.set_num_threads(1)

CERT = [
    "--n0",
    "20",
    "--n",
    "200",
    "--alpha",
    "0.01",
    "--batch-size",
    "100",
    "--count",
    "6",
    "--skip",
    "150",
    "--device",
    "cpu",
    "--no-progress",
]


def invoke(*args: str, ok: bool = True):
    result = CliRunner().invoke(smooth, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("smooth") / "g.pt"
    invoke(
        "train",
        "--method",
        "gaussian",
        "--sigma",
        "0.5",
        "--epochs",
        "1",
        "--train-count",
        "512",
        "--eval-count",
        "0",
        "--width",
        "4",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--out",
        path,
        "--no-progress",
    )
    return path


def _rows_without_time(path):
    header, columns, rows = read_tsv(path)
    return header, columns, [{k: v for k, v in r.items() if k != "time"} for r in rows]


def test_certify_hybrid_and_resume(model, tmp_path):
    full = tmp_path / "full.tsv"
    res = invoke("certify", "-c", model, "--noise", "hybrid", "--sigma", "0.5", "-o", full, *CERT)
    assert "clean accuracy" in res.output
    header, columns, rows = _rows_without_time(full)
    assert len(rows) == 6 and [r["idx"] for r in rows] == [str(i) for i in range(0, 900, 150)]
    assert header["run"]["alpha_each"] == 0.005 and columns[-1] == "time"
    for r in rows:
        assert r["rule"] in (
            "agree",
            "uniform-abstained",
            "gaussian-abstained",
            "both-abstained",
            "disagree",
        )
        assert int(r["correct"]) == (r["predict"] == r["label"])

    # simulated kill: the file ends in the middle of a row
    data = full.read_bytes()
    cut = tmp_path / "cut.tsv"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert len(read_tsv(cut)[2]) < 6
    invoke(
        "certify", "-c", model, "--noise", "hybrid", "--sigma", "0.5", "-o", cut, "--resume", *CERT
    )
    assert _rows_without_time(cut) == _rows_without_time(full)
    assert cut.read_text().count("\n") == full.read_text().count("\n")

    # shards give the same rows as one run
    shard = tmp_path / "shard.tsv"
    args = [a for a in CERT]
    args[args.index("--count") + 1] = "3"
    invoke(
        "certify",
        "-c",
        model,
        "--noise",
        "hybrid",
        "--sigma",
        "0.5",
        "-o",
        shard,
        "--start",
        "450",
        *args,
    )
    assert _rows_without_time(shard)[2] == _rows_without_time(full)[2][3:]

    # a TSV from another configuration is refused with a clear message
    res = invoke(
        "certify",
        "-c",
        model,
        "--noise",
        "hybrid",
        "--sigma",
        "0.25",
        "-o",
        cut,
        "--resume",
        *CERT,
        ok=False,
    )
    assert res.exit_code == 1 and "different run" in res.output and "noises" in res.output
    res = invoke(
        "certify", "-c", model, "--noise", "hybrid", "--sigma", "0.5", "-o", full, *CERT, ok=False
    )
    assert res.exit_code == 1 and "--resume" in res.output


def test_certify_gaussian_predict_and_analyze(model, tmp_path):
    g = tmp_path / "g.tsv"
    u = tmp_path / "u.tsv"
    invoke("certify", "-c", model, "--noise", "gaussian", "--sigma", "0.5", "-o", g, *CERT)
    invoke("certify", "-c", model, "--noise", "uniform", "--sigma", "0.25", "-o", u, *CERT)
    _, columns, rows = read_tsv(g)
    assert "gaussian_p_lower" in columns and "uniform_p_lower" not in columns
    for r in rows:
        assert float(r["radius_l1"]) == float(r["radius_l2"])

    p = tmp_path / "p.tsv"
    res = invoke(
        "predict",
        "-c",
        model,
        "--sigma",
        "0.5",
        "-o",
        p,
        "--n",
        "100",
        "--count",
        "4",
        "--skip",
        "100",
        "--alpha",
        "0.01",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert "accuracy" in res.output
    header, columns, rows = read_tsv(p)
    assert len(rows) == 4 and header["run"]["command"] == "predict"

    out = tmp_path / "report"
    res = invoke("analyze", f"A={g}", f"A={u}", str(g), "--out-dir", out, "--clean-acc", "0,10")
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 3
    assert (out / "certified_accuracy.png").stat().st_size > 1000
    assert "ACR" in (out / "summary.md").read_text()
    assert set(summary["fixed_clean_accuracy"]["methods"]) == {"A", "gaussian -> gaussian"}
    res = invoke("analyze", str(p), "--out-dir", out, ok=False)
    assert res.exit_code == 1 and "not a certification TSV" in res.output


def test_bad_input_messages(model, tmp_path):
    out = tmp_path / "x.tsv"
    res = invoke("certify", "-c", model, "--sigma", "0", "-o", out, ok=False)
    assert res.exit_code == 2 and "--sigma" in res.output
    res = invoke(
        "certify", "-c", model, "--noise", "laplace", "--sigma", "0.5", "-o", out, ok=False
    )
    assert res.exit_code == 2 and "laplace" in res.output
    res = invoke("certify", "-c", model, "--n0", "0", "--sigma", "0.5", "-o", out, ok=False)
    assert res.exit_code == 2 and "--n0" in res.output
    res = invoke("certify", "-c", model, "--noise", "uniform", "-o", out, ok=False)
    assert res.exit_code == 1 and "--sigma" in res.output
    res = invoke("certify", "-c", tmp_path / "missing.pt", "--sigma", "0.5", "-o", out, ok=False)
    assert res.exit_code == 1 and "does not exist" in res.output
    res = invoke(
        "certify",
        "-c",
        model,
        "--sigma",
        "0.5",
        "-o",
        out,
        "--n",
        "5",
        "--n0",
        "5",
        "--count",
        "1",
        "--alpha",
        "0.001",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert "smallest useful n is 10" in res.output
    assert read_tsv(out)[2][0]["predict"] == "-1"
    res = invoke(
        "train", "--method", "nu-rs", "--sigma", "-1", "--out", tmp_path / "m.pt", ok=False
    )
    assert res.exit_code == 2


def test_warnings_for_n0_above_n_and_a_model_not_trained_under_noise(model, tmp_path):
    from cure_lirpa.checkpoint import atomic_torch_save, make_checkpoint
    from cure_lirpa.data import dataset_info
    from cure_lirpa.models import build_model

    args = ["--sigma", "0.5", "--count", "1", "--alpha", "0.01", "--device", "cpu"]
    res = invoke("certify", "-c", model, "--n0", "300", "--n", "200", *args, "-o", tmp_path / "a")
    assert "--n0 300 is larger than --n 200" in res.output
    assert "not trained under noise" not in res.output
    res = invoke("certify", "-c", model, "--n0", "20", "--n", "200", *args, "-o", tmp_path / "b")
    assert "Warning" not in res.output

    info = dataset_info("sample")
    plain = tmp_path / "plain.pt"  # a checkpoint of 'cure-lirpa train': no noise in its config
    net = build_model("mlp", info.in_shape, 10, info.mean, info.std, width=8, depth=1)
    atomic_torch_save(
        make_checkpoint(net, "mlp", info, {"method": "natural"}, {"width": 8, "depth": 1}), plain
    )
    res = invoke("certify", "-c", plain, "--n0", "20", "--n", "200", *args, "-o", tmp_path / "c")
    assert "was not trained under noise" in res.output and "smooth train" in res.output
