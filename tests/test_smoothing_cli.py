"""End to end through ``cure-lirpa smooth ...`` and ``cure-lirpa merge`` on the built-in MNIST
sample: run folders, resume after a kill, shards merged into the unsharded run's files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from cure_lirpa.cli import main
from cure_lirpa.io.runs import Records
from cure_lirpa.smoothing.results import read_tsv

torch.set_num_threads(1)

CERT = ["--n0", "20", "--n", "200", "--alpha", "0.01", "--batch-size", "100", "--count", "6",
        "--skip", "150", "--device", "cpu", "--quiet"]  # fmt: skip
HYBRID = ["--noise", "hybrid", "--sigma", "0.5", *CERT]
TRAIN = ["--sigma", "0.5", "--epochs", "1", "--train-count", "512", "--eval-count", "0",
         "--width", "4", "--batch-size", "64", "--device", "cpu", "--quiet"]  # fmt: skip


def invoke(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("smooth") / "g"
    invoke("smooth", "train", *TRAIN, "--out", path)
    return path


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _tsv_without_time(folder):
    header, columns, rows = read_tsv(folder / "samples.tsv")
    return header, columns, _without_time(rows)


def _summary(folder):
    summary = json.loads((folder / "summary.json").read_text())
    assert summary.pop("seconds_total") >= 0
    return summary


def test_train_run_folder_and_resume_rules(model, tmp_path):
    assert {p.name for p in model.iterdir()} == {"config.json", "checkpoint.pt", "metrics.jsonl"}
    config = json.loads((model / "config.json").read_text())
    assert config["kind"] == "smooth-train" and config["config"]["sigma"] == 0.5
    res = invoke("smooth", "train", *TRAIN, "--out", model, ok=False)
    assert res.exit_code == 1 and "--resume to continue" in res.output
    res = invoke("smooth", "train", *TRAIN, "--sigma", "0.25", "--out", model, "--resume", ok=False)
    assert res.exit_code == 1 and "sigma: run 0.5, now 0.25" in res.output
    res = invoke("smooth", "train", *TRAIN, "--out", tmp_path / "none", "--resume", ok=False)
    assert res.exit_code == 1 and "no smooth-train run to continue" in res.output
    res = invoke("smooth", "train", *TRAIN, "--out", model, "--resume")  # finished: nothing to do
    assert "epoch 1/1" in res.output


def test_certify_resume_after_a_kill_and_merged_shards_equal_the_unsharded_run(model, tmp_path):
    full = tmp_path / "full"
    res = invoke("smooth", "certify", "-c", model, *HYBRID, "--out", full)
    assert "clean accuracy" in res.output and "certified accuracy (l2)" in res.output
    header, columns, rows = _tsv_without_time(full)
    assert [r["idx"] for r in rows] == [str(i) for i in range(0, 900, 150)]
    assert header["run"]["alpha_each"] == 0.005 and columns[-1] == "time"
    for r in rows:
        assert int(r["correct"]) == (r["predict"] == r["label"])
    records = Records(full / "samples.jsonl").read()
    assert len(records) == 6

    # a kill in the middle of a record: the resume recomputes the rest and gives the same files
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(full / "config.json", cut / "config.json")
    data = (full / "samples.jsonl").read_bytes()
    (cut / "samples.jsonl").write_bytes(data[: int(len(data) * 0.6)])
    assert 0 < len(Records(cut / "samples.jsonl").read()) < 6
    invoke("smooth", "certify", "-c", model, *HYBRID, "--out", cut, "--resume")
    assert _without_time(Records(cut / "samples.jsonl").read()) == _without_time(records)
    assert _tsv_without_time(cut) == _tsv_without_time(full)
    assert _summary(cut) == _summary(full)

    # three shards, each with its own records, merged into exactly the unsharded run's files
    sharded = tmp_path / "sharded"
    for k in range(3):
        invoke("smooth", "certify", "-c", model, *HYBRID, "--shard", f"{k}/3", "--out", sharded)
        assert len(Records(sharded / f"shard-{k}-of-3" / "samples.jsonl").read()) == 2
    res = invoke("merge", sharded)
    assert "merged 3 shards" in res.output
    assert _summary(sharded) == _summary(full)
    assert (sharded / "summary.md").read_text() == (full / "summary.md").read_text()
    assert _tsv_without_time(sharded) == _tsv_without_time(full)
    merged = Records(sharded / "samples.jsonl").read()
    assert _without_time(merged) == _without_time(records)
    assert json.loads((sharded / "config.json").read_text()) == json.loads(
        (full / "config.json").read_text()
    )

    # a missing shard is named by its indices; shards of other settings are refused
    partial = tmp_path / "partial"
    invoke("smooth", "certify", "-c", model, *HYBRID, "--shard", "0/3", "--out", partial)
    res = invoke("merge", partial, ok=False)
    assert res.exit_code == 1 and "4 of 6 samples are missing (indices 300, 450, 600, 750)" in (
        res.output
    )
    other = tmp_path / "other"
    args = ["--noise", "hybrid", "--sigma", "0.25", *CERT, "--shard", "1/3", "--out", other]
    invoke("smooth", "certify", "-c", model, *args)
    res = invoke("merge", partial, partial / "shard-0-of-3", other / "shard-1-of-3", ok=False)
    assert res.exit_code == 1 and "other settings" in res.output and "noises" in res.output

    # the finished run is refused without --resume; a resume with other settings names them
    res = invoke("smooth", "certify", "-c", model, *HYBRID, "--out", full, ok=False)
    assert res.exit_code == 1 and "--resume" in res.output
    res = invoke("smooth", "certify", "-c", model, "--noise", "hybrid", "--sigma", "0.25", *CERT,
                 "--out", full, "--resume", ok=False)  # fmt: skip
    assert res.exit_code == 1 and "other settings" in res.output and "noises" in res.output


def test_certify_gaussian_predict_and_analyze(model, tmp_path):
    g, u = tmp_path / "g", tmp_path / "u"
    invoke("smooth", "certify", "-c", model, "--sigma", "0.5", "--out", g, *CERT)
    invoke("smooth", "certify", "-c", model / "checkpoint.pt", "--noise", "uniform", "--sigma",
           "0.25", "--out", u, *CERT)  # fmt: skip
    _, columns, rows = read_tsv(g / "samples.tsv")
    assert "gaussian_p_lower" in columns and "uniform_p_lower" not in columns
    for r in rows:
        assert float(r["radius_l1"]) == float(r["radius_l2"])

    p = tmp_path / "p"
    res = invoke("smooth", "predict", "-c", model, "--sigma", "0.5", "--out", p, "--n", "100",
                 "--count", "4", "--skip", "100", "--alpha", "0.01", "--device", "cpu", "-q")  # fmt: skip
    assert "accuracy" in res.output
    header, _, rows = read_tsv(p / "samples.tsv")
    assert len(rows) == 4 and header["run"]["command"] == "predict"
    summary = json.loads((p / "summary.json").read_text())
    assert summary["accuracy"] == sum(int(r["correct"]) for r in rows) / 4

    out = tmp_path / "report"  # run folders and their TSVs alike
    res = invoke("smooth", "analyze", f"A={g}", f"A={u / 'samples.tsv'}", g, "--out", out,
                 "--clean-acc", "0,10")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 3
    assert (out / "certified_accuracy.png").stat().st_size > 1000
    assert "ACR" in (out / "summary.md").read_text()
    assert set(summary["fixed_clean_accuracy"]["methods"]) == {"A", "gaussian -> gaussian"}
    res = invoke("smooth", "analyze", p, "--out", out, ok=False)
    assert res.exit_code == 1 and "not a certification run" in res.output


def test_bad_input_messages(model, tmp_path):
    out = tmp_path / "x"
    res = invoke("smooth", "certify", "-c", model, "--sigma", "0", "--out", out, ok=False)
    assert res.exit_code == 2 and "--sigma" in res.output
    res = invoke("smooth", "certify", "-c", model, "--noise", "laplace", "--sigma", "0.5",
                 "--out", out, ok=False)  # fmt: skip
    assert res.exit_code == 2 and "laplace" in res.output
    res = invoke("smooth", "certify", "-c", model, "--noise", "uniform", "--out", out, ok=False)
    assert res.exit_code == 1 and "--sigma" in res.output
    res = invoke("smooth", "certify", "-c", tmp_path / "missing.pt", "--sigma", "0.5", "--out",
                 out, ok=False)  # fmt: skip
    assert res.exit_code == 1 and "does not exist" in res.output
    res = invoke("smooth", "certify", "-c", model, "--sigma", "0.5", "--shard", "3/3", "--out",
                 out, ok=False)  # fmt: skip
    assert res.exit_code == 1 and "0..N-1" in res.output
    res = invoke("smooth", "certify", "-c", model, "--sigma", "0.5", "--out", out, "--n", "5",
                 "--n0", "5", "--count", "1", "--alpha", "0.001", "--device", "cpu", "-q")  # fmt: skip
    assert "smallest useful n is 10" in res.output
    assert read_tsv(out / "samples.tsv")[2][0]["predict"] == "-1"
    res = invoke("smooth", "train", "--sigma", "-1", "--out", tmp_path / "m", ok=False)
    assert res.exit_code == 2


def test_warnings_for_n0_above_n_and_a_model_not_trained_under_noise(model, tmp_path):
    from cure_lirpa.data import dataset_info
    from cure_lirpa.io.checkpoint import atomic_torch_save, make_checkpoint
    from cure_lirpa.models import build_model

    args = ["--sigma", "0.5", "--count", "1", "--alpha", "0.01", "--device", "cpu", "-q"]
    res = invoke("smooth", "certify", "-c", model, "--n0", "300", "--n", "200", *args, "--out",
                 tmp_path / "a")  # fmt: skip
    assert "--n0 300 is larger than --n 200" in res.output
    assert "not trained under noise" not in res.output
    res = invoke("smooth", "certify", "-c", model, "--n0", "20", "--n", "200", *args, "--out",
                 tmp_path / "b")  # fmt: skip
    assert "Warning" not in res.output

    info = dataset_info("sample")
    plain = tmp_path / "plain.pt"  # a checkpoint of 'cure-lirpa train': no noise in its config
    net = build_model("mlp", info.in_shape, 10, info.mean, info.std, width=8, depth=1)
    atomic_torch_save(
        make_checkpoint(net, "mlp", info, {"method": "natural"}, {"width": 8, "depth": 1}), plain
    )
    res = invoke("smooth", "certify", "-c", plain, "--n0", "20", "--n", "200", *args, "--out",
                 tmp_path / "c")  # fmt: skip
    assert "was not trained under noise" in res.output and "smooth train" in res.output


def test_shards_from_a_slurm_array_and_from_torchrun_ranks(model, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = ["smooth", "certify", "-c", model, "--sigma", "0.5", *CERT, "--count", "4"]
    invoke(*args, "--out", tmp_path / "one")
    slurm = tmp_path / "slurm"  # a job array: the shard comes from the environment, merge later
    for k in range(2):
        env = {"SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_COUNT": "2"}
        res = CliRunner().invoke(main, [str(a) for a in args] + ["--out", str(slurm)], env=env)
        assert res.exit_code == 0 and f"shard-{k}-of-2" in res.output, res.output
        assert "cure-lirpa merge" in res.output
    invoke("merge", slurm)
    assert _summary(slurm) == _summary(tmp_path / "one")

    torchrun = tmp_path / "torchrun"  # two ranks: each certifies its shard, rank 0 merges
    # '--' keeps torchrun from reading --n and --start as abbreviations of its own options
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cure_lirpa", "--", *(str(a) for a in args), "--start", "0",
           "--out", str(torchrun)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "merged 2 shards" in done.stderr
    assert _summary(torchrun) == _summary(tmp_path / "one")
    assert _tsv_without_time(torchrun) == _tsv_without_time(tmp_path / "one")
