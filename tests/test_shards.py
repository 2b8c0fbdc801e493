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

from cure_lirpa.checkpoint import atomic_torch_save, make_checkpoint
from cure_lirpa.cli import main
from cure_lirpa.errors import UserError
from cure_lirpa.shards import Shard, parse_shard

COMMON = ["--threat", "linf:0.02", "--threat", "l2:0.3", "--method", "ibp", "--method", "auto",
          "--count", "20", "--batch-size", "6", "--quiet", "--device", "cpu", "--attack-steps",
          "10"]  # fmt: skip
FIGURES = ("samples", "clean_accuracy", "certified", "certified_best", "union", "pgd_accuracy",
           "soundness_violations")  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(small_trained_mlp, tmp_path_factory):
    model, info, _, _ = small_trained_mlp
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    arch_kwargs = {"width": 32, "depth": 1}
    atomic_torch_save(make_checkpoint(model, "mlp", info, {"method": "natural"}, arch_kwargs), path)
    return path


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


@pytest.fixture(scope="module")
def unsharded(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "whole"
    res = _run("verify", checkpoint, *COMMON, "--out", out)
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
        assert x == y
        for t in mx:
            for m in mx[t]:
                assert mx[t][m] == pytest.approx(my[t][m], abs=1e-4, rel=1e-4)
    head = lambda d: (d / "samples.csv").read_text().splitlines()[0]  # noqa: E731
    assert head(a) == head(b)
    assert (a / "summary.md").exists() and (b / "summary.md").exists()


def test_shard_blocks_cover_the_run_in_whole_batches():
    for n, bs, count in [(20, 6, 2), (20, 6, 3), (7, 4, 5), (100, 8, 7)]:
        blocks = [Shard(k, count).block(n, bs) for k in range(count)]
        covered = [i for lo, ln in blocks for i in range(lo, lo + ln)]
        assert covered == list(range(n))
        assert all(lo % bs == 0 for lo, ln in blocks if ln)
    assert parse_shard("1/4") == Shard(1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_merged_shards_equal_the_unsharded_run(checkpoint, unsharded, tmp_path):
    out = tmp_path / "sharded"
    for k in (1, 0):  # any order
        res = _run("verify", checkpoint, *COMMON, "--shard", f"{k}/2", "--out", out)
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["shard-0-of-2", "shard-1-of-2"]
    res = _run("merge", out)
    assert res.exit_code == 0, res.output
    _same_results(unsharded, out)


def test_slurm_array_tasks_shard_and_print_the_merge_command(
    checkpoint, unsharded, tmp_path, monkeypatch
):
    out = tmp_path / "array"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for k in (0, 1):  # array tasks never meet: no process group, each says how to merge
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(k))
        res = _run("verify", checkpoint, *COMMON, "--out", out)
        assert res.exit_code == 0, res.output
        assert f"cure-lirpa merge {out}" in res.output
    assert _run("merge", out).exit_code == 0
    _same_results(unsharded, out)


def test_merge_lists_missing_samples_and_refuses_other_options(checkpoint, tmp_path):
    out = tmp_path / "v"
    assert _run("verify", checkpoint, *COMMON, "--shard", "0/3", "--out", out).exit_code == 0
    res = _run("merge", out)
    assert res.exit_code != 0 and "missing" in res.output and "12, 13" in res.output
    other = [a if a != "l2:0.3" else "l2:0.4" for a in COMMON]
    assert _run("verify", checkpoint, *other, "--shard", "1/3", "--out", out).exit_code == 0
    res = _run("merge", out)
    assert res.exit_code != 0 and "other settings" in res.output and "threats" in res.output


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_shards_by_rank_and_merges(checkpoint, unsharded, tmp_path):
    """Two processes under torchrun (gloo on CPU): each certifies its rank's shard, rank 0 merges."""
    out = tmp_path / "tr"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", "-m", "cure_lirpa", "verify", str(checkpoint), *COMMON,
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _same_results(unsharded, out)
