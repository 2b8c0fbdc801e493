"""Data-parallel training: 2 processes (torchrun, gloo on CPU) against 1 with the same global batch.

For each training method, runs ``cure-lirpa train`` once in one process and once under
``torchrun --nproc_per_node 2`` with the same options (the global batch is ``--batch-size`` in
both), then reports the wall and CPU time per epoch of each (median over epochs, from the runs'
metrics), their ratios, and how far the two runs' final weights are apart (max absolute and max relative
difference over all parameters; float tolerance is expected, bit equality is not: the all-reduce
sums in another order).

Run:  python -m benchmarks.ddp [--train-count 1024] [--batch-size 128] [--epochs 3] [--threads 1]
Writes benchmarks/results/ddp/ddp.json and ddp.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import REPO, RESULTS, cli_command, save_summaries
from cure_lirpa.io.checkpoint import load_checkpoint, versions

OUT = RESULTS / "ddp"
METHODS = {
    "natural": [],
    "ibp-linf": [],
    "cure-joint+ba": ["--method", "cure-joint", "--ba-eta", "2.0"],
    "cure-joint+gp": ["--method", "cure-joint", "--gp-beta", "0.5"],
}


def _train(args: argparse.Namespace, name: str, out: Path, processes: int) -> dict:
    method = METHODS[name] or ["--method", name]
    cli = [
        "train",
        *method,
        "--train-count",
        str(args.train_count),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--warmup-epochs",
        "0",
        "--ramp-epochs",
        "1",
        "--threads",
        str(args.threads),
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    cmd = cli_command(*cli, processes=processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    ckpt = load_checkpoint(out / "checkpoint.pt")
    history = ckpt["trainer_state"]["history"]
    return {
        "state_dict": ckpt["state_dict"],
        "epoch_seconds": [h["seconds"] for h in history],
        "epoch_cpu_seconds": [h["cpu_seconds"] for h in history],
        "wall_seconds": wall,
        "last": {k: history[-1][k] for k in ("loss", "clean_accuracy", "certified")},
    }


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    abs_diff, rel_diff, scale = 0.0, 0.0, 0.0
    for k, w in a.items():
        if not w.is_floating_point():
            continue
        d = (b[k] - w).abs()
        abs_diff = max(abs_diff, float(d.max()))
        rel_diff = max(rel_diff, float((d / w.abs().clamp_min(1e-3)).max()))
        scale = max(scale, float(w.abs().max()))
    return {"max_abs_diff": abs_diff, "max_rel_diff": rel_diff, "max_abs_weight": scale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-count", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = {}
    work = Path(tempfile.mkdtemp(prefix="cure-lirpa-ddp-"))
    try:
        for name in args.methods:
            one = _train(args, name, work / f"{name}-1", 1)
            two = _train(args, name, work / f"{name}-2", 2)
            t1, t2 = (
                statistics.median(one["epoch_seconds"]),
                statistics.median(two["epoch_seconds"]),
            )
            c1 = statistics.median(one["epoch_cpu_seconds"])
            c2 = statistics.median(two["epoch_cpu_seconds"])
            rows[name] = {
                "epoch_seconds_1": t1,
                "epoch_seconds_2": t2,
                "speedup": t1 / t2,
                "epoch_cpu_seconds_1": c1,
                "epoch_cpu_seconds_2_rank0": c2,
                "cpu_speedup": c1 / c2,
                "per_epoch": {k: (one[k], two[k]) for k in ("epoch_seconds", "epoch_cpu_seconds")},
                "wall_seconds_1": one["wall_seconds"],
                "wall_seconds_2": two["wall_seconds"],
                "weights": _agreement(one["state_dict"], two["state_dict"]),
                "last_1": one["last"],
                "last_2": two["last"],
            }
            print(name, rows[name]["speedup"], c1 / c2, rows[name]["weights"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": "cnn-small (sample MNIST data)",
        "train_count": args.train_count,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "threads_per_process": args.threads,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "versions": versions(),
        "rows": rows,
    }
    lines = [
        f"# Data-parallel training: 2 processes against 1 (cnn-small, {args.train_count} sample "
        f"images, global batch {args.batch_size}, {args.epochs} epochs, {args.threads} thread(s) "
        f"per process, gloo on {os.cpu_count()} CPUs)",
        "",
        "| method | wall s/epoch, 1 process | wall s/epoch, 2 processes | wall ratio "
        "| CPU s/epoch, 1 process | CPU s/epoch, rank 0 of 2 | CPU ratio "
        "| max abs weight diff | max rel weight diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        w = r["weights"]
        lines.append(
            f"| {name} | {r['epoch_seconds_1']:.2f} | {r['epoch_seconds_2']:.2f} | "
            f"{r['speedup']:.2f}x | {r['epoch_cpu_seconds_1']:.2f} | "
            f"{r['epoch_cpu_seconds_2_rank0']:.2f} | {r['cpu_speedup']:.2f}x | "
            f"{w['max_abs_diff']:.1e} | {w['max_rel_diff']:.1e} |"
        )
    lines += [
        "",
        f"Load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
        "(a shared machine inflates both times; the weight agreement does not depend on it).",
        "",
        "Wall ratio: time per epoch of 1 process over 2 (median over epochs). On a machine busier "
        "than its cores, two processes also get a larger share of the CPU than one, so this ratio "
        "can exceed 2. CPU ratio: CPU seconds per epoch of the one process over those of rank 0 "
        "of two (each process runs one torch thread), the speed-up with one free core per "
        "process; what is missing to 2x is the all-reduce, the per-step work that does not shrink "
        "with the slice, and the smaller batches' lower efficiency.",
    ]
    text = "\n".join(lines) + "\n"
    save_summaries(args.out, {"ddp.json": result, "ddp.md": text}, echo=text)


if __name__ == "__main__":
    main()
