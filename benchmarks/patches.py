"""Suite ``patches``: time of patch certification with the cascade against IBP alone, and peak
memory of box-family bounds against the ``--memory-mb`` budget.

1. Time: ``certify_dataset`` on the first ``--count`` MNIST test images of the demo model (what
   ``cure-lirpa train`` trains with its defaults; trained here into ``models/`` if no
   ``--checkpoint`` is given) under ``--threat`` (default ``patch:2``), once with ``--method ibp``
   and once with ``--method auto``, each in a fresh child process. Target: auto / IBP <= 3.
2. Memory: for every bound method, ``BoundedClassifier.box_margins`` on enough (image, patch
   location) pairs for three chunks under a budget, in a fresh child process; peak resident memory
   above the level before the call, against the budget.

Run:  python -m benchmarks run --suite patches     (or python -m benchmarks.patches)
Writes benchmarks/results/patches/results.json and summary.md (included in docs/results.md).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import click

from benchmarks.harness import (
    RESULTS,
    data_root_option,
    exit_reason,
    generated_by,
    log,
    provenance,
    read_results,
    reset_peak_rss,
    rss_now_mb,
    rss_peak_mb,
    run_isolated,
    save_summaries,
)
from cure_lirpa.vocabulary import ALPHA_CROWN, AUTO, CROWN, CROWN_IBP, IBP

OUT = RESULTS / "patches"
METHODS = (IBP, CROWN_IBP, CROWN, ALPHA_CROWN)
TARGET_RATIO = 3.0


# ----------------------------------------------------------------------------------------------
# Child processes (module level: run_isolated pickles them by reference)
def _train_demo(out: str) -> None:
    import torch

    from cure_lirpa.training.certified import train
    from cure_lirpa.training.config import TrainConfig

    torch.set_num_threads(1)
    train(TrainConfig(), out, overwrite=True, progress=False, log=None)


def _load(checkpoint: str, data_root: str, count: int):
    import torch

    from cure_lirpa.data import load_dataset, take
    from cure_lirpa.io.checkpoint import dataset_info_of, load_checkpoint, model_from_checkpoint

    torch.set_num_threads(1)
    ckpt = load_checkpoint(checkpoint)
    info = dataset_info_of(ckpt)
    data = take(load_dataset("mnist", "test", root=data_root), 0, count)
    return model_from_checkpoint(ckpt).eval(), info, data


def _time_method(
    checkpoint: str,
    data_root: str,
    count: int,
    threat: str,
    method: str,
    memory_mb: float,
    out: str,
) -> None:
    """certify_dataset with one method; writes seconds, certified counts and memory to ``out``."""
    from cure_lirpa.threats.base import parse_threat
    from cure_lirpa.verification.runner import certify_dataset

    model, info, data = _load(checkpoint, data_root, count)
    before = rss_now_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    rows, summary = certify_dataset(
        model, data, [parse_threat(threat)], [method], info.in_shape, memory_mb=memory_mb
    )
    seconds = time.perf_counter() - t0
    name = parse_threat(threat).name
    result = {
        "method": method,
        "seconds": seconds,
        "certified": sum(r.certified[name][method] for r in rows),
        "correct": sum(r.correct for r in rows),
        "images": len(rows),
        "seconds_per_image": summary.get("seconds_per_image", {}),
        "growth_mb": rss_peak_mb() - before,
    }
    if method == AUTO:
        result["decided_by"] = dict(Counter(r.decided_by[name] for r in rows))
    Path(out).write_text(json.dumps(result))


def _measure_memory(
    checkpoint: str, data_root: str, threat: str, method: str, budget: float, out: str
) -> None:
    """box_margins on three chunks of pairs under ``budget``; writes the peak growth to ``out``."""
    import torch

    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.data import stack
    from cure_lirpa.threats.base import parse_threat

    model, info, data = _load(checkpoint, data_root, 64)
    x, y = stack(data)
    t = parse_threat(threat)
    bc = BoundedClassifier(model, info.in_shape, memory_mb=budget)
    n = t.num_boxes(info.in_shape)
    warm = torch.zeros(len(x), n, dtype=torch.bool)
    warm[0, :2] = True
    bc.box_margins(x, y, t, method, warm)  # first calls allocate caches that stay
    chunk = bc.box_chunk_size(method, t)
    pairs = min(len(x) * n, 3 * chunk)
    todo = torch.zeros(len(x) * n, dtype=torch.bool)
    todo[:pairs] = True
    before = rss_now_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    bc.box_margins(x, y, t, method, todo.view(len(x), n))
    result = {
        "method": method,
        "threat": t.name,
        "budget_mb": budget,
        "chunk": chunk,
        "pairs": pairs,
        "estimate_mb": min(pairs, chunk) * bc.bytes_per_sample(method) / 2**20,
        "growth_mb": rss_peak_mb() - before,
        "seconds": time.perf_counter() - t0,
    }
    Path(out).write_text(json.dumps(result))


def _child(target, *args) -> dict[str, Any]:
    """Run ``target(*args, out)`` in a fresh process and return the JSON it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        code = run_isolated(target, *args, str(out))
        if code != 0 or not out.exists():
            return {"error": exit_reason(code)}
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------
def report(res: dict[str, Any]) -> str:
    """The Markdown summary of ``res`` (results.json)."""
    t = res["timing"]
    lines = [
        f"{generated_by(res)} (1 thread, CPU); "
        f"demo model (`cure-lirpa train` defaults, cnn-small on the MNIST sample), the first "
        f"{res['count']} MNIST test images, `{res['threat']}`, `--memory-mb {res['memory_mb']:g}`. "
        "Each row is one fresh process; *+MB* is its peak resident memory above the level before "
        "certification.",
        "",
        "| method | seconds | s/image | certified | +MB | decided by |",
        "|---|---|---|---|---|---|",
    ]
    for m in (IBP, AUTO):
        r = t[m]
        if "error" in r:
            lines.append(f"| {m} | {r['error']} | | | | |")
            continue
        dec = ", ".join(f"{k} {v}" for k, v in sorted(r.get("decided_by", {}).items())) or "-"
        lines.append(
            f"| {m} | {r['seconds']:.1f} | {r['seconds'] / r['images']:.2f} | "
            f"{r['certified']}/{r['images']} | {r['growth_mb']:.0f} | {dec} |"
        )
    ratio = res.get("ratio_auto_to_ibp")
    if ratio is not None:
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        lines += ["", f"**auto / IBP time: {ratio:.2f}** (target <= {TARGET_RATIO:g}: {verdict})."]
    lines += [
        "",
        "Peak memory of box-family bounds against the budget (three chunks of (image, location) "
        "pairs per method; *estimate*: `bytes_per_sample x chunk` of cure_lirpa.bounds.classifier):",
        "",
        "| method | threat | budget MB | chunk (pairs) | pairs | estimate MB | +MB | within | s/pair |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["memory"]:
        if "error" in r:
            lines.append(
                f"| {r['method']} | {r['threat']} | {r['budget_mb']:g} | {r['error']} ||||||"
            )
            continue
        ok = "yes" if r["growth_mb"] <= r["budget_mb"] else "**no**"
        lines.append(
            f"| {r['method']} | {r['threat']} | {r['budget_mb']:g} | {r['chunk']} | {r['pairs']} | "
            f"{r['estimate_mb']:.0f} | {r['growth_mb']:.0f} | {ok} | {r['seconds'] / r['pairs']:.3g} |"
        )
    lines += [
        "",
        "The cascade costs IBP plus the attack when those two decide every image (as here); an "
        "image that neither decides sends its open locations through CROWN-IBP, CROWN and "
        "α-CROWN, at the *s/pair* above per location (α-CROWN stops at the image's first failure).",
    ]
    return "\n".join(lines) + "\n"


@click.command(context_settings={"show_default": True})
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Model to certify. Default: the demo model, trained into results/patches/models/.",
)
@click.option("--count", type=click.IntRange(min=1), default=16, help="MNIST test images.")
@click.option("--threat", default="patch:2", help="Box-family threat, e.g. patch:2, patch:5x5@2.")
@click.option("--memory-mb", type=click.FloatRange(min=64), default=4096.0)
@click.option(
    "--memory-budget",
    "budgets",
    multiple=True,
    type=click.FloatRange(min=64),
    default=(512.0,),
    help="Budgets of the memory measurement (repeatable).",
)
@data_root_option()
@click.option("--report-only", is_flag=True, help="Rebuild summary.md from results.json.")
def main(
    checkpoint: Optional[Path],
    count: int,
    threat: str,
    memory_mb: float,
    budgets: tuple[float, ...],
    data_root: str,
    report_only: bool,
) -> None:
    """Cascade against IBP on patches, and peak memory against the budget."""
    results_json = OUT / "results.json"
    if report_only:
        res = read_results(results_json)
        save_summaries(OUT, {"results.json": res, "summary.md": report(res)})
        return
    started = time.perf_counter()
    if checkpoint is None:
        checkpoint = OUT / "models" / "demo" / "checkpoint.pt"
        if not checkpoint.exists():
            log(f"training the demo model into {checkpoint.parent}")
            code = run_isolated(_train_demo, str(checkpoint.parent))
            if code != 0:
                raise click.ClickException(f"training the demo model {exit_reason(code)}")
    args = (str(checkpoint), data_root)
    timing = {}
    for method in (IBP, AUTO):
        log(f"{threat} with {method} on {count} images")
        timing[method] = _child(_time_method, *args, count, threat, method, memory_mb)
        log(f"  {timing[method]}")
    memory = []
    for budget in budgets:
        for method in METHODS:
            log(f"memory of {method} under {budget:g} MB")
            r = _child(_measure_memory, *args, threat, method, budget)
            memory.append({"method": method, "threat": threat, "budget_mb": budget, **r})
            log(f"  {memory[-1]}")
    ok = all("seconds" in timing[m] for m in (IBP, AUTO))
    res = {
        **provenance(results_json, False),
        "machine": f"{platform.machine()} {platform.system()}",
        "checkpoint": str(checkpoint),
        "count": count,
        "threat": threat,
        "memory_mb": memory_mb,
        "timing": timing,
        "ratio_auto_to_ibp": timing[AUTO]["seconds"] / timing[IBP]["seconds"] if ok else None,
        "target_ratio": TARGET_RATIO,
        "memory": memory,
        "wall_seconds": time.perf_counter() - started,
    }
    save_summaries(OUT, {"results.json": res, "summary.md": report(res)})


if __name__ == "__main__":
    main()
