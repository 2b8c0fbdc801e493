"""Sharded verification: merged shards equal the unsharded run; bad merges are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cure_lirpa.cli import main
from cure_lirpa.errors import UserError
from cure_lirpa.io.shards import Shard, parse_shard

COMMON = ["--threat", "linf:0.02", "--threat", "l2:0.3", "--method", "ibp", "--method", "auto",
          "--count", "20", "--batch-size", "6", "--quiet", "--device", "cpu", "--attack-steps",
          "10"]  # fmt: skip
FIGURES = ("samples", "clean_accuracy", "certified", "certified_best", "union", "pgd_accuracy",
           "soundness_violations")  # fmt: skip


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


@pytest.fixture(scope="module")
def unsharded(mlp_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "whole"
    res = _run("verify", mlp_checkpoint, *COMMON, "--out", out)
    assert res.exit_code == 0, res.output
    return out


def _same_results(a: Path, b: Path) -> None:
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in FIGURES:
        assert sa[key] == sb[key], key
    ra = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (b / "samples.jsonl").read_text().splitlines()]
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):  # margins to float rounding (thread counts may differ), all else exact
        mx, my = x.pop("margins"), y.pop("margins")
        x.pop("seconds", None), y.pop("seconds", None)  # wall-clock shares
        assert x == y
        for t in mx:
            for m in mx[t]:
                assert mx[t][m] == pytest.approx(my[t][m], abs=1e-4, rel=1e-4)
    head = lambda d: (d / "samples.csv").read_text().splitlines()[0]  # noqa: E731
    assert head(a) == head(b)
    assert (a / "summary.md").exists() and (b / "summary.md").exists()


def test_shard_blocks_are_near_equal_contiguous_slices_of_the_samples():
    for n, count in [(20, 2), (20, 3), (7, 3), (7, 5), (8, 2), (100, 7), (3, 3)]:
        blocks = [Shard(k, count).block(n) for k in range(count)]
        covered = [i for lo, ln in blocks for i in range(lo, lo + ln)]
        assert covered == list(range(n))
        lengths = [ln for _, ln in blocks]
        assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
    assert Shard(1, 2).block(8) == (4, 4)  # not cut in batches: --count 8 --shard 1/2 holds 4
    assert Shard(0, 3).block(2) == (0, 0)  # empty only when there are fewer samples than shards
    assert parse_shard("1/4") == Shard(1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_merged_shards_equal_the_unsharded_run(mlp_checkpoint, unsharded, tmp_path):
    out = tmp_path / "sharded"
    for k in (1, 0):  # any order
        res = _run("verify", mlp_checkpoint, *COMMON, "--shard", f"{k}/2", "--out", out)
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["shard-0-of-2", "shard-1-of-2"]
    res = _run("merge", out)
    assert res.exit_code == 0, res.output
    _same_results(unsharded, out)
    merged = json.loads((out / "summary.json").read_text())
    shards = [json.loads((d / "summary.json").read_text()) for d in sorted(out.glob("shard-*"))]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    total = sum(r["seconds"]["total"] for r in rows)  # the samples' own shares, every session
    assert total > 0 and merged["seconds_total"] == pytest.approx(total)
    assert merged["seconds_total"] == pytest.approx(sum(s["seconds_total"] for s in shards))
    for key, per_image in merged["seconds_per_image"].items():
        own = sum(r["seconds"].get(key, 0.0) for r in rows) / len(rows)
        assert per_image == pytest.approx(own), key


def test_slurm_array_tasks_shard_and_print_the_merge_command(
    mlp_checkpoint, unsharded, tmp_path, monkeypatch
):
    out = tmp_path / "array"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for k in (0, 1):  # array tasks never meet: no process group, each says how to merge
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(k))
        res = _run("verify", mlp_checkpoint, *COMMON, "--out", out)
        assert res.exit_code == 0, res.output
        assert f"cure-lirpa merge {out}" in res.output
    assert _run("merge", out).exit_code == 0
    _same_results(unsharded, out)


def test_merge_lists_missing_samples_and_refuses_other_options(mlp_checkpoint, tmp_path):
    out = tmp_path / "v"
    assert _run("verify", mlp_checkpoint, *COMMON, "--shard", "0/3", "--out", out).exit_code == 0
    res = _run("merge", out)
    assert res.exit_code != 0 and "missing" in res.output and "12, 13" in res.output
    other = [a if a != "l2:0.3" else "l2:0.4" for a in COMMON]
    assert _run("verify", mlp_checkpoint, *other, "--shard", "1/3", "--out", out).exit_code == 0
    res = _run("merge", out)
    assert res.exit_code != 0 and "other settings" in res.output and "threats" in res.output


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_shards_by_rank_and_merges(mlp_checkpoint, unsharded, tmp_path):
    """Two processes under torchrun (gloo on CPU): each certifies its rank's shard, rank 0 merges."""
    out = tmp_path / "tr"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", "-m", "cure_lirpa", "verify", str(mlp_checkpoint), *COMMON,
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _same_results(unsharded, out)


