"""Generalisation of certified models to unseen threats: patches, rotation and translation.

For every checkpoint (by default ``benchmarks/results/cure_mnist/<method>/checkpoint.pt``, one per
training method of the CURE MNIST reproduction) and every threat (default: ``patch:2``, ``patch:5``,
``rotate:30``, ``translate:2``; the CURE paper's generalisation sets), certify the first N test
images with IBP and
CROWN-IBP, and with CROWN when it is cheap: CROWN-type methods are timed on a few boxes of one image
first and skipped when the estimate exceeds ``--budget`` seconds per image. Reports certified
accuracy per (model, threat, method), "best" (certified by any of the methods, which is sound),
union accuracy over the threats, seconds per image, and a scaling study of how time and tightness
grow with the number of patch locations / sub-intervals (first checkpoint only).

Writes ``generalisation.json`` and ``generalisation.md`` to ``benchmarks/results/generalisation``
(``generalisation-quick`` with ``--quick``), after every model so partial runs keep their results.
Usage::

    python -m benchmarks.generalisation --data-root ../shared/data --n 200
    python -m benchmarks.generalisation --quick --checkpoint tiny=/tmp/tiny.pt --dataset sample
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click
import torch

from benchmarks.harness import RESULTS, log, named_checkpoints, save_summaries, split_commas
from cure_lirpa.bounds.classifier import BoundedClassifier, certified
from cure_lirpa.data import load_dataset, stack, take
from cure_lirpa.errors import UserError
from cure_lirpa.io.checkpoint import (
    dataset_info_of,
    load_checkpoint,
    model_from_checkpoint,
    versions,
)
from cure_lirpa.threats.base import BoxFamily, Threat, parse_threat
from cure_lirpa.threats.geometry import parse_geometric  # noqa: F401  (registers geometric threats)
from cure_lirpa.threats.patches import parse_patch  # noqa: F401  (registers patch threats)
from cure_lirpa.vocabulary import CROWN, CROWN_IBP, IBP

DEFAULT_THREATS = ("patch:2", "patch:5", "rotate:30", "translate:2")
DEFAULT_METHODS = (IBP, CROWN_IBP, CROWN)
SCALING = (
    "rotate:30@15",
    "rotate:30@30",
    "rotate:30@60",
    "rotate:30@120",
    "rotate:30@240",
    "translate:2@1",
    "translate:2@2",
    "translate:2@4",
    "translate:2@8",
    "translate:2",
    "patch:2@4",
    "patch:2@2",
    "patch:2@1",
)
SCALING_QUICK = ("rotate:30@15", "rotate:30@60", "translate:2@2", "patch:2@4", "patch:2@1")


def find_checkpoints(folder: Path, named: tuple[str, ...]) -> dict[str, Path]:
    """``NAME=PATH`` options, else every ``folder/<name>/checkpoint.pt``, as {name: path}."""
    out = named_checkpoints(named, None if named else folder)
    if not out:
        raise UserError(
            f"no checkpoints found: {folder}/<method>/checkpoint.pt does not exist; run the CURE MNIST "
            "reproduction first, or pass --checkpoint NAME=PATH"
        )
    return out


def estimate_seconds_per_image(bc: BoundedClassifier, x, y, threat: Threat, method: str) -> float:
    """Extrapolated seconds per image of ``method``, timed on up to 64 boxes of one image."""
    if not isinstance(threat, BoxFamily):
        t0 = time.perf_counter()
        bc.margin_lower_bounds(x[:1], y[:1], threat, method)
        return time.perf_counter() - t0
    x_L, x_U = next(threat.boxes(x[:1], 64))
    m = x_L.shape[1]
    t0 = time.perf_counter()
    bc.box_lower_bounds(x_L[0], x_U[0], y[:1].repeat(m), method)
    return (time.perf_counter() - t0) * threat.num_boxes(tuple(x.shape[1:])) / m


def certify(bc, x, y, threat: Threat, method: str, batch: int) -> tuple[torch.Tensor, float]:
    """Certified flags (N,) and total seconds."""
    flags = []
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        flags.append(
            certified(bc.margin_lower_bounds(x[s : s + batch], y[s : s + batch], threat, method))
        )
    return torch.cat(flags), time.perf_counter() - t0


def evaluate_model(
    bc: BoundedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    threats: list[Threat],
    methods: tuple[str, ...],
    budget: float,
    batch: int,
) -> dict[str, Any]:
    """Certified accuracies, timings and unions of one model."""
    n = len(y)
    in_shape = tuple(x.shape[1:])
    with torch.no_grad():
        clean = bc.model(x).argmax(1) == y
    res: dict[str, Any] = {"clean_accuracy": 100.0 * float(clean.float().mean()), "threats": {}}
    best_all = torch.ones(n, dtype=torch.bool)
    per_method_all = {m: torch.ones(n, dtype=torch.bool) for m in methods}
    incomplete: set[str] = set()  # methods skipped on some threat: no union for them
    for threat in threats:
        boxes = threat.num_boxes(in_shape) if isinstance(threat, BoxFamily) else 1
        entry: dict[str, Any] = {"boxes_per_image": boxes, "methods": {}}
        best = torch.zeros(n, dtype=torch.bool)
        for method in methods:
            if method != IBP:
                est = estimate_seconds_per_image(bc, x, y, threat, method)
                if est > budget:
                    entry["methods"][method] = {
                        "skipped": f"estimated {est:.3g} s per image > budget {budget:g} s",
                        "estimated_seconds_per_image": est,
                    }
                    incomplete.add(method)
                    log(f"  {threat.name:22s} {method:10s} skipped (~{est:.3g} s/image)")
                    continue
            flags, secs = certify(bc, x, y, threat, method, batch)
            best |= flags
            per_method_all[method] &= flags
            entry["methods"][method] = {
                "certified": int(flags.sum()),
                "certified_accuracy": 100.0 * float(flags.float().mean()),
                "seconds": secs,
                "seconds_per_image": secs / n,
                "seconds_per_box": secs / (n * boxes),
            }
            log(
                f"  {threat.name:22s} {method:10s} {100 * float(flags.float().mean()):6.1f}%  "
                f"{secs / n:.3f} s/image"
            )
        entry["best"] = {
            "certified": int(best.sum()),
            "certified_accuracy": 100.0 * float(best.float().mean()),
        }
        best_all &= best
        res["threats"][threat.name] = entry
    res["union"] = {
        m: None if m in incomplete else 100.0 * float(v.float().mean())
        for m, v in per_method_all.items()
    }
    res["union"]["best"] = 100.0 * float(best_all.float().mean())
    return res


def scaling_study(
    bc, x, y, names: tuple[str, ...], methods: tuple[str, ...], budget: float, batch: int
) -> list[dict[str, Any]]:
    """Seconds per image and certified accuracy as the number of boxes grows."""
    rows = []
    in_shape = tuple(x.shape[1:])
    for name in names:
        threat = parse_threat(name)
        for method in methods:
            if method != IBP and estimate_seconds_per_image(bc, x, y, threat, method) > budget:
                continue
            flags, secs = certify(bc, x, y, threat, method, batch)
            rows.append(
                {
                    "threat": threat.name,
                    "method": method,
                    "boxes_per_image": threat.num_boxes(in_shape),
                    "seconds_per_image": secs / len(y),
                    "certified_accuracy": 100.0 * float(flags.float().mean()),
                }
            )
            log(
                f"  scaling {threat.name:18s} {method:10s} boxes={rows[-1]['boxes_per_image']:5d} "
                f"{rows[-1]['seconds_per_image']:.3f} s/image"
            )
    return rows


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """Tables of certified accuracy, union accuracy, seconds per image and scaling."""
    cfg = report["config"]
    threats, methods = cfg["threats"], cfg["methods"]
    lines = [
        "# Generalisation to unseen threats",
        "",
        f"Dataset `{cfg['dataset']}`, test images {cfg['start']}..{cfg['start'] + cfg['n'] - 1} "
        f"(N = {cfg['n']}), {cfg['threads']} thread(s), budget {cfg['budget']:g} s per image for "
        "CROWN-type methods. Written by `benchmarks/generalisation.py`; every number comes from "
        "the JSON next to this file.",
        "",
        "## Certified accuracy (%)",
        "",
        "`best` = certified by any method (sound: each method's bound is sound). `-` = skipped (too "
        "slow for the budget). `boxes` = patch locations or parameter sub-intervals per image.",
        "",
    ]
    head = [
        "model",
        "threat",
        "boxes",
        "clean",
        *methods,
        "best",
        *(f"s/image {m}" for m in methods),
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for name, res in report["models"].items():
        for t in threats:
            e = res["threats"][t]
            accs = [_fmt(e["methods"].get(m, {}).get("certified_accuracy")) for m in methods]
            secs = []
            for m in methods:
                em = e["methods"].get(m, {})
                if "seconds_per_image" in em:
                    secs.append(_fmt(em["seconds_per_image"], 3))
                elif "estimated_seconds_per_image" in em:
                    secs.append(f"(~{em['estimated_seconds_per_image']:.3g})")
                else:
                    secs.append("-")
            row = [
                name,
                f"`{t}`",
                str(e["boxes_per_image"]),
                _fmt(res["clean_accuracy"]),
                *accs,
                _fmt(e["best"]["certified_accuracy"]),
                *secs,
            ]
            lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "(~x) = estimated seconds per image of a skipped method.",
        "",
        "## Union accuracy over all threats above (%)",
        "",
    ]
    lines.append("| model | " + " | ".join([*methods, "best"]) + " |")
    lines.append("|---|" + "---|" * (len(methods) + 1))
    for name, res in report["models"].items():
        lines.append(
            f"| {name} | " + " | ".join(_fmt(res["union"][m]) for m in [*methods, "best"]) + " |"
        )
    if report.get("scaling"):
        lines += [
            "",
            f"## Scaling (model `{report['scaling_model']}`, {cfg['scaling_n']} images)",
            "",
            "Time grows linearly with the number of boxes (patch locations, or the product of "
            "sub-interval counts); more sub-intervals give tighter hulls. Patch strides change the "
            "threat set (fewer locations), sub-interval counts do not.",
            "",
            "| threat | method | boxes per image | seconds per image | ms per box | certified (%) |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["scaling"]:
            lines.append(
                f"| `{r['threat']}` | {r['method']} | {r['boxes_per_image']} | "
                f"{r['seconds_per_image']:.3f} | {1000 * r['seconds_per_image'] / r['boxes_per_image']:.2f} | "
                f"{r['certified_accuracy']:.1f} |"
            )
    lines.append("")
    return "\n".join(lines)


@click.command()
@click.option(
    "--checkpoints",
    "folder",
    type=click.Path(path_type=Path),
    default=RESULTS / "cure_mnist",
    show_default=True,
    help="Folder with <method>/checkpoint.pt.",
)
@click.option(
    "--checkpoint",
    "named",
    multiple=True,
    help="NAME=PATH of one checkpoint (repeatable); overrides --checkpoints.",
)
@click.option(
    "--threat",
    "threats",
    multiple=True,
    help=f"Threat to evaluate (repeatable). Default: {', '.join(DEFAULT_THREATS)}.",
)
@click.option(
    "--methods",
    default=",".join(DEFAULT_METHODS),
    show_default=True,
    help="Comma-separated bound methods (ibp, crown-ibp, crown, alpha-crown).",
)
@click.option("--n", "n", type=int, default=100, show_default=True, help="Number of test images.")
@click.option("--start", type=int, default=0, show_default=True, help="First test image.")
@click.option("--dataset", default=None, help="Dataset override (default: the checkpoint's).")
@click.option(
    "--data-root", default=None, help="Dataset folder (default $CURE_LIRPA_DATA or ./data)."
)
@click.option(
    "--budget",
    type=float,
    default=2.0,
    show_default=True,
    help="Skip a non-IBP method when its estimated seconds per image exceed this.",
)
@click.option("--batch", type=int, default=16, show_default=True, help="Images per bound call.")
@click.option("--memory-mb", type=float, default=2048.0, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option(
    "--scaling/--no-scaling",
    default=True,
    show_default=True,
    help="Run the scaling study on the first checkpoint.",
)
@click.option("--scaling-n", type=int, default=10, show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default benchmarks/results/generalisation[-quick]).",
)
@click.option("--quick", is_flag=True, help="Tiny run: 4 images, 2 for the scaling study.")
def main(
    folder,
    named,
    threats,
    methods,
    n,
    start,
    dataset,
    data_root,
    budget,
    batch,
    memory_mb,
    threads,
    scaling,
    scaling_n,
    out,
    quick,
) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if quick:
        n, scaling_n = min(n, 4), min(scaling_n, 2)
    out = out or RESULTS / ("generalisation-quick" if quick else "generalisation")
    method_list = tuple(split_commas(methods))
    threat_objs = [parse_threat(t) for t in (threats or DEFAULT_THREATS)]
    ckpts = find_checkpoints(folder, named)
    report: dict[str, Any] = {
        "config": {
            "checkpoints": {k: str(v) for k, v in ckpts.items()},
            "threats": [t.name for t in threat_objs],
            "methods": list(method_list),
            "n": n,
            "start": start,
            "dataset": dataset,
            "budget": budget,
            "batch": batch,
            "memory_mb": memory_mb,
            "threads": threads,
            "scaling_n": scaling_n,
            "quick": quick,
        },
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "models": {},
    }
    data_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    t_all = time.perf_counter()
    for name, path in ckpts.items():
        ckpt = load_checkpoint(path)
        info = dataset_info_of(ckpt)
        ds_name = dataset or info.name
        report["config"]["dataset"] = ds_name
        if ds_name not in data_cache:
            data_cache[ds_name] = stack(take(load_dataset(ds_name, "test", data_root), start, n))
        x, y = data_cache[ds_name]
        report["config"]["n"] = len(y)
        model = model_from_checkpoint(ckpt)
        bc = BoundedClassifier(model, info.in_shape, memory_mb=memory_mb)
        log(f"{name} ({ckpt['arch']}, {path})")
        res = evaluate_model(bc, x, y, threat_objs, method_list, budget, batch)
        res.update({"checkpoint": str(path), "arch": ckpt["arch"], "epoch": ckpt.get("epoch")})
        report["models"][name] = res
        if scaling and "scaling" not in report:
            k = min(scaling_n, len(y))
            report["scaling_model"] = name
            report["scaling"] = scaling_study(
                bc,
                x[:k],
                y[:k],
                SCALING_QUICK if quick else SCALING,
                tuple(m for m in method_list if m in (IBP, CROWN_IBP)),
                budget,
                batch,
            )
        report["seconds_total"] = time.perf_counter() - t_all
        save_summaries(out, {"generalisation.json": report, "generalisation.md": markdown(report)})
    log(f"done in {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
