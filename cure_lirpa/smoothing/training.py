"""Training base classifiers for randomized smoothing.

Methods (each a small object whose ``loss(model, x, y, generator)`` returns ``(loss, logits)``):

- ``gaussian``: cross-entropy on ``x + N(0, sigma^2)`` (Cohen et al. 2019).
- ``uniform``: cross-entropy on ``x + U[-sqrt(3) sigma, sqrt(3) sigma]``.
- ``nu``: cross-entropy on Normal-Uniform noise ``x + N(0, sigma_n^2) + U[-sqrt3 sigma_u, sqrt3 sigma_u]``.
- ``nu-rs``: NU paper Eq. (3), ``CE(f(x+NU), y) + beta * R_S`` with Eq. (2)
  ``R_S = KL(p(x+NU) || p(x+N)) + KL(p(x+NU) || p(x+U))`` on fresh independent draws.
- ``consistency``: Jeong & Shin 2020, m Gaussian copies,
  ``mean_i CE(f(x+d_i), y) + lambda * mean_i KL(p_avg || p_i) + eta * H(p_avg)``.

:func:`train` writes a run folder (:mod:`cure_lirpa.io.runs`): ``config.json``, ``checkpoint.pt``
(atomically after every epoch, with optimizer, schedule and every RNG state) and ``metrics.jsonl``,
so that ``resume=True`` continues a killed run and ends with the same weights as an uninterrupted
run under the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data import TrainData, dataset_info, load_dataset
from ..errors import UserError
from ..io.checkpoint import (
    atomic_torch_save,
    atomic_write_text,
    dataset_info_of,
    load_checkpoint,
    make_checkpoint,
)
from ..io.runs import Run, rng_state, set_rng_state
from ..models import build_model
from .noise import GaussianNoise, Noise, NormalUniformNoise, UniformNoise, make_generator

METHODS = ("gaussian", "uniform", "nu", "nu-rs", "consistency")
SCHEDULES = ("constant", "cosine")
RUNTIME_KEYS = ("data_root", "eval_count")
"""Config keys that may differ between a run and its resumption (they do not change the weights)."""
KIND = "smooth-train"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
STATE_FORMAT = "cure-lirpa-smoothing-trainer/1"


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the checkpoint as ``config``).

    ``sigma`` is the Gaussian/Uniform standard deviation, or sigma_n for the Normal-Uniform methods,
    whose ``sigma_u`` defaults to ``sqrt(3)/2 * sigma_n`` (the NU paper's kurtosis -0.22 pairs).
    """

    dataset: str = "sample"
    data_root: Optional[str] = None
    arch: str = "cnn-small"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "gaussian"
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
        if c.method in ("nu", "nu-rs"):
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
    if c.method == "gaussian":
        return NoiseAugmentation(GaussianNoise(c.sigma))
    if c.method == "uniform":
        return NoiseAugmentation(UniformNoise(c.sigma))
    if c.method == "nu":
        return NoiseAugmentation(NormalUniformNoise(c.sigma, c.sigma_u))
    if c.method == "nu-rs":
        return SimilarityRegularised(NormalUniformNoise(c.sigma, c.sigma_u), c.beta)
    if c.method == "consistency":
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
# The training loop


