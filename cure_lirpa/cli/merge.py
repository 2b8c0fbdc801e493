"""``cure-lirpa merge``: combine the shards of a sharded verify or smooth certify run into one
result."""

from __future__ import annotations

from pathlib import Path

import click

from ..vocabulary import CLEAN_ACCURACY
from .options import overwrite_option


@click.command(context_settings={"show_default": True})
@click.argument("run", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("shards", nargs=-1, type=click.Path(file_okay=False, exists=True, path_type=Path))
@overwrite_option("Replace a run of other settings in RUN (its shard folders are kept).")
def merge(run: Path, shards: tuple[Path, ...], overwrite: bool) -> None:
    """Merge the shard-K-of-N folders of RUN (or the SHARDS given) into RUN.

    Writes samples.csv, samples.jsonl, summary.json and summary.md exactly as an unsharded verify
    run would (times are the sums over shards); for 'smooth certify' and 'smooth predict' runs
    samples.tsv, samples.jsonl, summary.json and summary.md. Refuses shards made with different
    options and lists the sample indices still missing. Merging again rebuilds the merged run; a
    run of other settings in RUN is refused unless --overwrite.

    \b
    Examples:
      cure-lirpa verify model.pt --count 1000 --shard 0/2 --out runs/v   # on one machine
      cure-lirpa verify model.pt --count 1000 --shard 1/2 --out runs/v   # on another
      cure-lirpa merge runs/v
    """
    from ..verification.results import markdown_table, to_percent
    from ..verification.runner import merge_shards
    from .smooth import merge_smoothing

    if merge_smoothing(run, shards, overwrite):  # a 'smooth certify' / 'smooth predict' run
        return
    summary = merge_shards(run, shards or None, overwrite=overwrite)
    click.echo(
        f"{summary['samples']} samples from {len(summary['merged_from'])} shards, clean accuracy "
        f"{to_percent(summary)[CLEAN_ACCURACY]:.1f}%\n"
    )
    click.echo(markdown_table(summary, summary["config"]["methods"]))
    click.echo(f"results: {run}/samples.csv, summary.json, summary.md")
    bad = {t: v for t, v in summary["soundness_violations"].items() if v}
    if bad:
        raise click.ClickException(
            f"SOUNDNESS VIOLATION in the merged run ({bad}): those samples count as not "
            "certified; this is a bug, please report it."
        )
