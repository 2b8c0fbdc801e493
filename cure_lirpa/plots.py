"""The figure of a ``verify`` run: certified accuracy per threat and bound method (PNG, Agg)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence, Union

PLOT_NAME = "certified_accuracy.png"


def plot_certified_accuracy(
    summary: dict[str, Any], methods: Sequence[str], path: Union[str, Path]
) -> Path:
    """Write a bar chart of ``summary`` (a verify summary with its accuracies in percent,
    :func:`cure_lirpa.verification.results.to_percent`) to ``path``: one group per threat and one
    for the union, one bar per bound method (percent of samples), PGD accuracy as a marker and
    clean accuracy as a dashed line. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io.checkpoint import atomic_write_bytes
    from .vocabulary import CERTIFIED, CLEAN_ACCURACY, PGD_ACCURACY, UNION

    threats = list(summary[CERTIFIED])
    groups = [*threats, UNION]
    values = {m: [summary[CERTIFIED][t][m] for t in threats] + [summary[UNION][m]] for m in methods}
    fig = Figure(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(methods)) ** 0.5 + 2), 3.8))
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot: leaves the caller's backend alone
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        xs = [g + (k - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values[m], width=width, label=m)
    pgd = [(g, summary[PGD_ACCURACY].get(t)) for g, t in enumerate(threats)]
    pgd = [(g, v) for g, v in pgd if v is not None]
    if pgd:
        ax.plot(*zip(*pgd), "k_", markersize=22, markeredgewidth=2, label="PGD (upper bound)")
    ax.axhline(summary[CLEAN_ACCURACY], color="gray", linestyle="--", linewidth=1, label="clean")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 100)
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(f"{summary.get('samples', '')} samples".strip())
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