def train(
    config: TrainConfig,
    out: Union[str, Path],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    stop_after: Optional[int] = None,
    progress: Optional[bool] = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a base classifier with ``config`` into the run folder ``out``.

    The folder holds ``config.json`` (the run layer's, :mod:`cure_lirpa.io.runs`), ``checkpoint.pt``
    (written atomically after every epoch, with the optimizer state and every RNG state) and
    ``metrics.jsonl`` (one line per epoch). ``resume=True`` continues the run in ``out`` (refusing
    other settings, naming the keys) and ends with the weights of an uninterrupted run;
    ``overwrite=True`` starts over; ``stop_after`` ends this call after that many epochs.
    Returns ``{"out", "checkpoint", "epoch", "history"}`` (history: one dict per epoch).
    """
    c = config.validated()
    device = torch.device(device)
    run = Run.open(out, KIND, c.to_dict(), resume=resume, overwrite=overwrite, mutable=RUNTIME_KEYS)
    try:
        return _train(c, run, device, stop_after, progress, log)
    except BaseException:
        run.discard_if_empty()
        raise
    finally:
        run.close()


def _train(
    c: TrainConfig,
    run: Run,
    device: torch.device,
    stop_after: Optional[int],
    progress: Optional[bool],
    log: Callable[[str], None],
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    info = dataset_info(c.dataset)
    ckpt_path = run.file(CHECKPOINT)
    ckpt = None
    if run.resumed and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        _check_state(ckpt, device, ckpt_path)

    torch.manual_seed(c.seed)
    model = build_model(
        c.arch, info.in_shape, info.num_classes, info.mean, info.std, **c.arch_kwargs
    ).to(device)
    method = make_method(c)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs)
        if c.schedule == "cosine"
        else None
    )
    generators = {
        "data": torch.Generator().manual_seed(c.seed),
        "noise": make_generator(device, c.seed + 1),
    }
    history: list[dict[str, Any]] = []
    start = 0
    if ckpt is not None:
        state = ckpt["trainer_state"]
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], generators)
        history = list(state["history"])
        start = int(ckpt["epoch"])
        log(f"resuming {run.path} after epoch {start} of {c.epochs}")
        if start >= c.epochs:
            log(f"{run.path} is already trained for {start} epochs; nothing to do")
            return {"out": str(run.path), "checkpoint": str(ckpt_path), "epoch": start,
                    "history": history}  # fmt: skip

    train_set = TrainData(load_dataset(c.dataset, "train", c.data_root), c.train_count)
    test_batches = None
    if c.eval_count > 0:
        test_batches = TrainData(load_dataset(c.dataset, "test", c.data_root), c.eval_count)
    steps = train_set.steps_per_epoch(c.batch_size)

    done_now = 0
    for epoch in range(start, c.epochs):
        if stop_after is not None and done_now >= stop_after:
            log(f"stopping after {done_now} epoch(s) as asked; continue with --resume")
            break
        t0 = time.perf_counter()
        model.train()
        tot_loss, tot_correct, tot = 0.0, 0, 0
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{c.epochs}",
            disable=None if progress is None else not progress,
            leave=False,
        )
        for x, y in train_set.batches(c.batch_size, generators["data"]):
            x, y = x.to(device), y.to(device)
            loss, logits = method.loss(model, x, y, generators["noise"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.detach().item() * len(y)
            tot_correct += int((logits.argmax(1) == y).sum())
            tot += len(y)
            bar.update(1)
        bar.close()
        if sched is not None:
            sched.step()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": tot_loss / tot,
            "train_noisy_accuracy": tot_correct / tot,
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if test_batches is not None:
            eval_gen = make_generator(device, c.seed * 1000 + epoch + 7)
            record["test_accuracy"] = evaluate(model, test_batches, None, None, device)
            record["test_noisy_accuracy"] = evaluate(
                model, test_batches, method.eval_noise, eval_gen, device
            )
        history.append(record)
        trainer_state = {
            "format": STATE_FORMAT,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": rng_state(generators),
            "device_type": device.type,
            "history": history,
        }
        ck = make_checkpoint(
            model, c.arch, info, c.to_dict(), c.arch_kwargs, epoch + 1, trainer_state
        )
        atomic_torch_save(ck, ckpt_path)
        atomic_write_text(run.file(METRICS), "".join(json.dumps(h) + "\n" for h in history))
        done_now += 1
        msg = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
        )
        log(msg)
    return {
        "out": str(run.path),
        "checkpoint": str(ckpt_path),
        "epoch": start + done_now,
        "history": history,
    }


def _check_state(ckpt: dict[str, Any], device: torch.device, path: Path) -> None:
    state = ckpt.get("trainer_state") or {}
    if state.get("format") != STATE_FORMAT:
        raise UserError(f"--resume: {path} has no 'smooth train' state to resume from")
    if state.get("device_type") != device.type:
        raise UserError(
            f"--resume: {path} was trained on {state.get('device_type')}; resume it with "
            f"--device {state.get('device_type')} (results are only reproducible on one device)"
        )


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
        "train_beta": cfg.get("beta") if cfg.get("method") == "nu-rs" else None,
        "epochs": ckpt.get("epoch"),
    }
