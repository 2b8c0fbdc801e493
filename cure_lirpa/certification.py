"""Per-sample certification under several threats and methods, union accuracy, the cascade.

:func:`certify_dataset` runs every (threat, method) pair on every sample and, as a soundness
cross-check, a PGD attack per lp-ball threat. It returns one :class:`SampleRow` per sample and a
summary dict with clean accuracy, certified accuracy per threat and method, best-of-methods certified
accuracy, union accuracy, PGD accuracy, time per image and peak memory. A sample reported certified and
broken by the attack under the same threat is counted in ``summary["soundness_violations"]`` (it must
stay 0; the tests assert it).

The method ``auto`` is the cheapest-first cascade: IBP, then CROWN-IBP, CROWN and alpha-CROWN, each
only on the samples still open; it certifies exactly the union of what these methods certify. Under
l2 balls SDP-CROWN runs between CROWN and alpha-CROWN (:func:`cascade_for`).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .attacks import pgd
from .bounds import METHODS, BoundedClassifier
from .errors import UserError
from .threats import NormBall, Threat

CASCADE = ("ibp", "crown-ibp", "crown", "alpha-crown")
L2_CASCADE = ("ibp", "crown-ibp", "crown", "sdp-crown", "alpha-crown")
"""The cascade under l2 balls: SDP-CROWN is tighter than CROWN there and cheaper than alpha-CROWN
(benchmarks/certificates.py measures both)."""


def cascade_for(threat: Threat) -> tuple[str, ...]:
    """The cascade's stages, cheapest first, for ``threat``."""
    if isinstance(threat, NormBall) and threat.p == 2.0:
        return L2_CASCADE
    return CASCADE


ALL_METHODS = (*METHODS, "auto")


@dataclass
class SampleRow:
    """One sample's results. ``margins[threat][method]`` is min_j lb_j (> 0 iff certified).

    For ``auto`` the margin is that of the method that decided and ``decided_by[threat]`` names it.
    ``robust[threat]`` is True when PGD found no adversarial example (None: not attacked).
    """

    index: int
    label: int
    prediction: int
    margins: dict[str, dict[str, float]] = field(default_factory=dict)
    certified: dict[str, dict[str, bool]] = field(default_factory=dict)
    decided_by: dict[str, str] = field(default_factory=dict)
    robust: dict[str, Optional[bool]] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.label == self.prediction

    def best(self, threat: str) -> bool:
        """Certified under ``threat`` by at least one method."""
        return any(self.certified.get(threat, {}).values())


def _cascade(
    bc: BoundedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    times: dict,
    correct: torch.Tensor,
) -> tuple[torch.Tensor, list[str]]:
    """Cheapest-first: returns the deciding margins (B,) and the deciding method per sample.

    Misclassified samples are never certifiable and skip every stage (margin -inf, "none").
    """
    margin = torch.full((len(x),), -math.inf)
    by = ["none"] * len(x)
    open_idx = torch.arange(len(x))[correct]
    for method in cascade_for(threat):
        if len(open_idx) == 0:
            break
        t0 = time.perf_counter()
        lb = bc.margin_lower_bounds(x[open_idx], y[open_idx], threat, method).min(1).values.cpu()
        times[(threat.name, f"auto:{method}")] += time.perf_counter() - t0
        for i, v in zip(open_idx.tolist(), lb.tolist()):
            margin[i] = v
            by[i] = method
        open_idx = open_idx[lb <= 0]
    return margin, by


