"""Certify or predict a whole dataset into a run folder (what ``cure-lirpa smooth certify`` and
``smooth predict`` call), shard it, and merge the shards.

A run folder (:mod:`cure_lirpa.io.runs`) holds

* ``config.json`` -- the settings that determine the results (a resume with other settings is
  refused naming the keys); its ``info`` entry (checkpoint path, training method, versions) is
  informational and not compared;
* ``samples.jsonl`` -- one record per sample, appended as the run goes (a kill at any byte loses
  at most the last second of work; ``--resume`` continues after the last complete record);
* when the run ends: ``samples.tsv``, ``summary.json`` and ``summary.md`` (:mod:`.results`).

Noise for sample i is seeded by ``sample_seed(seed, i, stream)``, so a sharded run
(``shard=Shard(K, N)`` writes ``<out>/shard-K-of-N/``) merged by :func:`merge_shards` gives the
unsharded run's files (only the per-sample ``time`` differs).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import UserError
from ..io.runs import RECORDS, Records, Run, read_config
from ..io.shards import Shard, gather_shards, open_merged, shard_dirs, write_merged
from .certifier import Smooth, SmoothingWarning, check_sampling, sample_seed
from .hybrid import combine, split_alpha
from .noise import GaussianNoise, Noise, UniformNoise
from .results import tsv_header, write_outputs
from .sequential import NORMS, certify_sequential, check_max_n, estimate_radius

PathLike = Union[str, Path]
KINDS = {"certify": "smooth-certify", "predict": "smooth-predict"}
MODES = ("gaussian", "uniform", "hybrid")
SEQUENTIAL = ("off", "decide", "estimate")
STREAMS = {"gaussian": 0, "uniform": 1, "predict": 2}
"""Noise stream of each certificate in :func:`sample_seed` (the same in every run)."""
NOT_COMPARED = ("info", "shard")
"""Config keys that shards of one run may differ in."""
FLUSH_SECONDS = 1.0
"""Records are appended at most this long after they are computed (and always at the end)."""


# ---------------------------------------------------------------------------------------------
# Indices and shards


def select_indices(
    size: int, start: int = 0, count: Optional[int] = None, skip: int = 1
) -> list[int]:
    """Indices ``start, start + skip, ...`` below ``size``, at most ``count`` of them."""
    if skip < 1:
        raise UserError(f"--skip must be >= 1, got {skip}")
    if start < 0 or start >= size:
        raise UserError(f"--start {start} is outside the dataset (it has {size} samples)")
    if count is not None and count < 1:
        raise UserError(f"--count must be >= 1, got {count}")
    idx = list(range(start, size, skip))
    return idx if count is None else idx[:count]


def expected_indices(config: dict[str, Any]) -> list[int]:
    """Every sample index of the (unsharded) run of ``config``."""
    return [config["start"] + config["skip"] * i for i in range(config["count"])]


def shard_indices(indices: Sequence[int], shard: Optional[Shard]) -> list[int]:
    """Shard K of N's contiguous block of ``indices`` (sizes differ by at most one)."""
    if shard is None:
        return list(indices)
    if len(indices) < shard.count:
        raise UserError(
            f"--shard {shard.index}/{shard.count}: {len(indices)} samples cannot fill "
            f"{shard.count} shards; use N <= {len(indices)}"
        )
    lo, length = shard.block(len(indices))
    return list(indices[lo : lo + length])


# ---------------------------------------------------------------------------------------------
# The per-sample loop over a run folder


