"""Certified training (the CURE methods and the single-norm baselines) as a task of the one loop.

:func:`train` runs a :class:`~cure_lirpa.training.config.TrainConfig` in the loop of
:mod:`cure_lirpa.training.trainer`, which owns the run folder (``checkpoint.pt``, ``metrics.jsonl``,
``config.json``), resume, the data order, progress and data parallelism. :class:`CertifiedTask`
supplies what is particular to certified training: the network (the model and its trainable bounded
classifier), the method object (:func:`cure_lirpa.training.objectives.make_method`, handed the batch,
the clean logits and the schedule values by :class:`cure_lirpa.training.step.TrainStep`), the
schedules as pure functions of the global optimizer step (:mod:`cure_lirpa.training.schedules`:
warm-up at eps 0, smoothed eps ramp, natural-loss share kappa, CROWN-IBP beta, step learning-rate
decay, the IBP regulariser's weight), the metrics of an epoch and the per-rank method generator.

Gradient projection (CURE paper, GP), in every epoch that starts after the eps ramp has ended:
save theta0 and the optimizer state; one certified pass -> theta_c; back to theta0 and the saved
optimizer state, one natural pass (cross-entropy only, gradients zeroed before every step) on the
same batches -> theta_n; ``theta = project_gradients(theta0, theta_c, theta_n, beta)``. Optimizer
state: the natural pass runs on a copy of the state saved at theta0 and is discarded; the merged
weights continue with the optimizer state of the certified pass (the certified update is the
primary one, and Adam's moments then keep describing the certified loss). Checkpoints are written
between epochs only, so a run killed inside the natural pass repeats the whole GP epoch on resume.
"""

from __future__ import annotations

import copy
import functools
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..data import DatasetInfo, TrainData, dataset_info, load_dataset
from ..distributed import METHOD_SEED_STRIDE, World, current_world
from ..errors import UserError
from ..io.checkpoint import load_checkpoint, make_checkpoint
from ..models import build_model, ibp_init
from ..threats.base import format_eps
from ..vocabulary import CERTIFIED, CLEAN_ACCURACY, IBP, L2, LINF, NATURAL
from .config import RUNTIME_KEYS, TrainConfig
from .losses import project_gradients
from .meter import Meter, StepResult
from .objectives import NORMS, TrainingNetwork, make_method
from .schedules import Ramp, crown_ibp_beta_at, eps_at, kappa_at, lr_at
from .step import StepSchedule, TrainStep
from .trainer import Epoch, LoopOptions, RunSpec, StepAt, TrainResult, run_training

KIND = "train"
"""Run-folder kind of certified training (:meth:`cure_lirpa.io.runs.Run.open`)."""
STATE_FORMAT = "cure-lirpa-trainer/2"


# ---------------------------------------------------------------------------------------------
# Building blocks of a run


def build_network(
    config: TrainConfig, info: DatasetInfo, device: torch.device, init: bool = True
) -> tuple[nn.Module, TrainingNetwork]:
    """The model (seeded with ``config.seed``; initialised from ``config.init_from`` if ``init``)
    and its :class:`TrainingNetwork`."""
    c = config
    torch.manual_seed(c.seed)
    model = build_model(
        c.arch, info.in_shape, info.num_classes, info.mean, info.std, **c.arch_kwargs
    )
    if c.init_from and init:
        load_init_weights(model, c, info)
    elif c.init == IBP:
        ibp_init(model)
    net = TrainingNetwork(model, info.in_shape, device, memory_mb=c.memory_mb)
    return model, net


def load_init_weights(model: nn.Module, config: TrainConfig, info: DatasetInfo) -> None:
    """Load the weights of ``config.init_from`` into ``model`` (fine-tuning); the architecture and
    input shape must match."""
    ckpt = load_checkpoint(config.init_from)
    d = ckpt.get("dataset") or {}
    if ckpt.get("arch") != config.arch or dict(ckpt.get("arch_kwargs") or {}) != config.arch_kwargs:
        raise UserError(
            f"--init-from {config.init_from} holds a {ckpt.get('arch')!r} model with "
            f"{ckpt.get('arch_kwargs') or {}}, but this run builds {config.arch!r} with "
            f"{config.arch_kwargs}; pass the same --arch/--width (or leave them out)"
        )
    if (
        tuple(d.get("in_shape", ())) != tuple(info.in_shape)
        or d.get("num_classes") != info.num_classes
    ):
        raise UserError(
            f"--init-from {config.init_from} was trained on {d.get('name')!r} (input "
            f"{d.get('in_shape')}, {d.get('num_classes')} classes); this run uses {info.name!r}"
        )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"--init-from weights do not fit the model: {str(exc)[:300]}") from None