def certify_batch(
    bc: BoundedClassifier,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threats: Sequence[Threat],
    methods: Sequence[str],
    attack: bool = True,
    attack_steps: int = 50,
    attack_restarts: int = 2,
    times: Optional[dict] = None,
    first_index: int = 0,
) -> list[SampleRow]:
    """Certify one batch ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,)."""
    times = times if times is not None else defaultdict(float)
    with torch.no_grad():
        pred = model(x.to(bc.device)).argmax(1).cpu()
    rows = [SampleRow(first_index + i, int(y[i]), int(pred[i])) for i in range(len(y))]
    correct = pred == y.cpu()
    for threat in threats:
        name = threat.name
        for method in methods:
            if method == "auto":
                margin, by = _cascade(bc, x, y, threat, times, correct)
                for r, b in zip(rows, by):
                    r.decided_by[name] = b
            else:
                t0 = time.perf_counter()
                margin = bc.margin_lower_bounds(x, y, threat, method).min(1).values.cpu()
                times[(name, method)] += time.perf_counter() - t0
            ok = (margin > 0) & correct
            for r, m, c in zip(rows, margin.tolist(), ok.tolist()):
                r.margins.setdefault(name, {})[method] = m
                r.certified.setdefault(name, {})[method] = bool(c)
        if attack and isinstance(threat, NormBall):
            t0 = time.perf_counter()
            x_adv = pgd(
                model,
                x.to(bc.device),
                y.to(bc.device),
                threat,
                steps=attack_steps,
                restarts=attack_restarts,
            )
            with torch.no_grad():
                robust = model(x_adv).argmax(1).cpu() == y.cpu()
            times[(name, "pgd")] += time.perf_counter() - t0
            for r, rb in zip(rows, robust.tolist()):
                r.robust[name] = bool(rb)
        else:
            for r in rows:
                r.robust[name] = None
    return rows


def summarize(
    rows: Sequence[SampleRow],
    threats: Sequence[Threat],
    methods: Sequence[str],
    times: Optional[dict] = None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """Accuracies in percent, times in seconds per image, memory in MB."""
    n = len(rows)
    if n == 0:
        raise UserError("no samples to summarise (check --start and --count)")
    pct = lambda k: 100.0 * k / n  # noqa: E731
    names = [t.name for t in threats]
    out: dict[str, Any] = {
        "samples": n,
        "clean_accuracy": pct(sum(r.correct for r in rows)),
        "certified": {
            t: {m: pct(sum(r.certified[t][m] for r in rows)) for m in methods} for t in names
        },
        "certified_best": {t: pct(sum(r.best(t) for r in rows)) for t in names},
        "union": {
            "best": pct(sum(all(r.best(t) for t in names) for r in rows)),
            **{m: pct(sum(all(r.certified[t][m] for t in names) for r in rows)) for m in methods},
        },
        "pgd_accuracy": {},
        "soundness_violations": {},
    }
    for t in names:
        attacked = [r for r in rows if r.robust.get(t) is not None]
        if attacked:
            out["pgd_accuracy"][t] = pct(sum(r.robust[t] for r in attacked))
            out["soundness_violations"][t] = sum(r.best(t) and not r.robust[t] for r in attacked)
    if times:
        out["seconds_per_image"] = {f"{t}/{m}": v / n for (t, m), v in sorted(times.items())}
    out["seconds_total"] = seconds
    out["peak_memory_mb"] = peak_memory_mb()
    return out


def peak_memory_mb(device: Optional[torch.device] = None) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MB."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def certify_dataset(
    model: nn.Module,
    dataset: Dataset,
    threats: Sequence[Threat],
    methods: Sequence[str],
    in_shape: Sequence[int],
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    memory_mb: float = 4096.0,
    attack: bool = True,
    attack_steps: int = 50,
    attack_restarts: int = 2,
    first_index: int = 0,
    done: Iterable[SampleRow] = (),
    on_batch: Optional[Callable[[list[SampleRow]], None]] = None,
    progress: bool = False,
) -> tuple[list[SampleRow], dict[str, Any]]:
    """Certify every sample of ``dataset``; ``done`` rows (from a resumed run) are skipped.

    ``on_batch`` is called with each finished batch's rows (used to append to a partial file).
    """
    methods = list(dict.fromkeys(methods))
    for m in methods:
        if m not in ALL_METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    if not threats:
        raise UserError("give at least one threat, e.g. --threat linf:0.1 --threat l2:0.5")
    device = torch.device(device)
    model = model.to(device).eval()
    bc = BoundedClassifier(model, in_shape, device=device, memory_mb=memory_mb)
    bc.train(False)
    rows = list(done)
    skip = len(rows)
    times: dict = defaultdict(float)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), initial=skip, unit="img", desc="verify")
    t_start = time.perf_counter()
    seen = 0
    for x, y in loader:
        if seen + len(y) <= skip:
            seen += len(y)
            continue
        lo = max(0, skip - seen)
        x, y = x[lo:], y[lo:]
        if tuple(x.shape[1:]) != tuple(in_shape):
            raise UserError(
                f"dataset images have shape {tuple(x.shape[1:])} but the model expects "
                f"{tuple(in_shape)}; pick the dataset the checkpoint was trained on"
            )
        batch_rows = certify_batch(
            bc,
            model,
            x,
            y,
            threats,
            methods,
            attack,
            attack_steps,
            attack_restarts,
            times,
            first_index + seen + lo,
        )
        seen += lo + len(batch_rows)
        rows.extend(batch_rows)
        if on_batch is not None:
            on_batch(batch_rows)
        if bar is not None:
            bar.update(len(batch_rows))
    if bar is not None:
        bar.close()
    summary = summarize(rows, threats, methods, times, time.perf_counter() - t_start)
    summary["peak_memory_mb"] = peak_memory_mb(device)
    return rows, summary


