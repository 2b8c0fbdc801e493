"""``smooth analyze``: read certification runs (run folders of ``smooth certify`` or their TSVs),
merge shards, and write the metrics of :mod:`cure_lirpa.smoothing.metrics`, curves and reports."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import UserError
from ..io.checkpoint import atomic_write_json, atomic_write_text
from ..vocabulary import L1, L2, SUMMARY_JSON, SUMMARY_MD
from .metrics import (
    DEFAULT_CLEAN_LEVELS,
    DEFAULT_RADII,
    NORMS,
    Run,
    certified_accuracy,
    compare_at_clean_accuracy,
    default_method,
    describe_noises,
    markdown_report,
    summarize,
)

KIND = "smooth-analyze"
"""The run kind of an ``analyze`` output folder (:mod:`cure_lirpa.io.runs`)."""
PathLike = Union[str, Path]


def load_run(path: PathLike, method: Optional[str] = None) -> Run:
    """Read a certification run: a run folder of ``smooth certify`` (finished or not) or the
    ``samples.tsv`` it writes."""
    from .results import read_tsv
    from .runner import read_run

    path = Path(path)
    if path.is_dir():
        header, rows = read_run(path)
        name = path.name
    elif path.is_file():
        header, _, rows = read_tsv(path)
        name = path.parent.name if path.name == "samples.tsv" else path.stem
    else:
        raise UserError(f"{path} does not exist; produce it with 'cure-lirpa smooth certify'")
    if header.get("run", {}).get("command") != "certify":
        raise UserError(f"{path} is not a certification run (it was written by 'smooth predict')")
    if not rows:
        raise UserError(f"{path} has no complete rows yet")
    run = header.get("run", {})
    info = header.get("info", {})
    train = (
        f"{info.get('train_method')}({info.get('train_sigma')})" if info.get("train_method") else ""
    )
    if train:
        name += f" [{train} cert {describe_noises(run.get('noises', []))}]"
    return Run(
        name=name,
        method=method or default_method(header),
        header=header,
        paths=[str(path)],
        idx=np.array([int(r["idx"]) for r in rows]),
        correct=np.array([int(r["correct"]) for r in rows], dtype=bool),
        radius={
            L1: np.array([float(r["radius_l1"]) for r in rows]),
            L2: np.array([float(r["radius_l2"]) for r in rows]),
        },
    )


def merge_runs(runs: Sequence[Run]) -> list[Run]:
    """Merge shards: runs with the same method and the same run configuration apart from
    ``start``, ``count`` and ``shard`` become one run (a sample present twice is counted once)."""
    merged: dict[str, Run] = {}
    for r in runs:
        cfg = {
            k: v for k, v in r.header.get("run", {}).items() if k not in ("start", "count", "shard")
        }
        key = repr((r.method, sorted(cfg.items(), key=lambda kv: kv[0])))
        if key not in merged:
            merged[key] = r
            continue
        m = merged[key]
        keep = ~np.isin(r.idx, m.idx)
        if not keep.all():
            warnings.warn(
                f"{r.paths[0]} repeats samples of {m.paths}; counting them once", stacklevel=2
            )
        m.idx = np.concatenate([m.idx, r.idx[keep]])
        m.correct = np.concatenate([m.correct, r.correct[keep]])
        for norm in m.radius:
            m.radius[norm] = np.concatenate([m.radius[norm], r.radius[norm][keep]])
        m.paths.append(r.paths[0])
    return list(merged.values())


def plot_certified_accuracy(
    runs: Sequence[Run], path: PathLike, max_radius: Optional[float] = None
) -> Path:
    """PNG of certified accuracy vs radius, one panel per norm (l2, l1), one curve per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(11, 4.2))  # Agg canvas, no pyplot: leaves the caller's backend alone
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, norm in zip(axes, NORMS):
        top = (
            max_radius or max([float(r.radius[norm].max(initial=0.0)) for r in runs] + [0.1]) * 1.05
        )
        grid = np.linspace(0.0, top, 300)
        for r in runs:
            acc = [certified_accuracy(r.radius[norm], r.correct, g) for g in grid]
            ax.plot(grid, acc, label=r.name)
        ax.set_xlabel(f"{norm} radius (pixel units)")
        ax.set_ylabel("certified accuracy")
        ax.set_ylim(0, 1.0)
        ax.grid(alpha=0.3)
        ax.set_title(f"certified accuracy vs {norm} radius")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path


def analyze(
    inputs: Sequence[tuple[Optional[str], PathLike]],
    out_dir: PathLike,
    radii: Sequence[float] = DEFAULT_RADII,
    radii_l1: Optional[Sequence[float]] = None,
    clean_levels: Sequence[float] = DEFAULT_CLEAN_LEVELS,
    max_radius: Optional[float] = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Summarise certification runs (folders or TSVs); write ``summary.json``, ``summary.md`` and
    ``certified_accuracy.png`` into the run folder ``out_dir`` (a ``smooth-analyze`` run:
    ``resume`` redoes it with the same settings, ``overwrite`` replaces it; see
    :meth:`cure_lirpa.io.runs.Run.open`). ``inputs`` are ``(method label or None, path)``."""
    from ..io.runs import Run as RunFolder

    if not inputs:
        raise UserError("give at least one certification run to analyze")
    runs = merge_runs([load_run(p, label) for label, p in inputs])
    summaries = [summarize(r, radii, radii_l1) for r in runs]
    comparison = compare_at_clean_accuracy(summaries, clean_levels)
    out_dir = Path(out_dir)
    config = {
        "inputs": [[label, str(Path(p).resolve())] for label, p in inputs],
        "radii": list(radii),
        "radii_l1": None if radii_l1 is None else list(radii_l1),
        "clean_levels": list(clean_levels),
        "max_radius": max_radius,
    }
    folder = RunFolder.open(out_dir, KIND, config, resume=resume, overwrite=overwrite)
    result = {"runs": summaries, "fixed_clean_accuracy": comparison}
    try:
        atomic_write_json(out_dir / SUMMARY_JSON, result)
        atomic_write_text(out_dir / SUMMARY_MD, markdown_report(summaries, comparison))
        plot_certified_accuracy(runs, out_dir / "certified_accuracy.png", max_radius)
    except BaseException:
        folder.discard_if_empty()
        raise
    folder.close()
    return result
