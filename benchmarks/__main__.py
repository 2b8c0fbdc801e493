"""Entry point of the benchmark suites: three commands over the registry
(:data:`benchmarks.harness.SUITES`).

::

    python -m benchmarks list                                   # the suites and what they measure
    python -m benchmarks run --suite certificates --quick       # run one (or several) suites
    python -m benchmarks run --suite scaling -- --threads 2     # options after -- go to the suite
    python -m benchmarks docs                                   # refresh docs/benchmarks.md

Every suite also runs alone, ``python -m benchmarks.<module>`` (e.g. ``python -m
benchmarks.scaling --quick``). Adding a suite is adding a :class:`~benchmarks.harness.Suite`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Sequence

import click

from benchmarks.harness import DOCS, SUITES, fill_docs, filled_text, log

__all__ = ["SUITES", "cli", "filled_text", "run_suite"]


def run_suite(name: str, quick: bool, args: Sequence[str]) -> None:
    """Import suite ``name`` and call its entry point with ``[--quick] *args``."""
    if name not in SUITES:
        raise click.BadParameter(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    suite = SUITES[name]
    if quick and not suite.quick:
        raise click.BadParameter(f"suite {name!r} has no --quick mode", param_hint="--quick")
    argv = [*suite.argv, *(["--quick"] if quick else []), *args]
    module, _, attr = suite.target.partition(":")
    entry = getattr(importlib.import_module(module), attr)
    prog = f"python -m benchmarks run --suite {name}"
    from cure_lirpa.errors import UserError

    try:
        if isinstance(entry, click.Command):
            entry.main(args=argv, prog_name=prog, standalone_mode=False)
            return
        saved = sys.argv
        sys.argv = [prog, *argv]
        try:
            entry()
        finally:
            sys.argv = saved
    except UserError as exc:
        raise click.ClickException(f"suite {name}: {exc}") from None


@click.group()
def cli() -> None:
    """Benchmark suites of cure-lirpa (results in benchmarks/results/)."""


@cli.command("list")
def list_suites() -> None:
    """List the registered suites."""
    for s in SUITES.values():
        click.echo(f"{s.name:16s} {'' if s.quick else '(no --quick) '}{s.help}")


@cli.command("run", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--suite", "suites", multiple=True, required=True, help="Suite name, repeatable.")
@click.option("--quick", is_flag=True, help="The suite's smoke-test mode (minutes).")
@click.pass_context
def run(ctx: click.Context, suites: Sequence[str], quick: bool) -> None:
    """Run suites; further arguments (after --) go to every suite's own command line."""
    unknown = [n for n in suites if n not in SUITES]
    if unknown:
        raise click.BadParameter(
            f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}",
            param_hint="--suite",
        )
    for name in suites:
        log(f"suite {name}{' (quick)' if quick else ''}")
        run_suite(name, quick, ctx.args)


@cli.command("docs")
@click.option(
    "--file",
    "paths",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=DOCS,
    show_default=True,
)
def docs(paths: Sequence[Path]) -> None:
    """Copy each suite's latest Markdown fragment into the marked sections of the docs pages.

    A section is ``<!-- BEGIN results:MARKER -->`` ... ``<!-- END results:MARKER -->``; sections
    whose fragment has not been generated yet are left as they are.
    """
    fill_docs(paths)


if __name__ == "__main__":
    cli()
