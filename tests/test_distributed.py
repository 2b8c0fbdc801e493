"""Data-parallel training (gloo, CPU): 2 processes give the weights of 1 process with the same
global batch, for natural, IBP l∞, CURE-Joint with bound alignment and gradient projection."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_config

from benchmarks.harness import cli_command
from cure_lirpa.distributed import World, shutdown
from cure_lirpa.errors import UserError
from cure_lirpa.io.checkpoint import load_checkpoint
from cure_lirpa.training.certified import train
from cure_lirpa.training.config import TrainConfig

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def tiny(**kw) -> TrainConfig:
    """96 sample images in global batches of 45 (slices of 23 and 22; the last batch, 6 samples,
    in slices of 3): unequal slices check the loss weighting."""
    kw = {"train_count": 96, "batch_size": 45, "epochs": 2, "memory_mb": 1e5, **kw}
    return tiny_config(kappa=0.5, eps=(0.01, 0.05), **kw)


CONFIGS = {
    "natural": tiny(method="natural"),
    "ibp-linf": tiny(method="ibp-linf"),
    "cure-joint-ba": tiny(
        method="cure-joint", ba_eta=50.0, train_eps_l2=0.01, train_eps_linf=0.002
    ),
    "cure-joint-gp": tiny(method="cure-joint", gp_beta=0.5),
}


def _worker(rank: int, size: int, init_file: str, root: str, jobs: dict, stop: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    finished = False
    try:
        world = World(rank, size, torch.device("cpu"))
        for name, config in jobs.items():
            out = Path(root) / name
            if name in stop:  # killed after that many epochs, then resumed
                train(config, out, world=world, log=None, progress=False, stop_after=stop[name])
                train(config, out, world=world, log=None, progress=False, resume=True)
            else:
                train(config, out, world=world, log=None, progress=False)
        finished = True
    finally:
        shutdown(finished)  # the CLI's teardown: barrier, then leave (a bare leave can abort)


def run_ranks(root: Path, jobs: dict, size: int = 2, stop: dict | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    mp.spawn(
        _worker,
        args=(size, str(root / "rendezvous"), str(root), jobs, stop or {}),
        nprocs=size,
        join=True,
    )


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    run_ranks(root, CONFIGS, stop={"cure-joint-ba": 1})
    return root


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_give_the_weights_of_one(two_process_runs, tmp_path, name):
    torch.set_num_threads(1)
    one = train(CONFIGS[name], tmp_path / name, log=None, progress=False)
    a = load_checkpoint(one.checkpoint)
    b = load_checkpoint(two_process_runs / name / "checkpoint.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    moved = 0.0
    for k, w in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], w, rtol=1e-4, atol=1e-5)
        moved = max(moved, float((w - _init(name)[k]).abs().max()))
    assert moved > 1e-3  # training changed the weights, so the agreement is not trivial
    ha, hb = one.history[-1], b["trainer_state"]["history"][-1]
    assert hb["processes"] == 2
    assert hb["clean_accuracy"] == pytest.approx(ha["clean_accuracy"], abs=1 / 96 + 1e-9)
    assert hb["loss"] == pytest.approx(ha["loss"], rel=1e-3)
    if name == "cure-joint-ba":
        assert ha["parts"]["ba"] > 0  # bound alignment contributed to the loss
        assert hb["parts"]["ba"] == pytest.approx(ha["parts"]["ba"], rel=0.5)
    if name == "cure-joint-gp":
        assert ha["gp"] and hb["gp"]


def _init(name: str) -> dict[str, torch.Tensor]:
    from cure_lirpa.data import dataset_info
    from cure_lirpa.training.certified import build_network

    c = CONFIGS[name].validated()
    model, _ = build_network(c, dataset_info(c.dataset), torch.device("cpu"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_rank_zero_writes_and_batches_too_small_are_refused(two_process_runs):
    files = sorted(p.name for p in (two_process_runs / "natural").iterdir())
    assert files == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    with pytest.raises(UserError, match="cannot be split over 2 processes"):
        World(0, 2, torch.device("cpu")).check_batches([45, 45, 1])


def test_slices_cover_the_global_batch_in_order():
    idx = torch.arange(45)
    parts = [World(r, 2, torch.device("cpu")).slice(idx) for r in range(2)]
    assert [len(p) for p in parts] == [23, 22]
    assert torch.equal(torch.cat(parts), idx)


def test_torchrun_cli_trains_in_two_processes(tmp_path):
    out = tmp_path / "run"
    cmd = cli_command(
        "train",
        "--method",
        "ibp-linf",
        "--width",
        "4",
        "--train-count",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--ramp-epochs",
        "0",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
        processes=2,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # the ranks' own messages come first in torchrun's stderr, its traceback last
    assert done.returncode == 0, done.stderr[:6000]
    assert done.stdout.count("checkpoint.pt") == 1  # only rank 0 reports
    history = load_checkpoint(out / "checkpoint.pt")["trainer_state"]["history"]
    assert history[-1]["processes"] == 2 and history[-1]["epoch"] == 1


def test_shutdown_meets_the_other_ranks_only_after_a_finished_run(monkeypatch):
    """A finished run: barrier, then leave the group (no rank leaves while rank 0 still writes).
    After a failure: neither (the barrier would wait for ranks that never come)."""
    from cure_lirpa import distributed

    calls: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.shutdown(finished=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.shutdown(finished=False)
    assert calls == []
