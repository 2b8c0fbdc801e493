"""Suite ``certificates``: IBP, CROWN-IBP, CROWN, SDP-CROWN and alpha-CROWN on the same images, and
the cascade.

For every model (natural, IBP l∞, IBP l2 and CURE checkpoints; MNIST and CIFAR-10) and every threat
(MNIST: linf:0.1, l2:0.5, l1:1; CIFAR-10: linf:2/255, l2:0.25, l1:0.5), the suite certifies the same
test images with each bound method and with the cheapest-first cascade (method ``auto`` of
:mod:`cure_lirpa.verification.cascade`), and runs PGD as a soundness cross-check. It reports per cell
(model, threat, method): certified accuracy, the samples a method certifies that the previous
(cheaper) method did not, the median time per image and the peak memory; per (model, method) the
union accuracy over the threats; per (model, threat) the cascade's total time against CROWN on
every image; per (model, l2 or l1 threat) SDP-CROWN against CROWN and alpha-CROWN with the ratio of
its time per image to alpha-CROWN's (same steps, same batch). SDP-CROWN runs only under l2 and l1
balls (under l∞ it returns CROWN's bound, so those cells are not run).

Each cell runs in a fresh child process (:func:`benchmarks.harness.run_cell`): the child loads the
model and images, builds the bounded model, records its resident memory, resets the kernel's peak
counter (Linux), certifies the images one batch at a time (default batch 1, so time per image is a
real per-image time) and records the peak. The child writes ``cells/<model>/<threat>__<method>.json``
atomically; a rerun skips cells whose file exists with the same settings, so a killed run resumes.

Models: ``--checkpoint NAME=PATH`` (repeatable) and/or ``--models DIR`` (every DIR/<name>/checkpoint.pt;
in full mode by default the models of the CURE runs in benchmarks/results/cure_mnist and
cure_cifar10, the latter named ``cifar10-<row>``). For a dataset with no model found the suite
trains small stand-ins with :func:`cure_lirpa.training.certified.train` (quick mode always does: cnn-small of
width 4 on the built-in MNIST sample, about a minute; CIFAR-10 stand-ins come from ``--data-root``
and are skipped with a message when the data are missing).

Outputs in benchmarks/results/certificates[-quick]/: ``results.json`` (everything), ``summary.md``
(the compact tables docs/benchmarks.md includes), ``results.md`` (every cell), ``certified.png``
and ``cost.png``. Usage::

    python -m benchmarks run --suite certificates --quick
    python -m benchmarks run --suite certificates -- --count 50 --only natural,ibp-linf,cure-joint
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from benchmarks.harness import (
    RESULTS,
    cached_cell,
    code_fingerprint,
    data_root_option,
    describe,
    file_sha1,
    generated_by,
    header_fields,
    log,
    named_checkpoints,
    provenance,
    reset_peak_rss,
    rss_now_mb,
    rss_peak_mb,
    run_cell,
    save_summary,
    slug,
    split_commas,
    warm_up,
    with_options,
)
from cure_lirpa.vocabulary import (
    ALPHA_CROWN,
    AUTO,
    AUTO_DEVICE,
    CASCADE_STAGES,
    CROWN,
    CROWN_IBP,
    IBP,
    L1,
    L2,
    NORMS,
    SDP_CROWN,
)

SUITE = "certificates"
CELL_VERSION = 2
"""Part of every cell's key: bump it when what a cell measures changes, so old cells are redone."""
METHODS = CASCADE_STAGES[L2]
"""The single bound methods, cheapest first (the order of the l2 cascade; SDP-CROWN only for l2, l1)."""
SDP = SDP_CROWN
CASCADE = AUTO
PGD = "pgd"
LABEL = {
    IBP: "IBP",
    CROWN_IBP: "CROWN-IBP",
    CROWN: "CROWN",
    ALPHA_CROWN: "α-CROWN",
    SDP: "SDP-CROWN",
    CASCADE: "cascade",
    PGD: "PGD",
}
THREATS = {
    "sample": ("linf:0.1", "l2:0.5", "l1:1"),
    "mnist": ("linf:0.1", "l2:0.5", "l1:1"),
    "cifar10": ("linf:2/255", "l2:0.25", "l1:0.5"),
}
DEFAULT_MODELS = {RESULTS / "cure_mnist": "", RESULTS / "cure_cifar10": "cifar10-"}
"""Folders of the CURE reproduction runs (``python -m benchmarks run --suite cure_mnist`` /
``cure_cifar10``) read in full mode, with the prefix their model names get here."""


def runs(method: str, threat: str) -> bool:
    """Whether the cell (threat, method) is run: SDP-CROWN only under l2 and l1 balls."""
    return method != SDP or threat.split(":")[0] in (L2, L1)


DEFAULT_ROWS = ("natural", "ibp-linf", "ibp-l2", "cure-joint", "cure-max")
"""The models taken from DEFAULT_MODELS unless --only says otherwise (all if none of them exist)."""


@dataclass
class Settings:
    """Run sizes: images per model, alpha-CROWN steps, PGD strength, batch and memory budget."""

    count: int
    alpha_iterations: int
    attack_steps: int
    attack_restarts: int
    batch_size: int = 1
    memory_mb: float = 2048.0


QUICK = Settings(count=20, alpha_iterations=5, attack_steps=20, attack_restarts=1)
FULL = Settings(count=40, alpha_iterations=20, attack_steps=50, attack_restarts=2)


# ---------------------------------------------------------------------------------------------
# Models: checkpoints found on disk, or stand-ins trained by the suite