def make_ramp(config: TrainConfig, steps_per_epoch: int) -> Ramp:
    return Ramp.from_epochs(
        config.warmup_epochs, config.ramp_epochs, steps_per_epoch, shape=config.ramp_shape
    )


def schedule_at(config: TrainConfig, step: int, steps_per_epoch: int, ramp: Ramp) -> StepSchedule:
    """eps per norm, kappa, CROWN-IBP beta and learning rate at global optimizer step ``step``."""
    c = config
    eps = {
        LINF: eps_at(step, c.train_eps_linf, ramp),
        L2: eps_at(step, c.train_eps_l2, ramp),
    }
    return StepSchedule(
        eps=eps,
        kappa=kappa_at(step, ramp, c.kappa_start, c.kappa_end),
        crown_ibp_beta=crown_ibp_beta_at(step, ramp) if c.crown_ibp else 0.0,
        lr=lr_at(step / steps_per_epoch, c.lr, c.lr_milestones, c.lr_factor),
        reg_weight=ibp_reg_weight_at(step, c, ramp),
    )


def ibp_reg_weight_at(step: float, config: TrainConfig, ramp: Ramp) -> float:
    """Weight of Shi et al.'s IBP regulariser: ``ibp_reg * (1 - eps / eps_max)`` (l∞) until the
    ramp ends, 0 afterwards."""
    c = config
    if c.ibp_reg <= 0 or ramp.ended(step) or not c.train_eps_linf:
        return 0.0
    return c.ibp_reg * (1.0 - eps_at(step, c.train_eps_linf, ramp) / c.train_eps_linf)


def gp_epoch(config: TrainConfig, epoch: int, steps: int, ramp: Ramp) -> bool:
    """Gradient projection applies to epochs (0-based) that start after the eps ramp has ended."""
    return config.gp_beta > 0 and ramp.ended(epoch * steps)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load(model: nn.Module, net: TrainingNetwork, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state)
    net.sync_from_model()


# ---------------------------------------------------------------------------------------------
# The task


