"""The verify runner: certify a batch, a dataset, and a whole run folder.

:func:`verify` is ``cure-lirpa verify`` as a function (the command line, the Python API and the
benchmarks call it): checkpoint, threats and data in; the run folder (:meth:`cure_lirpa.io.runs.Run.open`),
shards, resume, the merge once every shard is done, and the results files
(:mod:`cure_lirpa.verification.results`) out. :func:`certify_dataset` certifies every sample of a
dataset under every (threat, bound method) pair and, as a soundness cross-check, attacks every
sample under every threat (PGD in lp-balls; corners and PGD in every patch location; a grid of
transformations for geometric threats): a sample reported certified and broken by the attack
under the same threat is
counted in ``summary["soundness_violations"]`` (it must stay 0; the tests assert it) and its
certificates are withdrawn. Accuracies are fractions (0..1), times seconds, memory MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..attacks import family_attack, pgd
from ..bounds.classifier import METHODS, BoundedClassifier
from ..errors import UserError
from ..io.shards import (
    Shard,
    gather_shards,
    merge_when_all_done,
    open_merged,
    shard_of,
    started_by_torchrun,
    write_merged,
)
from ..threats.base import BoxFamily, NormBall, Threat
from ..vocabulary import (
    AUTO,
    DEFAULT_BOUND_METHODS,
    DEFAULT_THREATS,
    L2,
    LINF,
    MNIST,
    SUMMARY_JSON,
)
from .cascade import BUDGET, Stages, cascade_for, margins, run_cascade
from .results import SampleRow, peak_memory_mb, read_summary, summarize, write_results

PathLike = Union[str, os.PathLike]
ALL_METHODS = (*METHODS, AUTO)
DEFAULT_METHODS = DEFAULT_BOUND_METHODS
PGD = "pgd"
"""The method key of the PGD cross-check's time in ``seconds_per_image``."""
TOTAL = "total"
"""The key of a sample's share of its batch's whole time in :attr:`SampleRow.seconds`."""
PROBE_IMAGES = 16
"""Images timed (after a warm-up call) for the up-front estimate of a verify run."""


def default_threats(ckpt: dict, dataset: str) -> tuple[str, ...]:
    """The l∞ and l2 radii the checkpoint was trained for (``cure-lirpa train`` records them), else
    the usual pair of ``dataset``."""
    config = ckpt.get("config") or {}
    eps_linf, eps_l2 = config.get("eps_linf"), config.get("eps_l2")
    if isinstance(eps_linf, (int, float)) and isinstance(eps_l2, (int, float)):
        if eps_linf > 0 and eps_l2 > 0:
            return (f"{LINF}:{eps_linf!r}", f"{L2}:{eps_l2!r}")
    return DEFAULT_THREATS.get(dataset, DEFAULT_THREATS[MNIST])


def pgd_seed(seed: int, index: int) -> int:
    """Seed of the PGD cross-check's random starts for the sample of dataset index ``index``."""
    return seed * 1_000_003 + index


def estimate_text(per_image: float, images: int, probed: int = 1) -> str:
    """The up-front estimate of a run of ``images`` images from the seconds per image of a probe
    of ``probed`` images."""
    total = per_image * images
    minutes, seconds = divmod(int(round(total)), 60)
    hours, minutes = divmod(minutes, 60)
    span = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"
    return (
        f"estimated time: about {span} for {images} images ({per_image:.2f} s per image on the "
        f"first {probed}; an estimate: images that need the tighter methods take longer, large "
        "batches of easy ones less)"
    )


# ---------------------------------------------------------------------------------------------
# One batch


