"""The harness every benchmark suite shares: the suite registry, results files, timing and memory,
per-cell caches in child processes, the common command-line options and the docs generator.

Light imports only (no torch at import time: ``python -m benchmarks list`` and the docs test stay
fast); what needs the library imports it inside the function.

* **Registry**: :data:`SUITES`, one :class:`Suite` per suite (its ``main``, whether it has a
  ``--quick`` mode, the Markdown fragments the docs include); ``python -m benchmarks`` runs them.
* **Results**: :func:`save_summary` writes a committed results file (JSON stamped with
  :func:`commit_stamp`; absolute paths made :func:`portable`), :func:`save_summaries` several;
  :func:`environment` describes the software; :func:`provenance` and
  :func:`read_results` serve ``--report-only``; :func:`header_fields` starts a results.json
  and :func:`generated_by` its summary.md; :func:`slug` makes file names; :func:`log` prints.
* **Timing and memory**: :func:`interleaved_times` (calls interleaved so machine load hits all
  contenders alike), :func:`rss_now_mb` / :func:`rss_peak_mb` / :func:`reset_peak_rss`.
* **Cells**: :func:`run_cell` measures one cell in a fresh process (:func:`run_isolated`, so its
  peak memory is its own) and caches it under a key of everything that decides it; a missing or
  stale cache is simply recomputed (caches are local: ``cells/``, ``points/``, ... are not
  committed). :func:`warm_up`, :func:`code_fingerprint` and :func:`describe` serve the cells.
* **Options**: :func:`data_root_option`, :func:`with_options`, :func:`split_commas`,
  :func:`named_checkpoints`; :func:`cli_command` runs ``cure-lirpa`` in a fresh process.
* **Docs**: :func:`filled_text` copies each suite's latest fragment into the marked sections of the
  docs pages (``python -m benchmarks docs``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import traceback
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DEFAULT_DATA = (REPO / ".." / "shared" / "data").resolve()
DOCS = (
    REPO / "docs" / "benchmarks.md",
    REPO / "docs" / "results.md",
    REPO / "docs" / "scaling-out.md",
)

# Modules the fork server imports once, so that every child starts with torch and auto_LiRPA loaded
# (about 3 s per child otherwise) while still being a process of its own (one it cannot import is
# skipped).
_PRELOAD = ["torch", "cure_lirpa.bounds.classifier", "benchmarks.harness"]


# ---------------------------------------------------------------------------------------------
# The registry of suites


@dataclass(frozen=True)
class Suite:
    """One registered suite."""

    name: str
    target: str
    """``module:attribute`` of the suite's entry point (a click command, or an argparse ``main()``
    that reads ``sys.argv``)."""
    help: str
    quick: bool = True
    """The entry point accepts ``--quick``."""
    fragments: tuple[tuple[str, str], ...] = ()
    """``(marker, path relative to benchmarks/results)`` of Markdown that ``docs`` includes."""
    argv: tuple[str, ...] = ()
    """Arguments always passed first (one module serving several suites)."""


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
            fragments=(("generalisation", "generalisation/summary.md"),),
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


# ---------------------------------------------------------------------------------------------
# Results files


def log(msg: str) -> None:
    """One timestamped progress line on stderr."""
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def command_line() -> str:
    """How this process was started, as a user would type it (for the reports)."""
    argv = list(sys.argv)
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name.split(".")[0] == "benchmarks":  # python -m benchmarks[.x]
        return " ".join([f"python -m {spec.name.removesuffix('.__main__')}", *argv[1:]])
    first = Path(argv[0]) if argv else Path("python")
    try:
        first = first.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(first), *argv[1:]])


def read_results(results_json: Path) -> dict[str, Any]:
    """The results a ``--report-only`` run rebuilds its report from; a clear error (not a
    traceback) when the suite has not written them yet."""
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
    if report_only and results_json.is_file():
        try:
            old = json.loads(results_json.read_text())
            return {k: old[k] for k in ("command", "generated", "wall_seconds")}
        except (OSError, ValueError, KeyError):
            pass
    return {"command": command_line(), "generated": time.strftime("%Y-%m-%d %H:%M")}


def header_fields(
    suite: str, quick: bool, origin: dict[str, Any], t_start: float
) -> dict[str, Any]:
    """The first keys of a suite's results.json: the suite, its mode, and the command and date of
    :func:`provenance`'s ``origin`` with its ``wall_seconds`` (else the seconds since ``t_start``)."""
    wall = origin.get("wall_seconds", round(time.perf_counter() - t_start, 1))
    return {
        "suite": suite,
        "quick": quick,
        "command": origin["command"],
        "generated": origin["generated"],
        "wall_seconds": wall,
    }


def generated_by(result: dict[str, Any]) -> str:
    """The opening of a summary.md: ``Generated <date> by `<command>` on <machine>``."""
    return f"Generated {result['generated']} by `{result['command']}` on {result['machine']}"


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


