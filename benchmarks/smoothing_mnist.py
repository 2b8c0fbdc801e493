"""Randomized smoothing on MNIST: Gaussian-only vs the NU paper's hybrid certificate.

For each row (a trained model), this script

1. trains a small CNN (cnn-small) on MNIST with its noise (Gaussian, or Normal-Uniform + the
   similarity regulariser R_S) into ``models/<row>/``, resuming a half-finished run;
2. certifies evenly spaced test images with n = 10,000 twice: Gaussian only (at alpha) and hybrid
   (Gaussian + Uniform, each at alpha / 2, combined by Table 1) into the run folders
   ``tsv/<row>_<mode>_n<n>/`` (resuming half-finished ones);
3. repeats both on fewer images with n = 100,000 (a check of how much n matters);
4. writes ``rows/<row>.json`` and refreshes ``summary.json``, ``summary.md`` and
   ``certified_accuracy.png`` from every row present in the results folder.

Rows can be run separately (even from different shells) into the same folder::

    python -m benchmarks.smoothing_mnist --quick                   # minutes, built-in sample
    python -m benchmarks.smoothing_mnist --rows gauss-0.25
    python -m benchmarks.smoothing_mnist --rows gauss-0.50,nu-rs-0.50
    python -m benchmarks.smoothing_mnist --report-only
    python -m benchmarks.smoothing_mnist --rows gauss-0.50 --no-joint-alpha --images 250
        # the NU code's procedure: each certificate at alpha, the pair only 1 - 2 alpha
        # (into benchmarks/results/smoothing/mnist-no-joint-alpha)

Full mode: 500 test images (every 20th), n0 = 100, n = 10,000, alpha = 0.001; check with
n = 100,000 on 20 images (every 500th). Each hybrid uses a Uniform sigma of 1.16 x the Gaussian
sigma (the ratio of the NU paper's Table 8, first block); ``--uniform-ratio`` changes it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import click
import torch

from benchmarks.harness import RESULTS, data_root_option, environment, save_summaries, split_commas
from cure_lirpa.cli.common import DEVICE_CHOICE
from cure_lirpa.data import load_dataset
from cure_lirpa.io.checkpoint import (
    atomic_write_json,
    load_checkpoint,
    model_from_checkpoint,
)
from cure_lirpa.io.runs import read_config
from cure_lirpa.smoothing.analysis import load_run, plot_certified_accuracy
from cure_lirpa.smoothing.certifier import file_sha256
from cure_lirpa.smoothing.metrics import compare_at_clean_accuracy, markdown_report, summarize
from cure_lirpa.smoothing.results import TSV
from cure_lirpa.smoothing.runner import certify_dataset
from cure_lirpa.smoothing.training import CHECKPOINT, TrainConfig, checkpoint_summary, train
from cure_lirpa.vocabulary import AUTO_DEVICE, GAUSSIAN, HYBRID, NU_RS

# name -> (training method, sigma (sigma_n for nu-rs), sigma_u, beta, certification Gaussian sigma)
ROWS: dict[str, dict[str, Any]] = {
    "gauss-0.25": {"method": GAUSSIAN, "sigma": 0.25, "cert_sigma": 0.25},
    "gauss-0.50": {"method": GAUSSIAN, "sigma": 0.50, "cert_sigma": 0.50},
    "nu-rs-0.50": {
        "method": NU_RS,
        "sigma": 0.50,
        "sigma_u": 0.433,
        "beta": 3.0,
        "cert_sigma": 0.50,
    },
    "nu-rs-0.25": {
        "method": NU_RS,
        "sigma": 0.25,
        "sigma_u": 0.2165,
        "beta": 3.0,
        "cert_sigma": 0.25,
    },
}
DEFAULT_ROWS = ("gauss-0.25", "gauss-0.50", "nu-rs-0.50")
RADII = (0.25, 0.5, 0.75, 1.0)


def settings(quick: bool) -> dict[str, Any]:
    """Sizes of a full or a quick run."""
    if quick:
        return {
            "dataset": "sample",
            "epochs": 3,
            "test_size": 1000,
            "images": 20,
            "n0": 100,
            "n": 1000,
            "check_images": 4,
            "check_n": 10_000,
            "alpha": 0.001,
            "batch": 1000,
        }
    return {
        "dataset": "mnist",
        "epochs": 4,
        "test_size": 10_000,
        "images": 500,
        "n0": 100,
        "n": 10_000,
        "check_images": 20,
        "check_n": 100_000,
        "alpha": 0.001,
        "batch": 1000,
    }


def train_config(
    name: str, cfg: dict[str, Any], data_root: Optional[str], epochs: Optional[int] = None
) -> TrainConfig:
    """The training configuration of row ``name`` (also used by smoothing_sequential.py, which
    certifies the same models)."""
    row = ROWS[name]
    return TrainConfig(
        dataset=cfg["dataset"],
        data_root=None if cfg["dataset"] == "sample" else data_root,
        arch="cnn-small",
        method=row["method"],
        sigma=row["sigma"],
        sigma_u=row.get("sigma_u"),
        beta=row.get("beta", 3.0),
        epochs=epochs or cfg["epochs"],
        batch_size=256,
        lr=1e-3,
        seed=0,
        eval_count=1000,
    )


def run_row(
    name: str,
    out: Path,
    cfg: dict[str, Any],
    data_root: Optional[str],
    device: torch.device,
    uniform_ratio: float,
    epochs: Optional[int],
    joint_alpha: bool = True,
) -> dict[str, Any]:
    """Train (or resume) the row's model, certify it, write ``rows/<name>.json``."""
    row = ROWS[name]
    config = train_config(name, cfg, data_root, epochs)
    folder = out / "models" / name
    ckpt_path = folder / CHECKPOINT
    t0 = time.perf_counter()
    train(
        config,
        folder,
        resume=read_config(folder) is not None,
        device=device,
        log=lambda s: click.echo(f"[{name}] {s}"),
    )
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt).to(device).eval()
    test = load_dataset(config.dataset, "test", config.data_root)
    sha = file_sha256(ckpt_path)
    info = {"checkpoint": str(ckpt_path.relative_to(out)), **checkpoint_summary(ckpt)}
    sg = row["cert_sigma"]
    su = round(uniform_ratio * sg, 4)
    certs: dict[str, Any] = {}
    for label, n, images in (
        ("main", cfg["n"], cfg["images"]),
        ("check", cfg["check_n"], cfg["check_images"]),
    ):
        skip = cfg["test_size"] // images
        for mode in (GAUSSIAN, HYBRID):
            run_dir = out / "tsv" / f"{name}_{mode}_n{n}"
            t1 = time.perf_counter()
            certify_dataset(
                model,
                10,
                test,
                run_dir,
                mode=mode,
                sigma_gaussian=sg,
                sigma_uniform=su if mode == HYBRID else None,
                n0=cfg["n0"],
                n=n,
                alpha=cfg["alpha"],
                batch_size=cfg["batch"],
                joint_alpha=joint_alpha,
                seed=0,
                start=0,
                count=images,
                skip=skip,
                device=device,
                resume=read_config(run_dir) is not None,
                run_extra={"checkpoint_sha256": sha, "dataset": config.dataset, "split": "test"},
                info=info,
            )
            run = load_run(run_dir, method=f"{row['method']} -> {mode}")
            summary = summarize(run, RADII)
            summary["name"] = f"{name} {mode} n={n}"
            summary["wall_seconds_this_call"] = round(time.perf_counter() - t1, 1)
            summary["tsv"] = str((run_dir / TSV).relative_to(out))
            certs[f"{label}_{mode}"] = summary
            click.echo(
                f"[{name}] {mode} n={n}: clean {summary['clean_accuracy']:.3f}, "
                f"ACR l2 {summary['acr']['l2']:.3f}, l1 {summary['acr']['l1']:.3f}"
            )
    history = ckpt["trainer_state"].get("history", [])
    result = {
        "row": name,
        "training": config.to_dict(),
        "training_seconds": round(sum(h.get("seconds", 0.0) for h in history), 1),
        "training_history": history,
        "certification": {
            "sigma_gaussian": sg,
            "sigma_uniform": su,
            "joint_alpha": joint_alpha,
            **{k: v for k, v in cfg.items()},
        },
        "results": certs,
        "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
        "environment": environment(device=device.type),
    }
    atomic_write_json(out / "rows" / f"{name}.json", result)
    return result


