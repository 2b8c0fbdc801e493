"""The one training loop, shared by certified training and smoothing training.

A *task* (:class:`Task`: :class:`cure_lirpa.training.certified.CertifiedTask`,
:class:`cure_lirpa.smoothing.training.SmoothingTask`) is one kind of training: it builds its model,
optimizer and step, runs one epoch through :class:`Epoch`, and says what its checkpoint holds
besides the loop's state. The loop owns everything around it, the same for every kind:

* the run folder (:meth:`cure_lirpa.io.runs.Run.open`: ``config.json``; a resume with other settings,
  except the run's mutable keys, is refused naming the keys), ``checkpoint.pt`` written atomically
  after every epoch (:func:`cure_lirpa.io.checkpoint.make_checkpoint` with a ``trainer_state``:
  format, optimizer state, every RNG state, device type, the task's entries, the metrics history)
  and ``metrics.jsonl``, one JSON object per finished epoch, rewritten with the checkpoint;
* resume: everything an epoch does is a function of the saved state (weights, optimizer, the
  data-order generator, the task's generators), so a run killed anywhere and resumed repeats the
  unfinished epoch and ends with exactly the weights of an uninterrupted run (same device and
  threads); a larger ``epochs`` extends a run;
* the data order (a ``torch.Generator`` seeded with the run's seed, no module-level state), batches
  on the device, the progress bar, the per-step callback, a non-finite loss stopped with a clear
  error, ``stop_after``;
* data parallelism (:mod:`cure_lirpa.distributed`): rank 0 opens the folder and reads the checkpoint
  for every rank, each rank takes its slice of every global batch, the metrics are summed over the
  ranks, and only rank 0 writes and logs.

The loop knows no training method; the tasks know nothing of the run folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Union

import torch

from ..data import TrainData
from ..errors import UserError
from ..io.checkpoint import atomic_torch_save, atomic_write_text, load_checkpoint
from ..io.runs import Run, rng_state, set_rng_state
from .meter import Meter, StepResult

if TYPE_CHECKING:
    from ..distributed import World

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


# ---------------------------------------------------------------------------------------------
# What the loop is given


@dataclass(frozen=True)
class RunSpec:
    """A run as the loop sees it: the run folder's kind and configuration, the checkpoint format of
    its kind, its length and data order."""

    kind: str
    """Run-folder kind (``config.json``), e.g. ``train``."""
    config: dict[str, Any]
    """Everything that determines the results (JSON-serialisable)."""
    mutable: tuple[str, ...]
    """Config keys a resume may change."""
    state_format: str
    """``trainer_state['format']`` of this kind's checkpoints; another one is not resumed."""
    state_name: str
    """What the refusal to resume calls that state, e.g. ``certified-training``."""
    epochs: int
    seed: int
    """Seed of the data order."""
    batch_size: int
    """Samples per global batch."""


@dataclass
class LoopOptions:
    """How one call runs (nothing here changes the weights of a finished run)."""

    resume: bool = False
    overwrite: bool = False
    device: torch.device = torch.device("cpu")
    progress: Optional[bool] = None
    """tqdm bars (None: only on a terminal)."""
    log: Optional[Callable[[str], None]] = print
    """Receives the loop's and the task's lines (None: silent)."""
    callback: Optional[Callable[[dict[str, Any]], None]] = None
    """Sees ``{'epoch', 'phase', 'step'}`` after every step; an exception aborts like a kill."""
    stop_after: Optional[int] = None
    """End this call after that many epochs."""
    world: Optional[World] = None
    """This process's place in a data-parallel run (None: one process)."""


@dataclass(frozen=True)
class StepAt:
    """Where a step is: ``epoch`` (0-based), ``index`` in the epoch, the global optimizer ``step``
    (``epoch * steps_per_epoch + index``), the pass's ``phase`` and ``size``, the samples in the
    global batch (this process may hold a slice of it)."""

    epoch: int
    index: int
    step: int
    phase: str
    size: int


StepFn = Callable[[torch.Tensor, torch.Tensor, StepAt], StepResult]
"""One optimizer step on a batch ``(x, y)`` on the training device."""


