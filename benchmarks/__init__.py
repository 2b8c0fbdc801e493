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
* :func:`slug` turns threat and model names into file names; :func:`log` prints timestamped lines.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import re
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
_PRELOAD = ["torch", "cure_lirpa.lirpa", "cure_lirpa.certification", "benchmarks"]


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
