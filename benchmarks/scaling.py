"""Suite ``scaling``: time and peak memory of each bound method against batch size and model width.

Two sweeps over cnn-small (conv w 4x4 s2 - conv 2w 4x4 - fc100 - fc10) on MNIST-shaped inputs
(real images from the built-in sample): batch size at a fixed width, and width at a fixed batch. Each
point (sweep value, threat, method) runs in a fresh child process (:func:`benchmarks.harness.run_cell`):
build the model (seeded random weights: cost does not depend on training, except alpha-CROWN's
early stopping), warm up on a tiny model, record the resident memory, reset the peak counter, time
``BoundedClassifier.margin_lower_bounds`` on one batch ``repeats`` times (median), and read the
peak. Each point also records the memory model of :mod:`cure_lirpa.bounds.classifier` --
``bytes_per_sample(method) x min(batch, chunk_size)`` -- next to the measured growth, and the chunk
size that the ``--memory-mb`` budget imposes (a batch larger than the chunk is split).

Writes ``points/*.json`` (resumable: existing points with the same settings are skipped),
``results.json``, ``summary.md`` (included in docs/benchmarks.md), and ``scaling.png`` to
benchmarks/results/scaling[-quick]/. Usage::

    python -m benchmarks run --suite scaling --quick
    python -m benchmarks run --suite scaling -- --threat linf:0.1 --threat l2:0.5
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from benchmarks.certificates import LABEL, METHODS
from benchmarks.harness import (
    RESULTS,
    cached_cell,
    code_fingerprint,
    generated_by,
    header_fields,
    log,
    provenance,
    reset_peak_rss,
    rss_now_mb,
    rss_peak_mb,
    run_cell,
    save_summaries,
    slug,
    warm_up,
    with_options,
)
from cure_lirpa.vocabulary import ALPHA_CROWN

SUITE = "scaling"
ARCH = "cnn-small"
POINT_VERSION = 2
"""Part of every point's key: bump it when what a point measures changes."""


@dataclass
class Settings:
    """The two sweeps and how each point is timed."""

    batches: tuple[int, ...]
    batch_width: int
    widths: tuple[int, ...]
    width_batch: int
    repeats: int
    repeat_budget_s: float
    alpha_iterations: int
    memory_mb: float = 4096.0


QUICK = Settings(
    batches=(1, 4, 16),
    batch_width=4,
    widths=(2, 4, 8),
    width_batch=2,
    repeats=2,
    repeat_budget_s=5.0,
    alpha_iterations=5,
)
FULL = Settings(
    batches=(1, 4, 16, 64),
    batch_width=8,
    widths=(4, 8, 16, 32),
    width_batch=4,
    repeats=3,
    repeat_budget_s=60.0,
    alpha_iterations=20,
)


def points(s: Settings) -> list[tuple[str, int, int]]:
    """``(sweep, batch, width)`` of every point."""
    return [("batch", b, s.batch_width) for b in s.batches] + [
        ("width", s.width_batch, w) for w in s.widths
    ]


def point_path(out: Path, sweep: str, batch: int, width: int, threat: str, method: str) -> Path:
    value = batch if sweep == "batch" else width
    return out / "points" / f"{sweep}-{value}__{slug(threat)}__{method}.json"


