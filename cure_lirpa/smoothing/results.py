"""What a finished smoothing run writes: ``samples.tsv`` (Cohen et al.'s tab-separated layout),
``summary.json`` and ``summary.md``, computed from the per-sample records alone (so a run merged
from shards writes the unsharded run's files).

The TSV is ``# cure-lirpa-smoothing-tsv/1 {json header}``, a column line and one row per sample;
``pandas.read_csv(path, sep='\\t', comment='#')`` reads it. The header's ``run`` holds the settings
that determine the rows, ``info`` the informational ones (checkpoint path, training method).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from ..errors import UserError
from ..io.checkpoint import atomic_write_json, atomic_write_text
from ..vocabulary import (
    CLEAN_ACCURACY,
    GAUSSIAN,
    HYBRID,
    L2,
    SMOOTHING_RADII,
    SUMMARY_JSON,
    SUMMARY_MD,
    UNIFORM,
)
from .metrics import (
    NORMS,
    average_certified_radius,
    certified_accuracy,
    default_method,
    describe_noises,
    markdown_report,
)

PathLike = Union[str, Path]
TSV_FORMAT = "cure-lirpa-smoothing-tsv/1"
TSV = "samples.tsv"
DEFAULT_RADII = SMOOTHING_RADII


# ---------------------------------------------------------------------------------------------
# Columns and the TSV


def _noise_columns(name: str, sequential: str) -> list[str]:
    cols = ["predict", "count", "p_lower", "radius_l1", "radius_l2"]
    if sequential != "off":
        cols = ["predict", "count", "n", "p_lower", "radius_l1", "radius_l2", "stop"]
    if sequential == "estimate":
        cols.append("radius_upper")
    return [f"{name}_{c}" for c in cols]


def certify_columns(mode: str, sequential: str = "off") -> list[str]:
    """TSV columns of a certification run (``mode`` gaussian, uniform or hybrid)."""
    cols = ["idx", "label", "predict", "radius_l1", "radius_l2", "correct"]
    cols += ["rule"] if mode == HYBRID else []
    for name in (GAUSSIAN, UNIFORM) if mode == HYBRID else (mode,):
        cols += _noise_columns(name, sequential)
    return cols + (["samples", "drawn"] if sequential != "off" else []) + ["time"]


PREDICT_COLUMNS = [
    "idx",
    "label",
    "predict",
    "correct",
    "count_top",
    "count_second",
    "p_value",
    "time",
]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


def tsv_text(header: dict[str, Any], columns: Sequence[str], records: Sequence[dict]) -> str:
    """The TSV of ``records``: ``# <TSV_FORMAT> <json header>``, the column line, one row each."""
    lines = [f"# {TSV_FORMAT} {json.dumps(header, sort_keys=True)}", "\t".join(columns)]
    lines += ["\t".join(_fmt(r[c]) for c in columns) for r in records]
    return "\n".join(lines) + "\n"


def read_tsv(path: PathLike) -> tuple[dict[str, Any], list[str], list[dict[str, str]]]:
    """Read a smoothing TSV: ``(header, columns, rows)``; rows are dicts of strings (only complete
    rows)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    first_end = data.find(b"\n")
    prefix = f"# {TSV_FORMAT} ".encode()
    if first_end < 0 or not data.startswith(prefix):
        raise UserError(
            f"{path} is not a cure-lirpa smoothing TSV (its first line must start with "
            f"'# {TSV_FORMAT}')"
        )
    try:
        header = json.loads(data[len(prefix) : first_end].decode())
    except ValueError:
        raise UserError(f"{path}: the header line is damaged") from None
    lines = data[first_end + 1 :].decode(errors="replace").split("\n")
    if len(lines) < 2:
        return header, [], []
    columns = lines[0].split("\t")
    rows = []
    for line in lines[1:-1]:  # the last piece follows the last newline (empty or cut by a kill)
        fields = line.split("\t")
        if len(fields) != len(columns):
            break
        rows.append(dict(zip(columns, fields)))
    return header, columns, rows


def tsv_header(config: dict[str, Any]) -> dict[str, Any]:
    """The TSV header of a run's config: ``{"format", "run": settings, "info": informational}``."""
    return {
        "format": TSV_FORMAT,
        "run": {k: v for k, v in config.items() if k != "info"},
        "info": config.get("info", {}),
    }


