"""Sharded certification: split one verify run into K/N shards, run them anywhere, merge them.

A run certifies samples ``start .. start+count-1``. Shard K of N takes one contiguous block of them,
the blocks' sizes differing by at most one (:meth:`Shard.block`). Every random choice is seeded per
sample (verify's PGD by the sample's index, smoothing's noise by ``smoothing.sample_seed``),
so a merged run is the unsharded run: the same certified flags, margins, PGD results and summary
(only times differ, and margins to float rounding when batches are cut differently).

Each shard writes to ``<out>/shard-K-of-N/`` (``config.json``, ``samples.jsonl``, ``samples.csv``,
``summary.json``, ``summary.md``); :func:`gather_shards` checks that all shards share one config
and lists missing sample indices, and each kind of run's ``merge_shards``
(:mod:`cure_lirpa.verification.runner`, :mod:`cure_lirpa.smoothing.runner`) writes the merged files
into ``<out>``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TypeVar, Union

from ..errors import UserError

if TYPE_CHECKING:
    from .runs import Run

SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")
SHARD_KEYS = ("shard", "shard_start", "shard_count")
"""Config keys of one shard, not of the run."""
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def block(self, n: int) -> tuple[int, int]:
        """``(offset, length)`` of this shard's contiguous slice of n samples; the N slices cover
        them in order and their lengths differ by at most one (empty only when n < N)."""
        lo = self.index * n // self.count
        hi = (self.index + 1) * n // self.count
        return lo, hi - lo

    @property
    def label(self) -> str:
        """``"K/N"``, as the ``shard`` key of a shard's config records it."""
        return f"{self.index}/{self.count}"

    def checked_block(self, n: int) -> tuple[int, int]:
        """:meth:`block`, refusing fewer samples than shards (some shard would be empty)."""
        if n < self.count:
            raise UserError(
                f"shard {self.label} is empty: {n} samples cannot fill {self.count} shards; "
                f"use N <= {n}"
            )
        return self.block(n)

    def take(self, items: Sequence[T]) -> list[T]:
        """This shard's contiguous block of ``items`` (:meth:`checked_block`)."""
        lo, length = self.checked_block(len(items))
        return list(items[lo : lo + length])