def run_samples(
    out: PathLike,
    command: str,
    config: dict[str, Any],
    info: dict[str, Any],
    dataset: Any,
    indices: Sequence[int],
    record: Callable[[int, torch.Tensor, int], dict[str, Any]],
    *,
    shard: Optional[Shard] = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    desc: str = "",
) -> tuple[Path, list[dict[str, Any]]]:
    """Compute ``record(index, x, label)`` for every index (of this shard) into a run folder.

    ``config`` holds what determines the records (``start``, ``skip``, ``count`` describe
    ``indices``); a resume continues after the last complete record. Writes the TSV and summaries
    when all are done. Returns ``(run folder, records)``.
    """
    from tqdm.auto import tqdm

    mine = shard_indices(indices, shard)
    full = {**config, "info": info}
    if shard is not None:
        full["shard"] = f"{shard.index}/{shard.count}"
        out = Path(out) / shard.name
    # an unsharded run may be resumed with another --count (its records must be a prefix)
    mutable = ("info",) if shard is not None else ("info", "count")
    run = Run.open(out, KINDS[command], full, resume=resume, overwrite=overwrite, mutable=mutable)
    records = run.records()
    pending: list[dict[str, Any]] = []
    try:
        done = records.read()
        found = [r.get("idx") for r in done]
        if found != mine[: len(found)]:
            raise UserError(
                f"{records.path} holds samples {found[:3]}... that are not the first samples of "
                "this run's --start/--skip/--count; resume with the options it was written with"
            )
        bar = tqdm(
            total=len(mine),
            initial=len(done),
            disable=None if progress is None else not progress,
            desc=desc,
            unit="sample",
        )
        last_flush = time.monotonic()
        try:
            for idx in mine[len(done) :]:
                x, y = dataset[idx]
                t0 = time.perf_counter()
                rec = record(idx, x, int(y))
                rec.update(idx=idx, label=int(y), time=round(time.perf_counter() - t0, 3))
                pending.append(rec)
                if time.monotonic() - last_flush >= FLUSH_SECONDS:
                    records.append(pending)
                    done += pending
                    pending, last_flush = [], time.monotonic()
                bar.update(1)
        finally:
            bar.close()
            records.append(pending)  # also after Ctrl-C: keep what was computed
            done += pending
            pending = []
    except BaseException:
        run.discard_if_empty()
        raise
    write_outputs(run.path, run.kind, run.config, done)
    run.close()
    return run.path, done


# ---------------------------------------------------------------------------------------------
# Certification and prediction of whole datasets


def _smooths(
    model: nn.Module,
    num_classes: int,
    mode: str,
    sigma_gaussian: Optional[float],
    sigma_uniform: Optional[float],
    device: torch.device | str,
) -> dict[str, Smooth]:
    if mode not in MODES:
        raise UserError(f"unknown certification noise {mode!r}; choose one of {', '.join(MODES)}")
    smooths: dict[str, Smooth] = {}
    if mode in ("gaussian", "hybrid"):
        if sigma_gaussian is None:
            raise UserError("Gaussian certification needs a sigma (--sigma or --sigma-gaussian)")
        smooths["gaussian"] = Smooth(model, num_classes, GaussianNoise(sigma_gaussian), device)
    if mode in ("uniform", "hybrid"):
        if sigma_uniform is None:
            raise UserError("Uniform certification needs a sigma (--sigma or --sigma-uniform)")
        smooths["uniform"] = Smooth(model, num_classes, UniformNoise(sigma_uniform), device)
    return smooths