class CertifiedTask:
    """Certified training as the loop runs it (:class:`cure_lirpa.training.trainer.Task`).

    Built on every process of a run (``world``: its place in a data-parallel run, or None); a
    ``checkpoint`` to resume from skips ``init_from`` (its weights come from the checkpoint).
    """

    diverged_hint = "lower --lr or the training eps, or raise --ramp-epochs"

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        world: Optional[World],
        checkpoint: Optional[dict[str, Any]],
        say: Callable[[str], None],
    ):
        c = self.config = config
        self.device, self.world, self.say = device, world, say
        self.info = dataset_info(c.dataset)
        self.data = TrainData(load_dataset(c.dataset, "train", c.data_root), c.train_count)
        if self.data.size < 2:
            raise UserError(f"the training set of {c.dataset!r} has fewer than 2 samples")
        load_dataset(c.dataset, "test", c.data_root)  # fail now, not at verify, when it is missing
        self.model, self.net = build_network(c, self.info, device, init=checkpoint is None)
        self.method = make_method(c.method, c.method_options())
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay
        )
        self.steps = self.data.steps_per_epoch(c.batch_size)
        self.ramp = make_ramp(c, self.steps)
        rank = 0 if world is None else world.rank
        seed = c.seed + 1 + METHOD_SEED_STRIDE * rank
        self.method_gen = torch.Generator(device=device).manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}  # the method generator is per rank
        self._schedule: Optional[StepSchedule] = None
        self._method_rngs: list[torch.Tensor] = []
        self._warned = False
        self._warn_short_ramp()

    @functools.cached_property
    def train_step(self) -> TrainStep:
        """The optimizer step (built at the first step: under a world it wraps the loss in
        DistributedDataParallel)."""
        c = self.config
        return TrainStep(
            self.net,
            self.method,
            self.optimizer,
            c.grad_clip,
            c.train_cert,
            self.world,
            l1_reg=c.l1_reg,
        )

    def _warn_short_ramp(self) -> None:
        c = self.config
        if self.ramp.end > c.epochs * self.steps:
            reached = eps_at(c.epochs * self.steps - 1, 1.0, self.ramp)
            self.say(
                f"warning: the eps ramp ends at epoch {c.warmup_epochs + c.ramp_epochs:g} but the "
                f"run has {c.epochs} epochs, so training reaches only {100 * reached:.0f}% of the "
                f"target radii (linf {format_eps(c.train_eps_linf)}, l2 "
                f"{format_eps(c.train_eps_l2)}); raise --epochs or lower --warmup-epochs / "
                "--ramp-epochs"
            )

    # -- checkpoints -------------------------------------------------------------------------

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Weights and this rank's method generator from ``checkpoint``."""
        _load(self.model, self.net, checkpoint["state_dict"])
        ranks_rng = checkpoint["trainer_state"]["method_rng_by_rank"]
        rank, size = (0, 1) if self.world is None else (self.world.rank, self.world.size)
        if rank < len(ranks_rng) and len(ranks_rng) == size:
            self.method_gen.set_state(ranks_rng[rank])
            return
        self.say(
            f"note: the checkpoint was trained with {len(ranks_rng)} process(es); the methods' "
            "random draws continue from fresh seeds (not bit-identical to an uninterrupted run)"
        )
        if rank == 0:
            self.method_gen.set_state(ranks_rng[0])

    def state(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The task's part of the trainer state after ``len(history)`` epochs."""
        done = len(history)
        return {
            "method_rng_by_rank": self._method_rngs,
            "steps_per_epoch": self.steps,
            "global_step": done * self.steps,
            # Checkpoints are written between epochs only, so no GP pass is ever half done;
            # 'next_epoch_gp' says whether the next epoch will run gradient projection.
            "gp": {
                "phase": "between-epochs",
                "next_epoch_gp": gp_epoch(self.config, done, self.steps, self.ramp),
                "epochs_done": sum(1 for h in history if h.get("gp")),
            },
        }

    def checkpoint(self, epoch: int, trainer_state: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        return make_checkpoint(
            self.model, c.arch, self.info, c.to_dict(), c.arch_kwargs, epoch, trainer_state
        )

    # -- epochs ------------------------------------------------------------------------------

    def run_epoch(self, epoch: Epoch) -> dict[str, Any]:
        """One epoch (with gradient projection after the ramp); its metrics record."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        self.net.train(True)
        if gp_epoch(self.config, epoch.index, self.steps, self.ramp):
            record = self._projected_epoch(epoch)
        else:
            record = self._record(epoch.index, self._pass(epoch, CERTIFIED))
        record["seconds"] = round(time.perf_counter() - t0, 2)
        record["cpu_seconds"] = round(time.process_time() - cpu0, 2)  # this process only
        previous = epoch.previous["train_seconds"] if epoch.previous else 0.0
        record["train_seconds"] = round(previous + record["seconds"], 2)
        self._end_epoch(record)
        return record

    def _projected_epoch(self, epoch: Epoch) -> dict[str, Any]:
        """Gradient projection: a certified and a natural pass from theta0, merged."""
        net, model, opt = self.net, self.model, self.optimizer
        net.sync_to_model()
        theta0 = _state(model)
        opt0 = copy.deepcopy(opt.state_dict())
        record = self._record(epoch.index, self._pass(epoch, CERTIFIED))
        net.sync_to_model()
        theta_c = _state(model)
        opt_c = copy.deepcopy(opt.state_dict())
        _load(model, net, theta0)
        opt.load_state_dict(copy.deepcopy(opt0))
        natural = self._pass(epoch, NATURAL)
        net.sync_to_model()
        theta_n = _state(model)
        _load(model, net, project_gradients(theta0, theta_c, theta_n, self.config.gp_beta))
        opt.load_state_dict(opt_c)
        record["gp"] = True
        record["gp_natural_loss"] = natural.means().get("loss", 0.0)
        record["gp_natural_accuracy"] = natural.accuracy
        return record

    def _pass(self, epoch: Epoch, phase: str) -> Meter:
        return epoch.run(self._step, phase, Meter(NORMS))

    def _step(self, x: torch.Tensor, y: torch.Tensor, at: StepAt) -> StepResult:
        self._schedule = schedule_at(self.config, at.step, self.steps, self.ramp)
        return self.train_step(x, y, self._schedule, self.method_gen, at.phase, global_size=at.size)

    def _record(self, epoch: int, meter: Meter) -> dict[str, Any]:
        """Metrics of the certified pass at the schedule of its last step."""
        sched = self._schedule
        means = meter.means()
        return {
            "epoch": epoch + 1,
            "loss": means.pop("loss", 0.0),
            "parts": means,
            CLEAN_ACCURACY: meter.accuracy,
            CERTIFIED: {k: v / max(meter.cert_n, 1) for k, v in meter.cert.items()},
            "eps": dict(sched.eps),
            "kappa": sched.kappa,
            "crown_ibp_beta": sched.crown_ibp_beta,
            "lr": sched.lr,
            "gp": False,
        }

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Every rank: BatchNorm statistics averaged, method generators gathered, model synced."""
        self._method_rngs = [self.method_gen.get_state().clone().cpu()]
        if self.world is not None:
            self.world.average_buffers(self.net.bounded.module)
            self._method_rngs = self.world.gather(self._method_rngs[0])
            record["processes"] = self.world.size
        self.net.sync_to_model()

    def report(self, record: dict[str, Any]) -> list[str]:
        """The epoch's line, and a warning the first time the classifier has collapsed."""
        lines = [format_record(record, self.config.epochs)]
        if not self._warned and _collapsed(
            record, self.info.num_classes, record["epoch"], self.config.warmup_epochs
        ):
            self._warned = True
            lines.append(
                "warning: the model classifies the training batches at chance level -- certified "
                "training has collapsed to a (nearly) constant classifier. Try a longer "
                "--ramp-epochs, a smaller --batch-size (more steps), or keep "
                "some natural loss with --kappa-end 0.2."
            )
        return lines


def _collapsed(record: dict[str, Any], num_classes: int, epochs_done: int, warmup: float) -> bool:
    """Clean training accuracy at chance level after the warm-up: a collapsed classifier."""
    return epochs_done > warmup + 1 and record[CLEAN_ACCURACY] < 1.5 / num_classes


def format_record(r: dict[str, Any], epochs: int) -> str:
    """One human line per epoch."""
    cert = " ".join(f"{k} {v:.3f}" for k, v in r.get(CERTIFIED, {}).items())
    parts = " ".join(f"{k} {v:.3f}" for k, v in r.get("parts", {}).items())
    eps = " ".join(f"{k} {v:.4g}" for k, v in r["eps"].items())
    gp = " [gp]" if r.get("gp") else ""
    return (
        f"epoch {r['epoch']}/{epochs}{gp}  eps {eps}  loss {r['loss']:.4f} ({parts})  "
        f"clean {r[CLEAN_ACCURACY]:.3f}  certified {cert or '-'}  lr {r['lr']:.2g}  "
        f"{r['seconds']:.1f}s"
    )


# ---------------------------------------------------------------------------------------------
# Entry point


def train(
    config: TrainConfig,
    out: Union[str, Path],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: Union[str, torch.device] = "cpu",
    progress: Optional[bool] = None,
    log: Optional[Callable[[str], None]] = print,
    callback: Optional[Callable[[dict[str, Any]], None]] = None,
    stop_after: Optional[int] = None,
    world: Optional[World] = None,
) -> TrainResult:
    """Train with ``config``, writing ``checkpoint.pt``, ``metrics.jsonl``, ``config.json`` to ``out``.

    ``resume=True`` continues the run in ``out`` from its last completed epoch (refusing a
    checkpoint of another configuration, except for the keys in
    :data:`~cure_lirpa.training.config.RUNTIME_KEYS`; a larger ``epochs`` extends the run).
    ``overwrite=True`` replaces this package's files in an existing ``out``. ``progress``: tqdm bars
    (None: only on a terminal). ``log``: receives one line per epoch (None: silent). ``callback``
    sees ``{'epoch', 'phase', 'step'}`` after every optimizer step (``phase`` is ``'certified'`` or
    ``'natural'`` -- the GP pass); an exception it raises aborts the run like a kill.
    ``stop_after``: end this call after that many epochs.

    ``world``: this process's place in a data-parallel run (:mod:`cure_lirpa.distributed`; taken
    from an initialised process group when None). Every process then takes its slice of each global
    batch of ``batch_size`` samples, gradients are all-reduced, and only rank 0 writes ``out`` and
    logs.
    """
    c = config.validated()
    device = torch.device(device)
    if world is None:
        world = current_world(device)
    spec = RunSpec(
        kind=KIND,
        config=c.to_dict(),
        mutable=RUNTIME_KEYS,
        state_format=STATE_FORMAT,
        state_name="certified-training",
        epochs=c.epochs,
        seed=c.seed,
        batch_size=c.batch_size,
    )
    options = LoopOptions(resume, overwrite, device, progress, log, callback, stop_after, world)
    return run_training(spec, out, functools.partial(CertifiedTask, c, device, world), options)


__all__ = [
    "CertifiedTask",
    "KIND",
    "build_network",
    "format_record",
    "gp_epoch",
    "ibp_reg_weight_at",
    "load_init_weights",
    "make_ramp",
    "schedule_at",
    "train",
]
