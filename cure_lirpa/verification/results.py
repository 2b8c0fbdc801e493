"""The results of a verify run, written and read back: per-sample rows, the summary and its files.

Files of a run folder: ``samples.jsonl`` (one :class:`SampleRow` a line, exact; the run layer
appends it), ``samples.csv`` (one line per sample: flags, margins to 6 significant digits, the
cascade's deciding stage, the PGD result), ``summary.json`` (accuracies as fractions of the
samples, 0..1; times in seconds; memory in MB), ``summary.md`` and ``certified_accuracy.png``
(human: accuracies in percent). :func:`read_samples` and :func:`read_summary` read them back.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import resource
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from ..errors import UserError
from ..threats.base import Threat
from ..vocabulary import (
    ALPHA_CROWN,
    AUTO,
    BEST,
    CERTIFIED,
    CERTIFIED_BEST,
    CLEAN_ACCURACY,
    DECIDED_BY,
    MARGIN,
    PGD_ACCURACY,
    PGD_ROBUST,
    SAMPLES_CSV,
    SAMPLES_JSONL,
    SKIPPED,
    SUMMARY_JSON,
    SUMMARY_MD,
    TIMEOUT,
    UNION,
)

PathLike = Union[str, os.PathLike]
ACCURACY_UNIT = "fraction"
"""``summary["accuracy_unit"]``: accuracies in summary.json are fractions of the samples (0..1).
Summaries without the key (written before) hold percentages; :func:`read_summary` converts them."""
NONE = "none"
"""The deciding stage of a sample no cascade stage ran on (misclassified)."""


@dataclass
class SampleRow:
    """One sample's results. ``margins[threat][method]`` is min_j lb_j (> 0 iff certified).

    For ``auto`` the margin is that of the method that decided and ``decided_by[threat]`` names it.
    ``robust[threat]`` is True when the cross-check's attack (PGD for balls, the family attack for
    patches and geometric threats) found no adversarial example (None: not attacked).
    ``violations`` lists the threats under which a bound certified the sample and PGD broke it (a
    bug: those certificates are withdrawn, the sample counts as not certified there).
    ``alpha_fallback`` lists the threats under which this sample's alpha-CROWN bound (method
    ``alpha-crown`` or the cascade's last stage) is the CROWN bound, because auto_LiRPA's
    alpha-CROWN failed on its batch (sound, but not optimised; see :mod:`cure_lirpa.bounds.lirpa`).
    ``skipped[threat]`` maps the cascade stages skipped for this sample to the reason (the bound
    method does not support the model or the threat). ``decided_by[threat] == "timeout"``: the
    sample's time budget ran out before a stage certified it (not certified). ``seconds`` is the
    sample's share of its batch's time, per ``"<threat>/<method>"`` key of ``seconds_per_image``
    and under ``"total"`` (kept with the sample, so a resumed run's times count every session).
    """

    index: int
    label: int
    prediction: int
    margins: dict[str, dict[str, float]] = field(default_factory=dict)
    certified: dict[str, dict[str, bool]] = field(default_factory=dict)
    decided_by: dict[str, str] = field(default_factory=dict)
    robust: dict[str, Optional[bool]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    alpha_fallback: list[str] = field(default_factory=list)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.label == self.prediction

    def best(self, threat: str) -> bool:
        """Certified under ``threat`` by at least one method."""
        return any(self.certified.get(threat, {}).values())


def row_to_json(row: SampleRow) -> str:
    """One line of ``samples.jsonl`` (keys sorted, as :class:`cure_lirpa.io.runs.Records` writes)."""
    return json.dumps(asdict(row), sort_keys=True)


def row_from_json(line: str) -> SampleRow:
    return SampleRow(**json.loads(line))


# ---------------------------------------------------------------------------------------------
# The summary


def summarize(
    rows: Sequence[SampleRow],
    threats: Sequence[Threat],
    methods: Sequence[str],
    times: Optional[dict] = None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """Accuracies as fractions of the samples (0..1), times in seconds per image, memory in MB."""
    n = len(rows)
    if n == 0:
        raise UserError("no samples to summarise (check --start and --count)")
    frac = lambda k: k / n  # noqa: E731
    names = [t.name for t in threats]
    out: dict[str, Any] = {
        "samples": n,
        "accuracy_unit": ACCURACY_UNIT,
        CLEAN_ACCURACY: frac(sum(r.correct for r in rows)),
        CERTIFIED: {
            t: {m: frac(sum(r.certified[t][m] for r in rows)) for m in methods} for t in names
        },
        CERTIFIED_BEST: {t: frac(sum(r.best(t) for r in rows)) for t in names},
        UNION: {
            BEST: frac(sum(all(r.best(t) for t in names) for r in rows)),
            **{m: frac(sum(all(r.certified[t][m] for t in names) for r in rows)) for m in methods},
        },
        PGD_ACCURACY: {},
        "soundness_violations": {},
    }
    if any(m in (ALPHA_CROWN, AUTO) for m in methods):
        # samples whose alpha-CROWN bound is the CROWN bound (auto_LiRPA's alpha-CROWN failed)
        out["alpha_crown_fallbacks"] = {
            t: sum(t in getattr(r, "alpha_fallback", ()) for r in rows) for t in names
        }
    if AUTO in methods:
        out["cascade"] = {t: _cascade_summary(rows, t) for t in names}
    for t in names:
        attacked = [r for r in rows if r.robust.get(t) is not None]
        if attacked:
            out[PGD_ACCURACY][t] = frac(sum(r.robust[t] for r in attacked))
            out["soundness_violations"][t] = sum(t in r.violations for r in attacked)
    if times:
        out["seconds_per_image"] = {f"{t}/{m}": v / n for (t, m), v in sorted(times.items())}
    out["seconds_total"] = seconds
    out["peak_memory_mb"] = peak_memory_mb()
    return out


def _cascade_summary(rows: Sequence[SampleRow], threat: str) -> dict[str, Any]:
    """Samples per deciding stage, timeouts, and the skipped stages with their reasons."""
    decided: dict[str, int] = defaultdict(int)
    skipped: dict[str, dict[str, Any]] = {}
    for r in rows:
        decided[r.decided_by.get(threat, NONE)] += 1
        for stage, reason in r.skipped.get(threat, {}).items():
            entry = skipped.setdefault(stage, {"samples": 0, "reason": reason})
            entry["samples"] += 1
    return {DECIDED_BY: dict(decided), "timeouts": decided.get(TIMEOUT, 0), SKIPPED: skipped}


def peak_memory_mb(device: Optional[torch.device] = None) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MB."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _accuracy_slots(summary: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """Every (dict, key) of ``summary`` that holds an accuracy."""
    if CLEAN_ACCURACY in summary:
        yield summary, CLEAN_ACCURACY
    for per in summary.get(CERTIFIED, {}).values():
        yield from ((per, m) for m in per)
    for group in (CERTIFIED_BEST, UNION, PGD_ACCURACY):
        part = summary.get(group, {})
        yield from ((part, k) for k in part)


def _rescaled(summary: dict[str, Any], scale: Callable[[float], float]) -> dict[str, Any]:
    out = copy.deepcopy(summary)
    for holder, key in _accuracy_slots(out):
        if holder[key] is not None:
            holder[key] = scale(holder[key])
    return out


def to_percent(summary: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``summary`` with its accuracies in percent (for tables, plots, the console).

    An accuracy that is k/n of the ``samples`` n is given as exactly ``100.0 * k / n``."""
    n = summary.get("samples") or 0

    def pct(v: float) -> float:
        k = v * n
        return 100.0 * round(k) / n if n and abs(k - round(k)) < 1e-6 else 100.0 * v

    return _rescaled(summary, pct)


def read_summary(path: PathLike) -> dict[str, Any]:
    """The ``summary.json`` of a verify run (its folder, or the file), accuracies as fractions;
    a summary written before fractions (no ``accuracy_unit``: percent) is converted."""
    path = Path(path)
    file = path / SUMMARY_JSON if path.is_dir() else path
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{file}: not a readable summary.json of a verify run ({exc})") from None
    if summary.get("accuracy_unit") == ACCURACY_UNIT:
        return summary
    return {**_rescaled(summary, lambda v: v / 100.0), "accuracy_unit": ACCURACY_UNIT}


# ---------------------------------------------------------------------------------------------
# samples.csv


def csv_text(rows: Sequence[SampleRow], threats: Sequence[Threat], methods: Sequence[str]) -> str:
    """One line per sample: label, prediction, per threat and method certified flag and margin,
    the deciding method of ``auto``, the attack result, and the union flag."""
    names = [t.name for t in threats]
    header = ["index", "label", "prediction", "correct"]
    for t in names:
        for m in methods:
            header += [f"{t}/{m}/{CERTIFIED}", f"{t}/{m}/{MARGIN}"]
        if AUTO in methods:
            header += [f"{t}/{AUTO}/{DECIDED_BY}", f"{t}/{AUTO}/{SKIPPED}"]
        header += [f"{t}/{CERTIFIED}", f"{t}/{PGD_ROBUST}"]
    header.append(f"{UNION}/{CERTIFIED}")
    lines = [",".join(header)]
    for r in rows:
        cells: list[Any] = [r.index, r.label, r.prediction, int(r.correct)]
        for t in names:
            for m in methods:
                cells += [int(r.certified[t][m]), f"{r.margins[t][m]:.6g}"]
            if AUTO in methods:
                cells += [r.decided_by.get(t, ""), ";".join(r.skipped.get(t, {}))]
            rb = r.robust.get(t)
            cells += [int(r.best(t)), "" if rb is None else int(rb)]
        cells.append(int(all(r.best(t) for t in names)))
        lines.append(",".join(map(str, cells)))
    return "\n".join(lines) + "\n"


def rows_from_csv(text: str) -> list[SampleRow]:
    """The rows of a ``samples.csv`` (:func:`csv_text`): margins to its 6 significant digits;
    the skip reasons and alpha-CROWN fallbacks, which it does not hold, are empty; a withdrawn
    certificate (a positive margin on a correct sample PGD broke) is a violation again."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or header[:3] != ["index", "label", "prediction"]:
        raise UserError("not a samples.csv of a verify run (its columns start index,label,...)")
    suffix = f"/{PGD_ROBUST}"
    threats = [c[: -len(suffix)] for c in header if c.endswith(suffix)]
    columns = [_column(c, threats) for c in header]
    rows = []
    for cells in reader:
        r = SampleRow(int(cells[0]), int(cells[1]), int(cells[2]))
        for (t, method, what), value in zip(columns, cells):
            if t is not None:
                _set_cell(r, t, method, what, value)
        r.violations = [t for t in threats if _withdrawn(r, t)]
        rows.append(r)
    return rows


def _column(name: str, threats: Sequence[str]) -> tuple[Optional[str], str, str]:
    """``(threat, method, field)`` of a samples.csv column (``method`` empty for the per-threat
    columns ``certified`` and ``pgd_robust``; threat None for the others)."""
    mine = [t for t in threats if name.startswith(t + "/")]
    if not mine:
        return None, "", ""
    t = max(mine, key=len)  # a threat name may hold "/" (linf:2/255)
    method, _, what = name[len(t) + 1 :].rpartition("/")
    return t, method, what


def _set_cell(r: SampleRow, t: str, method: str, what: str, value: str) -> None:
    if what == PGD_ROBUST:
        r.robust[t] = None if value == "" else value == "1"
    elif what == CERTIFIED and method:
        r.certified.setdefault(t, {})[method] = value == "1"
    elif what == MARGIN:
        r.margins.setdefault(t, {})[method] = float(value)
    elif what == DECIDED_BY:
        r.decided_by[t] = value
    elif what == SKIPPED and value:
        r.skipped[t] = dict.fromkeys(value.split(";"), "")


def _withdrawn(r: SampleRow, t: str) -> bool:
    """Whether a bound certified ``r`` under ``t`` and PGD broke it (certificates withdrawn)."""
    positive = any(v > 0 for v in r.margins.get(t, {}).values())
    return r.correct and r.robust.get(t) is False and positive and not r.best(t)


def read_samples(path: PathLike) -> list[SampleRow]:
    """The per-sample rows of a verify run: ``path`` is its folder (``samples.jsonl``, exact,
    else ``samples.csv``), a ``samples.jsonl`` or a ``samples.csv`` (see :func:`rows_from_csv`)."""
    from ..io.runs import Records

    path = Path(path)
    if path.is_dir():
        jsonl = path / SAMPLES_JSONL
        path = jsonl if jsonl.is_file() else path / SAMPLES_CSV
    if path.suffix == ".jsonl":
        return [SampleRow(**r) for r in Records(path).read()]
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the samples of a verify run ({exc})") from None
    try:
        return rows_from_csv(text)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Human tables and the files


def markdown_table(summary: dict[str, Any], methods: Sequence[str]) -> str:
    """The summary as a Markdown table in percent: clean accuracy (the ceiling of every column),
    then a row per threat, a column per method, best and PGD, and the union row."""
    s = to_percent(summary)
    head = ["threat", *methods, BEST, "PGD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    clean = f"{s[CLEAN_ACCURACY]:.1f}"
    lines.append("| clean (no perturbation) | " + " | ".join([clean] * (len(head) - 1)) + " |")
    for t, per in s[CERTIFIED].items():
        pgd_acc = s[PGD_ACCURACY].get(t)
        cells = [
            t,
            *(f"{per[m]:.1f}" for m in methods),
            f"{s[CERTIFIED_BEST][t]:.1f}",
            "-" if pgd_acc is None else f"{pgd_acc:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    u = s[UNION]
    lines.append(
        "| **union** | "
        + " | ".join(f"{u[m]:.1f}" for m in methods)
        + f" | **{u[BEST]:.1f}** | - |"
    )
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: PathLike,
    rows: Sequence[SampleRow],
    summary: dict[str, Any],
    threats: Sequence[Threat],
    methods: Sequence[str],
) -> None:
    """Write ``samples.csv``, ``summary.json`` (as given: accuracies as fractions), ``summary.md``
    and the plot of certified accuracy per threat and method (``certified_accuracy.png``), the
    last two in percent, each atomically."""
    from ..io.checkpoint import atomic_write_json, atomic_write_text
    from ..plots import PLOT_NAME, plot_certified_accuracy

    out_dir = Path(out_dir)
    atomic_write_text(out_dir / SAMPLES_CSV, csv_text(rows, threats, methods))
    atomic_write_json(out_dir / SUMMARY_JSON, summary)
    atomic_write_text(out_dir / SUMMARY_MD, markdown_table(summary, methods))
    plot_certified_accuracy(to_percent(summary), methods, out_dir / PLOT_NAME)