def certify_dataset(
    model: nn.Module,
    num_classes: int,
    dataset: Any,
    out: PathLike,
    *,
    mode: str = "gaussian",
    sigma_gaussian: Optional[float] = None,
    sigma_uniform: Optional[float] = None,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    joint_alpha: bool = True,
    sequential: str = "off",
    radii: Sequence[float] = (0.25, 0.5, 0.75),
    norm_name: str = "l2",
    precision: float = 0.05,
    max_radius: Optional[float] = None,
    max_n: int = 100_000,
    futility_alpha: float = 0.05,
    seed: int = 0,
    start: int = 0,
    count: Optional[int] = None,
    skip: int = 1,
    device: torch.device | str = "cpu",
    shard: Optional[Shard] = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    run_extra: Optional[dict[str, Any]] = None,
    info: Optional[dict[str, Any]] = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Certify samples ``select_indices(len(dataset), start, count, skip)`` into the run folder
    ``out`` (see the module docstring); returns ``(run folder, records)``.

    ``sequential='off'``: CERTIFY (Cohen et al.) with ``n0`` selection and ``n`` estimation draws.
    ``'decide'``: draw noise until every radius of ``radii`` (``norm_name``) is decided by the
    anytime-valid test of :mod:`.sequential`, at most ``max_n`` estimation draws; ``'estimate'``:
    until the certified radius is known to ``precision`` (:func:`~.sequential.estimate_radius`).
    ``mode`` 'gaussian' or 'uniform' runs one certificate at ``alpha``; 'hybrid' runs both and
    combines them by the NU paper's Table 1, each at ``alpha / 2`` when ``joint_alpha`` (the pair
    then holds with probability >= 1 - alpha), else each at ``alpha``. ``run_extra`` joins the
    compared config (e.g. the checkpoint hash); ``info`` is stored but not compared.
    """
    if sequential not in SEQUENTIAL:
        raise UserError(f"unknown sequential mode {sequential!r}; choose one of {SEQUENTIAL}")
    if norm_name not in NORMS:
        raise UserError(f"unknown norm {norm_name!r}; choose one of {', '.join(NORMS)}")
    smooths = _smooths(model, num_classes, mode, sigma_gaussian, sigma_uniform, device)
    each = split_alpha(alpha, 2, joint_alpha) if mode == "hybrid" else alpha
    radii = sorted({float(r) for r in radii})
    if sequential == "off":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmoothingWarning)
            check_sampling(n, each, batch_size, n0=n0, what="certify")
        budget: dict[str, Any] = {"n": n}
    else:
        check_max_n(n0, max_n, each, batch_size)
        budget = {"norm": norm_name, "max_n": max_n, "futility_alpha": futility_alpha}
        if sequential == "decide":
            if not radii:
                raise UserError("give at least one radius to decide (e.g. --radii 0.25,0.5,0.75)")
            budget["radii"] = radii
        else:
            budget.update(precision=precision, max_radius=max_radius)
    indices = select_indices(len(dataset), start, count, skip)
    config = {
        "command": "certify",
        "sequential": sequential,
        "mode": mode,
        "noises": [s.noise.describe() for s in smooths.values()],
        "n0": n0,
        **budget,
        "alpha": alpha,
        "alpha_each": each,
        "batch_size": batch_size,
        "seed": seed,
        "start": start,
        "skip": skip,
        "count": len(indices),
        "device_type": torch.device(device).type,
        **(run_extra or {}),
    }

    def certify_one(smooth: Smooth, x: torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmoothingWarning)
            if sequential == "off":
                return smooth.certify(x, n0, n, each, batch_size)
        kw = {"futility_alpha": futility_alpha, "norm_name": norm_name}
        if sequential == "decide":
            return certify_sequential(smooth, x, radii, n0, each, max_n, batch_size, **kw)
        return estimate_radius(smooth, x, precision, max_radius, n0, each, max_n, batch_size, **kw)

    def record(idx: int, x: torch.Tensor, y: int) -> dict[str, Any]:
        certs = {}
        for name, smooth in smooths.items():
            smooth.manual_seed(sample_seed(seed, idx, STREAMS[name]))
            certs[name] = certify_one(smooth, x)
        rec: dict[str, Any] = {}
        for name, c in certs.items():
            rec.update(_per_noise(name, c, sequential))
        if mode == "hybrid":
            best = combine(certs["gaussian"], certs["uniform"])
            rec["rule"] = best.rule
        else:
            best = certs[mode]
        rec.update(
            predict=best.label,
            radius_l1=best.radius_l1,
            radius_l2=best.radius_l2,
            correct=int(best.label == y),
        )
        if sequential != "off":
            rec["samples"] = sum(c.samples for c in certs.values())
            rec["drawn"] = sum(c.n_drawn for c in certs.values())
        return rec

    desc = f"certify ({mode}" + (f", sequential {sequential})" if sequential != "off" else ")")
    return run_samples(
        out,
        "certify",
        config,
        info or {},
        dataset,
        indices,
        record,
        shard=shard,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        desc=desc,
    )


def _per_noise(name: str, cert: Any, sequential: str) -> dict[str, Any]:
    """The record fields of one noise's certificate (fixed-n or sequential)."""
    out = {
        f"{name}_predict": cert.label,
        f"{name}_count": cert.count,
        f"{name}_p_lower": cert.p_lower,
        f"{name}_radius_l1": cert.radius_l1,
        f"{name}_radius_l2": cert.radius_l2,
    }
    if sequential != "off":
        out.update({f"{name}_n": cert.n, f"{name}_stop": cert.stop})
    if sequential == "estimate":
        out[f"{name}_radius_upper"] = cert.radius_upper
    return out


