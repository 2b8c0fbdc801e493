"""One run folder for every command that writes results: ``train``, ``verify``, ``smooth train``,
``smooth certify``, ``smooth predict``, ``smooth analyze`` and ``merge``.

A run folder holds

* ``config.json`` -- ``{"format", "kind", "config", "versions"}``: what determines the results.
  A resume with other settings is refused naming the differing keys (:func:`config_diff`).
* ``checkpoint.pt`` (training runs) -- written atomically, with the full RNG state
  (:func:`rng_state` / :func:`set_rng_state`).
* ``samples.jsonl`` (certification runs) -- append-only per-sample records, one JSON object a line
  (:class:`Records`): a kill at any byte loses at most the torn last line, which a resume drops.
* results (``summary.json`` ...) written atomically when the run ends.

The rules are the same for every command, and :meth:`Run.open` is the one place that holds them:
a new or empty folder starts a run; a folder with other files is refused; a folder that holds a run
is refused unless ``--resume`` (continue it; same config) or ``--overwrite`` (start over) is given,
and both together are refused, so only ``--overwrite`` alone deletes a run; ``--resume`` without a
run is refused; a folder another process uses is refused (:func:`lock_folder`). ``merge`` rebuilds
a run with the same settings without ``--resume`` (its shards hold every sample) and never deletes
its shard folders. A run that fails before it wrote anything worth keeping leaves nothing behind
(:meth:`Run.discard_if_empty`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import AbstractSet, Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import UserError
from ..vocabulary import SAMPLES_JSONL
from .checkpoint import atomic_write_json, versions, write_error

try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None  # type: ignore[assignment]

FORMAT = "cure-lirpa-run/1"
CONFIG = "config.json"
RECORDS = SAMPLES_JSONL
PathLike = Union[str, os.PathLike]


def _json(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Sorted keys whose values differ between two configs (compared as JSON), except ``ignore``."""
    skip = set(ignore)
    old, new = _json(old), _json(new)
    return sorted(k for k in set(old) | set(new) if k not in skip and old.get(k) != new.get(k))


def describe_diff(old: dict[str, Any], new: dict[str, Any], keys: Sequence[str]) -> str:
    """``"lr: run 0.001, now 0.01; seed: run 0, now 1"`` for the differing ``keys``."""
    return "; ".join(f"{k}: run {old.get(k)!r}, now {new.get(k)!r}" for k in keys)


# ---------------------------------------------------------------------------------------------
# Random number generator state


def rng_state(generators: Optional[dict[str, torch.Generator]] = None) -> dict[str, Any]:
    """Every RNG a run draws from: torch (CPU and each CUDA device), numpy, Python's ``random``,
    and the named ``generators``."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {k: g.get_state().cpu() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(
    state: dict[str, Any], generators: Optional[dict[str, torch.Generator]] = None
) -> None:
    """Restore what :func:`rng_state` saved (generators missing from ``state`` keep theirs)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name in state["generators"]:
            gen.set_state(state["generators"][name].to(gen.get_state().device))


# ---------------------------------------------------------------------------------------------
# Append-only records


class Records:
    """An append-only JSON-lines file of per-sample records that survives a kill at any byte.

    Every :meth:`append` writes whole lines, flushes and fsyncs. A kill during a write leaves at
    most one torn last line; :meth:`read` ignores it and :meth:`append` cuts it off first. The file
    is scanned once per object; later appends of the same object only add their bytes (one writer
    per file).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._good: Optional[int] = None  # known good length after this object's own appends

    def _good_length(self) -> int:
        """Bytes up to the end of the last complete, parseable line."""
        if self._good is not None:
            return self._good
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except ValueError:
                break
            good += len(line)
        return good

    def read(self) -> list[dict[str, Any]]:
        """The complete records, in the order written."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()[: self._good_length()]
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        if not text:
            return
        try:
            good = self._good_length()
            with open(self.path, "r+b" if self.path.exists() else "wb") as f:
                f.truncate(good)
                f.seek(good)
                data = text.encode("utf-8")
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._good = good + len(data)
        except OSError as exc:
            self._good = None
            raise write_error(self.path, exc) from None

    def __len__(self) -> int:
        return len(self.read())


