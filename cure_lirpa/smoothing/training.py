"""Training base classifiers for randomized smoothing.

Methods (each a small object whose ``loss(model, x, y, generator)`` returns ``(loss, logits)``):

- ``gaussian``: cross-entropy on ``x + N(0, sigma^2)`` (Cohen et al. 2019).
- ``uniform``: cross-entropy on ``x + U[-sqrt(3) sigma, sqrt(3) sigma]``.
- ``nu``: cross-entropy on Normal-Uniform noise ``x + N(0, sigma_n^2) + U[-sqrt3 sigma_u, sqrt3 sigma_u]``.
- ``nu-rs``: NU paper Eq. (3), ``CE(f(x+NU), y) + beta * R_S`` with Eq. (2)
  ``R_S = KL(p(x+NU) || p(x+N)) + KL(p(x+NU) || p(x+U))`` on fresh independent draws.
- ``consistency``: Jeong & Shin 2020, m Gaussian copies,
  ``mean_i CE(f(x+d_i), y) + lambda * mean_i KL(p_avg || p_i) + eta * H(p_avg)``.

:func:`train` runs :class:`SmoothingTask` (its step, epoch record and schedule) in the one training
loop of :mod:`cure_lirpa.training.trainer`, the loop of certified training: a run folder
(:mod:`cure_lirpa.io.runs`) with ``config.json``, ``checkpoint.pt`` (atomically after every epoch,
with optimizer, schedule and every RNG state) and ``metrics.jsonl``, so that ``resume=True``
continues a killed run and ends with the same weights as an uninterrupted run under the same seed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data import TrainData, dataset_info, load_dataset
from ..errors import UserError
from ..io.checkpoint import dataset_info_of, make_checkpoint
from ..models import build_model
from ..training.meter import StepResult
from ..training.trainer import (
    CHECKPOINT,
    METRICS,
    Epoch,
    LoopOptions,
    RunSpec,
    StepAt,
    run_training,
)
from ..vocabulary import CONSISTENCY, GAUSSIAN, NU, NU_RS, SAMPLE, SMOOTHING_OBJECTIVES, UNIFORM
from .noise import GaussianNoise, Noise, NormalUniformNoise, UniformNoise, make_generator

METHODS = SMOOTHING_OBJECTIVES
SCHEDULES = ("constant", "cosine")
RUNTIME_KEYS = ("data_root", "eval_count")
"""Config keys that may differ between a run and its resumption (they do not change the weights)."""
KIND = "smooth-train"
STATE_FORMAT = "cure-lirpa-smoothing-trainer/1"


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the checkpoint as ``config``).

    ``sigma`` is the Gaussian/Uniform standard deviation, or sigma_n for the Normal-Uniform methods,
    whose ``sigma_u`` defaults to ``sqrt(3)/2 * sigma_n`` (the NU paper's kurtosis -0.22 pairs).
    """

    dataset: str = SAMPLE
    data_root: Optional[str] = None
    arch: str = "cnn-small"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = GAUSSIAN
    sigma: float = 0.25
    sigma_u: Optional[float] = None
    beta: float = 3.0
    consistency_m: int = 2
    consistency_lambda: float = 10.0
    consistency_eta: float = 0.5
    epochs: int = 4
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    seed: int = 0
    train_count: Optional[int] = None
    eval_count: int = 1000

    def validated(self) -> TrainConfig:
        """A copy with defaults resolved; raises :class:`UserError` for impossible values."""
        c = dataclasses.replace(self, arch_kwargs=dict(self.arch_kwargs))
        if c.method not in METHODS:
            raise UserError(
                f"unknown training method {c.method!r}; choose one of {', '.join(METHODS)}"
            )
        if c.schedule not in SCHEDULES:
            raise UserError(
                f"unknown schedule {c.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if c.method in (NU, NU_RS):
            noise = NormalUniformNoise(c.sigma, c.sigma_u)
            c.sigma, c.sigma_u = noise.sigma_n, noise.sigma_u
        else:
            GaussianNoise(c.sigma)  # validates sigma > 0
            c.sigma_u = None
        for name in ("epochs", "batch_size", "consistency_m"):
            if int(getattr(c, name)) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(c, name)}")
        if c.lr <= 0:
            raise UserError(f"learning rate must be > 0, got {c.lr}")
        if c.beta < 0 or c.consistency_lambda < 0:
            raise UserError("beta and the consistency lambda must be >= 0")
        if c.train_count is not None and c.train_count < 1:
            raise UserError(f"train_count must be >= 1, got {c.train_count}")
        if c.train_count is not None and c.train_count < c.batch_size:
            c.batch_size = int(c.train_count)  # one batch of all the images (the CLI says so)
        if c.eval_count < 0:
            raise UserError(f"eval_count must be >= 0, got {c.eval_count}")
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Methods


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(p || q) for log-probabilities of shape (B, K)."""
    return (logp.exp() * (logp - logq)).sum(dim=1).mean()


class NoiseAugmentation:
    """Cross-entropy on ``x + noise`` (Gaussian, Uniform or Normal-Uniform)."""

    def __init__(self, noise: Noise):
        self.noise = noise
        self.eval_noise = noise

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        logits = model(self.noise.perturb(x, gen))
        return F.cross_entropy(logits, y), logits


class SimilarityRegularised:
    """NU paper Eq. (3): ``CE(f(x+NU), y) + beta * [KL(p(x+NU)||p(x+N)) + KL(p(x+NU)||p(x+U))]``.

    The three noises are fresh independent draws; the three noisy batches go through the model as
    one batch; gradients flow through both sides of each KL.
    """

    def __init__(self, noise: NormalUniformNoise, beta: float):
        self.noise = noise
        self.eval_noise = noise.gaussian
        self.beta = float(beta)

    def loss(self, model, x, y, gen):
        xs = torch.cat(
            [
                self.noise.perturb(x, gen),
                self.noise.gaussian.perturb(x, gen),
                self.noise.uniform.perturb(x, gen),
            ]
        )
        l_nu, l_n, l_u = model(xs).chunk(3)
        logp_nu = F.log_softmax(l_nu, dim=1)
        r_s = _kl(logp_nu, F.log_softmax(l_n, dim=1)) + _kl(logp_nu, F.log_softmax(l_u, dim=1))
        return F.cross_entropy(l_nu, y) + self.beta * r_s, l_nu


class ConsistencyRegularised:
    """Jeong & Shin 2020: ``mean_i CE + lambda * mean_i KL(p_avg || p_i) + eta * H(p_avg)`` over
    ``m`` Gaussian copies of each input."""

    def __init__(self, noise: GaussianNoise, m: int, lbd: float, eta: float):
        self.noise = noise
        self.eval_noise = noise
        self.m, self.lbd, self.eta = int(m), float(lbd), float(eta)

    def loss(self, model, x, y, gen):
        b = x.shape[0]
        xs = torch.cat([self.noise.perturb(x, gen) for _ in range(self.m)])
        logits = model(xs)
        logp = F.log_softmax(logits, dim=1).view(self.m, b, -1)
        ce = F.cross_entropy(logits, y.repeat(self.m))
        avg = logp.exp().mean(dim=0)
        log_avg = avg.clamp_min(1e-20).log()
        kl = (avg.unsqueeze(0) * (log_avg.unsqueeze(0) - logp)).sum(dim=2).mean()
        entropy = -(avg * log_avg).sum(dim=1).mean()
        return ce + self.lbd * kl + self.eta * entropy, logits[:b]


def make_method(config: TrainConfig):
    """The loss object of ``config.method``."""
    c = config
    if c.method == GAUSSIAN:
        return NoiseAugmentation(GaussianNoise(c.sigma))
    if c.method == UNIFORM:
        return NoiseAugmentation(UniformNoise(c.sigma))
    if c.method == NU:
        return NoiseAugmentation(NormalUniformNoise(c.sigma, c.sigma_u))
    if c.method == NU_RS:
        return SimilarityRegularised(NormalUniformNoise(c.sigma, c.sigma_u), c.beta)
    if c.method == CONSISTENCY:
        return ConsistencyRegularised(
            GaussianNoise(c.sigma), c.consistency_m, c.consistency_lambda, c.consistency_eta
        )
    raise UserError(f"unknown training method {c.method!r}; choose one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------
# Data


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: TrainData,
    noise: Optional[Noise],
    gen: Optional[torch.Generator],
    device: torch.device,
    batch_size: int = 500,
) -> float:
    """Accuracy of the base classifier on the first ``batches.size`` samples, clean or under noise."""
    was = model.training
    model.eval()
    correct = 0
    for x, y in batches.batches(batch_size):
        x, y = x.to(device), y.to(device)
        if noise is not None:
            x = noise.perturb(x, gen)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was)
    return correct / max(1, batches.size)


# ---------------------------------------------------------------------------------------------
# The task the training loop runs


class SmoothingTask:
    """Smoothing training as the loop of :mod:`cure_lirpa.training.trainer` runs it: Adam (with
    the cosine schedule stepped per epoch), the method's loss on noise drawn from the ``noise``
    generator, and after every epoch the clean and noisy accuracy of the first ``eval_count`` test
    samples (noise drawn from a generator seeded per epoch)."""

    diverged_hint = "lower --lr"

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        checkpoint: Optional[dict[str, Any]],
        say: Callable[[str], None],
    ):
        c = self.config = config
        self.device = device
        self.info = dataset_info(c.dataset)
        torch.manual_seed(c.seed)
        self.model = build_model(
            c.arch,
            self.info.in_shape,
            self.info.num_classes,
            self.info.mean,
            self.info.std,
            **c.arch_kwargs,
        ).to(device)
        self.method = make_method(c)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay
        )
        self.scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=c.epochs)
            if c.schedule == "cosine"
            else None
        )
        self.generators = {"noise": make_generator(device, c.seed + 1)}
        self.data = TrainData(load_dataset(c.dataset, "train", c.data_root), c.train_count)
        self.test = None
        if c.eval_count > 0:
            self.test = TrainData(load_dataset(c.dataset, "test", c.data_root), c.eval_count)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Weights and the learning-rate schedule from ``checkpoint``."""
        self.model.load_state_dict(checkpoint["state_dict"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["trainer_state"]["scheduler"])

    def state(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def checkpoint(self, epoch: int, trainer_state: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        return make_checkpoint(
            self.model, c.arch, self.info, c.to_dict(), c.arch_kwargs, epoch, trainer_state
        )

    def run_epoch(self, epoch: Epoch) -> dict[str, Any]:
        """One pass over the training batches; loss, noisy training accuracy, learning rate, and
        the test accuracies."""
        t0 = time.perf_counter()
        self.model.train()
        meter = epoch.run(self._step)
        if self.scheduler is not None:
            self.scheduler.step()
        record: dict[str, Any] = {
            "epoch": epoch.index + 1,
            "loss": meter.means()["loss"],
            "train_noisy_accuracy": meter.accuracy,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if self.test is not None:
            gen = make_generator(self.device, self.config.seed * 1000 + epoch.index + 7)
            record["test_accuracy"] = evaluate(self.model, self.test, None, None, self.device)
            record["test_noisy_accuracy"] = evaluate(
                self.model, self.test, self.method.eval_noise, gen, self.device
            )
        return record

    def _step(self, x: torch.Tensor, y: torch.Tensor, at: StepAt) -> StepResult:
        loss, logits = self.method.loss(self.model, x, y, self.generators["noise"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepResult(loss.detach().item(), {}, logits.detach())

    def report(self, record: dict[str, Any]) -> list[str]:
        return [
            ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
            )
        ]


def train(
    config: TrainConfig,
    out: Union[str, Path],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    stop_after: Optional[int] = None,
    progress: Optional[bool] = None,
    log: Optional[Callable[[str], None]] = print,
    callback: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Train a base classifier with ``config`` into the run folder ``out``.

    The loop of :mod:`cure_lirpa.training.trainer` writes ``config.json``, ``checkpoint.pt``
    (atomically after every epoch, with the optimizer state and every RNG state) and
    ``metrics.jsonl`` (one line per epoch). ``resume=True`` continues the run in ``out`` (refusing
    other settings, naming the keys) and ends with the weights of an uninterrupted run;
    ``overwrite=True`` starts over; ``stop_after`` ends this call after that many epochs;
    ``callback`` sees ``{'epoch', 'phase', 'step'}`` after every step.
    Returns ``{"out", "checkpoint", "epoch", "history"}`` (history: one dict per epoch).
    """
    c = config.validated()
    device = torch.device(device)
    spec = RunSpec(
        kind=KIND,
        config=c.to_dict(),
        mutable=RUNTIME_KEYS,
        state_format=STATE_FORMAT,
        state_name="'smooth train'",
        epochs=int(c.epochs),
        seed=c.seed,
        batch_size=int(c.batch_size),
    )
    options = LoopOptions(resume, overwrite, device, progress, log, callback, stop_after)
    result = run_training(spec, out, functools.partial(SmoothingTask, c, device), options)
    return {
        "out": str(result.out),
        "checkpoint": str(result.checkpoint),
        "epoch": result.epoch,
        "history": result.history,
    }


def checkpoint_summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Training method, noise and sigmas of a checkpoint (for TSV headers and analysis labels)."""
    cfg = ckpt.get("config") or {}
    info = dataset_info_of(ckpt)
    return {
        "arch": ckpt.get("arch"),
        "dataset": info.name,
        "train_method": cfg.get("method"),
        "train_sigma": cfg.get("sigma"),
        "train_sigma_u": cfg.get("sigma_u"),
        "train_beta": cfg.get("beta") if cfg.get("method") == NU_RS else None,
        "epochs": ckpt.get("epoch"),
    }


__all__ = [
    "CHECKPOINT",
    "METHODS",
    "METRICS",
    "RUNTIME_KEYS",
    "SCHEDULES",
    "ConsistencyRegularised",
    "NoiseAugmentation",
    "SimilarityRegularised",
    "SmoothingTask",
    "TrainConfig",
    "checkpoint_summary",
    "evaluate",
    "make_method",
    "train",
]