def predict_dataset(
    model: nn.Module,
    num_classes: int,
    dataset: Any,
    out: PathLike,
    *,
    noise: Noise,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    start: int = 0,
    count: Optional[int] = None,
    skip: int = 1,
    device: torch.device | str = "cpu",
    shard: Optional[Shard] = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    run_extra: Optional[dict[str, Any]] = None,
    info: Optional[dict[str, Any]] = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """PREDICT (Cohen et al.) every selected sample into the run folder ``out`` (see
    :func:`certify_dataset`)."""
    smooth = Smooth(model, num_classes, noise, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmoothingWarning)
        check_sampling(n, alpha, batch_size, what="predict")
    indices = select_indices(len(dataset), start, count, skip)
    config = {
        "command": "predict",
        "mode": noise.name,
        "noises": [noise.describe()],
        "n": n,
        "alpha": alpha,
        "batch_size": batch_size,
        "seed": seed,
        "start": start,
        "skip": skip,
        "count": len(indices),
        "device_type": torch.device(device).type,
        **(run_extra or {}),
    }

    def record(idx: int, x: torch.Tensor, y: int) -> dict[str, Any]:
        smooth.manual_seed(sample_seed(seed, idx, STREAMS["predict"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmoothingWarning)
            label, n1, n2, p = smooth.predict_details(x, n, alpha, batch_size)
        return {
            "predict": label,
            "correct": int(label == y),
            "count_top": n1,
            "count_second": n2,
            "p_value": p,
        }

    return run_samples(
        out,
        "predict",
        config,
        info or {},
        dataset,
        indices,
        record,
        shard=shard,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        desc=f"predict ({noise.name})",
    )


# ---------------------------------------------------------------------------------------------
# Reading run folders and merging shards


def is_smoothing_run(path: PathLike) -> bool:
    """True when ``path`` is a smoothing run folder or a shard folder of one, or holds shards."""
    path = Path(path)
    candidates = [path] + (shard_dirs(path)[:1] if path.is_dir() else [])
    for p in candidates:
        record = read_config(p)
        if record is not None and record.get("kind") in KINDS.values():
            return True
    return False


def read_run(path: PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(TSV header, complete records)`` of a smoothing run folder (finished or not)."""
    path = Path(path)
    record = read_config(path)
    if record is None or record.get("kind") not in KINDS.values():
        hint = (
            "; merge its shards first with 'cure-lirpa merge " + str(path) + "'"
            if path.is_dir() and shard_dirs(path)
            else ""
        )
        raise UserError(f"{path} holds no 'smooth certify' or 'smooth predict' run{hint}")
    config = record["config"]
    return tsv_header(config), Records(path / RECORDS).read()


def merge_shards(
    out: PathLike, shards: Optional[Sequence[PathLike]] = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Merge the ``shard-K-of-N`` folders of ``out`` (or the given ones) into ``out``: the
    config.json, samples.jsonl, samples.tsv, summary.json and summary.md of the unsharded run.

    Refuses shards of another kind or other settings (naming the keys), shards of different N,
    an incomplete run (listing the missing sample indices), and a run of other settings in ``out``
    unless ``overwrite`` (:func:`cure_lirpa.io.shards.open_merged`). Returns the summary.
    """
    out = Path(out)
    g = gather_shards(out, shards, list(KINDS.values()), "idx", expected_indices, NOT_COMPARED)
    run = open_merged(out, g, overwrite, mutable=("info",))
    write_merged(out, g)
    summary = write_outputs(out, g.kind, g.config, g.records)
    run.close()
    return {**summary, "shards": len(g.dirs), "kind": g.kind}
