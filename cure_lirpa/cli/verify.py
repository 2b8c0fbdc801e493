"""``cure-lirpa verify``: certify a checkpoint under several threats and bound methods."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..vocabulary import (
    AUTO,
    BOUND_METHODS,
    CASCADE_BUDGET,
    CIFAR10,
    CLEAN_ACCURACY,
    DATASETS,
    DEFAULT_BOUND_METHODS,
    DEFAULT_THREATS,
    MNIST,
    SAMPLES_CSV,
    SUMMARY_JSON,
    SUMMARY_MD,
)
from . import options as opt
from .common import ThreatType, resolve_device, set_threads

if TYPE_CHECKING:
    from ..verification.runner import VerifyResult


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--threat",
    "threats",
    multiple=True,
    type=ThreatType(),
    help="Threat model, repeatable: linf:EPS, l2:EPS, l1:EPS (pixel units, 8/255 allowed), "
    "patch:K, rotate:DEG, ... Default: the l∞ and l2 radii the checkpoint was trained for, "
    f"else the dataset's pair (MNIST {' '.join(DEFAULT_THREATS[MNIST])}, "
    f"CIFAR-10 {' '.join(DEFAULT_THREATS[CIFAR10])}).",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice([*BOUND_METHODS, AUTO]),
    default=DEFAULT_BOUND_METHODS,
    help="Bound method, repeatable, e.g. --method crown --method sdp-crown. 'auto' is the "
    "cheapest-first cascade (sdp-crown before alpha-crown under l2 and l1; stages that cannot "
    "bound the model are skipped and recorded; see --budget). sdp-crown is for l2 balls; "
    "under l1 it keeps the better of CROWN and its l2 bound, under l∞ and box threats it returns "
    "the CROWN bound.",
)
@click.option(
    "--dataset",
    default=None,
    type=click.Choice(DATASETS),
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
@opt.batch_size_option(64, "Images per bound computation (split further to fit --memory-mb).")
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
@opt.out_option(
    "Output folder [default: <checkpoint folder>/verify-<hash of the options>].", required=False
)
@click.option(
    "--shard",
    default=None,
    metavar="K/N",
    help="Certify only shard K of N (0-based) into <out>/shard-K-of-N; merge the shards with "
    "'cure-lirpa merge <out>'. Under torchrun or a Slurm array it is set from the rank.",
)
@opt.seed_option("Seed of the PGD cross-check.")
@opt.resume_option("Continue a killed run from its samples.jsonl.")
@opt.overwrite_option("Replace results already in --out.")
@opt.device_option()
@opt.threads_option()
@opt.quiet_option("No progress bar (warnings and the results still show).")
def verify(checkpoint: Path, **o: Any) -> None:
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
    from ..verification import runner

    set_threads(o.pop("threads"))
    device = resolve_device(o.pop("device"))
    quiet = o.pop("quiet")
    _report(runner.verify(checkpoint, device=device, progress=not quiet, **o))


def _report(result: VerifyResult) -> None:
    """Print the run's shard line, its table, time and files; fail on a soundness violation."""
    from ..plots import PLOT_NAME
    from ..verification.results import markdown_table, to_percent

    rows, summary, part = result.rows, result.summary, result.shard
    config = summary["config"]
    if part is not None:
        first = config["shard_start"]
        click.echo(f"shard {part.index}/{part.count}: samples {first}..{first + len(rows) - 1} "
                   f"in {result.out}")  # fmt: skip
        if result.merged is not None:
            click.echo(f"merged {part.count} shards into {result.run_dir}")
        elif not result.by_rank:
            click.echo(f"when every shard is done: cure-lirpa merge {result.run_dir}")
    clean = to_percent(summary)[CLEAN_ACCURACY]
    click.echo(
        f"\n{len(rows)} samples of {config['dataset']}/{config['split']}, clean accuracy "
        f"{clean:.1f}%\n"
    )
    click.echo(markdown_table(summary, result.methods))
    seconds = summary["seconds_total"]
    click.echo(f"time {seconds:.1f} s ({seconds / len(rows):.3f} s/image), peak memory "
               f"{summary['peak_memory_mb']:.0f} MB")  # fmt: skip
    click.echo(f"results: {result.out}/{SAMPLES_CSV}, {SUMMARY_JSON}, {SUMMARY_MD}, {PLOT_NAME}")
    bad = {t: v for t, v in summary["soundness_violations"].items() if v}
    if bad:
        indices = [r.index for r in rows if r.violations][:20]
        raise click.ClickException(
            f"SOUNDNESS VIOLATION: bounds certified samples that PGD then broke ({bad}; sample "
            f"indices {indices}). These samples are counted as NOT certified in every figure above, "
            "but this is a bug in cure-lirpa or auto_LiRPA: please report it with the command, "
            "the checkpoint and samples.csv."
        )