class Task(Protocol):
    """One kind of training, as the loop runs it.

    Built by a factory ``build(checkpoint, say)`` after the run folder is open (``checkpoint``: the
    one to resume from, or None; ``say``: logs on rank 0 only).
    """

    data: TrainData
    optimizer: torch.optim.Optimizer
    generators: dict[str, torch.Generator]
    """Named generators saved with the RNG state (besides the loop's ``data``)."""
    diverged_hint: str
    """Advice after a non-finite loss, e.g. ``lower --lr``."""

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Weights and the task's own state from ``checkpoint`` (the loop restores the optimizer,
        the RNGs and the history)."""

    def run_epoch(self, epoch: Epoch) -> dict[str, Any]:
        """Train one epoch (on every rank, collectives included); its metrics record."""

    def state(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The task's entries of the trainer state after ``len(history)`` epochs."""

    def checkpoint(self, epoch: int, trainer_state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint to write after ``epoch`` epochs."""

    def report(self, record: dict[str, Any]) -> list[str]:
        """Lines to log after an epoch (its line, warnings)."""


TaskFactory = Callable[[Optional[dict[str, Any]], Callable[[str], None]], Task]


@dataclass
class TrainResult:
    """What a run returns: paths, epochs done, the metrics history and this call's time."""

    out: Path
    checkpoint: Path
    metrics: Path
    epoch: int
    history: list[dict[str, Any]]
    seconds: float

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# ---------------------------------------------------------------------------------------------
# One epoch, as a task sees it


class Epoch:
    """One epoch of a run: its 0-based ``index``, the ``previous`` epoch's record (None for the
    first), and :meth:`run`, one pass of a step over the epoch's batches (a task may run several
    passes over the same batches, e.g. gradient projection's certified and natural passes).
    ``chunks``: the epoch's global batches of sample positions; ``bar``: its tqdm progress bar."""

    def __init__(self, loop: _Loop, task: Task, index: int, chunks: list[torch.Tensor], bar: Any):
        self.index = index
        self.previous: Optional[dict[str, Any]] = loop.history[-1] if loop.history else None
        self._loop, self._task, self._chunks, self._bar = loop, task, chunks, bar
        self._steps = task.data.steps_per_epoch(loop.spec.batch_size)
        self._passes = 0

    def run(self, step: StepFn, phase: str = "train", meter: Optional[Meter] = None) -> Meter:
        """``step`` on every batch of the epoch (this process's slice); the pass's metrics,
        summed over the ranks."""
        meter = Meter() if meter is None else meter
        self._begin_pass(phase)
        world, device = self._loop.options.world, self._loop.options.device
        for i, idx in enumerate(self._chunks):
            size = len(idx)
            if world is not None:
                idx = world.slice(idx)  # this process's part of the global batch
            x, y = self._task.data.batch(idx)
            x, y = x.to(device), y.to(device)
            res = step(x, y, StepAt(self.index, i, self.index * self._steps + i, phase, size))
            if not math.isfinite(res.loss):
                raise UserError(
                    f"the training loss became {res.loss} in epoch {self.index + 1}; "
                    f"{self._task.diverged_hint}"
                )
            meter.update(res, y)
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{res.loss:.3f}", refresh=False)
            if self._loop.callback is not None:
                self._loop.callback({"epoch": self.index, "phase": phase, "step": i})
        if world is not None:
            world.reduce_meter(meter)
        return meter

    def _begin_pass(self, phase: str) -> None:
        """A later pass extends the progress bar and names its phase."""
        self._passes += 1
        if self._passes > 1:
            self._bar.total += len(self._chunks)
            self._bar.set_description(f"{self._loop.epoch_label(self.index)} ({phase})")


# ---------------------------------------------------------------------------------------------
# The loop


def run_training(
    spec: RunSpec, out: Union[str, Path], build: TaskFactory, options: LoopOptions
) -> TrainResult:
    """Run the task ``build`` makes in the run folder ``out`` (see the module docstring).

    A failure before any epoch finished leaves no run folder behind.
    """
    loop = _Loop(spec, Path(out), options)
    try:
        return loop.run(build)
    except BaseException:
        loop.discard()
        raise
    finally:
        loop.close()


class _Loop:
    """One call of :func:`run_training` (an object, so that no state lives at module level)."""

    def __init__(self, spec: RunSpec, out: Path, options: LoopOptions):
        self.spec, self.out, self.options = spec, out, options
        world = options.world
        self.main = world is None or world.is_main
        self.progress = options.progress if self.main else False
        self.callback = options.callback if self.main else None
        self.history: list[dict[str, Any]] = []
        self.data_gen = torch.Generator().manual_seed(spec.seed)
        self._run: Optional[Run] = None

    def say(self, msg: str) -> None:
        """Log on rank 0."""
        if self.main and self.options.log is not None:
            self.options.log(msg)

    def epoch_label(self, index: int) -> str:
        return f"epoch {index + 1}/{self.spec.epochs}"

    # -- run folder --------------------------------------------------------------------------

    def open(self) -> Optional[dict[str, Any]]:
        """Open the run folder; the checkpoint to resume from, if any (rank 0 only)."""
        s, o = self.spec, self.options
        self._run = Run.open(
            self.out, s.kind, s.config, resume=o.resume, overwrite=o.overwrite, mutable=s.mutable
        )
        path = self.out / CHECKPOINT
        if not path.is_file():  # a fresh run, or one killed before its first epoch ended
            return None
        ckpt = load_checkpoint(path, map_location="cpu")
        state = ckpt.get("trainer_state") or {}
        if state.get("format") != s.state_format:
            raise UserError(
                f"--resume: {path} has no {s.state_name} state of this version to resume from; "
                "start a new run in another --out"
            )
        if state.get("device_type") != o.device.type:
            raise UserError(
                f"--resume: {path} was trained on {state.get('device_type')}; resume it with "
                f"--device {state.get('device_type')} (results are only reproducible on one device)"
            )
        return ckpt

    def discard(self) -> None:
        """After a failure: no epoch finished, leave nothing behind."""
        if self._run is not None:
            self._run.discard_if_empty()

    def close(self) -> None:
        if self._run is not None:
            self._run.close()

    # -- the run -----------------------------------------------------------------------------

    def run(self, build: TaskFactory) -> TrainResult:
        world = self.options.world
        ckpt = self.open() if world is None else world.on_main(self.open)
        task = build(ckpt, self.say)
        start = self.restore(task, ckpt)
        result = TrainResult(
            self.out, self.out / CHECKPOINT, self.out / METRICS, start, self.history, 0.0
        )
        if self.main and self.history:  # a kill between checkpoint and metrics leaves them behind
            self.write_metrics()
        if start >= self.spec.epochs:
            self.say(
                f"{self.out} is already trained for {start} epochs (of {self.spec.epochs}); "
                "nothing to do"
            )
            return result
        if world is not None:
            world.check_batches([len(i) for i in task.data.order(self.spec.batch_size, None)])
        t_call = time.perf_counter()
        for index in range(start, self.spec.epochs):
            stop = self.options.stop_after
            if stop is not None and index - start >= stop:
                self.say(f"stopping after {stop} epoch(s) as asked; continue with --resume")
                break
            record = self.epoch(task, index)
            self.history.append(record)
            if self.main:
                self.save(task)
                for line in task.report(record):
                    self.say(line)
            result.epoch = index + 1
        result.seconds = round(time.perf_counter() - t_call, 2)
        return result

    def restore(self, task: Task, ckpt: Optional[dict[str, Any]]) -> int:
        """The task, optimizer, RNGs and history from ``ckpt``; the epochs done."""
        if ckpt is None:
            if self.options.resume:
                self.say(f"resuming {self.out}: no epoch had finished, starting at epoch 1")
            return 0
        state = ckpt["trainer_state"]
        task.restore(ckpt)
        task.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], {"data": self.data_gen, **task.generators})
        self.history[:] = state["history"]
        start = int(ckpt["epoch"])
        self.say(f"resuming {self.out} after epoch {start} of {self.spec.epochs}")
        return start

    def epoch(self, task: Task, index: int) -> dict[str, Any]:
        """One epoch of ``task`` in this epoch's data order, under a progress bar."""
        from tqdm.auto import tqdm

        chunks = task.data.order(self.spec.batch_size, self.data_gen)
        bar = tqdm(
            total=len(chunks),
            desc=self.epoch_label(index),
            disable=None if self.progress is None else not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        try:
            return task.run_epoch(Epoch(self, task, index, chunks, bar))
        finally:
            bar.close()

    def save(self, task: Task) -> None:
        """Checkpoint and metrics after the last epoch of :attr:`history` (rank 0)."""
        state = {
            "format": self.spec.state_format,
            "optimizer": task.optimizer.state_dict(),
            "rng": rng_state({"data": self.data_gen, **task.generators}),
            "device_type": self.options.device.type,
            **task.state(self.history),
            "history": self.history,
        }
        atomic_torch_save(task.checkpoint(len(self.history), state), self.out / CHECKPOINT)
        self.write_metrics()

    def write_metrics(self) -> None:
        text = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_text(self.out / METRICS, text)


__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "METRICS",
    "Epoch",
    "LoopOptions",
    "RunSpec",
    "StepAt",
    "StepFn",
    "Task",
    "TaskFactory",
    "TrainResult",
    "run_training",
]