def report(out: Path, levels: Sequence[float] = (0.9, 0.92, 0.94, 0.96, 0.98)) -> Optional[str]:
    """Aggregate every ``rows/*.json`` of ``out`` into summary.json / .md / certified_accuracy.png."""
    import json

    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]
    if not rows:
        return None
    main = [r["results"][k] for r in rows for k in ("main_gaussian", "main_hybrid")]
    check = [r["results"][k] for r in rows for k in ("check_gaussian", "check_hybrid")]
    comparison = compare_at_clean_accuracy(main, levels)
    md = ["# Randomized smoothing on MNIST (written by benchmarks/smoothing_mnist.py)", ""]
    md.append(
        "Rows: "
        + ", ".join(
            f"`{r['row']}` ({r['training']['method']}, sigma {r['training']['sigma']}"
            + (
                f", sigma_u {r['training']['sigma_u']}, beta {r['training']['beta']}"
                if r["training"]["sigma_u"]
                else ""
            )
            + f", {r['training']['epochs']} epochs, {r['training_seconds']} s training; certified with Gaussian "
            f"{r['certification']['sigma_gaussian']}, hybrid adds Uniform {r['certification']['sigma_uniform']})"
            for r in rows
        )
    )
    joint = rows[0]["certification"].get("joint_alpha", True)
    md += [
        "",
        "Hybrid: each certificate at alpha/2 (joint guarantee 1 - alpha)."
        if joint
        else "Hybrid: each certificate at alpha, as the public NU code does (the pair holds only "
        "with probability 1 - 2 alpha).",
        "Clean = certified accuracy at radius 0.",
        "",
    ]
    md += [f"# Main: n = {rows[0]['certification']['n']}", "", markdown_report(main, comparison)]
    md += [
        f"# Check: n = {rows[0]['certification']['check_n']} on fewer images",
        "",
        markdown_report(check),
    ]
    runs = [load_run(out / s["tsv"], method=s["method"]) for s in main]
    for run, s in zip(runs, main):
        run.name = s["name"]
    plot_certified_accuracy(runs, out / "certified_accuracy.png")
    text = "\n".join(md)
    summary = {"rows": rows, "fixed_clean_accuracy": comparison}
    save_summaries(out, {"summary.json": summary, "summary.md": text})
    return text