def write_outputs(
    folder: Path, kind: str, config: dict[str, Any], records: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """``samples.tsv``, ``summary.json`` and ``summary.md`` of a finished run; returns the summary."""
    header = tsv_header(config)
    command = header["run"]["command"]
    if command == "certify":
        columns = certify_columns(header["run"]["mode"], header["run"].get("sequential", "off"))
        summary = certify_summary(header, records)
        md = certify_markdown(summary)
    else:
        columns = PREDICT_COLUMNS
        summary = predict_summary(header, records)
        md = predict_markdown(summary)
    atomic_write_text(folder / TSV, tsv_text(header, columns, records))
    atomic_write_json(folder / SUMMARY_JSON, summary)
    atomic_write_text(folder / SUMMARY_MD, md)
    return summary


# ---------------------------------------------------------------------------------------------
# Summaries


def summary_radii(run: dict[str, Any]) -> list[float]:
    """The radii of a run's certified-accuracy table: the decided radii, else 0.25 .. 1."""
    return list(run.get("radii") or DEFAULT_RADII)


def certify_summary(header: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Clean accuracy, certified accuracy (l2 and l1) at :func:`summary_radii`, ACR, draws, time.

    Uses only the records and the compared config, so a merged run's summary is the unsharded
    run's (``seconds_total`` is the sum of the per-sample times).
    """
    run = header["run"]
    correct = np.array([bool(r["correct"]) for r in records], dtype=bool)
    radius = {norm: np.array([float(r[f"radius_{norm}"]) for r in records]) for norm in NORMS}
    radii = summary_radii(run)
    summary: dict[str, Any] = {
        "name": f"{run['mode']} {describe_noises(run.get('noises', []))}",
        "method": default_method(header),
        "samples": len(records),
        "mode": run["mode"],
        "sequential": run.get("sequential", "off"),
        "noises": run.get("noises"),
        "n": run.get("n", run.get("max_n")),
        "alpha": run.get("alpha"),
        "alpha_each": run.get("alpha_each"),
        "radius_norm": run.get("norm", L2),
        CLEAN_ACCURACY: float(np.mean(correct)) if records else math.nan,
        "abstained": float(np.mean([r["predict"] == -1 for r in records])) if records else 0.0,
        "certified_accuracy": {
            norm: {f"{r:g}": certified_accuracy(radius[norm], correct, r) for r in radii}
            for norm in NORMS
        },
        "acr": {norm: average_certified_radius(radius[norm], correct) for norm in NORMS},
    }
    if run.get("sequential", "off") != "off":
        summary["mean_samples_per_image"] = float(np.mean([r["samples"] for r in records]))
    summary["seconds_total"] = round(sum(float(r["time"]) for r in records), 3)
    return summary


def certify_markdown(summary: dict[str, Any]) -> str:
    text = markdown_report([summary])
    if "mean_samples_per_image" in summary:
        text += f"\nMean noise draws per image: {summary['mean_samples_per_image']:.0f}.\n"
    return text


def predict_summary(header: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    run = header["run"]
    size = max(1, len(records))
    return {
        "samples": len(records),
        "noises": run.get("noises"),
        "n": run.get("n"),
        "alpha": run.get("alpha"),
        "accuracy": sum(int(r["correct"]) for r in records) / size,
        "abstained": sum(r["predict"] == -1 for r in records) / size,
        "seconds_total": round(sum(float(r["time"]) for r in records), 3),
    }


def predict_markdown(summary: dict[str, Any]) -> str:
    noises = describe_noises(summary["noises"] or [])
    return (
        "## PREDICT\n\n| noise | samples | n | alpha | accuracy | abstained |\n|---|---|---|---|---|---|\n"
        f"| {noises} | {summary['samples']} | {summary['n']} | {summary['alpha']:g} | "
        f"{summary['accuracy']:.3f} | {summary['abstained']:.3f} |\n"
    )
