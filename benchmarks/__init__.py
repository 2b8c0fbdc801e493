"""Benchmark suites of cure-lirpa and the helpers they share.

Run them through the registry in :mod:`benchmarks.__main__`::

    python -m benchmarks list
    python -m benchmarks run --suite certificates --quick
    python -m benchmarks docs            # copy the latest results into docs/benchmarks.md

Shared helpers (light imports only: importing this package must not import torch):

* :func:`run_isolated` runs one measurement in a fresh child process, so its peak resident memory
  (``ru_maxrss``) belongs to that measurement alone (see docs/benchmarks.md, "How memory is
  measured");
* :func:`rss_now_mb` / :func:`rss_peak_mb` read the current and peak resident set size and
  :func:`reset_peak_rss` restarts the peak at the current size (Linux);
* :func:`slug` turns threat and model names into file names; :func:`log` prints timestamped lines;
* :func:`save_summary` writes a results file that is committed (JSON or Markdown): JSON is stamped
  with :func:`commit_stamp` (the commit of the code that wrote it and whether that code had
  uncommitted changes), and absolute paths in either are made :func:`portable`. Per-cell and
  per-point caches (``cells/``, ``points/``, ...) stay local and are not committed.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DEFAULT_DATA = (REPO / ".." / "shared" / "data").resolve()

# Modules the fork server imports once, so that every child starts with torch and auto_LiRPA loaded
# (about 3 s per child otherwise) while still being a process of its own.
_PRELOAD = [
    "torch",
    "cure_lirpa.bounds.lirpa",
    "cure_lirpa.verification.certification",
    "benchmarks",
]


def log(msg: str) -> None:
    """One timestamped progress line on stderr."""
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def command_line() -> str:
    """How this process was started, as a user would type it (for the reports)."""
    argv = list(sys.argv)
    first = Path(argv[0]) if argv else Path("python")
    if first.name == "__main__.py" and first.parent.name == "benchmarks":
        return " ".join(["python -m benchmarks", *argv[1:]])
    try:
        first = first.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(first), *argv[1:]])


def read_results(results_json: Path) -> dict[str, Any]:
    """The results a ``--report-only`` run rebuilds its report from; a clear error (not a
    traceback) when the suite has not written them yet."""
    import json

    import click

    if not results_json.is_file():
        raise click.ClickException(
            f"--report-only rebuilds the report from {results_json}, which does not exist yet; "
            "run the suite without --report-only first"
        )
    return json.loads(results_json.read_text())


def provenance(results_json: Path, report_only: bool) -> dict[str, Any]:
    """``command`` and ``generated`` (date) for a report: this process's, or with ``report_only``
    those of the run that measured the results (read back from ``results_json``, with its
    ``wall_seconds``), since a rebuilt report shows those results."""
    import json

    if report_only and results_json.is_file():
        try:
            old = json.loads(results_json.read_text())
            return {k: old[k] for k in ("command", "generated", "wall_seconds")}
        except (OSError, ValueError, KeyError):
            pass
    return {"command": command_line(), "generated": time.strftime("%Y-%m-%d %H:%M")}


@functools.cache
def commit_stamp() -> dict[str, Any]:
    """``{"commit": <git rev-parse HEAD>, "dirty": <bool>}`` of this checkout, taken once per
    process (at the first call, i.e. when the measurement starts). ``dirty``: the code that makes
    the numbers (``cure_lirpa/``, ``benchmarks/`` but its results, ``setup.cfg``,
    ``pyproject.toml``) differs from that commit. Both None outside a git checkout."""
    git = ["git", "-C", str(REPO)]
    code = [
        "cure_lirpa",
        "benchmarks",
        "setup.cfg",
        "pyproject.toml",
        ":(exclude)benchmarks/results",
    ]
    try:
        sha = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", *code],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(status.strip())}


_ABS_PATH = re.compile(r"(?<![^\s\"'`(\[=<,])/(?:[\w.+@-]+/)+[\w.+@-]+")
"""An absolute POSIX path of two or more parts inside a text, at its start or after a space, quote
or bracket (not the ``/255`` of ``linf:2/255``, not ``l∞/l2/l1``, not a URL)."""


def portable_path(path: str) -> str:
    """An absolute path as committed results show it: relative to the repository (also for a path
    into another checkout's ``benchmarks/results``), ``../x`` for a sibling of the repository
    (e.g. the default data folder ``../shared/data``), else the file's name only."""
    p = Path(path)
    parts = p.parts
    if len(parts) > 1 and parts[1] in ("proc", "sys", "dev"):
        return path  # the same on every Linux machine
    for i in range(len(parts) - 1):
        if parts[i : i + 2] == ("benchmarks", "results"):
            return str(Path(*parts[i:]))
    for base, prefix in ((REPO, ""), (REPO.parent, "..")):
        try:
            rel = p.relative_to(base)
        except ValueError:
            continue
        return str(Path(prefix, rel)) if str(rel) != "." else (prefix or ".")
    return p.name or path


def portable(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every absolute path, alone or
    inside a text, replaced by :func:`portable_path`."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and "/" in value:
        return _ABS_PATH.sub(lambda m: portable_path(m.group(0)), value)
    return value


def save_summary(path: Path, content: Any) -> None:
    """Write a committed results file atomically: Markdown text, or JSON (a dict) that starts with
    the :func:`commit_stamp` of this process (the code that wrote the file; a report rebuilt from
    caches or from an older summary gets the rebuild's commit); absolute paths in either become
    :func:`portable`."""
    from cure_lirpa.io.checkpoint import atomic_write_json, atomic_write_text

    if isinstance(content, str):
        atomic_write_text(path, portable(content))
        return
    stamp = commit_stamp()
    atomic_write_json(
        path, portable({**stamp, **{k: v for k, v in content.items() if k not in stamp}})
    )


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (``linf:2/255`` -> ``linf_2_255``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def rss_now_mb() -> float:
    """Current resident set size of this process in MB (Linux ``/proc``; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        return rss_peak_mb()


def rss_peak_mb() -> float:
    """Peak resident set size of this process in MB (``getrusage(RUSAGE_SELF).ru_maxrss``)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KB else


def reset_peak_rss() -> bool:
    """Reset the peak resident set size to the current one (Linux: ``/proc/self/clear_refs``).

    Afterwards :func:`rss_peak_mb` reports the peak reached *since this call*. Returns False where
    the kernel does not allow it; the peak then covers the whole (fresh) process.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _context() -> Any:
    """A multiprocessing context whose children share no heap with the parent or each other.

    ``forkserver`` (Linux, macOS): children are forked from a small server process that only
    imported :data:`_PRELOAD`, never from this (possibly large, multi-threaded) process.
    ``spawn`` elsewhere.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def run_isolated(
    target: Callable[..., None], *args: Any, timeout: Optional[float] = None
) -> Optional[int]:
    """Run ``target(*args)`` in a fresh child process; returns its exit code (None on timeout).

    ``target`` must be a module-level function of an importable module (it is pickled by
    reference; a function of a module run with ``python -m`` is looked up under the module's
    name), not one of a script's ``__main__``. A negative exit code
    is the signal that killed the child (-9: typically the kernel's out-of-memory killer).
    """
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    if target.__module__ == "__main__" and main_spec is not None:  # ``python -m benchmarks.x``:
        target = getattr(importlib.import_module(main_spec.name), target.__name__)  # by its name
    proc = _context().Process(target=target, args=args)
    # The child needs only ``target``'s module. Hide the caller's __main__ while starting it, so
    # that multiprocessing does not re-run the caller's script in the child (a script without an
    # ``if __name__ == "__main__"`` guard would otherwise start the whole benchmark again).
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        proc.start()
    finally:
        sys.modules["__main__"] = main
    try:
        proc.join(timeout)
    except BaseException:  # Ctrl-C: do not leave the child running
        proc.terminate()
        proc.join()
        raise
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return None
    return proc.exitcode


def exit_reason(code: Optional[int]) -> str:
    """A human explanation of a child's exit code."""
    if code is None:
        return "timed out"
    if code == -9:
        return "killed by SIGKILL (out of memory?)"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with code {code}"