def save_summaries(folder: Path, files: dict[str, Any], echo: Optional[str] = None) -> None:
    """:func:`save_summary` of each ``{file name: content}`` into ``folder`` (created); then print
    ``echo`` (the report) and log what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        save_summary(folder / name, content)
    if echo is not None:
        click.echo(echo)
    log(f"wrote {', '.join(files)} in {folder}")


def environment(**extra: Any) -> dict[str, Any]:
    """The torch and Python versions and torch's CPU threads, with ``extra``."""
    import platform

    import torch

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        **extra,
    }


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (``linf:2/255`` -> ``linf_2_255``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


# ---------------------------------------------------------------------------------------------
# Timing and memory


def interleaved_times(
    fns: Sequence[Callable[[], Any]], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> list[list[float]]:
    """Seconds of ``repeats`` calls of each function by ``clock``, the calls interleaved (one of
    each per round) so that the load of a shared machine hits all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
    return times


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


# ---------------------------------------------------------------------------------------------
# Child processes and per-cell caches


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


def _by_name(value: Any) -> Any:
    """A function of the module run with ``python -m benchmarks.<suite>`` (named ``__main__``)
    as the same function of that module under its own name, which a child can import."""
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    if callable(value) and getattr(value, "__module__", None) == "__main__" and main_spec:
        return getattr(importlib.import_module(main_spec.name), value.__name__)
    return value


def run_isolated(
    target: Callable[..., None], *args: Any, timeout: Optional[float] = None
) -> Optional[int]:
    """Run ``target(*args)`` in a fresh child process; returns its exit code (None on timeout).

    ``target`` (and any function among ``args``) must be a module-level function of an importable
    module: it is pickled by reference (a function of a suite run with ``python -m`` is looked up
    under the suite's name). A negative exit code is the signal that killed the child (-9:
    typically the kernel's out-of-memory killer).
    """
    proc = _context().Process(target=_by_name(target), args=tuple(map(_by_name, args)))
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


def cli_command(*args: str, processes: int = 1) -> list[str]:
    """The command line of ``cure-lirpa ARGS`` in a fresh Python: one process, or ``processes``
    processes under torchrun (``--standalone``: a rendezvous of its own on this machine)."""
    if processes == 1:
        return [sys.executable, "-m", "cure_lirpa", *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, "--nproc_per_node", str(processes), "-m", "cure_lirpa", *args]


def exit_reason(code: Optional[int]) -> str:
    """A human explanation of a child's exit code."""
    if code is None:
        return "timed out"
    if code == -9:
        return "killed by SIGKILL (out of memory?)"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with code {code}"


def describe(exc: BaseException) -> str:
    """``Type: message``, or ``Type at file:line`` for exceptions without a message."""
    text = str(exc).strip()
    if text:
        return f"{type(exc).__name__}: {text}"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    where = "/".join(Path(last.filename).parts[-3:])
    return f"{type(exc).__name__} at {where}:{last.lineno}"


def error_path(path: Path) -> Path:
    """Where the error record of the cell cached in ``path`` is kept."""
    return path.with_name(path.stem + ".error.json")


def cached_cell(path: Path, key: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The cell cached in ``path`` (or its error record) if it was measured under ``key``, else
    None: a missing cache, or one of other settings or older code, is measured again."""
    from cure_lirpa.io.runs import cached

    return cached(path, key) or cached(error_path(path), key)


def measure_cell(
    measure: Callable[[dict[str, Any]], dict[str, Any]], spec: dict, path: str
) -> None:
    """Child-process entry point of :func:`run_cell`: cache ``measure(spec)`` in ``path`` under
    ``spec["key"]``, or the exception it raised as an error record (exit code 1). Ctrl-C is not
    recorded: an interrupted cell runs again on resume."""
    from cure_lirpa.io.runs import store

    target = Path(path)
    try:
        result = measure(spec)
    except Exception as exc:
        error = {"error": describe(exc)[:2000], "traceback": traceback.format_exc()[-4000:]}
        store(error_path(target), spec["key"], error)
        sys.exit(1)
    store(target, spec["key"], result)
    error_path(target).unlink(missing_ok=True)


def run_cell(
    measure: Callable[[dict[str, Any]], dict[str, Any]],
    spec: dict[str, Any],
    path: Path,
    retry_failed: bool = False,
    timeout: Optional[float] = None,
) -> tuple[dict[str, Any], Optional[float]]:
    """The cell ``spec`` (with its ``key``) cached in ``path``: read back, or measured by
    ``measure(spec)`` (a module-level function) in a fresh process and cached. Returns the result
    or its error record (``{"error": ...}``), and the seconds the measurement took (None when read
    from the cache)."""
    from cure_lirpa.io.runs import store

    old = cached_cell(path, spec["key"])
    if old is not None and not (retry_failed and "error" in old):
        return old, None
    t0 = time.perf_counter()
    code = run_isolated(measure_cell, measure, spec, str(path), timeout=timeout)
    seconds = time.perf_counter() - t0
    res = cached_cell(path, spec["key"])
    if res is None or (code != 0 and "error" not in res):
        res = {"error": f"cell process {exit_reason(code)}"}
        store(error_path(path), spec["key"], res)
    return res, seconds


def warm_up(methods: Sequence[str], threat: Any) -> None:
    """Pay the process-wide first-call costs of ``methods`` (about 2 s for alpha-CROWN: lazy
    initialisation in torch and auto_LiRPA) on a tiny separate MLP, so that they are not billed to
    the cell's first image. The tiny model's memory is negligible and freed before the baseline."""
    import torch

    from cure_lirpa.bounds.classifier import BoundedClassifier
    from cure_lirpa.models import build_model

    tiny = build_model("mlp", (1, 4, 4), 3, (0.5,), (0.25,), width=4, depth=1).eval()
    bc = BoundedClassifier(tiny, (1, 4, 4), alpha_iterations=2)
    x, y = torch.full((1, 1, 4, 4), 0.5), torch.tensor([0])
    for m in methods:
        bc.margin_lower_bounds(x, y, threat, m)


@functools.cache
def file_sha1(path: Path) -> str:
    """Hex SHA-1 of a file (names the checkpoint a benchmark result was made with)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reattack_cell(folder: Path) -> str:
    """``0 / 2301``: certificates broken by ``benchmarks.reattack`` out of those it attacked, from
    ``<folder>/verify/reattack.json`` ('not yet' if the run was not reattacked)."""
    path = folder / "verify" / "reattack.json"
    if not path.is_file():
        return "not yet"
    threats = json.loads(path.read_text())["threats"].values()
    return f"{sum(t['broken'] for t in threats)} / {sum(t['certified'] for t in threats)}"


def code_fingerprint() -> str:
    """A hash of the library code a certificate depends on (part of every cell's key, so that
    cells are recomputed after a change of the bound code, the models or auto_LiRPA)."""
    import cure_lirpa
    from cure_lirpa.io.checkpoint import versions

    h = hashlib.sha1(json.dumps(versions(), sort_keys=True).encode())
    root = Path(cure_lirpa.__file__).parent
    for name in ("bounds", "threats", "verification", "attacks.py", "models.py"):
        for path in (
            sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]
        ):
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Command-line options shared by the suites


def data_root_option(help: str = "Folder holding MNIST/raw.", **kwargs: Any) -> Callable:
    """``--data-root`` (a folder, as text) defaulting to the shared data folder ../shared/data."""
    kwargs = {"default": str(DEFAULT_DATA), "show_default": True, "help": help, **kwargs}
    return click.option("--data-root", type=click.Path(file_okay=False), **kwargs)


def with_options(settings: Any, **options: Any) -> Any:
    """A copy of the settings dataclass ``settings`` with the options that were given (not None)."""
    return replace(settings, **{name: v for name, v in options.items() if v is not None})


def split_commas(*items: str) -> list[str]:
    """The non-empty comma-separated values of ``items`` (``"a,b", "c"`` -> ``[a, b, c]``)."""
    return [v.strip() for item in items for v in item.split(",") if v.strip()]


def named_checkpoints(items: Sequence[str], folder: Optional[Path] = None) -> dict[str, Path]:
    """``NAME=PATH`` (or a bare PATH, named after its folder) as ``{name: path}``; with
    ``folder``, every ``folder/<name>/checkpoint.pt`` besides."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, Path(item).parent.name or Path(item).stem
        out[name] = Path(path)
    if folder is not None:
        out.update({p.parent.name: p for p in sorted(folder.glob("*/checkpoint.pt"))})
    return out


# ---------------------------------------------------------------------------------------------
# The docs generator


def filled_text(path: Path, quiet: bool = False) -> str:
    """``path``'s text with every marked results section (``<!-- BEGIN results:MARKER -->`` ...
    ``<!-- END results:MARKER -->``) replaced by its suite's latest fragment; sections whose
    fragment has not been generated yet are left as they are."""
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
            body = relinked(frag.read_text().rstrip("\n") + "\n", frag.parent, path.parent)
            text = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(2), text)
            say(f"{marker}: copied {frag.relative_to(REPO)}")
    return text


LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s:#]+)((?:#[^)\s]*)?\))")
"""A Markdown link or image with a relative target (no scheme, not an anchor)."""


def relinked(text: str, source: Path, page: Path) -> str:
    """``text`` written in folder ``source`` with its relative link and image targets rewritten
    to point to the same files from folder ``page`` (a fragment's plot seen from docs/)."""

    def move(m: re.Match) -> str:
        target = os.path.relpath(source / m.group(2), page).replace(os.sep, "/")
        return m.group(1) + target + m.group(3)

    return LINK.sub(move, text)


def fill_docs(paths: Sequence[Path] = DOCS) -> None:
    """Rewrite each docs page with :func:`filled_text`."""
    from cure_lirpa.io.checkpoint import atomic_write_text

    for path in paths:
        atomic_write_text(path, filled_text(path))