def certify_batch(
    bc: BoundedClassifier,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threats: Sequence[Threat],
    methods: Sequence[str],
    attack: bool = True,
    attack_steps: int = 50,
    attack_restarts: int = 2,
    times: Optional[dict] = None,
    first_index: int = 0,
    seed: int = 0,
    advance: Optional[Callable[[float], None]] = None,
    budget: Optional[float] = BUDGET,
    stages: Stages = cascade_for,
) -> list[SampleRow]:
    """Certify one batch ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,).

    ``times`` (a ``defaultdict(float)``) gets the seconds per ``(threat, method)``; ``budget`` the
    cascade's seconds per sample and threat (None: no limit); ``stages(threat)`` its stages.
    The PGD cross-check draws each sample's random starts from its own generator, seeded by
    :func:`pgd_seed` (``seed`` and the sample's index ``first_index + i``), so a sample is attacked
    alike in any batch: resumed and sharded runs attack it as the plain run does.
    ``advance(images)`` is called as work finishes, adding up to B over the batch (progress bars).
    """
    times = times if times is not None else defaultdict(float)
    share = 1.0 / (len(threats) * len(methods))
    step = (lambda k: advance(share * k)) if advance is not None else (lambda k: None)
    with torch.no_grad():
        pred = model(x.to(bc.device)).argmax(1).cpu()
    rows = [SampleRow(first_index + i, int(y[i]), int(pred[i])) for i in range(len(y))]
    correct = pred == y.cpu()
    for threat in threats:
        for method in methods:
            margin, fell = _bound(bc, model, x, y, threat, method, rows, correct, times, step,
                                  budget, stages)  # fmt: skip
            name = threat.name
            for r, f in zip(rows, fell.tolist()):
                if f and name not in r.alpha_fallback:
                    r.alpha_fallback.append(name)
            ok = (margin > 0) & correct
            for r, m, c in zip(rows, margin.tolist(), ok.tolist()):
                r.margins.setdefault(name, {})[method] = m
                r.certified.setdefault(name, {})[method] = bool(c)
        if attack and isinstance(threat, NormBall):
            attacked = (attack_steps, attack_restarts, seed, first_index)
            _cross_check(bc, model, x, y, threat, rows, times, *attacked)
        elif attack and isinstance(threat, BoxFamily):
            _family_cross_check(bc, model, x, y, threat, rows, times, seed)
        else:
            for r in rows:
                r.robust[threat.name] = None
    return rows