def standin_configs(quick: bool, data_root: Optional[str], cifar: bool) -> dict[str, Any]:
    """``{name: TrainConfig}`` of the stand-in models (MNIST, and CIFAR-10 when ``cifar``): one
    cnn-small per training method, trained without certified metrics."""
    from cure_lirpa.training.config import TrainConfig

    def standins(
        methods: Sequence[str], schedule: tuple[int, float, float], prefix: str = "", **fields: Any
    ) -> dict[str, Any]:
        """One config per method (named ``prefix + method``); ``schedule``: the epochs, warm-up
        epochs and ramp epochs."""
        epochs, warmup, ramp = schedule
        base = TrainConfig(
            arch="cnn-small", epochs=epochs, warmup_epochs=warmup, ramp_epochs=ramp, **fields
        )
        return {prefix + m: dataclasses.replace(base, method=m, train_cert=False) for m in methods}

    if quick:  # about ten seconds per model on one core
        sizes = dict(arch_kwargs={"width": 4}, batch_size=100, lr=2e-3, memory_mb=1024.0)
        methods = ("natural", "ibp-linf", "ibp-l2", "cure-joint")
        return standins(methods, (8, 1.0, 4.0), dataset="sample", **sizes)
    mnist = data_root is not None and (Path(data_root) / "MNIST" / "raw").is_dir()
    out = standins(  # a short CPU recipe (cnn-small, IBP, 1.5x l2)
        ("natural", "ibp-linf", "ibp-l2", "cure-joint", "cure-max"),
        (5, 1.0, 2.5) if mnist else (20, 2.0, 10.0),
        dataset="mnist" if mnist else "sample",
        data_root=data_root if mnist else None,
        train_count=10000 if mnist else None,  # MNIST is not sorted by class: a fair subset
        batch_size=256,
        lr=5e-4,
        train_eps_l2=0.75,
    )
    if cifar:
        radii = dict(eps_linf=2 / 255, eps_l2=0.25)
        sizes = dict(arch_kwargs={"width": 8}, batch_size=128, lr=1e-3)
        methods = ("natural", "ibp-linf", "cure-joint")
        cifar10 = dict(dataset="cifar10", data_root=data_root, **sizes, **radii)
        out.update(standins(methods, (3, 0.5, 1.5), "cifar10-", **cifar10))
    return out


