"""Metrics of smoothing certification runs: certified accuracy, ACR and the fixed-clean-accuracy
comparison, and the Markdown report of them. Pure functions of per-sample results.

- Certified accuracy at radius r (per norm): fraction of samples whose prediction is correct and
  whose certified radius is >= r. At r = 0 this is the smoothed classifier's clean accuracy
  (abstentions count as wrong).
- ACR (Zhai et al., NU paper Eq. 1): mean over samples of ``radius * [prediction correct]``.
- Comparison at fixed clean accuracy (NU paper Sec. 4.5): the runs of one method (different sigma)
  give points (clean accuracy, ACR); the ACR at a requested clean accuracy is linearly interpolated
  between the two neighbouring points (never extrapolated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..vocabulary import CLEAN_ACCURACY, L1, L2, SMOOTHING_NORMS, SMOOTHING_RADII

NORMS = SMOOTHING_NORMS
DEFAULT_RADII = SMOOTHING_RADII
DEFAULT_CLEAN_LEVELS = (0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


@dataclass
class Run:
    """The per-sample results of one certification run (possibly merged from shards)."""

    name: str
    method: str
    header: dict[str, Any]
    paths: list[str]
    idx: np.ndarray
    correct: np.ndarray
    radius: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.idx.size)


def describe_noises(noises: Sequence[dict[str, Any]]) -> str:
    """``gaussian(0.5)+uniform(0.58)``: the noises of a run."""
    return "+".join(f"{d.get('noise')}({d.get('sigma', '?'):g})" for d in noises)


def default_method(header: dict[str, Any]) -> str:
    """Method label of a run: training method and certification mode, e.g. ``nu-rs -> hybrid``."""
    info, run = header.get("info", {}), header.get("run", {})
    return f"{info.get('train_method') or 'model'} -> {run.get('mode', '?')}"


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, r: float) -> float:
    """Fraction of samples correct with certified radius >= r."""
    if radius.size == 0:
        return float("nan")
    return float(np.mean(correct & (radius >= r)))


def average_certified_radius(radius: np.ndarray, correct: np.ndarray) -> float:
    """ACR: mean of ``radius * [correct]`` (NU paper Eq. 1)."""
    if radius.size == 0:
        return float("nan")
    return float(np.mean(np.where(correct, radius, 0.0)))


def summarize(
    run: Run, radii: Sequence[float] = DEFAULT_RADII, radii_l1: Optional[Sequence[float]] = None
) -> dict[str, Any]:
    """Clean accuracy, certified accuracy at ``radii`` (l2) / ``radii_l1`` (l1), ACR per norm."""
    radii_by_norm = {L2: list(radii), L1: list(radii if radii_l1 is None else radii_l1)}
    cfg, info = run.header.get("run", {}), run.header.get("info", {})
    return {
        "name": run.name,
        "method": run.method,
        "files": run.paths,
        "samples": run.size,
        "mode": cfg.get("mode"),
        "noises": cfg.get("noises"),
        "n": cfg.get("n"),
        "alpha": cfg.get("alpha"),
        "alpha_each": cfg.get("alpha_each"),
        "train": {k: v for k, v in info.items() if k.startswith("train_")},
        CLEAN_ACCURACY: float(np.mean(run.correct)),
        "abstain_or_wrong": float(1 - np.mean(run.correct)),
        "certified_accuracy": {
            norm: {
                f"{r:g}": certified_accuracy(run.radius[norm], run.correct, r)
                for r in radii_by_norm[norm]
            }
            for norm in NORMS
        },
        "acr": {norm: average_certified_radius(run.radius[norm], run.correct) for norm in NORMS},
    }


def interpolate_at(points: Sequence[tuple[float, float]], level: float) -> Optional[float]:
    """Linear interpolation of y at x = ``level`` through ``points`` (x, y) sorted by x.

    Points with equal x keep the largest y (the best run at that accuracy). Returns None outside
    the range of x (no extrapolation).
    """
    best: dict[float, float] = {}
    for x, y in points:
        if not (math.isnan(x) or math.isnan(y)):
            best[x] = max(y, best.get(x, -math.inf))
    xs = sorted(best)
    if not xs or level < xs[0] - 1e-12 or level > xs[-1] + 1e-12:
        return None
    return float(np.interp(level, xs, [best[x] for x in xs]))


def compare_at_clean_accuracy(
    summaries: Sequence[dict[str, Any]], levels: Sequence[float] = DEFAULT_CLEAN_LEVELS
) -> dict[str, Any]:
    """Per method, l1 and l2 ACR interpolated at each clean-accuracy ``level`` (fractions)."""
    methods: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        methods.setdefault(s["method"], []).append(s)
    out: dict[str, Any] = {"levels": list(levels), "methods": {}}
    for method, runs in methods.items():
        entry: dict[str, Any] = {
            "runs": [
                {"name": r["name"], CLEAN_ACCURACY: r[CLEAN_ACCURACY], "acr": r["acr"]}
                for r in runs
            ],
            "at_level": {},
        }
        for level in levels:
            entry["at_level"][f"{level:g}"] = {
                norm: interpolate_at([(r[CLEAN_ACCURACY], r["acr"][norm]) for r in runs], level)
                for norm in NORMS
            }
        out["methods"][method] = entry
    return out


def _cell(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_report(
    summaries: Sequence[dict[str, Any]], comparison: Optional[dict[str, Any]] = None
) -> str:
    """Markdown tables of the summaries (and of the fixed-clean-accuracy comparison)."""
    if not summaries:
        return "No runs.\n"
    lines = ["## Certified accuracy and ACR", ""]
    r2 = list(summaries[0]["certified_accuracy"][L2])
    r1 = list(summaries[0]["certified_accuracy"][L1])
    head = (
        ["run", "method", "samples", "n", "clean"]
        + [f"l2 {r}" for r in r2]
        + [f"l1 {r}" for r in r1]
    )
    head += ["ACR l2", "ACR l1"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        ca = s["certified_accuracy"]
        cells = [s["name"], s["method"], str(s["samples"]), str(s["n"]), _cell(s[CLEAN_ACCURACY])]
        cells += [_cell(ca[L2].get(r)) for r in r2] + [_cell(ca[L1].get(r)) for r in r1]
        cells += [_cell(s["acr"][L2]), _cell(s["acr"][L1])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if comparison and comparison.get("methods"):
        lines += [
            "## ACR at fixed clean accuracy (linear interpolation between runs; '-' = outside the runs' range)",
            "",
        ]
        levels = [f"{lv:g}" for lv in comparison["levels"]]
        head = ["method", "runs: clean range"] + [f"clean {lv}: ACR l2 / l1" for lv in levels]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, entry in comparison["methods"].items():
            clean = sorted(r[CLEAN_ACCURACY] for r in entry["runs"])
            span = f"{len(clean)}: {_cell(clean[0])}" + (
                f" - {_cell(clean[-1])}" if len(clean) > 1 else " (one run: no interpolation)"
            )
            cells = [method, span]
            for lv in levels:
                v = entry["at_level"][lv]
                cells.append(f"{_cell(v[L2])} / {_cell(v[L1])}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
