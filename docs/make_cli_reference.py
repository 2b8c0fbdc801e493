"""Regenerate docs/cli.md from the click help texts: ``python docs/make_cli_reference.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from cure_lirpa.cli import main


def _walk(cmd: click.Command, path: list[str], parent: Optional[click.Context] = None) -> list[str]:
    settings = {**cmd.context_settings, "terminal_width": 100, "max_content_width": 100}
    # e.g. verify's show_default; -h/--help as the group gives every command at run time (click
    # caches a command's help option when first asked, so it is set here, not left to inherit)
    settings["help_option_names"] = main.context_settings["help_option_names"]
    ctx = click.Context(cmd, info_name=path[-1], parent=parent, **settings)
    out = [
        f"{'#' * min(len(path) + 1, 4)} `{' '.join(path)}`",
        "",
        "```text",
        cmd.get_help(ctx).rstrip(),
        "```",
        "",
    ]
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            out += _walk(cmd.get_command(ctx, name), [*path, name], ctx)
    return out


def reference() -> str:
    head = [
        "# Command-line reference",
        "",
        "Generated from the commands' own help by `python docs/make_cli_reference.py`; "
        "every command also answers `--help`.",
        "",
    ]
    return "\n".join(head + _walk(main, ["cure-lirpa"])) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("cli.md")
    target.write_text(reference())
    print(f"wrote {target}")