# ---------------------------------------------------------------------------------------------
# The run folder


def read_config(path: PathLike) -> Optional[dict[str, Any]]:
    """The ``config.json`` record of the run in folder ``path``, or None if it holds no run."""
    file = Path(path) / CONFIG
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None
    return record


# folders this process holds (lock_folder): real path -> (descriptor, device, inode)
_HELD: dict[str, tuple[int, int, int]] = {}


def lock_folder(path: PathLike) -> None:
    """Hold the folder ``path`` for this process: an exclusive ``flock`` on the folder itself,
    released by :func:`unlock_folder` or when the process ends, however it ends. Refuses a folder
    another process holds; this process may take a folder it holds again. A file system without
    locks leaves the folder unlocked."""
    if fcntl is None:
        return
    key = os.path.realpath(path)
    stat = os.stat(key)
    held = _HELD.get(key)
    if held is not None and held[1:] == (stat.st_dev, stat.st_ino):
        return
    unlock_folder(key)  # a folder deleted and made again under the same name
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"{path} is in use by another cure-lirpa process; wait until it ends, or choose "
            "another folder"
        ) from None
    except OSError:
        os.close(fd)
        return
    _HELD[key] = (fd, stat.st_dev, stat.st_ino)


def unlock_folder(path: PathLike) -> None:
    """Release a folder :func:`lock_folder` holds (nothing if it holds none)."""
    held = _HELD.pop(os.path.realpath(path), None)
    if held is not None:
        os.close(held[0])


