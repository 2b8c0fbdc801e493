"""Sequential against fixed-n randomized-smoothing certification (MNIST and CIFAR-10).

For each model this script

1. trains it if its checkpoint is absent (the MNIST models are those of smoothing_mnist.py, same
   configuration and checkpoint path, so either script reuses the other's; the CIFAR-10 model is a
   small Gaussian-noise-trained cnn-small);
2. certifies evenly spaced test images with fixed-n CERTIFY at n = 100,000 (the reference);
3. certifies the same images with the sequential test at the l2 radii 0.25 / 0.5 / 0.75 in one run
   (``mode='decide'``), at the same alpha, n0 and noise seeds, with the cap ``max_n = 100,000``;
4. writes ``rows/<model>.json`` and refreshes ``summary.json``, ``results.md`` and
   ``samples_per_image.png`` from every row in the results folder.

Both runs write resumable run folders (``tsv/<model>_.../``, each with its ``samples.tsv``), so a
killed run continues where it stopped::

    python -m benchmarks.smoothing_sequential --quick                 # minutes, built-in sample
    python -m benchmarks.smoothing_sequential --models mnist-0.25,mnist-0.50,cifar10-0.25
    python -m benchmarks.smoothing_sequential --report-only

The sequential run draws the same noise stream as the fixed-n run (seed per image and noise), so
its samples are a prefix of the reference's: the two certificates of an image differ only through
the stopping rule, which makes the comparison of certified accuracy paired.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np
import torch
from scipy.stats import norm

from benchmarks.harness import (
    RESULTS,
    data_root_option,
    environment,
    log,
    provenance,
    save_summaries,
    split_commas,
)
from cure_lirpa.data import load_dataset
from cure_lirpa.io.checkpoint import (
    atomic_write_json,
    load_checkpoint,
    model_from_checkpoint,
)
from cure_lirpa.io.runs import read_config
from cure_lirpa.smoothing.certifier import file_sha256
from cure_lirpa.smoothing.results import TSV, read_tsv
from cure_lirpa.smoothing.runner import certify_dataset
from cure_lirpa.smoothing.training import CHECKPOINT, TrainConfig, checkpoint_summary, train
from cure_lirpa.vocabulary import GAUSSIAN, L2

RADII = (0.25, 0.5, 0.75)

# name -> dataset, sigma, where the checkpoint lives (relative to benchmarks/results)
MODELS: dict[str, dict[str, Any]] = {
    "mnist-0.25": {"dataset": "mnist", "sigma": 0.25, "mnist_row": "gauss-0.25"},
    "mnist-0.50": {"dataset": "mnist", "sigma": 0.50, "mnist_row": "gauss-0.50"},
    "cifar10-0.25": {"dataset": "cifar10", "sigma": 0.25},
}
DEFAULT_MODELS = ("mnist-0.25", "mnist-0.50", "cifar10-0.25")


def settings(quick: bool) -> dict[str, Any]:
    """Sizes of a full or a quick run (the quick run uses the built-in MNIST sample)."""
    if quick:
        return {
            "images": 10,
            "skip": 100,
            "n0": 100,
            "n": 10_000,
            "max_n": 10_000,
            "alpha": 0.001,
            "batch": 1000,
            "batch_growth": 2.0,
        }
    return {
        "images": 100,
        "skip": 100,
        "n0": 100,
        "n": 100_000,
        "max_n": 100_000,
        "alpha": 0.001,
        "batch": 1000,
        "batch_growth": 2.0,
    }


def model_config(name: str, quick: bool, data_root: Optional[str]) -> tuple[TrainConfig, Path]:
    """Training configuration and run folder of model ``name``."""
    spec = MODELS[name]
    if spec["dataset"] == "mnist":
        from benchmarks.smoothing_mnist import settings as mnist_settings
        from benchmarks.smoothing_mnist import train_config

        folder = RESULTS / "smoothing" / ("mnist-quick" if quick else "mnist") / "models"
        cfg = train_config(spec["mnist_row"], mnist_settings(quick), data_root)
        return cfg, folder / spec["mnist_row"]
    if quick:
        raise click.BadParameter("the CIFAR-10 model has no --quick version", param_hint="--models")
    cfg = TrainConfig(
        dataset="cifar10",
        data_root=data_root,
        arch="cnn-small",
        method=GAUSSIAN,
        sigma=spec["sigma"],
        epochs=3,
        train_count=20_000,
        batch_size=256,
        lr=1e-3,
        seed=0,
        eval_count=1000,
    )
    return cfg, RESULTS / "smoothing_sequential" / "models" / name


def prepare_model(name: str, quick: bool, data_root: Optional[str], device: torch.device):
    """Train model ``name`` if needed; returns ``(model, config, checkpoint path, sha256, info)``."""
    config, folder = model_config(name, quick, data_root)
    resume = read_config(folder) is not None
    train(config, folder, resume=resume, device=device, log=lambda s: log(f"[{name}] {s}"))
    path = folder / CHECKPOINT
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(device).eval()
    info = {"checkpoint": str(path.relative_to(RESULTS)), **checkpoint_summary(ckpt)}
    return model, config, path, file_sha256(path), info


def run_stage(
    stage: str,
    name: str,
    out: Path,
    cfg: dict[str, Any],
    quick: bool,
    data_root: Optional[str],
    device: torch.device,
) -> Path:
    """Certify the model's evenly spaced test images with fixed-n CERTIFY (``stage='fixed'``, the
    reference) or sequentially (``'sequential'``: ``decide`` at :data:`RADII`); returns the TSV."""
    model, config, _, sha, info = prepare_model(name, quick, data_root, device)
    test = load_dataset(config.dataset, "test", config.data_root)
    if stage == "fixed":
        run_dir = out / "tsv" / f"{name}_fixed_n{cfg['n']}"
        what = f"fixed-n CERTIFY, n = {cfg['n']}, {cfg['images']} images"
        own: dict[str, Any] = {"n": cfg["n"]}
    else:
        run_dir = out / "tsv" / f"{name}_sequential_max{cfg['max_n']}"
        what = f"sequential, radii {RADII}, max_n = {cfg['max_n']}"
        own = {"sequential": "decide", "radii": RADII, "norm_name": L2, "max_n": cfg["max_n"]}
    log(f"[{name}] {what} -> {run_dir}")
    certify_dataset(
        model,
        10,
        test,
        run_dir,
        mode=GAUSSIAN,
        sigma_gaussian=MODELS[name]["sigma"],
        n0=cfg["n0"],
        alpha=cfg["alpha"],
        batch_size=cfg["batch"],
        seed=0,
        start=0,
        count=cfg["images"],
        skip=cfg["skip"],
        device=device,
        resume=read_config(run_dir) is not None,
        run_extra={"checkpoint_sha256": sha, "dataset": config.dataset, "split": "test"},
        info=info,
        **own,
    )
    return run_dir / TSV


def measure_overhead(
    name: str,
    out: Path,
    cfg: dict[str, Any],
    quick: bool,
    data_root: Optional[str],
    images: int = 5,
) -> dict[str, Any]:
    """CPU seconds of the sequential run against fixed-n CERTIFY at the same n on the same images
    (interleaved, ``time.process_time``): the cost of the sequential bookkeeping per sample, free
    of the machine's load. Cached in ``overhead/<model>.json``."""
    from cure_lirpa.smoothing import GaussianNoise, Smooth
    from cure_lirpa.smoothing.sequential import certify_sequential

    path = out / "overhead" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    device = torch.device("cpu")
    model, config, _, _, _ = prepare_model(name, quick, data_root, device)
    test = load_dataset(config.dataset, "test", config.data_root)
    smooth = Smooth(model, 10, GaussianNoise(MODELS[name]["sigma"]), device)
    seq_s, fixed_s, samples = [], [], []
    for k in range(images):
        x, _ = test[k * cfg["skip"]]
        smooth.manual_seed(k)
        t0 = time.process_time()
        c = certify_sequential(
            smooth, x, RADII, cfg["n0"], cfg["alpha"], cfg["max_n"], cfg["batch"]
        )
        t1 = time.process_time()
        smooth.certify(x, cfg["n0"], c.n, cfg["alpha"], cfg["batch"])
        seq_s.append(t1 - t0)
        fixed_s.append(time.process_time() - t1)
        samples.append(c.samples)
    res = {
        "images": images,
        "samples": samples,
        "sequential_cpu_seconds": seq_s,
        "fixed_same_n_cpu_seconds": fixed_s,
        "overhead": float(sum(seq_s) / sum(fixed_s) - 1.0),
    }
    atomic_write_json(path, res)
    return res


