"""``cure-lirpa verify``: certify a checkpoint under several threats and bound methods."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import click

from ..errors import UserError
from ..vocabulary import CASCADE_BUDGET
from .common import ThreatType, resolve_device, set_threads
from .options import (
    batch_size_option,
    device_option,
    out_option,
    overwrite_option,
    quiet_option,
    resume_option,
    seed_option,
    threads_option,
)

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
    "cheapest-first cascade (sdp-crown before alpha-crown under l2 and l1; stages that cannot "
    "bound the model are skipped and recorded; see --budget). sdp-crown is for l2 balls; "
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
@batch_size_option(64, "Images per bound computation (split further to fit --memory-mb).")
@click.option(
    "--memory-mb",
    type=click.FloatRange(min=64),
    default=4096.0,
    help="Memory budget of one bound computation (MB above the process's own); batches and "
    "patch/geometric boxes are split to fit, for every method.",
)
@click.option(
    "--attack/--no-attack",
    default=True,
    help="Run PGD per lp threat (empirical accuracy and a soundness cross-check).",
)
@click.option("--attack-steps", type=click.IntRange(min=1), default=50)
@click.option("--attack-restarts", type=click.IntRange(min=1), default=2)
@click.option(
    "--budget",
    type=click.FloatRange(min=0),
    default=CASCADE_BUDGET,
    show_default=True,
    help="Seconds of bound computation per sample and threat for --method auto; a sample still "
    "open when they are spent is recorded as 'timeout' (not certified). 0: no limit.",
)
@out_option(
    "Output folder [default: <checkpoint folder>/verify-<hash of the options>].", required=False
)
@click.option(
    "--shard",
    default=None,
    metavar="K/N",
    help="Certify only shard K of N (0-based) into <out>/shard-K-of-N; merge the shards with "
    "'cure-lirpa merge <out>'. Under torchrun or a Slurm array it is set from the rank.",
)
@seed_option("Seed of the PGD cross-check.")
@resume_option("Continue a killed run from its samples.jsonl.")
@overwrite_option("Replace results already in --out.")
@device_option()
@threads_option()
@quiet_option("No progress bar (warnings and the results still show).")
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
    budget,
    out,
    shard,
    seed,
    resume,
    overwrite,
    device,
    threads,
    quiet,
) -> None:
    """Certify CHECKPOINT under every --threat with every --method.

    Prints clean accuracy, certified accuracy per threat and method, best-of-methods and union
    accuracy, and PGD accuracy; writes samples.csv (one row per sample), summary.json,
    summary.md and certified_accuracy.png to --out.

    \b
    Examples:
      cure-lirpa verify runs/demo/checkpoint.pt
      cure-lirpa verify model.pt --threat linf:0.1 --threat l2:0.5 --method ibp --method crown
      cure-lirpa verify model.pt --method auto --count 1000 --shard 0/4 --out results/v
      cure-lirpa merge results/v
    """
    from dataclasses import asdict
    from functools import partial

    from torch.utils.data import Subset

    from ..data import load_dataset, take
    from ..io.checkpoint import (
        dataset_info_of,
        load_checkpoint,
        model_from_checkpoint,
        smoothing_noise,
    )
    from ..io.runs import Run
    from ..io.shards import (
        merge_shards,
        merge_when_all_done,
        parse_shard,
        shard_from_environment,
        started_by_torchrun,
    )
    from ..plots import PLOT_NAME
    from ..threats.base import NormBall, check_radius, parse_threat
    from ..verification.certification import (
        SampleRow,
        certify_dataset,
        markdown_table,
        write_results,
    )

    set_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    noise = smoothing_noise(ckpt)
    if noise:
        sigma = (ckpt.get("config") or {}).get("sigma")
        raise UserError(
            f"{checkpoint} is a randomized-smoothing base classifier (trained with {noise}); its "
            "guarantee is the smoothed classifier's: certify it with 'cure-lirpa smooth certify "
            f"-c {checkpoint} --sigma {sigma:g} --out RUN'. verify bounds models from "
            "'cure-lirpa train'"
        )
    info = dataset_info_of(ckpt)
    dataset = dataset or info.name
    if not threats:
        threats = tuple(parse_threat(t) for t in default_threats(ckpt, dataset))
    threats = tuple(dict.fromkeys(threats))
    for threat in threats:  # a ball that holds the whole input box certifies nothing
        if isinstance(threat, NormBall):
            check_radius(threat.norm, threat.eps, info.in_shape, f"--threat {threat.name}")
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
        "seed": seed,
        "budget": budget,
    }
    if out is None:
        digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        out = checkpoint.parent / f"verify-{digest}"
    part = parse_shard(shard) if shard else shard_from_environment()
    run_dir = out
    if part is not None:
        offset, length = part.block(len(data))
        if length == 0:
            raise UserError(
                f"shard {part.index}/{part.count} is empty: {len(data)} samples cannot fill "
                f"{part.count} shards; use N <= {len(data)}"
            )
        config.update(shard=f"{part.index}/{part.count}", shard_start=start + offset,
                      shard_count=length)  # fmt: skip
        data = Subset(data, range(offset, offset + length))
        out = out / part.name
    model = model_from_checkpoint(ckpt)
    run = Run.open(out, "verify", config, resume=resume, overwrite=overwrite)
    records = run.records()
    done = [SampleRow(**r) for r in records.read()]
    try:
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
            budget=budget or None,
            first_index=config.get("shard_start", start),
            seed=seed,
            done=done,
            on_batch=lambda rows: records.append(asdict(r) for r in rows),
            progress=not quiet,
        )
    except Exception:
        run.discard_if_empty()  # nothing worth resuming: leave no partial output behind
        raise
    summary["config"] = config
    write_results(out, rows, summary, threats, methods)
    run.close()
    if part is not None:
        click.echo(f"shard {part.index}/{part.count}: samples {config['shard_start']}.."
                   f"{config['shard_start'] + len(rows) - 1} in {out}")  # fmt: skip
        if shard is None and started_by_torchrun():  # rank 0 merges when all ranks are done
            if merge_when_all_done(run_dir, partial(merge_shards, overwrite=overwrite)) is not None:
                click.echo(f"merged {part.count} shards into {run_dir}")
        else:
            click.echo(f"when every shard is done: cure-lirpa merge {run_dir}")
    click.echo(
        f"\n{len(rows)} samples of {dataset}/{split}, clean accuracy "
        f"{summary['clean_accuracy']:.1f}%\n"
    )
    click.echo(markdown_table(summary, methods))
    click.echo(
        f"time {summary['seconds_total']:.1f} s ({summary['seconds_total'] / len(rows):.3f}"
        f" s/image), peak memory {summary['peak_memory_mb']:.0f} MB"
    )
    click.echo(f"results: {out}/samples.csv, summary.json, summary.md, {PLOT_NAME}")
    bad = {t: v for t, v in summary["soundness_violations"].items() if v}
    if bad:
        indices = [r.index for r in rows if r.violations][:20]
        raise click.ClickException(
            f"SOUNDNESS VIOLATION: bounds certified samples that PGD then broke ({bad}; sample "
            f"indices {indices}). These samples are counted as NOT certified in every figure above, "
            "but this is a bug in cure-lirpa or auto_LiRPA: please report it with the command, "
            "the checkpoint and samples.csv."
        )