class Run:
    """A run folder (see the module docstring); create it with :meth:`open`."""

    def __init__(
        self,
        path: Path,
        kind: str,
        config: dict[str, Any],
        resumed: bool,
        created: bool,
        sources: Sequence[Path] = (),
    ):
        self.path = path
        self.kind = kind
        self.config = config
        self.resumed = resumed
        self._created = created
        self._sources = tuple(sources)

    @classmethod
    def open(
        cls,
        path: PathLike,
        kind: str,
        config: dict[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
        mutable: Iterable[str] = (),
        sources: Iterable[PathLike] = (),
    ) -> Run:
        """Start a new run of ``kind`` in ``path`` or continue (``resume``) the one there: the
        run-folder rule of every command (the module docstring).

        ``config`` is everything that determines the results (JSON-serialisable); on resume it
        must equal the stored one except for the ``mutable`` keys (which are updated).
        ``overwrite`` deletes the run in ``path`` first. ``sources`` are the folders a merge
        rebuilds the run from (its shard folders): never deleted, no other files, and a run with
        the same settings is rebuilt without ``resume``. The folder is locked for this process
        (:func:`lock_folder`) until :meth:`close`. Raises :class:`UserError` for both ``resume``
        and ``overwrite``, a folder that holds a run when neither is given, a resume without a run
        or with another config, other files in the folder, and a folder in use by another process.
        """
        path = Path(path)
        keep = {Path(p).resolve() for p in sources}
        _decide(path, kind, config, resume, overwrite, mutable, keep)  # refuse before any change
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(path, exc) from None
        lock_folder(path)
        try:
            old = _decide(path, kind, config, resume, overwrite, mutable, keep)  # now it is ours
            if old is None:
                created |= _clear(path, keep)
            run = cls(path, kind, _json(config), old is not None, created, tuple(keep))
            atomic_write_json(
                path / CONFIG,
                {"format": FORMAT, "kind": kind, "config": run.config, "versions": versions()},
            )
        except BaseException:
            unlock_folder(path)
            if created and path.is_dir() and not _entries(path):
                path.rmdir()
            raise
        return run

    def close(self) -> None:
        """Release the folder (:func:`lock_folder`) once the run is over."""
        unlock_folder(self.path)

    def _nothing_kept(self) -> bool:
        return _nothing_kept(self.path, set(self._sources))

    def file(self, name: str) -> Path:
        return self.path / name

    def records(self, name: str = RECORDS) -> Records:
        return Records(self.path / name)

    def discard_if_empty(self) -> None:
        """After a failure: remove the run if it kept nothing (only its config, empty records or
        temporary files), and the folder if this run created it; release the folder."""
        try:
            if not self.path.is_dir() or not self._nothing_kept():
                return
            for p in self.path.iterdir():
                if p.resolve() not in self._sources:
                    p.unlink()
            if self._created and not any(self.path.iterdir()):
                self.path.rmdir()
        finally:
            self.close()


def _decide(
    path: Path,
    kind: str,
    config: dict[str, Any],
    resume: bool,
    overwrite: bool,
    mutable: Iterable[str],
    sources: AbstractSet[Path],
) -> Optional[dict[str, Any]]:
    """The run-folder rule of :meth:`Run.open`, without changing anything: the ``config.json``
    record of the run to continue, or None to start a new run (after :func:`_clear`)."""
    if resume and overwrite:
        raise UserError(
            f"--resume and --overwrite contradict each other (--resume continues the run in "
            f"{path}, --overwrite deletes it); pass one of them"
        )
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a folder for the run's outputs")
    old = read_config(path)
    if old is not None and old.get("kind") != kind:
        raise UserError(
            f"{path} holds a {old.get('kind')} run, not a {kind} run; choose another folder"
        )
    if old is not None and (overwrite or (not resume and _nothing_kept(path, sources))):
        return None  # start over (also over a run killed before it kept anything)
    if old is not None and not resume and not sources:
        raise UserError(
            f"{path} already holds a {kind} run; pass --resume to continue it, "
            "--overwrite to start over, or choose another folder"
        )
    if old is None and resume:
        raise UserError(f"--resume: {path} holds no {kind} run to continue; start without --resume")
    if old is not None:
        _check_same(path, old["config"], config, mutable, resume)
        return old
    others = sorted(p.name for p in _entries(path) if not _ours(p) and p.resolve() not in sources)
    if others:
        raise UserError(
            f"{path} already holds other files ({', '.join(others[:3])}); choose an empty or "
            "new folder for the run"
        )
    return None


def _check_same(
    path: Path, old: dict[str, Any], new: dict[str, Any], mutable: Iterable[str], resume: bool
) -> None:
    """Refuse to continue (or rebuild, for a merge) a run made with other settings."""
    diff = config_diff(old, new, ignore=mutable)
    if not diff:
        return
    what = describe_diff(old, new, diff)
    if resume:
        raise UserError(
            f"--resume: {path} was made with other settings ({what}); resume with the same "
            "options, or start a new run in another folder"
        )
    raise UserError(
        f"{path} already holds a run made with other settings ({what}); pass --overwrite to "
        "replace it, or choose another folder"
    )


def _entries(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def _nothing_kept(path: Path, sources: AbstractSet[Path] = frozenset()) -> bool:
    """Whether the run in ``path`` kept nothing: only its config, empty records, temporary files
    (and the ``sources`` it is rebuilt from)."""
    return all(
        p.resolve() in sources or (_ours(p) and (p.name == CONFIG or _empty(p)))
        for p in _entries(path)
    )


def _clear(path: Path, sources: AbstractSet[Path]) -> bool:
    """Delete everything in ``path`` but the ``sources``; whether a run was deleted."""
    had_run = read_config(path) is not None
    for p in _entries(path):
        if p.resolve() in sources:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return had_run


def _ours(p: Path) -> bool:
    """A file the run layer writes before results exist: the config, records, temporary files."""
    return p.is_file() and (
        p.name == CONFIG or p.suffix == ".jsonl" or (p.name.startswith(".") and p.suffix == ".tmp")
    )


def _empty(p: Path) -> bool:
    return p.suffix == ".tmp" or (p.suffix == ".jsonl" and not Records(p).read())


# ---------------------------------------------------------------------------------------------
# Cached results (benchmark cells)


def cached(path: PathLike, key: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The result stored in ``path`` by :func:`store` under the same ``key``, else None."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != _json(key):
        return None
    return record


def store(path: PathLike, key: dict[str, Any], result: dict[str, Any]) -> None:
    """Write ``result`` (a dict) with its ``key`` to ``path`` atomically."""
    atomic_write_json(path, {**result, "key": _json(key)})