def measure_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and measure one point (in a child process of its own: :func:`run_points`)."""
    import gc

    import torch

    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.data import dataset_info, load_dataset, stack, take
    from cure_lirpa.models import build_model
    from cure_lirpa.threats.base import parse_threat

    torch.set_num_threads(spec["threads"])
    info = dataset_info("sample")
    torch.manual_seed(0)
    model = build_model(
        ARCH, info.in_shape, info.num_classes, info.mean, info.std, width=spec["width"]
    ).eval()
    x, y = stack(take(load_dataset("sample", "test"), 0, spec["batch"]))
    threat = parse_threat(spec["threat"])
    method = spec["method"]
    bc = BoundedClassifier(
        model, info.in_shape, memory_mb=spec["memory_mb"], alpha_iterations=spec["alpha_iterations"]
    )
    bc.train(False)
    relu_neurons = sum(bc._sizes)
    warm_up([method], threat)
    gc.collect()
    base = rss_now_mb()
    was_reset = reset_peak_rss()
    # The first call on this model also builds per-model state in auto_LiRPA: it is timed apart
    # (``first_s``) and the median is over the calls after it, unless the budget allows none.
    t0 = time.perf_counter()
    bc.margin_lower_bounds(x, y, threat, method)
    first = spent = time.perf_counter() - t0
    times: list[float] = []
    while len(times) < spec["repeats"] and spent < spec["repeat_budget_s"]:
        t0 = time.perf_counter()
        bc.margin_lower_bounds(x, y, threat, method)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    times = times or [first]
    peak = rss_peak_mb()
    chunk = bc.chunk_size(method)
    b = len(y)
    return {
        "key": spec["key"],
        "sweep": spec["sweep"],
        "batch": b,
        "width": spec["width"],
        "threat": threat.name,
        "method": method,
        "relu_neurons": relu_neurons,
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_s": first,
        "seconds": times,
        "median_s": statistics.median(times),
        "per_image_s": statistics.median(times) / b,
        "base_rss_mb": round(base, 1),
        "peak_rss_mb": round(peak, 1),
        "extra_mb": round(max(0.0, peak - base), 1),
        "peak_since_baseline": was_reset,
        "chunk_size": chunk,
        "estimate_mb": round(bc.bytes_per_sample(method) * min(b, chunk) / 2**20, 1),
    }


def point_spec(
    sweep: str, batch: int, width: int, threat: str, method: str, s: Settings, threads: int
) -> dict[str, Any]:
    key = {
        "version": POINT_VERSION,
        "code": code_fingerprint(),
        "arch": ARCH,
        "sweep": sweep,
        "batch": batch,
        "width": width,
        "threat": threat,
        "method": method,
        "threads": threads,
        "repeats": s.repeats,
        "memory_mb": s.memory_mb,
        "alpha_iterations": s.alpha_iterations if method == ALPHA_CROWN else None,
    }
    return {
        **key,
        "key": key,
        "repeat_budget_s": s.repeat_budget_s,
        "alpha_iterations": s.alpha_iterations,
    }


def run_points(
    s: Settings,
    threats: Sequence[str],
    methods: Sequence[str],
    threads: int,
    out: Path,
    retry_failed: bool = False,
) -> list[dict[str, Any]]:
    """Measure every missing point (cheapest method first); returns all points of these settings."""
    todo = [(p, t, m) for m in methods for t in threats for p in points(s)]
    done = []
    for k, ((sweep, batch, width), threat, method) in enumerate(todo, 1):
        spec = point_spec(sweep, batch, width, threat, method, s, threads)
        path = point_path(out, sweep, batch, width, threat, method)
        res, seconds = run_cell(measure_point, spec, path, retry_failed)
        what = f"[{k}/{len(todo)}] {method} {threat} batch {batch} width {width}"
        if seconds is not None and "error" in res:
            log(f"{what}: FAILED ({res['error']})")
        elif seconds is not None:
            log(
                f"{what}: {1e3 * res['per_image_s']:.3g} ms/img, +{res['extra_mb']:.0f} MB "
                f"(model estimate {res['estimate_mb']:.0f} MB) ({seconds:.1f} s)"
            )
        done.append({**spec["key"], **res})
    return done


# ---------------------------------------------------------------------------------------------
# Reports


def summary_markdown(result: dict[str, Any]) -> str:
    """Two tables (batch sweep, width sweep) with time and memory per method."""
    s = result["settings"]
    lines = [
        f"{generated_by(result)} ({result['threads']} thread(s), CPU); {ARCH} with seeded random weights, real MNIST "
        f"images, median of up to {s['repeats']} calls after a first (untimed unless the "
        f"{s['repeat_budget_s']:g} s budget allows no other), α-CROWN {s['alpha_iterations']} steps, "
        f"memory budget {s['memory_mb']:.0f} MB. *+MB*: peak resident memory of the point's "
        "process above its level before the bound call; *estimate*: "
        "`bytes_per_sample x min(batch, chunk)` of cure_lirpa.bounds.classifier; *chunk*: the most images "
        "one auto_LiRPA call takes under the budget.",
    ]
    pts = [p for p in result["points"] if "error" not in p]
    for sweep, title, col in (
        ("batch", f"**Against batch size** (width {s['batch_width']})", "batch"),
        ("width", f"**Against width** (batch {s['width_batch']})", "width"),
    ):
        lines += [
            "",
            title,
            "",
            f"| threat | method | {col} | ReLU neurons | s/batch | ms/image | +MB | estimate MB | "
            "chunk |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in pts:
            if p["sweep"] != sweep:
                continue
            lines.append(
                f"| {p['threat']} | {LABEL[p['method']]} | {p[col]} | {p['relu_neurons']} | "
                f"{p['median_s']:.3g} | {1e3 * p['per_image_s']:.3g} | {p['extra_mb']:.0f} | "
                f"{p['estimate_mb']:.0f} | {p['chunk_size']} |"
            )
    under = [p for p in pts if p["extra_mb"] > p["estimate_mb"]]
    if pts:
        worst = max(pts, key=lambda p: p["extra_mb"] - p["estimate_mb"])
        big = [p for p in under if p["extra_mb"] - p["estimate_mb"] > 5]
        lines += [
            "",
            f"The memory estimate was below the measured growth at {len(under)} of {len(pts)} "
            f"points, by more than 5 MB at {len(big)}; the largest shortfall was "
            f"{worst['extra_mb'] - worst['estimate_mb']:.0f} MB ({LABEL[worst['method']]}, "
            f"batch {worst['batch']}, width {worst['width']}: {worst['extra_mb']:.0f} MB measured, "
            f"{worst['estimate_mb']:.0f} MB estimated).",
        ]
    failed = [p for p in result["points"] if "error" in p]
    if failed:
        lines += [
            "",
            "Failed points: "
            + "; ".join(
                f"{p['method']} {p['threat']} batch {p['batch']} width {p['width']}: {p['error']}"
                for p in failed
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """``scaling.png``: time per image and memory against batch size and against width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in result["points"] if "error" not in p]
    threats = list(dict.fromkeys(p["threat"] for p in pts))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    styles = ["-", "--", ":", "-."]
    for si, threat in enumerate(threats):
        for m in METHODS:
            for c, sweep in enumerate(("batch", "width")):
                sel = sorted(
                    (
                        p
                        for p in pts
                        if p["sweep"] == sweep and p["method"] == m and p["threat"] == threat
                    ),
                    key=lambda p: p[sweep],
                )
                if not sel:
                    continue
                xs = [p[sweep] for p in sel]
                label = LABEL[m] + (f" {threat}" if len(threats) > 1 else "")
                ls = styles[si % len(styles)]
                axes[0][c].plot(xs, [p["per_image_s"] for p in sel], ls, marker="o", label=label)
                line = axes[1][c].plot(
                    xs, [max(p["extra_mb"], 0.1) for p in sel], ls, marker="o", label=label
                )
                axes[1][c].plot(
                    xs,
                    [max(p["estimate_mb"], 0.1) for p in sel],
                    ls,
                    marker="x",
                    color=line[0].get_color(),
                    alpha=0.4,
                )
    s = result["settings"]
    for c, (sweep, fixed) in enumerate(
        (("batch", f"width {s['batch_width']}"), ("width", f"batch {s['width_batch']}"))
    ):
        for r, ylabel in enumerate(("seconds per image", "peak MB above baseline (x: estimate)")):
            ax = axes[r][c]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{sweep} ({fixed})")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{ARCH}: cost of the bound methods", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def _ints(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if len(vals) < 1 or min(vals) < 1:
        raise click.BadParameter(f"{text!r}: give positive integers, e.g. 1,4,16")
    return vals


@click.command(context_settings={"show_default": True})
@click.option("--quick", is_flag=True, help="Smoke run: small widths and batches (a few minutes).")
@click.option("--threat", "threats", multiple=True, help="Threats, repeatable [default: linf:0.1].")
@click.option("--method", "methods", multiple=True, type=click.Choice(METHODS))
@click.option("--batches", default=None, help="Batch sizes, e.g. 1,4,16,64.")
@click.option("--widths", default=None, help="cnn-small widths, e.g. 4,8,16,32.")
@click.option("--batch-width", type=click.IntRange(min=1), default=None)
@click.option("--width-batch", type=click.IntRange(min=1), default=None)
@click.option("--repeats", type=click.IntRange(min=1), default=None)
@click.option("--alpha-iterations", type=click.IntRange(min=1), default=None)
@click.option("--memory-mb", type=click.FloatRange(min=64), default=None)
@click.option("--threads", type=click.IntRange(min=1), default=1)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Results folder [default: benchmarks/results/scaling[-quick]].",
)
@click.option("--retry-failed", is_flag=True)
@click.option("--report-only", is_flag=True, help="Only rebuild the report from measured points.")
def main(
    quick: bool,
    threats: Sequence[str],
    methods: Sequence[str],
    batches: Optional[str],
    widths: Optional[str],
    batch_width: Optional[int],
    width_batch: Optional[int],
    repeats: Optional[int],
    alpha_iterations: Optional[int],
    memory_mb: Optional[float],
    threads: int,
    out: Optional[Path],
    retry_failed: bool,
    report_only: bool,
) -> None:
    """Time and memory of IBP, CROWN-IBP, CROWN and alpha-CROWN against batch size and width."""
    from cure_lirpa.errors import UserError
    from cure_lirpa.io.checkpoint import versions
    from cure_lirpa.threats.base import parse_threat

    t_start = time.perf_counter()
    s = with_options(
        QUICK if quick else FULL,
        batches=_ints(batches),
        widths=_ints(widths),
        batch_width=batch_width,
        width_batch=width_batch,
        repeats=repeats,
        alpha_iterations=alpha_iterations,
        memory_mb=memory_mb,
    )
    try:
        threats = [parse_threat(t).name for t in (threats or ("linf:0.1",))]
    except UserError as exc:
        raise click.BadParameter(str(exc), param_hint="--threat") from None
    methods = [m for m in METHODS if m in methods] if methods else list(METHODS)
    out = out or RESULTS / (f"{SUITE}-quick" if quick else SUITE)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{len(points(s)) * len(threats) * len(methods)} points; results in {out}")
    if report_only:
        pts = [
            {**spec["key"], **res}
            for m in methods
            for t in threats
            for (sw, b, w) in points(s)
            for spec in [point_spec(sw, b, w, t, m, s, threads)]
            for res in [cached_cell(point_path(out, sw, b, w, t, m), spec["key"])]
            if res is not None
        ]
        if not pts:
            raise click.ClickException(
                f"--report-only: no points of these settings in {out / 'points'} (the points are "
                "a local cache, not committed); run the suite without --report-only"
            )
    else:
        pts = run_points(s, threats, methods, threads, out, retry_failed)
    origin = provenance(out / "results.json", report_only)
    result = {
        **header_fields(SUITE, quick, origin, t_start),
        "machine": f"{platform.machine()} {platform.system()}",
        "threads": threads,
        "arch": ARCH,
        "settings": dataclasses.asdict(s),
        "threats": threats,
        "methods": methods,
        "versions": versions(),
        "points": pts,
    }
    save_summaries(out, {"results.json": result, "summary.md": summary_markdown(result)})
    plot(result, out / "scaling.png")
    log(
        f"done in {time.perf_counter() - t_start:.0f} s: {out / 'summary.md'}, results.json, "
        "scaling.png"
    )
    click.echo((out / "summary.md").read_text())
    if any(not math.isfinite(p.get("median_s", 0.0)) for p in pts):  # pragma: no cover
        log("warning: some points have no timing")


if __name__ == "__main__":
    main()