@click.command()
@click.option(
    "--quick", is_flag=True, help="Built-in sample, 1 epoch, 20 images, n = 1,000 (minutes)."
)
@click.option(
    "--rows",
    default=",".join(DEFAULT_ROWS),
    show_default=True,
    help=f"Comma-separated rows to run, from: {', '.join(ROWS)}.",
)
@data_root_option()
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="[default: benchmarks/results/smoothing/mnist or mnist-quick]",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=None, help="Override the training epochs."
)
@click.option(
    "--uniform-ratio",
    type=click.FloatRange(min=0, min_open=True),
    default=1.16,
    show_default=True,
    help="Uniform sigma of the hybrid = ratio x Gaussian sigma.",
)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--images",
    type=click.IntRange(min=1),
    default=None,
    help="Evenly spaced test images certified with n = 10,000 [default: 500; 20 with --quick].",
)
@click.option("--device", type=DEVICE_CHOICE, default=AUTO_DEVICE, show_default=True)
@click.option(
    "--clean-acc",
    default="90,92,94,96,98",
    show_default=True,
    help="Clean-accuracy levels (percent) for the ACR comparison at fixed clean accuracy.",
)
@click.option(
    "--joint-alpha/--no-joint-alpha",
    default=True,
    show_default=True,
    help="Hybrid at alpha/2 per certificate (joint 1 - alpha), or at alpha each as the NU code "
    "(1 - 2 alpha; default folder mnist-no-joint-alpha).",
)
@click.option("--report-only", is_flag=True, help="Only rebuild the summary from rows already run.")
def main(
    quick,
    rows,
    data_root,
    out_dir,
    epochs,
    uniform_ratio,
    threads,
    images,
    device,
    clean_acc,
    joint_alpha,
    report_only,
):
    """Train and certify smoothed MNIST classifiers; write JSON + Markdown + PNG results."""
    from cure_lirpa.cli.common import resolve_device

    torch.set_num_threads(threads)
    out = (
        Path(out_dir)
        if out_dir
        else RESULTS
        / "smoothing"
        / (("mnist-quick" if quick else "mnist") + ("" if joint_alpha else "-no-joint-alpha"))
    )
    cfg = settings(quick)
    if images is not None:
        cfg["images"] = images
    if not report_only:
        names = split_commas(rows)
        unknown = [r for r in names if r not in ROWS]
        if unknown:
            raise click.BadParameter(
                f"unknown rows {unknown}; choose from {', '.join(ROWS)}", param_hint="--rows"
            )
        dev = resolve_device(device)
        click.echo(f"results in {out}; load average {os.getloadavg()}")
        for name in names:
            run_row(name, out, cfg, data_root, dev, uniform_ratio, epochs, joint_alpha)
    try:
        levels = [float(v) / 100.0 for v in clean_acc.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{clean_acc!r} is not a list of percents", param_hint="--clean-acc"
        ) from None
    text = report(out, levels)
    click.echo(text or "no rows yet")


if __name__ == "__main__":
    main()
