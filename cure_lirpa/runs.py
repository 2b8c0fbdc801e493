"""One run folder for every long job: ``train``, ``smooth train``, ``verify``, ``smooth certify``
and the benchmark cells.

A run folder holds

* ``config.json`` -- ``{"format", "kind", "config", "versions"}``: what determines the results.
  A resume with other settings is refused naming the differing keys (:func:`config_diff`).
* ``checkpoint.pt`` (training runs) -- written atomically, with the full RNG state
  (:func:`rng_state` / :func:`set_rng_state`).
* ``samples.jsonl`` (certification runs) -- append-only per-sample records, one JSON object a line
  (:class:`Records`): a kill at any byte loses at most the torn last line, which a resume drops.
* results (``summary.json`` ...) written atomically when the run ends.

The rules are the same for every command: a folder that holds a run is refused unless ``--resume``
(continue it; same config) or ``--overwrite`` (start over) is given; ``--resume`` without a run is
refused; a run that fails before it wrote anything worth keeping leaves nothing behind
(:meth:`Run.discard_if_empty`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .checkpoint import atomic_write_json, versions, write_error
from .errors import UserError

FORMAT = "cure-lirpa-run/1"
CONFIG = "config.json"
RECORDS = "samples.jsonl"
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


class Run:
    """A run folder (see the module docstring); create it with :meth:`open`."""

    def __init__(self, path: Path, kind: str, config: dict[str, Any], resumed: bool, created: bool):
        self.path = path
        self.kind = kind
        self.config = config
        self.resumed = resumed
        self._created = created

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
    ) -> Run:
        """Start a new run of ``kind`` in ``path`` or continue (``resume``) the one there.

        ``config`` is everything that determines the results (JSON-serialisable); on resume it
        must equal the stored one except for the ``mutable`` keys (which are updated).
        ``overwrite`` deletes the run in ``path`` first. Raises :class:`UserError` for a folder
        that holds a run when neither is given, a resume without a run or with another config.
        """
        path = Path(path)
        flag = "--resume"
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file; give a folder for the run's outputs")
        old = read_config(path)
        if old is not None and old.get("kind") != kind:
            raise UserError(
                f"{path} holds a {old.get('kind')} run, not a {kind} run; choose another folder"
            )
        if old is not None and overwrite:
            shutil.rmtree(path)
            old = None
        elif old is not None and not resume:
            if cls._nothing_kept(path):  # a run killed before it kept anything: start over
                shutil.rmtree(path)
                old = None
            else:
                raise UserError(
                    f"{path} already holds a {kind} run; pass --resume to continue it, "
                    "--overwrite to start over, or choose another folder"
                )
        if old is None and resume:
            raise UserError(f"{flag}: {path} holds no {kind} run to continue; start without {flag}")
        if old is not None:
            diff = config_diff(old["config"], config, ignore=mutable)
            if diff:
                raise UserError(
                    f"{flag}: {path} was made with other settings "
                    f"({describe_diff(old['config'], config, diff)}); resume with the same "
                    "options, or start a new run in another folder"
                )
        if old is None and path.is_dir() and any(not _ours(p) for p in path.iterdir()):
            others = sorted(p.name for p in path.iterdir() if not _ours(p))
            raise UserError(
                f"{path} already holds other files ({', '.join(others[:3])}); choose an empty or "
                "new folder for the run"
            )
        if old is None and path.is_dir():  # leftovers of a run killed before it kept anything
            for p in path.iterdir():
                p.unlink()
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(path, exc) from None
        run = cls(path, kind, _json(config), resumed=old is not None, created=created)
        try:
            atomic_write_json(
                path / CONFIG,
                {"format": FORMAT, "kind": kind, "config": run.config, "versions": versions()},
            )
        except UserError:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return run

    @staticmethod
    def _nothing_kept(path: Path) -> bool:
        return all(_ours(p) and (p.name == CONFIG or _empty(p)) for p in path.iterdir())

    def file(self, name: str) -> Path:
        return self.path / name

    def records(self, name: str = RECORDS) -> Records:
        return Records(self.path / name)

    def discard_if_empty(self) -> None:
        """After a failure: remove the run if it kept nothing (only its config, empty records or
        temporary files), and the folder if this run created it."""
        if not self.path.is_dir() or not self._nothing_kept(self.path):
            return
        for p in self.path.iterdir():
            p.unlink()
        if self._created:
            self.path.rmdir()


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