def _table(rows: list[dict[str, str]]) -> dict[str, np.ndarray]:
    out = {
        "idx": np.array([int(r["idx"]) for r in rows]),
        "correct": np.array([int(r["correct"]) for r in rows], dtype=bool),
        "radius": np.array([float(r["radius_l2"]) for r in rows]),
        "time": np.array([float(r["time"]) for r in rows]),
    }
    if rows and "samples" in rows[0]:
        out["samples"] = np.array([int(r["samples"]) for r in rows])
        out["drawn"] = np.array([int(r["drawn"]) for r in rows])
        out["stop"] = np.array([r["gaussian_stop"] for r in rows])
    return out


def radius_level(correct: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Per image, how many of the radii 0, 0.25, 0.5, 0.75 its certificate reaches (0: abstained
    or wrong): fixed-n radii and sequential decisions on one scale."""
    return sum((correct & (radius >= r)).astype(int) for r in (0.0, *RADII))


def ratio_interval(fixed_samples: int, samples: np.ndarray, draws: int = 10_000) -> list[float]:
    """95% percentile-bootstrap interval (over images, seed 0) of fixed samples per image over
    the sequential run's mean samples per image."""
    rng = np.random.default_rng(0)
    means = samples[rng.integers(0, samples.size, (draws, samples.size))].mean(axis=1)
    lo, hi = np.percentile(fixed_samples / means, [2.5, 97.5])
    return [float(lo), float(hi)]


def compare(name: str, fixed_tsv: Path, seq_tsv: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Certified accuracy compared on the images both runs have finished (paired); samples and
    time of the sequential run over all its images."""
    fh, _, frows = read_tsv(fixed_tsv)
    sh, _, srows = read_tsv(seq_tsv)
    f, q = _table(frows), _table(srows)
    q_all = dict(q)
    common = np.intersect1d(f["idx"], q["idx"])
    fi, qi = np.isin(f["idx"], common), np.isin(q["idx"], common)
    f = {k: v[fi] for k, v in f.items()}
    q = {k: v[qi] for k, v in q.items()}
    fixed_samples = fh["run"]["n0"] + fh["run"]["n"]
    acc: dict[str, Any] = {}
    for r in (0.0, *RADII):
        a = f["correct"] & (f["radius"] >= r)
        b = q["correct"] & (q["radius"] >= r)
        acc[f"{r:g}"] = {
            "fixed": 100.0 * float(a.mean()),
            "sequential": 100.0 * float(b.mean()),
            "difference_points": 100.0 * float(b.mean() - a.mean()),
            "only_fixed": int((a & ~b).sum()),
            "only_sequential": int((b & ~a).sum()),
        }
    samples = q_all["samples"]
    level_f, level_q = (
        radius_level(f["correct"], f["radius"]),
        radius_level(q["correct"], q["radius"]),
    )
    order_f, order_q = np.argsort(f["idx"]), np.argsort(q["idx"])  # pair the images by index
    differ = level_f[order_f] != level_q[order_q]
    disagreements = [
        {"index": int(i), "fixed_radius": float(rf), "sequential_radius": float(rq)}
        for i, rf, rq in zip(
            f["idx"][order_f][differ],
            np.where(f["correct"], f["radius"], -1.0)[order_f][differ],
            np.where(q["correct"], q["radius"], -1.0)[order_q][differ],
        )
    ]
    sigma = MODELS[name]["sigma"]
    # fewest samples any test at this alpha needs for an image with pA = 1 at the largest radius
    # (the fixed-n bound alpha ** (1/n) reaching Phi(r / sigma)), plus n0
    floor = sh["run"]["n0"] + math.log(sh["run"]["alpha"]) / math.log(norm.cdf(max(RADII) / sigma))
    return {
        "model": name,
        "sigma": sigma,
        "dataset": MODELS[name]["dataset"],
        "images": int(common.size),
        "sequential_images": int(samples.size),
        "sequential_certified_accuracy": {
            f"{r:g}": 100.0 * float((q_all["correct"] & (q_all["radius"] >= r)).mean())
            for r in (0.0, *RADII)
        },
        "best_case_samples": float(floor),
        "best_case_ratio": float((fh["run"]["n0"] + fh["run"]["n"]) / floor),
        "train": {k: v for k, v in fh.get("info", {}).items() if k.startswith("train_")},
        "certified_accuracy": acc,
        "radius_agreement": float(1.0 - differ.mean()) if differ.size else None,
        "disagreements": disagreements,
        "fixed_samples_per_image": fixed_samples,
        "sequential_samples": {
            "mean": float(samples.mean()),
            "median": float(np.median(samples)),
            "p10": float(np.percentile(samples, 10)),
            "p25": float(np.percentile(samples, 25)),
            "p75": float(np.percentile(samples, 75)),
            "p90": float(np.percentile(samples, 90)),
            "max": int(samples.max()),
            "mean_drawn": float(q_all["drawn"].mean()),
            "at_cap": int((q_all["stop"] == "cap").sum()),
            "per_image": samples.tolist(),
        },
        "samples_ratio": fixed_samples / float(samples.mean()),
        "samples_ratio_interval": ratio_interval(fixed_samples, samples),
        "seconds_per_image": {
            "fixed": float(f["time"].mean()),
            "sequential": float(q_all["time"].mean()),
        },
        "time_ratio": float(f["time"].mean() / max(q_all["time"].mean(), 1e-9)),
        "alpha": sh["run"]["alpha"],
        "n0": sh["run"]["n0"],
        "max_n": sh["run"]["max_n"],
        "fixed_tsv": str(fixed_tsv.relative_to(RESULTS)),
        "sequential_tsv": str(seq_tsv.relative_to(RESULTS)),
    }


def plot_samples(rows: list[dict[str, Any]], path: Path) -> None:
    """Histogram (log x) of samples per image of the sequential runs, fixed n marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(rows), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    for ax, r in zip(axes, rows):
        s = np.asarray(r["sequential_samples"]["per_image"])
        bins = np.geomspace(max(10, s.min() * 0.8), r["fixed_samples_per_image"] * 1.2, 30)
        ax.hist(s, bins=bins, color="tab:blue", alpha=0.8, label="sequential")
        ax.axvline(r["fixed_samples_per_image"], color="tab:red", label="fixed n")
        ax.axvline(s.mean(), color="k", linestyle="--", label=f"mean {s.mean():.0f}")
        ax.set_xscale("log")
        ax.set_xlabel("noise samples per image (n0 + n)")
        ax.set_ylabel("images")
        ax.set_title(f"{r['model']} (sigma {r['sigma']}), {s.size} images", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


QUANTILES = ("p10", "p25", "median", "p75", "p90")


def _agreement(r: dict[str, Any]) -> str:
    a = r.get("radius_agreement")
    return "-" if a is None else f"{100 * a:.0f}%"


def _interval(r: dict[str, Any]) -> str:
    lo, hi = r.get("samples_ratio_interval") or (float("nan"), float("nan"))
    return f"[{lo:.1f}, {hi:.1f}]"


def _disagreements(r: dict[str, Any]) -> str:
    d = r.get("disagreements") or []
    if not d:
        return "none"
    return ", ".join(
        f"{x['index']}: {x['fixed_radius']:.3f} / {x['sequential_radius']:.2f}" for x in d
    )


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table (copied into docs/results.md)."""
    lines = [
        "# Sequential against fixed-n smoothing certification "
        "(written by benchmarks/smoothing_sequential.py)",
        "",
        f"Command: `{meta['command']}` ({meta['generated']}). Gaussian smoothing, l2 radii "
        f"{', '.join(f'{r:g}' for r in RADII)} decided in one sequential run per image; "
        f"alpha {rows[0]['alpha']}, n0 {rows[0]['n0']}, cap max_n {rows[0]['max_n']:,}; "
        f"fixed-n CERTIFY at n = {rows[0]['fixed_samples_per_image'] - rows[0]['n0']:,}. "
        "Both runs use the same noise seeds (the same n0 selection draws), evenly spaced test "
        "images; the number of images per model is what the shared 2-core CPU finished.",
        "",
        "| model | images: paired / sequential | certified accuracy % at l2 0 / 0.25 / 0.5 / 0.75 "
        "(paired): fixed n | sequential | difference (points) | sequential, all its images | "
        "radii agree | samples per image: fixed | sequential mean (p10 / p25 / median / p75 / "
        "p90) | fewer samples [95% interval] | best case (pA = 1) | s per image: fixed | "
        "sequential |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = ["0", *(f"{r:g}" for r in RADII)]
    for r in rows:
        a = r["certified_accuracy"]
        s = r["sequential_samples"]
        t = r["seconds_per_image"]
        lines.append(
            f"| {r['model']} (sigma {r['sigma']}) | {r['images']} / {r['sequential_images']} | "
            + " / ".join(f"{a[k]['fixed']:.1f}" for k in keys)
            + " | "
            + " / ".join(f"{a[k]['sequential']:.1f}" for k in keys)
            + " | "
            + " / ".join(f"{a[k]['difference_points']:+.1f}" for k in keys)
            + " | "
            + " / ".join(f"{r['sequential_certified_accuracy'][k]:.1f}" for k in keys)
            + f" | {_agreement(r)} | {r['fixed_samples_per_image']:,} | {s['mean']:,.0f} ("
            + " / ".join(f"{s.get(k, float('nan')):,.0f}" for k in QUANTILES)
            + f") | {r['samples_ratio']:.1f}x {_interval(r)} | {r['best_case_samples']:,.0f} = "
            f"{r['best_case_ratio']:.1f}x | {t['fixed']:.1f} | {t['sequential']:.2f} |"
        )
    lines += [
        "",
        "Samples per image count the n0 selection draws. Best case: the fewest samples any test "
        "at this alpha needs for an image whose top class never misses, at the largest radius "
        "(n0 + ln(1/alpha) / ln(1/Phi(0.75/sigma)), the point where even fixed-n CERTIFY's bound "
        "alpha^(1/n) reaches the threshold), and the largest ratio it allows. Sequential images "
        "stopped at the cap: "
        + ", ".join(f"{r['model']} {r['sequential_samples']['at_cap']}" for r in rows)
        + ". Images certified by only one of the two runs at some radius: "
        + ", ".join(
            f"{r['model']} "
            + "/".join(
                f"{v['only_fixed']}+{v['only_sequential']}"
                for v in r["certified_accuracy"].values()
            )
            for r in rows
        )
        + " (fixed-only + sequential-only, at radius 0 / 0.25 / 0.5 / 0.75). Radii agree: share "
        "of the paired images whose certificates reach the same of the radii 0 / 0.25 / 0.5 / "
        "0.75 (abstentions and wrong predictions count as radius -1); the images where they "
        "differ (test index: fixed radius / sequential radius): "
        + "; ".join(f"{r['model']} {_disagreements(r)}" for r in rows)
        + ". Fewer samples: fixed samples per image over the sequential mean, with a 95% "
        "percentile-bootstrap interval over images. Wall time is per "
        "image on the shared, heavily loaded CPU (1 thread; the two runs ran at different times, "
        "so their ratio is noisy). Load-free cost of the sequential bookkeeping: CPU time of the "
        "sequential run over CERTIFY at the same number of samples, interleaved on the first "
        "images: "
        + ", ".join(
            f"{r['model']} {100 * r['cpu_overhead']['overhead']:+.1f}% "
            f"({r['cpu_overhead']['images']} images)"
            for r in rows
            if "cpu_overhead" in r
        )
        + " (largest where only a few hundred samples are drawn: small batches, fixed costs); "
        "CPU time per image falls by the samples ratio divided by (1 + overhead). Distribution: "
        "samples_per_image.png.",
        "",
    ]
    return "\n".join(lines)


def report(
    out: Path,
    names: list[str],
    cfg: dict[str, Any],
    report_only: bool,
    quick: bool = False,
    data_root: Optional[str] = None,
) -> Optional[str]:
    """Compare every model whose two TSVs exist; write summary.json, results.md and the PNG."""
    rows = []
    for name in names:
        fixed = out / "tsv" / f"{name}_fixed_n{cfg['n']}" / TSV
        seq = out / "tsv" / f"{name}_sequential_max{cfg['max_n']}" / TSV
        if fixed.is_file() and seq.is_file():
            row = compare(name, fixed, seq, cfg)
            row["cpu_overhead"] = measure_overhead(name, out, cfg, quick, data_root)
            rows.append(row)
    rows = [r for r in rows if r["images"] > 0]
    if not rows:
        return None
    meta = provenance(out / "summary.json", report_only)
    text = markdown(rows, meta)
    plot_samples(rows, out / "samples_per_image.png")
    env = environment(load_average=[round(v, 2) for v in os.getloadavg()])
    summary = {**meta, "models": rows, "environment": env}
    save_summaries(out, {"summary.json": summary, "results.md": text})
    return text


@click.command()
@click.option("--quick", is_flag=True, help="Built-in MNIST sample, 10 images, n = 10,000.")
@click.option(
    "--models",
    default=",".join(DEFAULT_MODELS),
    show_default=True,
    help=f"Comma-separated models, from: {', '.join(MODELS)}.",
)
@data_root_option(help="Folder holding MNIST/raw and cifar10-jpeg.tar.gz.")
@click.option("--images", type=click.IntRange(min=1), default=None, help="Images per model.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--stage",
    type=click.Choice(["all", "fixed", "sequential"]),
    default="all",
    show_default=True,
    help="fixed / sequential: only that run (e.g. in two shells); all: both, then the report.",
)
@click.option("--report-only", is_flag=True, help="Only rebuild the report from the TSVs.")
def main(
    quick: bool,
    models: str,
    data_root: str,
    images: Optional[int],
    threads: int,
    stage: str,
    report_only: bool,
) -> None:
    """Sequential against fixed-n smoothing certification; JSON + Markdown + PNG results."""
    torch.set_num_threads(threads)
    cfg = settings(quick)
    if images is not None:
        cfg["images"] = images
    out = RESULTS / ("smoothing_sequential-quick" if quick else "smoothing_sequential")
    names = split_commas(models)
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise click.BadParameter(f"unknown models {unknown}", param_hint="--models")
    if quick:
        names = [m for m in names if MODELS[m]["dataset"] == "mnist"]
    device = torch.device("cpu")
    if not report_only:
        log(f"results in {out}; load average {os.getloadavg()}")
        for name in names:
            for one in ("fixed", "sequential"):
                if stage in ("all", one):
                    run_stage(one, name, out, cfg, quick, data_root, device)
    text = report(out, names, cfg, report_only, quick, data_root)
    click.echo(text or "no model has both runs yet")


if __name__ == "__main__":
    main()
