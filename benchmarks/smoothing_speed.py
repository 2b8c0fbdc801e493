"""Throughput of randomized-smoothing certification against plain forward passes.

Measures, in one process and interleaved (the machine is shared, so repeats alternate and medians
are reported):

- the certification throughput of ``Smooth.certify`` (noisy samples per second, counting the n0
  selection and the n estimation samples) over the throughput of plain forward passes + argmax of the
  same model on batches of the same size (target >= 0.90);
- how certification time grows with n and with the batch size.

Writes ``speed.json`` and ``speed.md`` into ``benchmarks/results/smoothing/speed`` (``speed-quick``
with ``--quick``). Usage::

    python -m benchmarks.smoothing_speed --quick
    python -m benchmarks.smoothing_speed --threads 1
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Optional

import click
import torch

from benchmarks.harness import RESULTS, environment, interleaved_times, save_summaries
from cure_lirpa.data import dataset_info
from cure_lirpa.io.checkpoint import (
    dataset_info_of,
    load_checkpoint,
    model_from_checkpoint,
)
from cure_lirpa.models import build_model
from cure_lirpa.smoothing import GaussianNoise, Smooth, UniformNoise


def _forward(model: torch.nn.Module, batch: torch.Tensor, total: int) -> None:
    """Plain forward + argmax over ``total`` samples in batches of ``len(batch)``."""
    with torch.inference_mode():
        done = 0
        while done < total:
            b = min(len(batch), total - done)
            model(batch[:b]).argmax(dim=1)
            done += b


def measure_ratio(model, x, noise, n0: int, n: int, batch: int, repeats: int) -> dict[str, Any]:
    """Interleaved repeats of certify and of plain forward over the same number of samples."""
    smooth = Smooth(model, 10, noise, seed=0)
    inputs = torch.rand(batch, *x.shape)
    total = n0 + n
    _forward(model, inputs, batch)  # warm-up
    smooth.certify(x, 1, batch, 0.001, batch)
    fwd, cert = interleaved_times(
        [lambda: _forward(model, inputs, total), lambda: smooth.certify(x, n0, n, 0.001, batch)],
        repeats,
    )
    f, c = statistics.median(fwd), statistics.median(cert)
    return {
        "noise": noise.describe(),
        "n0": n0,
        "n": n,
        "batch_size": batch,
        "repeats": repeats,
        "forward_samples_per_s": total / f,
        "certify_samples_per_s": total / c,
        "ratio": f / c,
        "pairwise_ratio_median": statistics.median(a / b for a, b in zip(fwd, cert)),
        "forward_seconds": fwd,
        "certify_seconds": cert,
    }


def measure_growth(
    model, x, n0: int, ns: list[int], batches: list[int], n_for_batches: int, repeats: int
):
    smooth = Smooth(model, 10, GaussianNoise(0.5), seed=0)

    def seconds(n: int, batch: int) -> float:
        (secs,) = interleaved_times([lambda: smooth.certify(x, n0, n, 0.001, batch)], repeats)
        return statistics.median(secs)

    by_n = [{"n": n, "batch_size": max(batches), "seconds": seconds(n, max(batches))} for n in ns]
    by_batch = [
        {"n": n_for_batches, "batch_size": b, "seconds": seconds(n_for_batches, b)} for b in batches
    ]
    return by_n, by_batch


def _markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = [
        "# Smoothing certification speed",
        "",
        f"Model `{res['model']}`, input {res['in_shape']}, torch {env['torch']}, "
        f"{env['threads']} thread(s), {env['cpus']} CPUs, load average at start {env['load_start']}, "
        f"at end {env['load_end']}. Medians of {res['repeats']} interleaved repeats.",
        "",
        "## Certification throughput vs plain forward passes (same model, same batch size)",
        "",
        "| noise | n0 + n | batch | forward samples/s | certify samples/s | ratio | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["ratio"]:
        lines.append(
            f"| {r['noise']['noise']} | {r['n0']} + {r['n']} | {r['batch_size']} | "
            f"{r['forward_samples_per_s']:.0f} | {r['certify_samples_per_s']:.0f} | {r['ratio']:.3f} | "
            f"{'>= 0.90 ok' if r['ratio'] >= 0.9 else 'below 0.90'} |"
        )
    lines += [
        "",
        "## Time of one CERTIFY call vs n",
        "",
        "| n | batch | seconds | us per noisy sample |",
        "|---|---|---|---|",
    ]
    for r in res["growth_n"]:
        lines.append(
            f"| {r['n']} | {r['batch_size']} | {r['seconds']:.3f} | {1e6 * r['seconds'] / (r['n'] + res['n0']):.1f} |"
        )
    lines += [
        "",
        "## Time of one CERTIFY call vs batch size",
        "",
        "| batch | n | seconds | us per noisy sample |",
        "|---|---|---|---|",
    ]
    for r in res["growth_batch"]:
        lines.append(
            f"| {r['batch_size']} | {r['n']} | {r['seconds']:.3f} | {1e6 * r['seconds'] / (r['n'] + res['n0']):.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="Small n and few repeats (a minute).")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="Model to time [default: an untrained cnn-small; speed does not depend on weights].",
)
@click.option("--arch", default="cnn-small", show_default=True)
@click.option("--width", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="[default: benchmarks/results/smoothing/speed or speed-quick]",
)
def main(
    quick: bool,
    checkpoint: Optional[str],
    arch: str,
    width: int,
    batch_size: int,
    threads: int,
    out_dir: Optional[str],
) -> None:
    """Certification throughput over plain forward throughput, and time vs n and batch size."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if checkpoint:
        ckpt = load_checkpoint(checkpoint)
        model = model_from_checkpoint(ckpt)
        name = str(checkpoint)
        in_shape = dataset_info_of(ckpt).in_shape
    else:
        info = dataset_info("mnist")
        model = build_model(arch, info.in_shape, info.num_classes, info.mean, info.std, width=width)
        name = f"{arch} width {width} (untrained)"
        in_shape = info.in_shape
    model.eval()
    x = torch.rand(in_shape)
    n0 = 100
    repeats = 3 if quick else 7
    n_ratio = 4000 if quick else 20_000
    ns = [1000, 4000, 10_000] if quick else [1000, 10_000, 100_000]
    batches = [100, 500, 1000] if quick else [100, 250, 500, 1000, 2000, 4000]
    n_for_batches = 4000 if quick else 20_000
    load_start = os.getloadavg()
    ratio = [
        measure_ratio(model, x, GaussianNoise(0.5), n0, n_ratio, batch_size, repeats),
        measure_ratio(model, x, UniformNoise(0.5), n0, n_ratio, batch_size, repeats),
    ]
    growth_n, growth_batch = measure_growth(
        model, x, n0, ns, batches, n_for_batches, max(1, repeats // 2)
    )
    res = {
        "model": name,
        "in_shape": list(in_shape),
        "quick": quick,
        "n0": n0,
        "repeats": repeats,
        "environment": environment(
            cpus=os.cpu_count(),
            load_start=[round(v, 2) for v in load_start],
            load_end=[round(v, 2) for v in os.getloadavg()],
        ),
        "ratio": ratio,
        "growth_n": growth_n,
        "growth_batch": growth_batch,
    }
    out = (
        Path(out_dir) if out_dir else RESULTS / "smoothing" / ("speed-quick" if quick else "speed")
    )
    save_summaries(out, {"speed.json": res, "speed.md": _markdown(res)}, echo=_markdown(res))


if __name__ == "__main__":
    main()