def _bound(
    bc: BoundedClassifier,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    method: str,
    rows: list[SampleRow],
    correct: torch.Tensor,
    times: dict,
    step: Callable[[float], None],
    budget: Optional[float],
    stages: Stages,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins (B,) of ``method`` under ``threat`` and the alpha-CROWN fallback flags (bool (B,));
    the cascade's deciding stages and skipped stages go into ``rows``."""
    family = isinstance(threat, BoxFamily)
    t0 = time.perf_counter()
    fell = torch.zeros(len(y), dtype=torch.bool)
    if method == AUTO:
        decision = run_cascade(bc, model, x, y, threat, times, correct, step, budget, stages)
        margin, fell = decision.margin, decision.fallback
        for r, b, sk in zip(rows, decision.by, decision.skipped):
            r.decided_by[threat.name] = b
            if sk:
                r.skipped[threat.name] = sk
    elif family:
        total = len(y) * threat.num_boxes(bc.in_shape)
        margin = bc.box_margins(
            x, y, threat, method, on_chunk=lambda idx, t=total: step(len(y) * len(idx) / t)
        )
        margin = margin.min(1).values.cpu()
    else:
        margin, fell = margins(bc, x, y, threat, method)
    if method != AUTO:
        times[(threat.name, method)] += time.perf_counter() - t0
    if not family:
        step(len(y))
    return margin, fell


def _cross_check(
    bc: BoundedClassifier,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: NormBall,
    rows: list[SampleRow],
    times: dict,
    steps: int,
    restarts: int,
    seed: int,
    first_index: int,
) -> None:
    """PGD under ``threat``: records ``robust`` in ``rows`` and withdraws every certificate the
    attack breaks (a violation: never reported as certified)."""
    name = threat.name
    t0 = time.perf_counter()
    x_adv = pgd(
        model,
        x.to(bc.device),
        y.to(bc.device),
        threat,
        steps=steps,
        restarts=restarts,
        generator=[torch.Generator().manual_seed(pgd_seed(seed, r.index)) for r in rows],
    )
    with torch.no_grad():
        robust = model(x_adv).argmax(1).cpu() == y.cpu()
    times[(name, PGD)] += time.perf_counter() - t0
    _record_attack(rows, name, robust.tolist())


def _record_attack(rows: list[SampleRow], name: str, robust: Sequence[bool]) -> None:
    """Record the cross-check's ``robust`` flags under threat ``name`` and withdraw every
    certificate the attack broke (a violation: never reported as certified)."""
    for r, rb in zip(rows, robust):
        r.robust[name] = bool(rb)
        if r.best(name) and not rb:
            r.violations.append(name)
            r.certified[name] = dict.fromkeys(r.certified[name], False)


def _family_cross_check(
    bc: BoundedClassifier,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: BoxFamily,
    rows: list[SampleRow],
    times: dict,
    seed: int,
) -> None:
    """:func:`family_attack` on the correctly classified samples (each seeded by its index):
    records ``robust`` (misclassified samples are not robust) and withdraws every certificate the
    attack breaks, as :func:`_cross_check` does for balls; nothing when the family has no attack."""
    name = threat.name
    t0 = time.perf_counter()
    correct = [i for i, r in enumerate(rows) if r.correct]
    robust = torch.zeros(len(rows), dtype=torch.bool)
    if correct:
        gens = [torch.Generator().manual_seed(pgd_seed(seed, rows[i].index)) for i in correct]
        idx = torch.tensor(correct)
        found = family_attack(model, x[idx].to(bc.device), y[idx].to(bc.device), threat,
                              bc.in_shape, generators=gens)  # fmt: skip
        if found is None:
            for r in rows:
                r.robust[name] = None
            return
        robust[idx] = found
    times[(name, PGD)] += time.perf_counter() - t0
    _record_attack(rows, name, robust.tolist())


# ---------------------------------------------------------------------------------------------
# A dataset


def certify_dataset(
    model: nn.Module,
    dataset: Dataset,
    threats: Sequence[Threat],
    methods: Sequence[str],
    in_shape: Sequence[int],
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    memory_mb: float = 4096.0,
    attack: bool = True,
    attack_steps: int = 50,
    attack_restarts: int = 2,
    first_index: int = 0,
    done: Iterable[SampleRow] = (),
    on_batch: Optional[Callable[[list[SampleRow]], None]] = None,
    progress: bool = False,
    seed: int = 0,
    budget: Optional[float] = BUDGET,
    stages: Stages = cascade_for,
) -> tuple[list[SampleRow], dict[str, Any]]:
    """Certify every sample of ``dataset`` (images in [0, 1] of shape ``in_shape``); ``done`` rows
    (from a resumed run) are skipped; returns the rows and :func:`summarize`'s summary.

    ``budget``: seconds of bound computation per sample and threat for the cascade (None: no
    limit); ``stages(threat)``: its stages. ``on_batch`` is called with each finished batch's rows
    (:func:`verify` appends them to the run's samples.jsonl).
    """
    methods = _checked(methods, threats)
    device = torch.device(device)
    model = model.to(device).eval()
    bc = BoundedClassifier(model, in_shape, device=device, memory_mb=memory_mb)
    bc.train(False)
    rows = list(done)
    skip = len(rows)
    times: dict = defaultdict(float)
    bar = _progress_bar(len(dataset), skip) if progress else None
    certify = partial(certify_batch, bc, model, threats=threats, methods=methods, attack=attack,
                      attack_steps=attack_steps, attack_restarts=attack_restarts, seed=seed,
                      budget=budget, stages=stages)  # fmt: skip
    for offset, x, y in _batches(dataset, batch_size, skip):
        if tuple(x.shape[1:]) != tuple(in_shape):
            raise UserError(
                f"dataset images have shape {tuple(x.shape[1:])} but the model expects "
                f"{tuple(in_shape)}; pick the dataset the checkpoint was trained on"
            )
        first = first_index + offset
        if bar is not None and len(rows) == skip and len(dataset) - skip > 1:
            bar.write(_estimate(certify, x, y, first, len(dataset) - skip))
        advance = bar.update if bar is not None else None
        before, t0 = dict(times), time.perf_counter()
        batch_rows = certify(x=x, y=y, times=times, first_index=first, advance=advance)
        spent = {f"{t}/{m}": v - before.get((t, m), 0.0) for (t, m), v in times.items()}
        spent[TOTAL] = time.perf_counter() - t0
        for r in batch_rows:
            r.seconds = {k: v / len(batch_rows) for k, v in spent.items()}
        rows.extend(batch_rows)
        if on_batch is not None:
            on_batch(batch_rows)
        if bar is not None:  # round off the fractional updates
            bar.n = len(rows)
            bar.refresh()
    if bar is not None:
        bar.close()
    summary = summarize(rows, threats, methods, *_seconds_of(rows))
    summary["peak_memory_mb"] = peak_memory_mb(device)
    return rows, summary


def _seconds_of(rows: Sequence[SampleRow]) -> tuple[dict[tuple[str, str], float], float]:
    """The seconds per ``(threat, method)`` and in all, summed over the rows (every session of a
    resumed run)."""
    times: dict[tuple[str, str], float] = defaultdict(float)
    total = 0.0
    for r in rows:
        for key, v in r.seconds.items():
            if key == TOTAL:
                total += v
            else:
                t, m = key.rsplit("/", 1)
                times[(t, m)] += v
    return times, total


def _checked(methods: Sequence[str], threats: Sequence[Threat]) -> list[str]:
    """``methods`` without repeats; refuses unknown methods and an empty list of threats."""
    methods = list(dict.fromkeys(methods))
    for m in methods:
        if m not in ALL_METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    if not threats:
        example = " ".join(f"--threat {t}" for t in DEFAULT_THREATS[MNIST])
        raise UserError(f"give at least one threat, e.g. {example}")
    return methods


def _batches(
    dataset: Dataset, batch_size: int, skip: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(offset, x, y)`` of each batch in order, without the first ``skip`` samples (``offset``:
    the position of ``x[0]`` in ``dataset``)."""
    seen = 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if seen + len(y) > skip:
            lo = max(0, skip - seen)
            yield seen + lo, x[lo:], y[lo:]
        seen += len(y)


def _progress_bar(total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc="verify",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} img [{elapsed}<{remaining}]",
    )


def _estimate(
    certify: Callable[..., list[SampleRow]], x: torch.Tensor, y: torch.Tensor, first: int, left: int
) -> str:
    """Time a few images after a warm-up call (first calls pay for set-up) and estimate the whole
    run's time; the results are discarded, so every batch is certified as in a run without a
    progress bar."""
    certify(x=x[:1], y=y[:1], times=defaultdict(float), first_index=first)
    k = min(len(y), PROBE_IMAGES)
    t0 = time.perf_counter()
    certify(x=x[:k], y=y[:k], times=defaultdict(float), first_index=first)
    return estimate_text((time.perf_counter() - t0) / k, left, k)


# ---------------------------------------------------------------------------------------------
# A run folder


@dataclass
class VerifyResult:
    """A finished :func:`verify` run, or this process's shard of it.

    ``out``: the folder of these results (``<run_dir>/shard-K-of-N`` for a shard); ``summary``:
    accuracies as fractions, the run's settings under ``"config"``; ``by_rank``: the shard came
    from torchrun's rank, so the ranks merge themselves; ``merged``: the merged summary when this
    process merged every shard into ``run_dir``.
    """

    out: Path
    run_dir: Path
    rows: list[SampleRow]
    summary: dict[str, Any]
    threats: list[Threat]
    methods: list[str]
    shard: Optional[Shard] = None
    by_rank: bool = False
    merged: Optional[dict[str, Any]] = None


def verify(
    checkpoint: PathLike,
    threats: Sequence[Union[Threat, str]] = (),
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    dataset: Optional[str] = None,
    data_root: Optional[PathLike] = None,
    split: str = "test",
    start: int = 0,
    count: Optional[int] = None,
    batch_size: int = 64,
    memory_mb: float = 4096.0,
    attack: bool = True,
    attack_steps: int = 50,
    attack_restarts: int = 2,
    budget: Optional[float] = BUDGET,
    out: Optional[PathLike] = None,
    shard: Union[str, Shard, None] = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> VerifyResult:
    """Certify the checkpoint of ``cure-lirpa train`` under every threat with every method, into
    the run folder ``out`` (default ``<checkpoint folder>/verify-<hash of the settings>``).

    ``threats`` default to the radii the checkpoint was trained for (:func:`default_threats`);
    ``dataset`` to the checkpoint's; samples ``start .. start+count-1`` of ``split``; ``budget``
    0 or None: no time limit for the cascade. ``shard`` ("K/N" or a :class:`Shard`; None: from
    torchrun's rank or a Slurm array task, if any) certifies one block of the samples into
    ``out/shard-K-of-N``; under torchrun rank 0 merges every shard into ``out`` once all are done.
    ``resume`` continues a killed run, ``overwrite`` replaces one (:meth:`Run.open`).
    """
    from ..data import load_dataset, take
    from ..io.checkpoint import dataset_info_of, model_from_checkpoint

    checkpoint = Path(checkpoint)
    ckpt = _load_bounded(checkpoint)
    info = dataset_info_of(ckpt)
    dataset = dataset or info.name
    threats = _threats(threats, ckpt, dataset, info.in_shape)
    methods = list(dict.fromkeys(methods))
    root = str(data_root) if data_root else None
    data = take(load_dataset(dataset, split, root=root), start, count)
    config = {"checkpoint": str(checkpoint.resolve()), "threats": [t.name for t in threats],
              "methods": methods, "dataset": dataset, "split": split, "start": start,
              "count": len(data), "attack": attack, "attack_steps": attack_steps,
              "attack_restarts": attack_restarts, "seed": seed, "budget": budget}  # fmt: skip
    run_dir = Path(out) if out is not None else checkpoint.parent / f"verify-{_digest(config)}"
    part = shard_of(shard)
    data, out_dir = _take_shard(data, config, part, run_dir)
    certify = partial(certify_dataset, model_from_checkpoint(ckpt), data, threats, methods,
                      info.in_shape, device=device, batch_size=batch_size, memory_mb=memory_mb,
                      attack=attack, attack_steps=attack_steps, attack_restarts=attack_restarts,
                      budget=budget or None, first_index=config.get("shard_start", start),
                      seed=seed, progress=progress)  # fmt: skip
    write = partial(write_results, threats=threats, methods=methods)
    rows, summary = _run(out_dir, config, certify, write, resume, overwrite)
    result = VerifyResult(out_dir, run_dir, rows, summary, threats, methods, part)
    result.by_rank = part is not None and shard is None and started_by_torchrun()
    if result.by_rank:  # rank 0 merges when all ranks are done
        result.merged = merge_when_all_done(run_dir, partial(merge_shards, overwrite=overwrite))
    return result


def _load_bounded(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint; refuses a randomized-smoothing base classifier (certified otherwise)."""
    from ..io.checkpoint import load_checkpoint, smoothing_noise

    ckpt = load_checkpoint(checkpoint)
    noise = smoothing_noise(ckpt)
    if noise:
        sigma = (ckpt.get("config") or {}).get("sigma")
        raise UserError(
            f"{checkpoint} is a randomized-smoothing base classifier (trained with {noise}); its "
            "guarantee is the smoothed classifier's: certify it with 'cure-lirpa smooth certify "
            f"-c {checkpoint} --sigma {sigma:g} --out RUN'. verify bounds models from "
            "'cure-lirpa train'"
        )
    return ckpt


def _threats(
    threats: Sequence[Union[Threat, str]], ckpt: dict, dataset: str, in_shape: Sequence[int]
) -> list[Threat]:
    """The threats (default: :func:`default_threats`) without repeats; refuses a ball that holds
    the whole input box (it certifies nothing)."""
    from ..threats.base import check_radius, parse_threat

    given = threats or default_threats(ckpt, dataset)
    out = list(dict.fromkeys(t if isinstance(t, Threat) else parse_threat(t) for t in given))
    for threat in out:
        if isinstance(threat, NormBall):
            check_radius(threat.norm, threat.eps, in_shape, f"--threat {threat.name}")
    return out


def _digest(config: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def _take_shard(
    data: Dataset, config: dict[str, Any], part: Optional[Shard], run_dir: Path
) -> tuple[Dataset, Path]:
    """This shard's block of ``data`` and its folder (``config`` gets the shard's keys); all of
    ``data`` and ``run_dir`` when not sharded."""
    from torch.utils.data import Subset

    if part is None:
        return data, run_dir
    offset, length = part.checked_block(len(data))
    config.update(shard=part.label, shard_start=config["start"] + offset,
                  shard_count=length)  # fmt: skip
    return Subset(data, range(offset, offset + length)), run_dir / part.name


def _run(
    out: Path,
    config: dict[str, Any],
    certify: Callable[..., tuple[list[SampleRow], dict[str, Any]]],
    write: Callable[[Path, list[SampleRow], dict[str, Any]], None],
    resume: bool,
    overwrite: bool,
) -> tuple[list[SampleRow], dict[str, Any]]:
    """``certify(done=..., on_batch=...)`` in the run folder ``out``, then ``write(out, rows,
    summary)``: the rows of a resumed run are skipped, each finished batch is appended to
    samples.jsonl; a run that fails before it kept anything leaves nothing behind. The summary
    gets ``config``."""
    from ..io.runs import Run

    run = Run.open(out, "verify", config, resume=resume, overwrite=overwrite)
    records = run.records()
    done = [SampleRow(**r) for r in records.read()]
    try:
        rows, summary = certify(
            done=done, on_batch=lambda rows: records.append(asdict(r) for r in rows)
        )
    except Exception:
        run.discard_if_empty()  # nothing worth resuming: leave no partial output behind
        raise
    summary["config"] = config
    write(out, rows, summary)
    run.close()
    return rows, summary


# ---------------------------------------------------------------------------------------------
# Merging shards


def merge_shards(
    out: PathLike, shards: Optional[Sequence[PathLike]] = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Merge the verify shards in ``out`` (or the given shard folders) into ``out``: the
    summary.json, summary.md, samples.csv and samples.jsonl of the unsharded run; returns the
    summary (see :func:`cure_lirpa.io.shards.gather_shards` and
    :func:`~cure_lirpa.io.shards.open_merged` for what is refused). Times are the samples' own
    seconds added up (every session of every shard); peak memory is the largest shard's."""
    from ..threats.base import parse_threat

    out = Path(out)
    dirs = [Path(d) for d in shards] if shards else None
    g = gather_shards(
        out, dirs, ["verify"], "index", lambda c: range(c["start"], c["start"] + c["count"])
    )
    run = open_merged(out, g, overwrite)
    ordered = [SampleRow(**r) for r in g.records]
    threats = [parse_threat(t) for t in g.config["threats"]]
    methods = g.config["methods"]
    summaries = [read_summary(d) for d in g.dirs if (d / SUMMARY_JSON).exists()]
    if all(r.seconds for r in ordered):
        times, seconds = _seconds_of(ordered)
    else:  # shards written before samples kept their seconds: add up their summaries
        times, seconds = defaultdict(float), 0.0
        for s in summaries:
            seconds += s.get("seconds_total", 0.0)
            for key, per_image in s.get("seconds_per_image", {}).items():
                t, m = key.rsplit("/", 1)
                times[(t, m)] += per_image * s["samples"]
    peaks = [s.get("peak_memory_mb", 0.0) for s in summaries]
    summary = summarize(ordered, threats, methods, times, seconds)
    summary["peak_memory_mb"] = max(peaks, default=0.0)
    summary["config"] = g.config
    summary["merged_from"] = [d.name for d in g.dirs]
    write_results(out, ordered, summary, threats, methods)
    write_merged(out, g)
    run.close()
    return summary
