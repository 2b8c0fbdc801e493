"""The one training loop: certified and smoothing training both run in it, with the same run folder,
trainer state and resume guarantee; and it runs a task it knows nothing of."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cure_lirpa.data import TrainData, load_dataset
from cure_lirpa.errors import UserError
from cure_lirpa.io.checkpoint import FORMAT, load_checkpoint
from cure_lirpa.smoothing import training as smoothing
from cure_lirpa.training import certified, trainer
from cure_lirpa.training.config import TrainConfig
from cure_lirpa.training.meter import StepResult

torch.set_num_threads(1)
TIMING = {"seconds", "cpu_seconds", "train_seconds"}
LOOP_STATE = {"format", "optimizer", "rng", "device_type", "history"}


class Kill(Exception):
    pass


def _certified(out, **kw):
    config = TrainConfig(
        method="cure-max", linf_variant="sabr", ba_eta=1.0, gp_beta=0.5, arch_kwargs={"width": 4},
        train_count=96, batch_size=32, epochs=3, warmup_epochs=0.0, ramp_epochs=1.0, seed=2,
    )  # fmt: skip
    return certified.train(config, out, log=None, progress=False, **kw).checkpoint


def _smoothing(out, **kw):
    config = smoothing.TrainConfig(
        method="nu-rs", sigma=0.5, schedule="cosine", arch_kwargs={"width": 4}, train_count=96,
        batch_size=32, epochs=3, eval_count=32, seed=2,
    )  # fmt: skip
    return smoothing.train(config, out, log=None, progress=False, **kw)["checkpoint"]


KINDS = {"certified": _certified, "smoothing": _smoothing}


def _metrics(folder) -> list[dict[str, Any]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_kill_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path, kind):
    """Both kinds, killed in the middle of their third epoch (for the certified run: inside the
    natural pass of gradient projection) and resumed: the weights equal bit for bit and the
    metrics equal those of an uninterrupted run."""
    run = KINDS[kind]
    full = load_checkpoint(run(tmp_path / "full"))

    def kill(info: dict[str, Any]) -> None:
        if info["epoch"] == 2 and info["step"] == 1 and info["phase"] != "certified":
            raise Kill  # certified: inside the natural pass of gradient projection

    with pytest.raises(Kill):
        run(tmp_path / "part", callback=kill)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 2
    part = load_checkpoint(run(tmp_path / "part", resume=True))
    assert part["epoch"] == full["epoch"] == 3
    for k, w in full["state_dict"].items():
        assert torch.equal(part["state_dict"][k], w), k
    assert _metrics(tmp_path / "part") == _metrics(tmp_path / "full")
    state = part["trainer_state"]
    assert LOOP_STATE <= set(state) and len(state["history"]) == 3
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
    ]


def test_both_kinds_run_in_the_one_loop(tmp_path, monkeypatch):
    kinds = []
    real = trainer._Loop.run

    def spy(self, build):
        kinds.append(self.spec.kind)
        return real(self, build)

    monkeypatch.setattr(trainer._Loop, "run", spy)
    cfg = dict(arch_kwargs={"width": 4}, train_count=32, batch_size=32, epochs=1)
    certified.train(TrainConfig(method="natural", **cfg), tmp_path / "c", log=None, progress=False)
    smoothing.train(
        smoothing.TrainConfig(eval_count=0, **cfg), tmp_path / "s", log=None, progress=False
    )
    assert kinds == ["train", "smooth-train"]


class _Linear:
    """A task the loop does not know: softmax regression on 64 sample images."""

    diverged_hint = "lower the toy's lr"

    def __init__(self, checkpoint, say, lr: float = 0.1):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(784, 10)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.data = TrainData(load_dataset("sample", "train"), 64)
        self.generators = {"toy": torch.Generator().manual_seed(5)}
        self.say = say

    def restore(self, checkpoint):
        self.model.load_state_dict(checkpoint["state_dict"])

    def run_epoch(self, epoch):
        meter = epoch.run(self._step)
        return {"epoch": epoch.index + 1, "loss": meter.means()["loss"]}

    def _step(self, x, y, at):
        noise = torch.randn(x.shape, generator=self.generators["toy"]) * 0.1
        logits = self.model((x + noise).flatten(1))
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return StepResult(float(loss.detach()), {}, logits.detach())

    def state(self, history):
        return {"toy_epochs": len(history)}

    def checkpoint(self, epoch, trainer_state):
        state_dict = self.model.state_dict()
        return {
            "format": FORMAT,
            "epoch": epoch,
            "state_dict": state_dict,
            "trainer_state": trainer_state,
        }

    def report(self, record):
        return [f"toy epoch {record['epoch']}"]


def _toy(out, lr=0.1, **kw):
    spec = trainer.RunSpec("toy", {"lr": lr}, (), "toy/1", "toy", epochs=3, seed=1, batch_size=16)
    options = trainer.LoopOptions(progress=False, log=None, **kw)
    return trainer.run_training(spec, out, lambda ckpt, say: _Linear(ckpt, say, lr), options)


def test_the_loop_runs_a_task_it_does_not_know(tmp_path):
    full = _toy(tmp_path / "full")
    assert full.epoch == 3 and [h["epoch"] for h in full.history] == [1, 2, 3]
    _toy(tmp_path / "part", stop_after=2)
    part = _toy(tmp_path / "part", resume=True)
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(part.checkpoint)
    assert torch.equal(a["state_dict"]["weight"], b["state_dict"]["weight"])
    assert b["trainer_state"]["toy_epochs"] == 3 and LOOP_STATE <= set(b["trainer_state"])
    assert _metrics(tmp_path / "part") == _metrics(tmp_path / "full")
    with pytest.raises(UserError, match="became .*lower the toy's lr"):
        _toy(tmp_path / "nan", lr=float("nan"))
    assert not (tmp_path / "nan").exists()  # a run that kept nothing leaves nothing behind