def train_standins(configs: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Train (or resume, or reuse) every stand-in into ``folder/<name>/checkpoint.pt``."""
    from cure_lirpa.data import load_dataset
    from cure_lirpa.errors import UserError
    from cure_lirpa.training.certified import train
    from cure_lirpa.training.trainer import CHECKPOINT

    out: dict[str, Path] = {}
    for name, cfg in configs.items():
        run = folder / name
        ckpt = run / CHECKPOINT
        try:
            if cfg.dataset != "sample":
                load_dataset(cfg.dataset, "test", cfg.data_root)  # fail early on missing data
            t0 = time.perf_counter()
            res = train(
                cfg,
                run,
                resume=ckpt.is_file(),
                overwrite=not ckpt.is_file() and run.is_dir(),
                progress=False,
                log=None,
            )
        except UserError as exc:
            log(f"skipping stand-in {name}: {exc}")
            continue
        last = res.last or {}
        if time.perf_counter() - t0 > 1:
            log(
                f"trained stand-in {name} ({cfg.method}, {cfg.arch}, {cfg.dataset}) in "
                f"{time.perf_counter() - t0:.0f} s, clean accuracy on training batches "
                f"{100 * last.get('clean_accuracy', float('nan')):.1f}%"
            )
        out[name] = ckpt
    return out


def pick_indices(n_total: int, count: int) -> list[int]:
    """``count`` evenly spaced test indices (class-balanced also for class-sorted ImageFolders)."""
    count = min(count, n_total)
    return [i * n_total // count for i in range(count)]


# ---------------------------------------------------------------------------------------------
# One cell, in a child process


def cell_path(out: Path, model: str, threat: str, method: str) -> Path:
    return out / "cells" / slug(model) / f"{slug(threat)}__{method}.json"


def _run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Certify (or attack) the cell's images; returns the cell's JSON (run in a child process of
    its own by :func:`benchmarks.harness.run_cell`, which caches it)."""
    import gc
    from collections import defaultdict

    import torch
    from torch.utils.data import Subset
    from tqdm import tqdm

    from cure_lirpa.attacks import pgd
    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.data import load_dataset, stack
    from cure_lirpa.io.checkpoint import dataset_info_of, load_checkpoint, model_from_checkpoint
    from cure_lirpa.io.checkpoint import versions as lib_versions
    from cure_lirpa.threats.base import parse_threat
    from cure_lirpa.verification.runner import certify_batch

    t_start = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    ckpt = load_checkpoint(spec["checkpoint"])
    info = dataset_info_of(ckpt)
    model = model_from_checkpoint(ckpt).to(device).eval()
    del ckpt
    data = load_dataset(spec["dataset"], "test", spec["data_root"])
    x, y = stack(Subset(data, spec["indices"]))
    del data
    threat = parse_threat(spec["threat"])
    method = spec["method"]
    bc = None
    if method != PGD:
        bc = BoundedClassifier(
            model,
            info.in_shape,
            device=device,
            memory_mb=spec["memory_mb"],
            alpha_iterations=spec["alpha_iterations"],
        )
        bc.train(False)
        warm_up(list(METHODS) if method == CASCADE else [method], threat)
    gc.collect()
    # Baseline: everything the cell needs is loaded; the peak is measured from here on.
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device) / 2**20
    base = rss_now_mb()
    was_reset = reset_peak_rss()

    n, bs = len(y), spec["batch_size"]
    seconds: list[Optional[float]] = []
    flags: list[bool] = []
    margins: list[Optional[float]] = []
    errors: list[dict[str, Any]] = []
    preds: list[int] = []
    decided: list[str] = []
    times: dict = defaultdict(float)
    gen = torch.Generator(device=device).manual_seed(0)
    bar = tqdm(
        total=n,
        unit="img",
        leave=False,
        disable=not spec.get("progress"),
        desc=f"{spec['model']} {threat.name} {method}",
    )
    for s in range(0, n, bs):
        xb, yb = x[s : s + bs].to(device), y[s : s + bs].to(device)
        if method == PGD:
            t0 = time.perf_counter()
            x_adv = pgd(
                model,
                xb,
                yb,
                threat,
                steps=spec["attack_steps"],
                restarts=spec["attack_restarts"],
                generator=gen,
            )
            with torch.no_grad():
                ok = (model(x_adv).argmax(1) == yb).cpu()
                pb = model(xb).argmax(1).cpu()
            dt = time.perf_counter() - t0
            flags += [bool(v) for v in ok]
            preds += [int(v) for v in pb]
        else:
            before = sum(times.values())
            try:
                rows = certify_batch(
                    bc, model, xb, yb, [threat], [method], attack=False, times=times
                )
            except Exception as exc:  # noqa: BLE001 - a bound method that raises on some images
                # is reported (the images count as not certified), not allowed to hide the others
                errors.append(
                    {
                        "indices": spec["indices"][s : s + bs],
                        "error": describe(exc)[:300],
                    }
                )
                with torch.no_grad():
                    pb = model(xb).argmax(1).cpu()
                flags += [False] * len(yb)
                margins += [None] * len(yb)
                preds += [int(v) for v in pb]
                decided += ["error"] * len(yb) if method == CASCADE else []
                seconds += [None] * len(yb)
                bar.update(len(yb))
                continue
            dt = sum(times.values()) - before
            flags += [r.certified[threat.name][method] for r in rows]
            margins += [r.margins[threat.name][method] for r in rows]
            preds += [r.prediction for r in rows]
            if method == CASCADE:
                decided += [r.decided_by[threat.name] for r in rows]
        seconds += [dt / len(yb)] * len(yb)
        bar.update(len(yb))
    bar.close()
    memory = {
        "base_rss_mb": round(base, 1),
        "peak_rss_mb": round(rss_peak_mb(), 1),
        "peak_since_baseline": was_reset,
    }
    memory["extra_mb"] = round(max(0.0, memory["peak_rss_mb"] - base), 1)
    if cuda:
        memory["cuda_base_mb"] = round(cuda_base, 1)
        memory["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        memory["cuda_extra_mb"] = round(memory["cuda_peak_mb"] - cuda_base, 1)
    out: dict[str, Any] = {
        "key": spec["key"],
        "model": spec["model"],
        "threat": threat.name,
        "method": method,
        "indices": list(spec["indices"]),
        "labels": [int(v) for v in y],
        "predictions": preds,
        ("robust" if method == PGD else "certified"): flags,
        "margins": margins,
        "seconds": seconds,
        "image_errors": errors,
        "memory": memory,
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "device": str(device),
        "threads": spec["threads"],
        "versions": lib_versions(),
    }
    if bc is not None and method != CASCADE:
        out["chunk_size"] = bc.chunk_size(method)
    if method == CASCADE:
        out["decided_by"] = decided
        out["stage_seconds"] = {m: round(v, 6) for (_t, m), v in sorted(times.items())}
    return out


# ---------------------------------------------------------------------------------------------
# The plan and the run


@dataclass
class ModelEntry:
    """One model of the run and what its cells are computed on."""

    name: str
    checkpoint: Path
    dataset: str
    arch: str
    width: Optional[int]
    sha1: str
    threats: tuple[str, ...]
    indices: list[int]


def model_entry(
    name: str, path: Path, threats: Optional[Sequence[str]], count: int, data_root: Optional[str]
) -> ModelEntry:
    """Read ``path`` and choose the model's threats and test images."""
    from cure_lirpa.data import load_dataset
    from cure_lirpa.io.checkpoint import load_checkpoint
    from cure_lirpa.threats.base import parse_threat

    ckpt = load_checkpoint(path)
    dataset = ckpt["dataset"]["name"]
    n_total = len(load_dataset(dataset, "test", data_root))
    names = threats or THREATS.get(dataset, THREATS["mnist"])
    return ModelEntry(
        name=name,
        checkpoint=path.resolve(),
        dataset=dataset,
        arch=ckpt["arch"],
        width=(ckpt.get("arch_kwargs") or {}).get("width"),
        sha1=file_sha1(path),
        threats=tuple(dict.fromkeys(parse_threat(t).name for t in names)),
        indices=pick_indices(n_total, count),
    )


def cell_spec(
    e: ModelEntry, threat: str, method: str, s: Settings, run: dict[str, Any]
) -> dict[str, Any]:
    """Everything the child needs; ``key`` holds what decides the result (for resuming)."""
    key = {
        "version": CELL_VERSION,
        "checkpoint_sha1": e.sha1,
        "dataset": e.dataset,
        "indices": e.indices,
        "threat": threat,
        "method": method,
        "batch_size": s.batch_size,
        "threads": run["threads"],
        "device": run["device"],
        "code": run["code"],
    }
    if method == PGD:
        key.update(attack_steps=s.attack_steps, attack_restarts=s.attack_restarts)
    else:
        key.update(memory_mb=s.memory_mb)
        if method in (ALPHA_CROWN, SDP, CASCADE):
            key["alpha_iterations"] = s.alpha_iterations
    return {
        "key": key,
        "model": e.name,
        "checkpoint": str(e.checkpoint),
        "dataset": e.dataset,
        "data_root": None if e.dataset == "sample" else run["data_root"],
        "indices": e.indices,
        "threat": threat,
        "method": method,
        "batch_size": s.batch_size,
        "memory_mb": s.memory_mb,
        "alpha_iterations": s.alpha_iterations,
        "attack_steps": s.attack_steps,
        "attack_restarts": s.attack_restarts,
        "threads": run["threads"],
        "device": run["device"],
        "progress": run["progress"],
    }


def cell_methods(methods: Sequence[str], cascade: bool, attack: bool) -> list[str]:
    return [*methods, *([CASCADE] if cascade else []), *([PGD] if attack else [])]


@dataclass
class Grid:
    """The cells of a run: the models, the single bound methods (with the cascade and PGD when
    ``cascade`` / ``attack``), the settings, the run's code key and the results folder."""

    entries: Sequence[ModelEntry]
    methods: Sequence[str]
    s: Settings
    run: dict[str, Any]
    out: Path
    cascade: bool
    attack: bool


def run_cells(
    grid: Grid,
    retry_failed: bool = False,
    timeout: Optional[float] = None,
    on_model_done: Optional[Any] = None,
) -> None:
    """Run every missing cell, each in a fresh process; cells already on disk are skipped."""
    entries, s, run, out = grid.entries, grid.s, grid.run, grid.out
    kinds = cell_methods(grid.methods, grid.cascade, grid.attack)
    total = sum(runs(m, t) for e in entries for t in e.threats for m in kinds)
    k = 0
    for e in entries:
        for method in kinds:
            for threat in e.threats:
                k += 1
                if not runs(method, threat):
                    continue
                spec = cell_spec(e, threat, method, s, run)
                path = cell_path(out, e.name, threat, method)
                res, dt = run_cell(_run_cell, spec, path, retry_failed, timeout)
                if dt is None:
                    continue
                if "error" in res:
                    log(f"[{k}/{total}] {e.name} {threat} {method}: FAILED ({res['error']})")
                    continue
                log(f"[{k}/{total}] {e.name} {threat} {method}: {cell_line(res)} ({dt:.1f} s)")
        if on_model_done is not None:
            on_model_done()


def cell_line(c: dict[str, Any]) -> str:
    """A one-line summary of a finished cell."""
    flags = c.get("certified", c.get("robust", []))
    what = "robust" if c["method"] == PGD else "certified"
    mem = c["memory"]
    return (
        f"{sum(flags)}/{len(flags)} {what}, median {1e3 * _median(c['seconds']):.3g} "
        f"ms/img, peak {mem['peak_rss_mb']:.0f} MB (+{mem['extra_mb']:.0f} MB over the loaded model)"
        + (f", raised on {_n_errors(c)} image(s)" if _n_errors(c) else "")
    )


def _timed(seconds: Sequence[Optional[float]]) -> list[float]:
    """The per-image times of the images that did not raise."""
    return [v for v in seconds if v is not None]


def _median(seconds: Sequence[Optional[float]]) -> float:
    t = _timed(seconds)
    return statistics.median(t) if t else float("nan")


def _n_errors(c: dict[str, Any]) -> int:
    return sum(v is None for v in c["seconds"])


# ---------------------------------------------------------------------------------------------
# Analysis


def _pct(k: int, n: int) -> float:
    return 100.0 * k / n if n else float("nan")


def analyse_model(
    e: ModelEntry, cells: dict[tuple[str, str], dict[str, Any]], methods: Sequence[str]
) -> dict[str, Any]:
    """Summaries of one model from its cells ``{(threat, method): cell JSON}``.

    Counts are numbers of images; accuracies are percentages of all images. For each single method
    ``new_vs_prev`` / ``lost_vs_prev`` count the images it certifies that the previous (cheaper) method
    run does not, and vice versa; ``new_vs_cheaper`` counts those no cheaper method certifies. For the
    cascade, "previous" is the most expensive single method run and "cheaper" all of them.
    """
    singles = [m for m in METHODS if m in methods]
    n = len(e.indices)
    ok = {k: c for k, c in cells.items() if "error" not in c}
    first = next(iter(ok.values()), None)
    labels = first["labels"] if first else []
    preds = first["predictions"] if first else []
    consistent = all(c["predictions"] == preds for c in ok.values())
    cert: dict[str, dict[str, set[int]]] = {t: {} for t in e.threats}
    for (t, m), c in ok.items():
        if m != PGD:
            cert[t][m] = {i for i, f in enumerate(c["certified"]) if f}
    res: dict[str, Any] = {
        "name": e.name,
        "dataset": e.dataset,
        "arch": e.arch,
        "width": e.width,
        "checkpoint": str(e.checkpoint),
        "samples": n,
        "clean_accuracy": _pct(sum(int(a == b) for a, b in zip(labels, preds)), n)
        if first
        else None,
        "predictions_consistent": consistent,
        "cell_seconds": round(sum(c.get("wall_seconds", 0.0) for c in ok.values()), 1),
        "threats": list(e.threats),
        "cells": {},
        "union": {},
        "cascade": {},
        "sdp": {},
        "pgd": {},
        "errors": {f"{t}/{m}": c["error"] for (t, m), c in cells.items() if "error" in c},
        "raised": {
            f"{t}/{m}": sorted({e["error"] for e in c["image_errors"]})
            for (t, m), c in ok.items()
            if c.get("image_errors")
        },
    }
    for t in e.threats:
        res["cells"][t] = {}
        for m in [*singles, CASCADE]:
            c = ok.get((t, m))
            if c is None:
                continue
            mine = cert[t][m]
            cheaper = singles if m == CASCADE else singles[: singles.index(m)]
            cheaper = [p for p in cheaper if runs(p, t)]
            prev = cheaper[-1] if cheaper else None
            have = [p for p in cheaper if p in cert[t]]
            row: dict[str, Any] = {
                "certified": len(mine),
                "certified_pct": _pct(len(mine), n),
                "prev": prev,
                "new_vs_prev": None,
                "lost_vs_prev": None,
                "new_vs_cheaper": None,
                "median_s": _median(c["seconds"]),
                "total_s": sum(_timed(c["seconds"])),
                "image_errors": _n_errors(c),
                **c["memory"],
            }
            if prev is not None and prev in cert[t]:
                row["new_vs_prev"] = len(mine - cert[t][prev])
                row["lost_vs_prev"] = len(cert[t][prev] - mine)
            if cheaper and len(have) == len(cheaper):
                row["new_vs_cheaper"] = len(mine - set().union(*(cert[t][p] for p in have)))
            elif not cheaper:
                row["new_vs_cheaper"] = len(mine)
            res["cells"][t][m] = row
        c = ok.get((t, CASCADE))
        if c is not None:
            best = set().union(*(cert[t][m] for m in singles if m in cert[t]))
            crown = ok.get((t, CROWN))
            stages = c.get("stage_seconds", {})
            res["cascade"][t] = {
                "certified_pct": _pct(len(cert[t][CASCADE]), n),
                "best_single_pct": _pct(len(best), n),
                "total_s": sum(_timed(c["seconds"])),
                "up_to_crown_s": sum(stages.get(f"{CASCADE}:{m}", 0.0) for m in METHODS[:3]),
                "crown_total_s": sum(_timed(crown["seconds"])) if crown else None,
                "stage_seconds": stages,
                "decided_by": {
                    m: c["decided_by"].count(m)
                    for m in [*METHODS, "attack", "none", "error"]
                    if m in c["decided_by"]
                },
                "image_errors": _n_errors(c),
            }
            tot = res["cascade"][t]
            tot["time_ratio_vs_crown"] = (
                tot["total_s"] / tot["crown_total_s"]
                if tot["crown_total_s"] is not None and tot["crown_total_s"] > 0
                else None
            )
        sdp = ok.get((t, SDP))
        if sdp is not None:
            res["sdp"][t] = sdp_row(t, cert[t], ok, n)
        p = ok.get((t, PGD))
        if p is not None:
            broken = {i for i, r in enumerate(p["robust"]) if not r}
            anycert = set().union(*cert[t].values()) if cert[t] else set()
            res["pgd"][t] = {
                "accuracy_pct": _pct(n - len(broken), n),
                "soundness_violations": len(anycert & broken),
                "median_s": _median(p["seconds"]),
            }
    for m in [*singles, CASCADE]:
        if all(m in cert[t] for t in e.threats):
            both = set.intersection(*(cert[t][m] for t in e.threats))
            res["union"][m] = _pct(len(both), n)
    if all(any(m in cert[t] for m in singles) for t in e.threats) and singles:
        best = [set().union(*(cert[t][m] for m in singles if m in cert[t])) for t in e.threats]
        res["union"]["best"] = _pct(len(set.intersection(*best)), n)
    return res


def sdp_row(
    t: str, cert: dict[str, set[int]], ok: dict[tuple[str, str], dict[str, Any]], n: int
) -> dict[str, Any]:
    """SDP-CROWN against CROWN and alpha-CROWN under threat ``t``: certified %, the images it adds
    or loses, median seconds per image and the time ratio to alpha-CROWN (same steps and batch)."""
    med = {
        m: _median(ok[(t, m)]["seconds"]) if (t, m) in ok else None
        for m in (CROWN, ALPHA_CROWN, SDP)
    }
    row: dict[str, Any] = {
        f"{m}_pct": _pct(len(cert[m]), n) if m in cert else None
        for m in (CROWN, ALPHA_CROWN, SDP, CASCADE)
    }
    row.update({f"{m}_median_s": v for m, v in med.items()})
    for m in (CROWN, ALPHA_CROWN):
        if m in cert:
            row[f"new_vs_{m}"] = len(cert[SDP] - cert[m])
            row[f"lost_vs_{m}"] = len(cert[m] - cert[SDP])
    a, d = med[ALPHA_CROWN], med[SDP]
    row["time_ratio_vs_alpha"] = d / a if a and d is not None and a > 0 else None
    margins = {m: ok[(t, m)]["margins"] for m in (CROWN, ALPHA_CROWN, SDP) if (t, m) in ok}
    for m, v in margins.items():  # mean over the images of the smallest margin lower bound
        vals = [x for x in v if x is not None and math.isfinite(x)]
        row[f"{m}_mean_margin"] = statistics.fmean(vals) if vals else None
    if CROWN in margins:
        pairs = zip(margins[SDP], margins[CROWN])
        row["tighter_than_crown"] = sum(
            1 for x, c in pairs if x is not None and c is not None and x > c + 1e-6
        )
    return row


def collect(grid: Grid) -> list[dict[str, Any]]:
    """Analyse every model from the cells on disk (cells of other settings are ignored)."""
    s, run, out, methods = grid.s, grid.run, grid.out, grid.methods
    kinds = cell_methods(methods, grid.cascade, grid.attack)
    models = []
    for e in grid.entries:
        cells = {}
        for t in e.threats:
            for m in kinds:
                if not runs(m, t):
                    continue
                c = cached_cell(cell_path(out, e.name, t, m), cell_spec(e, t, m, s, run)["key"])
                if c is not None:
                    cells[(t, m)] = c
        if cells:
            models.append(analyse_model(e, cells, methods))
    return models


# ---------------------------------------------------------------------------------------------
# Reports


def _f(v: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{1e3 * v:.3g}"


def _warn(row: dict[str, Any]) -> str:
    k = row.get("image_errors")
    return f" ⚠{k}" if k else ""


def _delta(row: dict[str, Any]) -> str:
    new, lost = row.get("new_vs_prev"), row.get("lost_vs_prev")
    if new is None:
        return ""
    return f" (+{new}" + (f"/−{lost}" if lost else "") + ")"


def summary_markdown(result: dict[str, Any]) -> str:
    """The compact tables (written to ``summary.md`` and copied into docs/benchmarks.md)."""
    models, methods = result["models"], result["methods"]
    kinds = [*methods, *([CASCADE] if result["cascade"] else [])]
    st = result["settings"]
    lines = [
        f"{generated_by(result)} ({result['threads']} thread(s) per cell, {result['device']}); the cells took "
        f"{sum(m['cell_seconds'] for m in models) / 60:.1f} min (each in its own process). "
        f"{st['count']} test images per model (evenly spaced over the test "
        f"split), batch {st['batch_size']}, α-CROWN {st['alpha_iterations']} steps, PGD "
        f"{st['attack_steps']} steps x {st['attack_restarts']} restarts.",
        "",
        "**Certified accuracy (%)**; in brackets the images a method certifies that the previous "
        "(cheaper) one in the row does not (+) and the reverse (−).",
        "",
        "| model | threat | " + " | ".join(LABEL[m] for m in kinds) + " | PGD |",
        "|---|---|" + "---|" * (len(kinds) + 1),
    ]
    for mo in models:
        name = f"{mo['name']} ({_f(mo['clean_accuracy'])}% clean)"
        for t in mo["threats"]:
            row = mo["cells"].get(t, {})
            cells = [
                (_f(row[m]["certified_pct"]) + _delta(row[m]) + _warn(row[m]))
                if m in row
                else ("failed" if runs(m, t) else "n/a")
                for m in kinds
            ]
            p = mo["pgd"].get(t)
            lines.append(
                f"| {name} | {t} | " + " | ".join(cells) + f" | {_f(p and p['accuracy_pct'])} |"
            )
            name = ""
        un = [_f(mo["union"].get(m)) for m in kinds]
        lines.append("| | **union** | " + " | ".join(un) + " | |")
    lines += [
        "",
        "**Cost per image**: median milliseconds per image under each threat, and the largest peak "
        "memory over the threats (resident set of the cell's process, and its growth above the "
        "loaded model and images).",
        "",
        "| model | method | "
        + " | ".join(f"ms ({t})" for t in _threat_columns(models))
        + " | peak MB | +MB |",
        "|---|---|" + "---|" * (len(_threat_columns(models)) + 2),
    ]
    for mo in models:
        name = mo["name"]
        for m in kinds:
            per = [mo["cells"].get(t, {}).get(m) for t in mo["threats"]]
            if not any(per):
                continue
            peak = max((r["peak_rss_mb"] for r in per if r), default=None)
            extra = max((r["extra_mb"] for r in per if r), default=None)
            ms = [
                _ms(r["median_s"]) if r else ("failed" if runs(m, t) else "n/a")
                for r, t in zip(per, mo["threats"])
            ]
            ms += ["-"] * (len(_threat_columns(models)) - len(ms))
            lines.append(
                f"| {name} | {LABEL[m]} | " + " | ".join(ms) + f" | {_f(peak, '{:.0f}')} | "
                f"{_f(extra, '{:.0f}')} |"
            )
            name = ""
    if result["cascade"]:
        lines += [
            "",
            "**Cascade** (IBP → CROWN-IBP → CROWN → α-CROWN, under l2 with SDP-CROWN before α-CROWN; "
            "each stage on the images still open) against "
            "CROWN on every image: total seconds over all images; *without α-CROWN* is the time the "
            "cascade spent in its first three stages (a cascade that stops at CROWN, certifying "
            "what IBP, CROWN-IBP or CROWN certifies); and which stage decided each image.",
            "",
            "| model | threat | cascade % | best single % | cascade s | without α-CROWN s | "
            "CROWN s | cascade / CROWN | decided by "
            + " / ".join(LABEL[m] for m in METHODS)
            + " |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mo in models:
            name = mo["name"]
            for t in mo["threats"]:
                c = mo["cascade"].get(t)
                if c is None:
                    continue
                d = c["decided_by"]
                dec = " / ".join(str(d.get(m, 0)) for m in METHODS)
                dec += "".join(f", {k} {d[k]}" for k in ("attack", "none", "error") if d.get(k))
                lines.append(
                    f"| {name} | {t} | {_f(c['certified_pct'])} | {_f(c['best_single_pct'])} | "
                    f"{_f(c['total_s'], '{:.2f}')} | {_f(c['up_to_crown_s'], '{:.2f}')} | "
                    f"{_f(c['crown_total_s'], '{:.2f}')} | {_f(c['time_ratio_vs_crown'], '{:.1f}x')} "
                    f"| {dec} |"
                )
                name = ""
    if any(mo.get("sdp") for mo in models):
        lines += ["", *sdp_markdown(models)]
    bad = {
        f"{mo['name']} {t}": p["soundness_violations"]
        for mo in models
        for t, p in mo["pgd"].items()
        if p["soundness_violations"]
    }
    lines += [
        "",
        "Soundness cross-check: "
        + (
            f"**VIOLATIONS** (certified images broken by PGD): {bad}"
            if bad
            else "no certified image was broken by PGD."
        ),
    ]
    raised: dict[str, list[str]] = {}
    for mo in models:
        for k, msgs in mo["raised"].items():
            for msg in msgs:
                raised.setdefault(msg, []).append(f"{mo['name']} {k}")
    for msg, where in raised.items():
        lines += [
            "",
            f"⚠k: the method raised on k images, which count as not certified: `{msg}` "
            f"(in {', '.join(where)}).",
        ]
    errors = {f"{mo['name']} {k}": v for mo in models for k, v in mo["errors"].items()}
    if errors:
        lines += ["", "Failed cells: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    return "\n".join(lines) + "\n"


def sdp_markdown(models: Sequence[dict[str, Any]]) -> list[str]:
    """The SDP-CROWN table: certified % beside CROWN, alpha-CROWN, the cascade and PGD, and times."""
    lines = [
        "**SDP-CROWN** (l2 and l1 balls) against CROWN and α-CROWN on the same images: certified "
        "accuracy (%), in brackets the images SDP-CROWN certifies that α-CROWN does not (+) and the "
        "reverse (−); PGD accuracy is the upper limit. Median milliseconds per image; *SDP / α* is "
        "the ratio of SDP-CROWN's to α-CROWN's time per image (same optimisation steps and batch).",
        "",
        "| model | threat | CROWN | α-CROWN | SDP-CROWN | cascade | PGD | CROWN ms | α-CROWN ms "
        "| SDP-CROWN ms | SDP / α |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mo in models:
        name = mo["name"]
        for t, r in mo.get("sdp", {}).items():
            new, lost = r.get("new_vs_alpha-crown"), r.get("lost_vs_alpha-crown")
            delta = "" if new is None else f" (+{new}" + (f"/−{lost}" if lost else "") + ")"
            p = mo["pgd"].get(t)
            lines.append(
                f"| {name} | {t} | {_f(r['crown_pct'])} | {_f(r['alpha-crown_pct'])} | "
                f"{_f(r['sdp-crown_pct'])}{delta} | {_f(r['auto_pct'])} | "
                f"{_f(p and p['accuracy_pct'])} | {_ms(r['crown_median_s'])} | "
                f"{_ms(r['alpha-crown_median_s'])} | {_ms(r['sdp-crown_median_s'])} | "
                f"{_f(r['time_ratio_vs_alpha'], '{:.2f}')} |"
            )
            name = ""
    ratios = [
        r["time_ratio_vs_alpha"]
        for mo in models
        for r in mo.get("sdp", {}).values()
        if r["time_ratio_vs_alpha"] is not None
    ]
    lines += [
        "",
        "Tightness: mean over the images of the smallest margin lower bound (higher is tighter; "
        "misclassified images included), and the images on which SDP-CROWN's bound is above "
        "CROWN's.",
        "",
        "| model | threat | CROWN | α-CROWN | SDP-CROWN | SDP-CROWN > CROWN |",
        "|---|---|---|---|---|---|",
    ]
    for mo in models:
        name = mo["name"]
        for t, r in mo.get("sdp", {}).items():
            lines.append(
                f"| {name} | {t} | {_f(r.get('crown_mean_margin'), '{:.3f}')} | "
                f"{_f(r.get('alpha-crown_mean_margin'), '{:.3f}')} | "
                f"{_f(r.get('sdp-crown_mean_margin'), '{:.3f}')} | "
                f"{_f(r.get('tighter_than_crown'), '{}')}/{mo['samples']} |"
            )
            name = ""
    lost = sum(r.get("lost_vs_crown", 0) for mo in models for r in mo.get("sdp", {}).values())
    if ratios:
        lines += [
            "",
            f"SDP-CROWN / α-CROWN time per image: median {statistics.median(ratios):.2f}, "
            f"largest {max(ratios):.2f} over {len(ratios)} (model, threat) pairs. Images CROWN "
            f"certifies and SDP-CROWN does not: {lost} (must be 0).",
        ]
    return lines


def _threat_columns(models: Sequence[dict[str, Any]]) -> list[str]:
    """Threat column headers: the threats of the first model's kind (l∞, l2, l1 in order)."""
    width = max((len(m["threats"]) for m in models), default=0)
    first = models[0]["threats"] if models else []
    names = [t.split(":")[0] for t in first]
    return names + [f"#{i + 1}" for i in range(len(names), width)]


def detail_markdown(result: dict[str, Any]) -> str:
    """Every cell: one table per model (``results.md``)."""
    lines = [
        f"# Suite `{SUITE}`{' (quick)' if result['quick'] else ''}",
        "",
        summary_markdown(result),
    ]
    for mo in result["models"]:
        lines += [
            "",
            f"## {mo['name']}",
            "",
            f"{mo['arch']} (width {mo['width'] or 'default'}) on {mo['dataset']}, "
            f"{mo['samples']} images, clean accuracy {_f(mo['clean_accuracy'])}%; "
            f"checkpoint `{mo['checkpoint']}`.",
            "",
            "| threat | method | certified % | new vs previous | lost vs previous | new vs all cheaper "
            "| median ms/img | total s | peak RSS MB | base MB | +MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in mo["threats"]:
            for m, r in mo["cells"].get(t, {}).items():
                lines.append(
                    f"| {t} | {LABEL[m]} | {_f(r['certified_pct'])} | {_f(r['new_vs_prev'], '{}')} "
                    f"| {_f(r['lost_vs_prev'], '{}')} | {_f(r['new_vs_cheaper'], '{}')} | "
                    f"{_ms(r['median_s'])} | {r['total_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['base_rss_mb']:.0f} | {r['extra_mb']:.0f} |"
                )
            p = mo["pgd"].get(t)
            if p:
                lines.append(
                    f"| {t} | PGD | {_f(p['accuracy_pct'])} (empirical) | | | | {_ms(p['median_s'])} "
                    f"| | | | |"
                )
        lines += [
            "",
            "Union accuracy: "
            + ", ".join(f"{LABEL.get(m, m)} {_f(v)}%" for m, v in mo["union"].items()),
        ]
        if not mo["predictions_consistent"]:
            lines += ["", "**Warning**: the cells disagree on the model's predictions."]
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out: Path) -> None:
    """``certified.png`` (accuracy per threat and union) and ``cost.png`` (time and memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    if not models:
        return
    kinds = [*result["methods"], *([CASCADE] if result["cascade"] else [])]
    datasets = list(dict.fromkeys(m["dataset"] for m in models))
    ncol = max(len(m["threats"]) for m in models) + 1
    fig, axes = plt.subplots(
        len(datasets), ncol, figsize=(3.6 * ncol, 3.2 * len(datasets)), squeeze=False
    )
    width = 0.8 / len(kinds)
    for r, ds in enumerate(datasets):
        group = [m for m in models if m["dataset"] == ds]
        cols = [*group[0]["threats"], "union"]
        for c, col in enumerate(cols):
            ax = axes[r][c]
            for j, k in enumerate(kinds):
                vals = [
                    (
                        mo["union"].get(k)
                        if col == "union"
                        else mo["cells"].get(col, {}).get(k, {}).get("certified_pct")
                    )
                    or 0.0
                    for mo in group
                ]
                xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(group))]
                ax.bar(xs, vals, width, label=LABEL[k])
            ax.set_xticks(range(len(group)))
            ax.set_xticklabels([mo["name"] for mo in group], rotation=30, ha="right", fontsize=7)
            ax.set_ylim(0, 100)
            ax.set_title(f"{ds}: {col}", fontsize=9)
            if c == 0:
                ax.set_ylabel("certified accuracy (%)")
        for c in range(len(cols), ncol):
            axes[r][c].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "certified.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [mo["name"] for mo in models]
    for j, k in enumerate(kinds):
        med, mem = [], []
        for mo in models:
            rows = [mo["cells"].get(t, {}).get(k) for t in mo["threats"]]
            rows = [r for r in rows if r]
            med.append(statistics.median(r["median_s"] for r in rows) if rows else float("nan"))
            mem.append(max(r["extra_mb"] for r in rows) if rows else float("nan"))
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(models))]
        axes[0].bar(xs, med, width, label=LABEL[k])
        axes[1].bar(xs, mem, width, label=LABEL[k])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median seconds per image")
    axes[1].set_ylabel("peak memory above the loaded model (MB)")
    for ax in axes:
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)
    plt.close(fig)


def write_report(result: dict[str, Any], out: Path) -> None:
    """``results.json`` (stamped with the commit), ``summary.md``, ``results.md`` and the plots, all
    written atomically (see :func:`benchmarks.harness.save_summary`)."""
    save_summary(out / "results.json", result)
    save_summary(out / "summary.md", summary_markdown(result))
    save_summary(out / "results.md", detail_markdown(result))
    plots(result, out)


# ---------------------------------------------------------------------------------------------
# Command line


@click.command(context_settings={"show_default": True})
@click.option("--quick", is_flag=True, help="Smoke run: tiny stand-in models, 20 images (minutes).")
@click.option(
    "--models",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Folder with <name>/checkpoint.pt [default in full mode: {DEFAULT_MODELS}].",
)
@click.option(
    "--checkpoint",
    "named",
    multiple=True,
    help="NAME=PATH of a checkpoint, repeatable (then --models is only read when given).",
)
@click.option("--only", multiple=True, help="Model names to keep (comma-separated or repeated).")
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(METHODS),
    help="Single bound methods [default: all four].",
)
@click.option("--cascade/--no-cascade", default=True, help="Also run the cheapest-first cascade.")
@click.option("--attack/--no-attack", default=True, help="PGD per threat (soundness cross-check).")
@click.option(
    "--threat", "threats", multiple=True, help="Threats for every model [default: by dataset]."
)
@click.option(
    "--norm",
    "norms",
    multiple=True,
    type=click.Choice(list(NORMS)),
    help="Keep only the default threats of these norms, e.g. --norm l2 --norm l1 [default: all].",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Test images per model.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Images per bound call."
)
@click.option("--alpha-iterations", type=click.IntRange(min=1), default=None)
@click.option("--memory-mb", type=click.FloatRange(min=64), default=None)
@data_root_option(help="Folder with MNIST/raw and cifar10-jpeg.tar.gz.")
@click.option("--cifar/--no-cifar", default=True, help="Full mode: CIFAR-10 stand-ins.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Results folder [default: benchmarks/results/certificates[-quick]].",
)
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch threads per cell.")
@click.option("--device", type=click.Choice([AUTO_DEVICE, "cpu", "cuda"]), default="cpu")
@click.option("--cell-timeout", type=click.FloatRange(min=1), default=None, help="Seconds.")
@click.option("--retry-failed", is_flag=True, help="Run failed cells again.")
@click.option("--report-only", is_flag=True, help="Only rebuild the report from finished cells.")
def main(
    quick: bool,
    models_dir: Optional[Path],
    named: Sequence[str],
    only: Sequence[str],
    methods: Sequence[str],
    cascade: bool,
    attack: bool,
    threats: Sequence[str],
    norms: Sequence[str],
    count: Optional[int],
    batch_size: Optional[int],
    alpha_iterations: Optional[int],
    memory_mb: Optional[float],
    data_root: str,
    cifar: bool,
    out: Optional[Path],
    threads: int,
    device: str,
    cell_timeout: Optional[float],
    retry_failed: bool,
    report_only: bool,
) -> None:
    """Compare IBP, CROWN-IBP, CROWN, SDP-CROWN, alpha-CROWN and the cascade on the same images."""
    import torch

    from cure_lirpa.cli.common import resolve_device
    from cure_lirpa.errors import UserError
    from cure_lirpa.io.checkpoint import versions
    from cure_lirpa.threats.base import parse_threat

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    s = with_options(
        QUICK if quick else FULL,
        count=count,
        batch_size=batch_size,
        alpha_iterations=alpha_iterations,
        memory_mb=memory_mb,
    )
    methods = [m for m in METHODS if m in methods] if methods else list(METHODS)
    try:
        threats = [parse_threat(t).name for t in split_commas(*threats)]
    except UserError as exc:
        raise click.BadParameter(str(exc), param_hint="--threat") from None
    out = out or RESULTS / (f"{SUITE}-quick" if quick else SUITE)
    out.mkdir(parents=True, exist_ok=True)
    root = data_root or None
    dev = str(resolve_device(device))
    run = {
        "threads": threads,
        "device": dev,
        "data_root": root,
        "progress": sys.stderr.isatty(),
        "code": code_fingerprint(),
    }

    paths = named_checkpoints(named)
    if models_dir is not None:
        found = named_checkpoints((), models_dir)
        if not found:
            log(f"no <name>/checkpoint.pt in {models_dir}")
        paths.update(found)
    elif not named and not quick:
        for folder, prefix in DEFAULT_MODELS.items():
            found = named_checkpoints((), folder)
            if not only:
                found = {k: found[k] for k in DEFAULT_ROWS if k in found} or found
            paths.update({prefix + k: v for k, v in found.items()})
    configs: dict[str, Any] = {}
    if not paths:
        log("no checkpoints given or found: using stand-in models trained by the suite")
    if not named:
        configs = standin_configs(quick, root, cifar and not quick)
        # stand-ins only for the datasets no real checkpoint was found for
        have = {"cifar10" if k.startswith("cifar10-") else "mnist" for k in paths}
        configs = {
            k: v
            for k, v in configs.items()
            if ("cifar10" if v.dataset == "cifar10" else "mnist") not in have
        }
    keep = set(split_commas(*only))
    if keep:
        configs = {k: v for k, v in configs.items() if k in keep}
        paths = {k: v for k, v in paths.items() if k in keep}
        missing = keep - set(configs) - set(paths)
        if missing:
            raise click.BadParameter(f"no model named {sorted(missing)}", param_hint="--only")
    if configs and not report_only:
        paths.update(train_standins(configs, out / "models"))
    elif configs:
        paths.update(
            {
                k: out / "models" / k / "checkpoint.pt"
                for k in configs
                if (out / "models" / k / "checkpoint.pt").is_file()
            }
        )
    entries: list[ModelEntry] = []
    for name, path in paths.items():
        try:
            entries.append(model_entry(name, path, threats or None, s.count, root))
        except UserError as exc:
            log(f"skipping model {name}: {exc}")
    if norms:
        for e in entries:
            e.threats = tuple(t for t in e.threats if t.split(":")[0] in norms)
    if not entries:
        raise click.ClickException("no usable models (see the messages above)")
    log(
        f"{len(entries)} model(s): {', '.join(e.name for e in entries)}; {s.count} images each; "
        f"methods {', '.join(methods)}{' + cascade' if cascade else ''}; results in {out}"
    )
    origin = provenance(out / "results.json", report_only)
    grid = Grid(entries, methods, s, run, out, cascade, attack)

    def report() -> None:
        result = {
            **header_fields(SUITE, quick, origin, t_start),
            "machine": f"{platform.machine()} {platform.system()}, {_cpus()} CPU(s)",
            "threads": threads,
            "device": dev,
            "settings": dataclasses.asdict(s),
            "methods": methods,
            "cascade": cascade,
            "attack": attack,
            "versions": versions(),
            "code": run["code"],
            "models": collect(grid),
        }
        if report_only and not result["models"]:
            raise click.ClickException(
                f"--report-only: no cells of these settings in {out / 'cells'} (the cells are a "
                "local cache, not committed); run the suite without --report-only"
            )
        write_report(result, out)

    if not report_only:
        run_cells(grid, retry_failed, cell_timeout, on_model_done=report)
    report()
    log(
        f"done in {time.perf_counter() - t_start:.0f} s: {out / 'summary.md'}, results.md, "
        "results.json, certified.png, cost.png"
    )
    click.echo((out / "summary.md").read_text())


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