# ---------------------------------------------------------------------------------------------
# Files: a per-sample CSV, a summary JSON and a JSONL partial file for --resume.


def row_to_json(row: SampleRow) -> str:
    return json.dumps(asdict(row))


def row_from_json(line: str) -> SampleRow:
    return SampleRow(**json.loads(line))


def csv_text(rows: Sequence[SampleRow], threats: Sequence[Threat], methods: Sequence[str]) -> str:
    """One line per sample: label, prediction, per threat and method certified flag and margin,
    the deciding method of ``auto``, the attack result, and the union flag."""
    names = [t.name for t in threats]
    header = ["index", "label", "prediction", "correct"]
    for t in names:
        for m in methods:
            header += [f"{t}/{m}/certified", f"{t}/{m}/margin"]
        if "auto" in methods:
            header.append(f"{t}/auto/decided_by")
        header += [f"{t}/certified", f"{t}/pgd_robust"]
    header.append("union/certified")
    lines = [",".join(header)]
    for r in rows:
        cells: list[Any] = [r.index, r.label, r.prediction, int(r.correct)]
        for t in names:
            for m in methods:
                cells += [int(r.certified[t][m]), f"{r.margins[t][m]:.6g}"]
            if "auto" in methods:
                cells.append(r.decided_by.get(t, ""))
            rb = r.robust.get(t)
            cells += [int(r.best(t)), "" if rb is None else int(rb)]
        cells.append(int(all(r.best(t) for t in names)))
        lines.append(",".join(map(str, cells)))
    return "\n".join(lines) + "\n"


def markdown_table(summary: dict[str, Any], methods: Sequence[str]) -> str:
    """The summary as a Markdown table: a row per threat, a column per method, best and PGD."""
    head = ["threat", *methods, "best", "PGD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, per in summary["certified"].items():
        pgd_acc = summary["pgd_accuracy"].get(t)
        cells = [
            t,
            *(f"{per[m]:.1f}" for m in methods),
            f"{summary['certified_best'][t]:.1f}",
            "-" if pgd_acc is None else f"{pgd_acc:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    u = summary["union"]
    lines.append(
        "| **union** | "
        + " | ".join(f"{u[m]:.1f}" for m in methods)
        + f" | **{u['best']:.1f}** | - |"
    )
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: Path,
    rows: Sequence[SampleRow],
    summary: dict[str, Any],
    threats: Sequence[Threat],
    methods: Sequence[str],
) -> None:
    """Write ``samples.csv``, ``summary.json`` and ``summary.md`` atomically."""
    from .checkpoint import atomic_write_json, atomic_write_text

    atomic_write_text(out_dir / "samples.csv", csv_text(rows, threats, methods))
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", markdown_table(summary, methods))
