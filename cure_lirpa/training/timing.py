"""Seconds of one optimizer step of certified training against another (for benchmarks).

The step timed is the training loop's own :class:`cure_lirpa.training.step.TrainStep`, so every
step-time table in ``benchmarks/`` measures what :func:`cure_lirpa.training.certified.train` runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Union

import torch

from ..data import dataset_info
from ..errors import UserError
from ..vocabulary import L2, LINF
from .certified import build_network
from .config import TrainConfig
from .objectives import make_method
from .step import StepSchedule, TrainStep


def step_times(
    configs: dict[str, TrainConfig],
    x: torch.Tensor,
    y: torch.Tensor,
    rounds: int = 5,
    device: Union[str, torch.device] = "cpu",
    statistic: str = "min",
    clock: str = "wall",
) -> dict[str, float]:
    """Seconds of one optimizer step for each named config on the batch ``(x, y)``, at the end of
    the ramp (full training eps, ``kappa_end``, the initial learning rate).

    The step is the training loop's own :class:`cure_lirpa.training.step.TrainStep`: forward, bounds,
    backward, the training-certificate pass (``train_cert``), gradient clipping (``grad_clip``),
    the optimizer step. All models are built first; then each round times one step of every config
    in turn (after one untimed warm-up step each). ``statistic``: ``'min'`` (the fastest round) or
    ``'median'`` over the rounds; interleaving keeps the comparison fair on a shared machine.
    ``clock``: ``'wall'`` (``time.perf_counter``) or, on the CPU, ``'cpu'`` (``time.process_time``,
    this process's CPU seconds: a loaded machine inflates them far less than wall time, since the
    time the process waits for a core is not counted; use it with one torch thread).
    """
    if statistic not in ("min", "median"):
        raise UserError(f"statistic must be 'min' or 'median', got {statistic!r}")
    if clock not in ("wall", "cpu"):
        raise UserError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    device = torch.device(device)
    if clock == "cpu" and device.type != "cpu":
        raise UserError(f"clock='cpu' times CPU work only; use clock='wall' on {device.type}")
    now = time.process_time if clock == "cpu" else time.perf_counter
    x, y = x.to(device), y.to(device)
    steps: dict[str, Callable[[], float]] = {}
    for name, config in configs.items():
        c = dataclasses.replace(config, init_from=None).validated()
        model, net = build_network(c, dataset_info(c.dataset), device)
        method = make_method(c.method, c.method_options())
        opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        step = TrainStep(net, method, opt, c.grad_clip, c.train_cert, l1_reg=c.l1_reg)
        gen = torch.Generator(device=device).manual_seed(c.seed + 1)
        values = StepSchedule(
            eps={LINF: c.train_eps_linf, L2: c.train_eps_l2},
            kappa=c.kappa_end,
            crown_ibp_beta=0.0,
            lr=c.lr,
        )

        def one(step=step, gen=gen, values=values) -> float:
            t0 = now()
            step(x, y, values, gen)
            return now() - t0

        one()
        steps[name] = one
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(1, rounds)):
        for name, one in steps.items():
            times[name].append(one())
    pick = min if statistic == "min" else statistics.median
    return {name: float(pick(ts)) for name, ts in times.items()}


def step_time(
    config: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    repeats: int = 5,
    device: Union[str, torch.device] = "cpu",
) -> float:
    """Seconds of one optimizer step of ``config`` (the fastest of ``repeats``, see
    :func:`step_times`)."""
    return step_times({"run": config}, x, y, repeats, device)["run"]


__all__ = ["step_time", "step_times"]
