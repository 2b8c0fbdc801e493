"""Wrapper overhead and IBP training-step cost, as ratios from one run.

1. ``BoundedClassifier.margin_lower_bounds`` against calling auto_LiRPA directly (a BoundedModule on
   the same folded network, the same batch, the same margin matrix) for IBP and CROWN.
   Target: ratio <= 1.10.
2. One IBP certified training step (l∞ and l2 ball) against one natural training step of the small
   CNN on the same batch -- the training loop's own step, with and without the training-certificate
   pass. Target: ratio <= 3.0.

Times are CPU seconds of this process (``time.process_time``: the waits for a core on a loaded
machine are not counted), and every comparison interleaves its calls (one call of each contender
per round, median over the rounds), so the load of a shared machine hits both sides alike: the
ratios are what to read, the seconds still depend on the machine and its load (the report gives the
load average).

Run:  python -m benchmarks.overhead [--batch 256] [--repeats 20] [--threads 1]
Writes benchmarks/results/overhead/overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, interleaved_times, save_summaries
from cure_lirpa.bounds import lirpa
from cure_lirpa.bounds.classifier import BoundedClassifier, margin_matrix
from cure_lirpa.data import dataset_info, load_dataset, stack
from cure_lirpa.io.checkpoint import versions
from cure_lirpa.models import build_model
from cure_lirpa.threats.base import NormBall
from cure_lirpa.training.config import TrainConfig
from cure_lirpa.training.timing import step_times
from cure_lirpa.vocabulary import CROWN, IBP

OUT = RESULTS / "overhead"


def _median_times(fns, repeats: int) -> list[float]:
    """Median CPU seconds of each function (``time.process_time``, which leaves out the waits for a
    core), calls interleaved so that machine load hits all alike."""
    for fn in fns:
        fn()  # warm-up
    return [statistics.median(ts) for ts in interleaved_times(fns, repeats, time.process_time)]


def wrapper_overhead(model, x, y, repeats: int, crown_batch: int) -> dict:
    """Median seconds of the wrapper and of direct auto_LiRPA calls, per method."""
    info = dataset_info("sample")
    bc = BoundedClassifier(model, info.in_shape, memory_mb=1e6)
    direct = bc.module  # the same BoundedModule, called the way a user of auto_LiRPA would
    eps = 0.1
    out = {}
    full_x, full_y = x, y
    for method, name in ((IBP, "IBP"), (CROWN, "backward")):
        x, y = (full_x, full_y) if method == IBP else (full_x[:crown_batch], full_y[:crown_batch])
        C = margin_matrix(y, 10)
        mean = model.normalize.mean
        x_shift = x - mean  # the wrapper's input shift, done once outside the timing
        x_L, x_U = (x - eps).clamp(0, 1) - mean, (x + eps).clamp(0, 1) - mean
        for threat in (NormBall(math.inf, eps), NormBall(2.0, 0.5)):

            def run_direct(threat=threat, x_L=x_L, x_U=x_U, x_shift=x_shift, C=C, name=name):
                if threat.p == math.inf:
                    ptb = lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=x_L, x_U=x_U)
                    center = (x_L + x_U) / 2
                else:
                    ptb = lirpa.PerturbationLpNorm(norm=2.0, eps=threat.eps)
                    center = x_shift
                with torch.no_grad():
                    direct.compute_bounds(
                        x=(lirpa.BoundedTensor(center, ptb),), C=C, method=name, bound_upper=False
                    )

            def run_wrapper(threat=threat, x=x, y=y, method=method):
                with torch.no_grad():
                    bc.margin_lower_bounds(x, y, threat, method)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_direct, t_wrap = _median_times([run_direct, run_wrapper], repeats)
            out[f"{method}/{threat.name}"] = {
                "batch": len(y),
                "direct_s": t_direct,
                "wrapper_s": t_wrap,
                "ratio": t_wrap / t_direct,
            }
    return out


def training_step_ratio(x, y, repeats: int) -> dict:
    """Seconds of one optimizer step of natural, IBP l∞ and IBP l2 training of the small CNN.

    The step is the training loop's own (:func:`cure_lirpa.training.timing.step_times`): forward, bounds,
    backward, gradient clipping, Adam, and -- with ``train_cert`` (the default of ``cure-lirpa
    train``) -- the no-grad IBP pass that reports the certified accuracy of the training batches
    for the norms the loss does not certify. Both settings are timed; ratios compare steps with
    the same setting.
    """
    base = dict(arch="cnn-small", lr=5e-4, eps_linf=0.1, eps_l2=0.5, kappa_end=0.0)
    configs = {
        f"{method}/{'cert' if cert else 'no-cert'}": TrainConfig(
            method=method, train_cert=cert, **base
        )
        for cert in (True, False)
        for method in ("natural", "ibp-linf", "ibp-l2")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = step_times(configs, x, y, rounds=repeats, statistic="median", clock="cpu")
    res: dict = {}
    for cert in ("cert", "no-cert"):
        nat = t[f"natural/{cert}"]
        res[cert] = {"natural_s": nat}
        for method, threat in (("ibp-linf", "linf:0.1"), ("ibp-l2", "l2:0.5")):
            sec = t[f"{method}/{cert}"]
            res[cert][f"ibp/{threat}"] = {"seconds": sec, "ratio": sec / nat}
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--crown-batch",
        type=int,
        default=16,
        help="batch of the CROWN overhead measurement (CROWN is costly)",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = dataset_info("sample")
    x, y = stack(load_dataset("sample", "test"))
    x, y = x[: args.batch], y[: args.batch]
    torch.manual_seed(0)
    model = build_model("cnn-small", info.in_shape, 10, info.mean, info.std).eval()
    load_start = os.getloadavg()[0]
    result = {
        "batch": args.batch,
        "threads": args.threads,
        "clock": "cpu",
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "versions": versions(),
        "wrapper_overhead": wrapper_overhead(model, x, y, args.repeats, args.crown_batch),
        "training_step": training_step_ratio(x, y, args.repeats),
    }
    result["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["cpus"] = os.cpu_count()
    load = result["load_average"]
    lines = [
        f"# Overhead (cnn-small, batch {args.batch}, {args.threads} thread(s), median of "
        f"{args.repeats} interleaved rounds of CPU time)",
        "",
        "Each round calls every contender once in turn and CPU time leaves out the waits for a "
        "core, so the load of the shared machine (load "
        f"average {load['start']:.1f} at the start, {load['end']:.1f} at the end, "
        f"{result['cpus']} CPUs) hits them alike: compare the ratios; the seconds depend on the "
        "load.",
        "",
        "| bound call | batch | direct auto_LiRPA (CPU s) | wrapper (CPU s) | ratio (target <= 1.10) |",
        "|---|---|---|---|---|",
    ]
    for k, v in result["wrapper_overhead"].items():
        lines.append(
            f"| {k} | {v['batch']} | {v['direct_s']:.4f} | {v['wrapper_s']:.4f} | {v['ratio']:.3f} |"
        )
    lines += [
        "",
        "Training steps: the training loop's step (gradient clipping included); *cert*: with the "
        "training-certificate pass of `cure-lirpa train` (its default), *no-cert*: "
        "`--no-train-cert`.",
        "",
        "| training step | certificates pass | CPU s | ratio to natural (target <= 3.0) |",
        "|---|---|---|---|",
    ]
    for cert, ts in result["training_step"].items():
        lines.append(f"| natural | {cert} | {ts['natural_s']:.4f} | 1.00 |")
        for k, v in ts.items():
            if k != "natural_s":
                lines.append(f"| {k} | {cert} | {v['seconds']:.4f} | {v['ratio']:.2f} |")
    text = "\n".join(lines) + "\n"
    save_summaries(args.out, {"overhead.json": result, "overhead.md": text}, echo=text)


if __name__ == "__main__":
    main()
