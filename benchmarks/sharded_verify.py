"""Sharded verification: one ``cure-lirpa verify`` process against N shards run side by side, merged.

Trains a small model on the built-in sample data (or takes ``--checkpoint``), certifies the same
images once unsharded and once as N shards started at the same time (``--shard K/N``, one process
each), merges the shards with ``cure-lirpa merge`` and checks that the merged run equals the
unsharded one (per-sample certified flags, margins and PGD results; summary figures). Reports the wall
time of each, the summed CPU time and their ratios.

Run:  python -m benchmarks.sharded_verify [--count 256 --shards 2]
Writes benchmarks/results/sharded_verify/results.json and summary.md.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import click

from benchmarks.harness import REPO, RESULTS, read_results, save_summaries
from cure_lirpa.vocabulary import CROWN, IBP

OUT = RESULTS / "sharded_verify"


def _cli(args: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "cure_lirpa", *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        output, _ = p.communicate()
        if p.returncode != 0:
            raise click.ClickException(f"{' '.join(p.args)} failed:\n{output[-3000:]}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(procs_args: list[list[str]], threads: int) -> tuple[float, float]:
    """Run the commands side by side; (wall seconds, CPU seconds of all of them)."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    _wait([_cli(a, threads) for a in procs_args])
    return time.perf_counter() - t0, _children_cpu() - cpu0


def _rows(folder: Path) -> list:
    """The per-sample rows of samples.csv (margins to its 6 digits: the part that must agree)."""
    from cure_lirpa.verification.results import read_samples

    return read_samples(folder / "samples.csv")


@click.command(context_settings={"show_default": True})
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(min=2), default=256, help="Test images to certify.")
@click.option("--shards", type=click.IntRange(min=2), default=2, help="N: shards run side by side.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--method", "methods", multiple=True, default=(IBP, CROWN), help="Bound methods.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch threads per process.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=OUT)
@click.option("--report-only", is_flag=True, help="Rewrite summary.md from results.json.")
def main(
    checkpoint: Optional[Path],
    count: int,
    shards: int,
    batch_size: int,
    methods: tuple[str, ...],
    threads: int,
    out: Path,
    report_only: bool,
) -> None:
    """Time one verify process against N shards + merge, and check they agree."""
    from cure_lirpa.io.checkpoint import versions
    from cure_lirpa.verification.results import read_summary, to_percent

    if report_only:
        result = read_results(out / "results.json")
        result.setdefault("cpu_ratio", result["cpu_seconds_unsharded"] * result["shards"]
                          / result["cpu_seconds_sharded"])  # fmt: skip
        text = summary_markdown(result)
        save_summaries(out, {"results.json": result, "summary.md": text}, echo=text)
        return

    with tempfile.TemporaryDirectory(prefix="cure-lirpa-shards-") as tmp:
        work = Path(tmp)
        model = "--checkpoint"
        if checkpoint is None:
            model = "the demo model ('cure-lirpa train' with its defaults, on the sample data)"
            checkpoint = work / "model" / "checkpoint.pt"
            _wait([_cli(["train", "--device", "cpu", "--quiet", "--out", str(checkpoint.parent)],
                        threads)])  # fmt: skip
        common = ["verify", str(checkpoint), "--count", str(count), "--batch-size",
                  str(batch_size), "--threat", "linf:0.1", "--threat", "l2:0.5",
                  "--device", "cpu", "--threads", str(threads), "--quiet", "--seed", "0"]  # fmt: skip
        for m in methods:
            common += ["--method", m]
        click.echo(f"unsharded: {count} images in one process")
        one_wall, one_cpu = _timed([[*common, "--out", str(work / "one")]], threads)
        click.echo(f"{shards} shards side by side")
        sharded = work / "sharded"
        shard_wall, shard_cpu = _timed(
            [[*common, "--out", str(sharded), "--shard", f"{k}/{shards}"] for k in range(shards)],
            threads,
        )
        t0 = time.perf_counter()
        _wait([_cli(["merge", str(sharded)], threads)])
        merge_wall = time.perf_counter() - t0
        a, b = read_summary(work / "one"), read_summary(sharded)
        keys = ("clean_accuracy", "certified", "certified_best", "union", "pgd_accuracy")
        same_summary = all(a.get(k) == b.get(k) for k in keys)
        same_rows = _rows(work / "one") == _rows(sharded)
    result = {
        "model": model,
        "count": count,
        "shards": shards,
        "batch_size": batch_size,
        "methods": list(methods),
        "threads_per_process": threads,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "wall_seconds_unsharded": one_wall,
        "wall_seconds_sharded": shard_wall,
        "wall_seconds_merge": merge_wall,
        "cpu_seconds_unsharded": one_cpu,
        "cpu_seconds_sharded": shard_cpu,
        "wall_ratio": one_wall / (shard_wall + merge_wall),
        "cpu_ratio": one_cpu / (shard_cpu / shards),
        "identical_rows": same_rows,
        "identical_summary": same_summary,
        "union_best": to_percent(a)["union"]["best"],  # percent, as this suite reports it
        "versions": versions(),
    }
    text = summary_markdown(result)
    save_summaries(out, {"results.json": result, "summary.md": text}, echo=text)
    if not (same_rows and same_summary):
        raise click.ClickException("the merged shards differ from the unsharded run")


def summary_markdown(r: dict) -> str:
    """The Markdown table of one run's ``results.json``."""
    n = r["shards"]
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    lines = [
        f"# Sharded verify: 1 process against {n} shards side by side + merge "
        f"({r['count']} images, {', '.join(r['methods'])}, l∞ 0.1 and l2 0.5, batch "
        f"{r['batch_size']}, {r['threads_per_process']} thread(s) per process, {r['cpus']} CPUs)",
        "",
        "| run | wall s | CPU s (all processes) |",
        "|---|---|---|",
        f"| 1 process | {r['wall_seconds_unsharded']:.1f} | {r['cpu_seconds_unsharded']:.1f} |",
        f"| {n} shards | {r['wall_seconds_sharded']:.1f} | {r['cpu_seconds_sharded']:.1f} |",
        f"| merge | {r['wall_seconds_merge']:.1f} | - |",
        "",
        f"Merged run equal to the unsharded one: per-sample rows {yes(r['identical_rows'])}, "
        f"summary {yes(r['identical_summary'])} (union certified {r['union_best']:.1f}%).",
        "",
        f"Wall ratio (1 process over shards + merge): {r['wall_ratio']:.2f}x, with the load average "
        f"at {', '.join(f'{v:.1f}' for v in r['load_average_at_end'])} on {r['cpus']} CPUs at the "
        "end: on a machine busier than its cores the shards compete for the same CPUs, so this "
        f"ratio says little. CPU ratio: {r['cpu_ratio']:.2f}x, the unsharded run's CPU seconds over "
        "one shard's (their mean), the speed-up to expect with one free core per shard; what is "
        "missing to N is the fixed cost every process pays (starting Python, torch and "
        "auto_LiRPA, tracing the model).",
        "",
        f"Model: {r['model']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
