"""Data-parallel certified training under torchrun (DistributedDataParallel).

``torchrun --nproc_per_node N -m cure_lirpa train ...`` starts N processes (ranks). Each builds the
model, moves it to its device and traces its own bounded module (auto_LiRPA's BoundedModule is built
by tracing, so it is never shared or pickled). Per optimizer step:

* every rank draws the same global batch (the data order of one process, ``--batch-size`` samples)
  and takes its contiguous slice (:meth:`World.slice`, sizes differ by at most one);
* the whole loss -- clean forward, the method's bounds, bound alignment -- runs inside the forward
  of :class:`cure_lirpa.training.step.LossModule` wrapped in DistributedDataParallel, so backward
  all-reduces every parameter's gradient;
* the loss of rank r is scaled by ``world * b_r / B`` (:meth:`World.prepare`): DDP averages the
  gradients over ranks, so the reduced gradient is that of the mean loss over the global batch of
  size B, also when the slices differ in size; bound alignment's ``|gamma|`` is the all-reduced
  count of the global batch (``Batch.count_factor``);
* gradient clipping, Adam and gradient projection then see identical reduced gradients and keep
  identical weights on every rank.

BatchNorm: each rank normalises with the batch statistics of its own slice (as DDP without
SyncBatchNorm; auto_LiRPA cannot trace SyncBatchNorm, and its IBP bounds in train mode use the
statistics of the clean forward pass of the same slice, so the bounds stay those of the network the
rank trains). The running statistics are averaged over the ranks at every epoch end
(:meth:`World.average_buffers`), so every rank, and the checkpoint, holds the same ones. Results of a
BatchNorm model therefore depend on the number of processes, unlike models without BatchNorm.

Randomness of methods (SABR and l2-defence attack starts, CURE-Random halves) comes from one
generator per rank (``seed + 1 + 1000 * rank``; rank 0 is the one-process generator), so those
methods are equivalent in distribution to one process but not equal bit for bit.

Only rank 0 writes the run folder; rank 0 reads the checkpoint on ``--resume`` and broadcasts it, so
the folder needs to exist only where rank 0 runs. Backends: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError
from .training.objectives import Batch
from .vocabulary import AUTO_DEVICE

T = TypeVar("T")
METHOD_SEED_STRIDE = 1000
"""Rank r's method generator is seeded with ``seed + 1 + METHOD_SEED_STRIDE * r``."""


def launched() -> bool:
    """True when this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return size.isdigit() and int(size) > 1


def local_rank() -> int:
    """``LOCAL_RANK`` set by torchrun (0 when absent)."""
    value = os.environ.get("LOCAL_RANK", "0")
    return int(value) if value.isdigit() else 0


def process_device(name: str) -> torch.device:
    """The device of this process for a ``--device`` value under torchrun.

    ``cuda`` / ``auto`` (with a GPU) -> ``cuda:LOCAL_RANK``; ``cuda:N`` is taken as given (one
    process per GPU is the caller's choice then); ``cpu`` / ``auto`` without a GPU -> CPU.
    """
    if name == AUTO_DEVICE:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for but no CUDA GPU is available")
        if name == "cuda":
            rank = local_rank()
            if rank >= torch.cuda.device_count():
                raise UserError(
                    f"LOCAL_RANK {rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                    "start at most one process per GPU (torchrun --nproc_per_node)"
                )
            name = f"cuda:{rank}"
        device = torch.device(name)
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


@dataclass
class World:
    """The processes of one data-parallel run: ``rank`` of ``size``, on ``device``."""

    rank: int
    size: int
    device: torch.device

    @classmethod
    def from_process_group(cls, device: torch.device) -> World:
        """The world of an initialised default process group."""
        return cls(dist.get_rank(), dist.get_world_size(), torch.device(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ------------------------------------------------------------------------------------

    def slice(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch of positions (sizes differ by <= 1)."""
        return torch.tensor_split(idx, self.size)[self.rank]

    def check_batches(self, sizes: list[int]) -> None:
        """Refuse global batches that leave a rank without samples."""
        small = min(sizes)
        if small < self.size:
            raise UserError(
                f"a batch of {small} samples cannot be split over {self.size} processes; use "
                "fewer processes, or a --batch-size / --train-count whose last batch of an epoch "
                f"has at least {self.size} samples"
            )

    def prepare(self, batch: Batch, global_size: int) -> None:
        """Fill in ``batch.loss_scale`` and ``batch.count_factor`` for a slice of a global batch
        of ``global_size`` samples (see the module docstring)."""
        local = int(batch.y.shape[0])
        batch.loss_scale = self.size * local / global_size
        world = self

        def count_factor(n: int) -> float:
            total = world.all_sum([float(n)])[0]
            return world.size * max(n, 1) / max(total, 1.0) / batch.loss_scale

        batch.count_factor = count_factor

    # -- collectives -----------------------------------------------------------------------------

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def reduce_meter(self, meter: Any) -> None:
        """Sum a training meter's counts and sample-weighted sums over the ranks, in place."""
        keys = sorted(meter.sums)
        cert = sorted(meter.cert)
        flat = [meter.n, meter.correct, meter.cert_n, *(meter.sums[k] for k in keys)]
        flat += [meter.cert[k] for k in cert]
        total = self.all_sum([float(v) for v in flat])
        meter.n, meter.correct, meter.cert_n = (int(round(v)) for v in total[:3])
        for k, v in zip(keys, total[3 : 3 + len(keys)]):
            meter.sums[k] = v
        for k, v in zip(cert, total[3 + len(keys) :]):
            meter.cert[k] = int(round(v))

    @torch.no_grad()
    def average_buffers(self, module: nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) over the ranks."""
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(self.size)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and give its result to every rank; a :class:`UserError` (or any
        other exception) on rank 0 is raised on every rank, so no rank waits for the others."""
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except UserError as exc:
                box[0] = ("user", str(exc))
            except Exception as exc:  # noqa: BLE001 -- re-raised below on rank 0
                box[0] = ("error", f"{type(exc).__name__}: {exc}")
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "user":
            raise UserError(value)
        if kind == "error":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def barrier(self) -> None:
        dist.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel (inputs stay where they are: ``device_ids=None``;
        running statistics are averaged per epoch instead of broadcast per step)."""
        return nn.parallel.DistributedDataParallel(
            module, device_ids=None, broadcast_buffers=False, find_unused_parameters=False
        )

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_environment(device: torch.device, timeout_minutes: float = 30.0) -> World:
    """Join the process group torchrun describes (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``...)
    with the backend for ``device``; returns this process's :class:`World`."""
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; train in one process")
    if not dist.is_initialized():
        dist.init_process_group(
            backend_for(device), timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return World.from_process_group(device)


def shutdown(finished: bool = True) -> None:
    """Leave the process group (if joined).

    ``finished``: every rank got through its work. The ranks then meet at a barrier first, so that
    no rank tears down its gloo connections (and exits) while rank 0 is still writing the run folder
    -- a rank leaving early could abort in gloo's teardown. After a failure the group is left
    without the collective teardown (it would wait for ranks that never come); torchrun stops the
    others when this rank exits with an error.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        gc.collect()  # DistributedDataParallel wrappers of this run hold the group; free them first
        dist.barrier()
        dist.destroy_process_group()


def current_world(device: torch.device) -> Optional[World]:
    """The :class:`World` of an initialised process group with more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World.from_process_group(device)
    return None


__all__ = [
    "METHOD_SEED_STRIDE",
    "World",
    "backend_for",
    "current_world",
    "init_from_environment",
    "launched",
    "local_rank",
    "process_device",
    "shutdown",
]