SMALL = ["--threat", "linf:0.02", "--threat", "l2:0.3", "--method", "ibp", "--method", "crown",
         "--quiet", "--device", "cpu", "--attack-steps", "5"]  # fmt: skip


def _sharded_run(mlp_checkpoint, out: Path, n: int, extra: list) -> None:
    for k in range(n):
        res = _run("verify", mlp_checkpoint, *SMALL, *extra, "--shard", f"{k}/{n}", "--out", out)
        assert res.exit_code == 0, res.output
        assert len((out / f"shard-{k}-of-{n}" / "samples.jsonl").read_text().splitlines()) >= 1
    res = _run("merge", out)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "extra, shards, sizes",
    [
        (["--count", "8"], 2, [4, 4]),  # batches of 64: shard 1/2 used to be empty
        (["--count", "7", "--batch-size", "3"], 3, [2, 2, 3]),  # cuts inside batches
    ],
)
def test_shards_cut_by_samples_merge_into_the_plain_run(
    mlp_checkpoint, tmp_path, extra, shards, sizes
):
    plain = tmp_path / "plain"
    assert _run("verify", mlp_checkpoint, *SMALL, *extra, "--out", plain).exit_code == 0
    out = tmp_path / "sharded"
    _sharded_run(mlp_checkpoint, out, shards, extra)
    held = [
        len((out / f"shard-{k}-of-{shards}" / "samples.jsonl").read_text().splitlines())
        for k in range(shards)
    ]
    assert held == sizes
    _same_results(plain, out)
    # samples.csv: every cell equal, margins to float rounding (a shard batches a sample with
    # other samples than the plain run, and batched bound arithmetic rounds differently)
    csv = lambda d: [r.split(",") for r in (d / "samples.csv").read_text().splitlines()]  # noqa: E731
    head, *rows = csv(plain)
    head_out, *rows_out = csv(out)
    assert head == head_out and len(rows) == len(rows_out)
    for a, b in zip(rows, rows_out):
        for name, u, v in zip(head, a, b):
            if name.endswith("/margin"):
                assert float(u) == pytest.approx(float(v), rel=1e-4, abs=1e-4), name
            else:
                assert u == v, name


def test_a_sample_is_attacked_alike_alone_and_in_any_batch(small_trained_mlp):
    from cure_lirpa.attacks import pgd
    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.threats.base import parse_threat
    from cure_lirpa.verification.runner import certify_batch, pgd_seed

    model, info, x, y = small_trained_mlp
    x, y = x[:6], y[:6]
    gens = lambda idx: [torch.Generator().manual_seed(pgd_seed(0, i)) for i in idx]  # noqa: E731
    for threat in ("linf:0.1", "l2:1.0", "l1:3.0"):
        t = parse_threat(threat)
        # the random start alone (no steps) is exactly the same in every batch
        start = pgd(model, x, y, t, steps=0, restarts=1, generator=gens(range(6)))
        for i in (0, 3, 5):
            alone = pgd(model, x[i : i + 1], y[i : i + 1], t, steps=0, restarts=1,
                        generator=gens([i]))  # fmt: skip
            assert torch.equal(alone[0], start[i])
        # the full attack, batched gradient steps included, to float rounding
        batch = pgd(model, x, y, t, steps=10, restarts=2, generator=gens(range(6)))
        part = pgd(model, x[2:5], y[2:5], t, steps=10, restarts=2, generator=gens(range(2, 5)))
        torch.testing.assert_close(part, batch[2:5])
        for i in (0, 4):
            alone = pgd(model, x[i : i + 1], y[i : i + 1], t, steps=10, restarts=2,
                        generator=gens([i]))  # fmt: skip
            torch.testing.assert_close(alone[0], batch[i])
    with pytest.raises(UserError, match="one per sample"):
        pgd(model, x, y, parse_threat("l2:1.0"), generator=gens(range(3)))

    # certify_batch: sample 13 gets the same PGD verdict alone as inside a batch of 10..15
    bc = BoundedClassifier(model, info.in_shape)
    threats = [parse_threat("linf:0.1"), parse_threat("l2:1.5")]
    rows = certify_batch(bc, model, x, y, threats, ["ibp"], attack_steps=10, first_index=10)
    one = certify_batch(bc, model, x[3:4], y[3:4], threats, ["ibp"], attack_steps=10,
                        first_index=13)  # fmt: skip
    assert one[0].index == rows[3].index == 13
    assert one[0].robust == rows[3].robust


def test_more_shards_than_samples_is_refused_in_one_line(mlp_checkpoint, tmp_path):
    res = _run(
        "verify", mlp_checkpoint, *SMALL, "--count", "2", "--shard", "0/3", "--out", tmp_path
    )
    assert res.exit_code != 0
    assert "shard 0/3 is empty: 2 samples cannot fill 3 shards; use N <= 2" in res.output