def parse_shard(text: str) -> Shard:
    """``"K/N"`` (0 <= K < N) -> :class:`Shard`; a clear error otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise UserError(f"--shard {text!r}: expected K/N, e.g. --shard 0/4 (shard 0 of 4)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or k >= n:
        raise UserError(f"--shard {text!r}: K must lie in 0..N-1 and N >= 1")
    return Shard(k, n)


def shard_from_environment() -> Optional[Shard]:
    """The shard of this process under torchrun (``RANK``/``WORLD_SIZE``) or a Slurm array
    (``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``); None when run alone."""
    for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")):
        if os.environ.get(size, "1").isdigit() and int(os.environ.get(size, "1")) > 1:
            return Shard(int(os.environ.get(rank, "0")), int(os.environ[size]))
    return None


def shard_of(shard: Union[str, Shard, None]) -> Optional[Shard]:
    """``shard`` as a :class:`Shard` (``"K/N"`` parsed); None: this process's shard under torchrun
    or a Slurm array (:func:`shard_from_environment`), None when run alone."""
    if isinstance(shard, Shard):
        return shard
    return parse_shard(shard) if shard else shard_from_environment()


def shard_dirs(out: Path) -> list[Path]:
    """The ``shard-K-of-N`` folders in ``out``, sorted by K."""
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := SHARD_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


@dataclass
class Gathered:
    """The shards of one run: its kind, its config without the shard keys, the shard folders and
    every record ordered by sample index."""

    kind: str
    config: dict[str, Any]
    dirs: list[Path]
    records: list[dict[str, Any]]


def gather_shards(
    out: Path,
    shards: Optional[Sequence[Path]],
    kinds: Sequence[str],
    index_key: str,
    expected: Callable[[dict[str, Any]], Sequence[int]],
    not_compared: Sequence[str] = SHARD_KEYS,
) -> Gathered:
    """Read the ``shard-K-of-N`` folders of ``out`` (or ``shards``) of a run of one of ``kinds``.

    Refuses folders without such a run, shards of different kinds, settings (naming the keys, all
    but ``not_compared``) or N, and an incomplete run (listing the missing indices of
    ``expected(config)``). Records are keyed by ``record[index_key]``.
    """
    from .runs import RECORDS, Records, config_diff, describe_diff, read_config

    out = Path(out)
    dirs = [Path(d) for d in shards] if shards else (shard_dirs(out) if out.is_dir() else [])
    if not dirs:
        raise UserError(f"no shard-K-of-N folders in {out}; run the command with --shard K/N")
    records = []
    for d in dirs:
        record = read_config(d)
        if record is None or record.get("kind") not in kinds:
            raise UserError(f"{d} holds no {' or '.join(kinds)} run (no config.json of one)")
        if "shard" not in record["config"]:
            raise UserError(f"{d} is not a shard (it was run without --shard)")
        records.append(record)
    first, base = dirs[0], records[0]
    for d, r in zip(dirs[1:], records[1:]):
        if r["kind"] != base["kind"]:
            raise UserError(f"{d} holds a {r['kind']} run, {first} a {base['kind']} run")
        diff = config_diff(base["config"], r["config"], ignore=not_compared)
        if diff:
            raise UserError(
                f"{d} was made with other settings than {first} "
                f"({describe_diff(base['config'], r['config'], diff)}); shards of one run must "
                "share every option except --shard"
            )
    counts = sorted({r["config"]["shard"].split("/")[1] for r in records})
    if len(counts) > 1:
        raise UserError(f"shards of different N cannot be merged: N = {', '.join(counts)}")
    by_index: dict[int, dict[str, Any]] = {}
    for d in dirs:
        for rec in Records(d / RECORDS).read():
            by_index[int(rec[index_key])] = rec
    config = {k: v for k, v in base["config"].items() if k not in SHARD_KEYS}
    indices = list(expected(config))
    missing = [i for i in indices if i not in by_index]
    if missing:
        shown = ", ".join(map(str, missing[:30])) + (" ..." if len(missing) > 30 else "")
        raise UserError(
            f"{len(missing)} of {len(indices)} samples are missing (indices {shown}); run or "
            "resume the shards that hold them (--shard K/N --resume), then merge again"
        )
    return Gathered(base["kind"], config, dirs, [by_index[i] for i in indices])


def open_shard(
    out: Path,
    kind: str,
    config: dict[str, Any],
    shard: Optional[Shard],
    *,
    resume: bool = False,
    overwrite: bool = False,
    mutable: Sequence[str] = (),
) -> Run:
    """:meth:`Run.open` of ``shard`` of the run in ``out``: the folder ``<out>/shard-K-of-N`` with
    ``config`` plus ``shard: "K/N"`` (what :func:`gather_shards` reads); ``out`` itself when
    ``shard`` is None."""
    from .runs import Run

    if shard is not None:
        config = {**config, "shard": shard.label}
        out = Path(out) / shard.name
    return Run.open(out, kind, config, resume=resume, overwrite=overwrite, mutable=mutable)


def open_merged(
    out: Path, gathered: Gathered, overwrite: bool = False, mutable: Sequence[str] = ()
) -> Run:
    """The run folder ``out`` of the merge of ``gathered`` (:meth:`Run.open` writes its
    ``config.json``): a run there with the same settings is rebuilt, other settings need
    ``overwrite``, and the shard folders (merged ones and those in ``out``) are kept."""
    from .runs import Run

    kept = [*gathered.dirs, *(shard_dirs(out) if Path(out).is_dir() else [])]
    return Run.open(out, gathered.kind, gathered.config, overwrite=overwrite, mutable=mutable,
                    sources=kept)  # fmt: skip


def write_merged(out: Path, gathered: Gathered) -> None:
    """The merged run's ``samples.jsonl`` (as the unsharded run writes it)."""
    from .checkpoint import atomic_write_text
    from .runs import RECORDS

    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in gathered.records)
    atomic_write_text(Path(out) / RECORDS, lines)


def started_by_torchrun() -> bool:
    """Whether this process is a rank of a torchrun job with more than one process (a Slurm array
    task is not: its tasks never meet, so they are merged afterwards with ``cure-lirpa merge``)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def finish_shard(
    out: Path,
    shard: Optional[Shard],
    merge_ranks: bool,
    merge: Callable[[Path], dict[str, Any]],
    log: Callable[[str], None],
) -> Optional[Path]:
    """After shard K/N of the run in ``out``: with ``merge_ranks`` under torchrun, rank 0
    ``merge(out)``s when every rank is done; otherwise ``log`` says how to merge. Returns the folder
    whose results to show: ``out`` (no shard, or merged), the shard folder, or None (a rank that
    does not merge)."""
    if shard is None:
        return out
    folder = Path(out) / shard.name
    log(f"shard {shard.label} done in {folder}")
    if not merge_ranks or not started_by_torchrun():
        log(f"when every shard is done: cure-lirpa merge {out}")
        return folder
    if merge_when_all_done(out, merge) is None:
        return None
    log(f"merged {shard.count} shards into {out}")
    return out


def merge_when_all_done(
    out: Path, merge: Callable[[Path], dict[str, Any]]
) -> Optional[dict[str, Any]]:
    """Under torchrun: wait for every rank (a gloo barrier), then ``merge(out)`` on rank 0 and
    return its summary (other ranks: None). ``merge`` is the run's merge
    (:func:`cure_lirpa.verification.runner.merge_shards`,
    :func:`cure_lirpa.smoothing.runner.merge_shards`)."""
    import torch.distributed as dist

    from ..distributed import shutdown

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    finished = False
    try:
        dist.barrier()
        summary = merge(out) if dist.get_rank() == 0 else None
        finished = True
        return summary
    finally:
        if own:  # after a finished merge the ranks meet once more before leaving the group
            shutdown(finished)
