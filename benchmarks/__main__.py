"""Entry point of the benchmark suites: a small registry and three commands.

::

    python -m benchmarks list                                   # the suites and what they measure
    python -m benchmarks run --suite certificates --quick       # run one (or several) suites
    python -m benchmarks run --suite scaling -- --threads 2     # options after -- go to the suite
    python -m benchmarks docs                                   # refresh docs/benchmarks.md

A suite is a :class:`Suite` entry in :data:`SUITES`: the ``module:attribute`` of its ``main`` (a
click command, or an argparse ``main()`` that reads ``sys.argv``), whether it has a ``--quick`` mode,
and the Markdown fragments it writes that ``docs`` copies into docs/benchmarks.md. Adding a suite is
adding an entry.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click

from benchmarks import REPO, RESULTS, log

DOCS = (
    REPO / "docs" / "benchmarks.md",
    REPO / "docs" / "results.md",
    REPO / "docs" / "scaling-out.md",
)


@dataclass(frozen=True)
class Suite:
    """One registered suite."""

    name: str
    target: str
    """``module:attribute`` of the suite's entry point."""
    help: str
    quick: bool = True
    """The entry point accepts ``--quick``."""
    fragments: tuple[tuple[str, str], ...] = ()
    """``(marker, path relative to benchmarks/results)`` of Markdown that ``docs`` includes."""
    argv: tuple[str, ...] = ()
    """Arguments always passed first (one script serving several suites)."""


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "certificates",
            "benchmarks.certificates:main",
            "IBP / CROWN-IBP / CROWN / SDP-CROWN / alpha-CROWN and the cascade on the same images: "
            "certified and union accuracy, newly certified images, time per image, peak memory",
            fragments=(
                ("certificates-quick", "certificates-quick/summary.md"),
                ("certificates", "certificates/summary.md"),
                ("certificates-sdp", "certificates-sdp/summary.md"),
                ("certificates-sdp-cifar10", "certificates-sdp-cifar10/summary.md"),
                ("certificates-sdp-goal", "certificates-sdp-goal/summary.md"),
                ("certificates-sdp-blocks", "certificates-sdp-blocks/summary.md"),
                ("certificates-sdp-small", "certificates-sdp-small/summary.md"),
            ),
        ),
        Suite(
            "scaling",
            "benchmarks.scaling:main",
            "time and peak memory of each bound method against batch size and model width",
            fragments=(
                ("scaling-quick", "scaling-quick/summary.md"),
                ("scaling", "scaling/summary.md"),
            ),
        ),
        Suite(
            "cure_mnist",
            "benchmarks.cure_training:main",
            "CURE on MNIST: single-norm baselines against multi-norm training (trains models)",
            fragments=(
                ("cure_mnist", "cure_mnist/summary.md"),
                ("cure_mnist-speed", "cure_mnist/speed.md"),
            ),
            argv=("--dataset", "mnist"),
        ),
        Suite(
            "cure_mnist_blocks",
            "benchmarks.cure_training:main",
            "CURE on MNIST with tighter training blocks (MTL-IBP, SABR with Shi et al.'s recipe; "
            "trains models)",
            fragments=(("cure_mnist_blocks", "cure_mnist_blocks/summary.md"),),
            argv=(
                "--dataset",
                "mnist",
                "--results",
                str(RESULTS / "cure_mnist_blocks"),
                "--train-count",
                "30000",
                "--test-count",
                "1000",
            ),
        ),
        Suite(
            "cure_cifar10",
            "benchmarks.cure_training:main",
            "CURE on CIFAR-10 at reduced scale (cnn-small, l∞ 2/255, l2 0.25; trains models)",
            fragments=(("cure_cifar10", "cure_cifar10/summary.md"),),
            argv=("--dataset", "cifar10"),
        ),
        Suite(
            "generalisation",
            "benchmarks.generalisation:main",
            "certified models against unseen threats: patches, rotation, translation",
            fragments=(("generalisation", "generalisation/generalisation.md"),),
        ),
        Suite(
            "patches",
            "benchmarks.patches:main",
            "patch certification: the cascade against IBP alone (time ratio), and peak memory of "
            "box-family bounds against the memory budget",
            quick=False,
            fragments=(("patches", "patches/summary.md"),),
        ),
        Suite(
            "overhead",
            "benchmarks.overhead:main",
            "wrapper overhead against auto_LiRPA and IBP training-step cost",
            quick=False,
            fragments=(("overhead", "overhead/overhead.md"),),
        ),
        Suite(
            "ddp",
            "benchmarks.ddp:main",
            "data-parallel training: 2 processes (torchrun, gloo) against 1, same global batch",
            quick=False,
            fragments=(("ddp", "ddp/ddp.md"),),
        ),
        Suite(
            "sharded_verify",
            "benchmarks.sharded_verify:main",
            "sharded verify: one process against N shards side by side + merge (equal results)",
            quick=False,
            fragments=(("sharded_verify", "sharded_verify/summary.md"),),
        ),
        Suite(
            "smoothing_mnist",
            "benchmarks.smoothing_mnist:main",
            "randomized smoothing on MNIST (Gaussian, uniform, NU hybrid)",
            fragments=(
                ("smoothing_mnist", "smoothing/mnist/summary.md"),
                (
                    "smoothing_mnist-quick-no-joint-alpha",
                    "smoothing/mnist-quick-no-joint-alpha/summary.md",
                ),
            ),
        ),
        Suite(
            "smoothing_sequential",
            "benchmarks.smoothing_sequential:main",
            "sequential (anytime-valid) against fixed-n smoothing certification: certified "
            "accuracy, samples and time per image (MNIST, CIFAR-10)",
            fragments=(("smoothing_sequential", "smoothing_sequential/results.md"),),
        ),
        Suite(
            "smoothing_speed",
            "benchmarks.smoothing_speed:main",
            "randomized smoothing certification speed",
            fragments=(
                ("smoothing_speed-quick", "smoothing/speed-quick/speed.md"),
                ("smoothing_speed", "smoothing/speed/speed.md"),
            ),
        ),
    )
}


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
    for path in paths:
        _fill(path)


def _fill(path: Path) -> None:
    from cure_lirpa.io.checkpoint import atomic_write_text

    atomic_write_text(path, filled_text(path))


def filled_text(path: Path, quiet: bool = False) -> str:
    """``path``'s text with every marked results section replaced by its suite's fragment."""
    say = (lambda _msg: None) if quiet else log
    text = path.read_text()
    for suite in SUITES.values():
        for marker, rel in suite.fragments:
            frag = RESULTS / rel
            pattern = re.compile(
                rf"(<!-- BEGIN results:{re.escape(marker)} -->\n).*?(<!-- END results:"
                rf"{re.escape(marker)} -->)",
                re.S,
            )
            if not pattern.search(text):
                continue
            if not frag.is_file():
                say(f"{marker}: {frag} not generated yet; section left unchanged")
                continue
            body = frag.read_text().rstrip("\n") + "\n"
            text = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(2), text)
            say(f"{marker}: copied {frag.relative_to(REPO)}")
    return text


if __name__ == "__main__":
    cli()
