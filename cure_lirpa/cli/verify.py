"""``cure-lirpa verify``: certify a checkpoint under several threats and bound methods."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import click

from ..errors import UserError
from .common import DEVICE_CHOICE, ThreatType, resolve_device

DEFAULT_THREATS = {
    "mnist": ("linf:0.1", "l2:0.5"),
    "sample": ("linf:0.1", "l2:0.5"),
    "cifar10": ("linf:2/255", "l2:0.25"),
    "tinyimagenet": ("linf:1/255", "l2:36/255"),
}
"""Threats of checkpoints that do not record their own (no ``eps_linf``/``eps_l2`` in the config)."""


def default_threats(ckpt: dict, dataset: str) -> tuple[str, ...]:
    """The l∞ and l2 radii the checkpoint was trained for (``cure-lirpa train`` records them), else
    the usual pair of ``dataset``."""
    config = ckpt.get("config") or {}
    eps_linf, eps_l2 = config.get("eps_linf"), config.get("eps_l2")
    if isinstance(eps_linf, (int, float)) and isinstance(eps_l2, (int, float)):
        if eps_linf > 0 and eps_l2 > 0:
            return (f"linf:{eps_linf!r}", f"l2:{eps_l2!r}")
    return DEFAULT_THREATS.get(dataset, ("linf:0.1", "l2:0.5"))


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--threat",
    "threats",
    multiple=True,
    type=ThreatType(),
    help="Threat model, repeatable: linf:EPS, l2:EPS, l1:EPS (pixel units, 8/255 allowed), "
    "patch:K, rotate:DEG, ... Default: the l∞ and l2 radii the checkpoint was trained for, "
    "else the dataset's pair (MNIST linf:0.1 l2:0.5, CIFAR-10 linf:2/255 l2:0.25).",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(["ibp", "crown-ibp", "crown", "alpha-crown", "sdp-crown", "auto"]),
    default=("ibp", "crown-ibp"),
    help="Bound method, repeatable, e.g. --method crown --method sdp-crown. 'auto' is the "
    "cheapest-first cascade (sdp-crown before alpha-crown under l2). sdp-crown is for l2 balls; "
    "under l1 it keeps the better of CROWN and its l2 bound, under l∞ and box threats it returns "
    "the CROWN bound.",
)
@click.option(
    "--dataset",
    default=None,
    type=click.Choice(["sample", "mnist", "cifar10", "tinyimagenet"]),
    help="Dataset to certify on. Default: the checkpoint's.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=True, path_type=Path),
    default=None,
    help="Folder (or archive) holding the dataset; default $CURE_LIRPA_DATA or ./data.",
)
@click.option("--split", type=click.Choice(["test", "train"]), default="test")
@click.option("--start", type=click.IntRange(min=0), default=0, help="First sample (sharding).")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Number of samples (default: all from --start).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option(
    "--memory-mb",
    type=click.FloatRange(min=64),
    default=4096.0,
    help="Memory budget of one bound computation; CROWN batches are split to fit.",
)
@click.option(
    "--attack/--no-attack",
    default=True,
    help="Run PGD per lp threat (empirical accuracy and a soundness cross-check).",
)
@click.option("--attack-steps", type=click.IntRange(min=1), default=50)
@click.option("--attack-restarts", type=click.IntRange(min=1), default=2)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder. Default: <checkpoint folder>/verify-<hash of the options>.",
)
@click.option("--resume", is_flag=True, help="Continue a killed run from its partial file.")
@click.option("--overwrite", is_flag=True, help="Replace results already in --out.")
@click.option("--device", type=DEVICE_CHOICE, default="auto")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(
    checkpoint: Path,
    threats,
    methods,
    dataset: Optional[str],
    data_root,
    split,
    start,
    count,
    batch_size,
    memory_mb,
    attack,
    attack_steps,
    attack_restarts,
    out,
    resume,
    overwrite,
    device,
    quiet,
) -> None:
    """Certify CHECKPOINT under every --threat with every --method.

    Prints clean accuracy, certified accuracy per threat and method, best-of-methods and union
    accuracy, and PGD accuracy; writes samples.csv (one row per sample), summary.json and
    summary.md to --out.

    \b
    Examples:
      cure-lirpa verify runs/demo/checkpoint.pt
      cure-lirpa verify model.pt --threat linf:0.1 --threat l2:0.5 --method ibp --method crown
      cure-lirpa verify model.pt --method auto --start 0 --count 1000 --out results/shard0
    """
    from ..certification import (
        certify_dataset,
        markdown_table,
        row_from_json,
        row_to_json,
        write_results,
    )
    from ..checkpoint import (
        atomic_write_json,
        dataset_info_of,
        load_checkpoint,
        model_from_checkpoint,
    )
    from ..data import load_dataset, take
    from ..threats import parse_threat

    ckpt = load_checkpoint(checkpoint)
    info = dataset_info_of(ckpt)
    dataset = dataset or info.name
    if not threats:
        threats = tuple(parse_threat(t) for t in default_threats(ckpt, dataset))
    threats = tuple(dict.fromkeys(threats))
    methods = tuple(dict.fromkeys(methods))
    dev = resolve_device(device)
    data = take(
        load_dataset(dataset, split, root=str(data_root) if data_root else None), start, count
    )
    config = {
        "checkpoint": str(checkpoint.resolve()),
        "threats": [t.name for t in threats],
        "methods": list(methods),
        "dataset": dataset,
        "split": split,
        "start": start,
        "count": len(data),
        "attack": attack,
        "attack_steps": attack_steps,
        "attack_restarts": attack_restarts,
    }
    if out is None:
        digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        out = checkpoint.parent / f"verify-{digest}"
    partial = out / "samples.partial.jsonl"
    done = []
    if overwrite:
        for name in ("summary.json", "summary.md", "samples.csv", partial.name, "config.json"):
            (out / name).unlink(missing_ok=True)
    if (out / "summary.json").exists() and not resume:
        raise UserError(f"{out} already holds results; pass --overwrite or another --out")
    if partial.exists():
        if not resume:
            raise UserError(f"{partial} exists from a killed run; pass --resume to continue it")
        saved = json.loads((out / "config.json").read_text())
        if saved != config:
            diff = sorted(k for k in config if saved.get(k) != config[k])
            raise UserError(f"--resume: {out} was made with different options ({', '.join(diff)})")
        lines = partial.read_text().splitlines()
        done = [row_from_json(line) for line in lines if line.strip().endswith("}")]
    model = model_from_checkpoint(ckpt)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config)
    written = len(done)
    try:
        with open(partial, "w") as f:
            f.write("".join(row_to_json(r) + "\n" for r in done))  # drops a line cut by a kill

            def append(rows) -> None:
                nonlocal written
                f.write("".join(row_to_json(r) + "\n" for r in rows))
                f.flush()
                written += len(rows)

            rows, summary = certify_dataset(
                model,
                data,
                threats,
                methods,
                info.in_shape,
                device=dev,
                batch_size=batch_size,
                memory_mb=memory_mb,
                attack=attack,
                attack_steps=attack_steps,
                attack_restarts=attack_restarts,
                first_index=start,
                done=done,
                on_batch=append,
                progress=not quiet,
            )
    except Exception:
        if written == 0:  # nothing worth resuming: leave no partial output behind
            partial.unlink(missing_ok=True)
            (out / "config.json").unlink(missing_ok=True)
            if created:
                out.rmdir()
        raise
    summary["config"] = config
    write_results(out, rows, summary, threats, methods)
    partial.unlink()
    click.echo(
        f"\n{len(rows)} samples of {dataset}/{split}, clean accuracy "
        f"{summary['clean_accuracy']:.1f}%\n"
    )
    click.echo(markdown_table(summary, methods))
    bad = {t: v for t, v in summary["soundness_violations"].items() if v}
    if bad:
        click.secho(
            f"SOUNDNESS VIOLATION: certified samples broken by PGD: {bad}", fg="red", err=True
        )
    click.echo(
        f"time {summary['seconds_total']:.1f} s ({summary['seconds_total'] / len(rows):.3f}"
        f" s/image), peak memory {summary['peak_memory_mb']:.0f} MB"
    )
    click.echo(f"results: {out}/samples.csv, summary.json, summary.md")
