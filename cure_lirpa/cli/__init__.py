"""The ``cure-lirpa`` command: thin click commands over the library (no logic of their own).

Sub-commands: ``train`` (certified training), ``verify`` (multi-threat certification), ``merge``
(the shards of a sharded ``verify`` or ``smooth certify`` run) and the ``smooth`` group
(randomized smoothing). Every :class:`~cure_lirpa.errors.UserError` raised by the
library ends as one clean message and exit code 1, never a traceback.
"""

from __future__ import annotations

import sys

import click

from ..errors import UserError
from .common import resolve_device


class _Group(click.Group):
    """A click group that turns UserError (and Ctrl-C) into clean messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None
        except MemoryError:
            raise click.ClickException(
                "out of memory; lower --memory-mb or --batch-size, or use a cheaper --method"
            ) from None
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise click.ClickException(
                    "out of memory on the device; lower --memory-mb or --batch-size"
                ) from None
            raise
        except OSError as exc:  # a read-only or full disk, a folder we may not enter, ...
            if not exc.strerror:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(
                f"{where}{exc.strerror}; check the path, free some disk space, or choose a "
                "writable folder"
            ) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cure-lirpa")
def main() -> None:
    """Certified robustness against several perturbation types at once.

    \b
    Examples:
      cure-lirpa train --method cure-joint --epochs 4 --out runs/demo
      cure-lirpa verify runs/demo/checkpoint.pt --threat linf:0.1 --threat l2:0.5
      cure-lirpa smooth train --method nu-rs --sigma 0.5 --out runs/nu
      cure-lirpa smooth certify -c runs/nu --noise hybrid --sigma 0.5 --out runs/nu-hybrid
    """


def _register() -> None:
    from .merge import merge
    from .smooth import smooth
    from .train import train
    from .verify import verify

    main.add_command(train)
    main.add_command(verify)
    main.add_command(merge)
    main.add_command(smooth)


_register()

__all__ = ["main", "resolve_device"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
