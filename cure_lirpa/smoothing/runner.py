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
unsharded run's files (only the per-sample ``time`` differs). The rules of run folders, shards,
resume and merge are :meth:`cure_lirpa.io.runs.Run.open` and :mod:`cure_lirpa.io.shards`, shared
with ``verify``; :func:`run_checkpoint` is what the commands call.
"""

from __future__ import annotations

import inspect
import sys
import time
import warnings
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..data import DatasetInfo, dataset_info, load_dataset
from ..errors import UserError
from ..io.runs import RECORDS, Records, read_config
from ..io.shards import (
    Shard,
    finish_shard,
    gather_shards,
    open_merged,
    open_shard,
    shard_dirs,
    shard_of,
    write_merged,
)
from ..vocabulary import DECIDE_RADII, GAUSSIAN, HYBRID, L2, SMOOTHING_MODES, UNIFORM
from .certifier import Smooth, SmoothingWarning, check_sampling, file_sha256, sample_seed
from .hybrid import combine, split_alpha
from .noise import GaussianNoise, Noise, UniformNoise
from .results import tsv_header, write_outputs
from .sequential import NORMS, certify_sequential, check_max_n, estimate_radius

PathLike = Union[str, Path]
KINDS = {"certify": "smooth-certify", "predict": "smooth-predict"}
MODES = SMOOTHING_MODES
SEQUENTIAL = ("off", "decide", "estimate")
STREAMS = {GAUSSIAN: 0, UNIFORM: 1, "predict": 2}
"""Noise stream of each certificate in :func:`sample_seed` (the same in every run)."""
NOT_COMPARED = ("info", "shard")
"""Config keys that shards of one run may differ in."""
FLUSH_SECONDS = 1.0
"""Records are appended at most this long after they are computed (and always at the end)."""


# ---------------------------------------------------------------------------------------------
# Indices


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

    mine = list(indices) if shard is None else shard.take(indices)
    # an unsharded run may be resumed with another --count (its records must be a prefix)
    mutable = ("info",) if shard is not None else ("info", "count")
    full = {**config, "info": info}
    run = open_shard(
        Path(out), KINDS[command], full, shard, resume=resume, overwrite=overwrite, mutable=mutable
    )
    records = run.records()
    try:
        done = _resumed(records, mine)
        disable = None if progress is None else not progress
        bar = tqdm(total=len(mine), initial=len(done), disable=disable, desc=desc, unit="sample")
        done += _compute(records, dataset, mine[len(done) :], record, bar)
    except BaseException:
        run.discard_if_empty()
        raise
    write_outputs(run.path, run.kind, run.config, done)
    run.close()
    return run.path, done


def _resumed(records: Records, mine: Sequence[int]) -> list[dict[str, Any]]:
    """The complete records of a resumed run; refuses records of other sample indices."""
    done = records.read()
    found = [r.get("idx") for r in done]
    if found != list(mine[: len(found)]):
        raise UserError(
            f"{records.path} holds samples {found[:3]}... that are not the first samples of "
            "this run's --start/--skip/--count; resume with the options it was written with"
        )
    return done


def _compute(
    records: Records,
    dataset: Any,
    todo: Sequence[int],
    record: Callable[[int, torch.Tensor, int], dict[str, Any]],
    bar: Any,
) -> list[dict[str, Any]]:
    """The records of the indices ``todo``, each appended to ``records`` at most
    ``FLUSH_SECONDS`` after it is computed (and what is computed also after Ctrl-C)."""
    new: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    try:
        for idx in todo:
            pending.append(_timed_record(record, dataset, idx))
            if time.monotonic() - last_flush >= FLUSH_SECONDS:
                records.append(pending)
                new += pending
                pending, last_flush = [], time.monotonic()
            bar.update(1)
    finally:
        bar.close()
        records.append(pending)  # also after Ctrl-C: keep what was computed
        new += pending
    return new


def _timed_record(
    record: Callable[[int, torch.Tensor, int], dict[str, Any]], dataset: Any, idx: int
) -> dict[str, Any]:
    """``record(idx, x, label)`` of sample ``idx`` plus its ``idx``, ``label`` and ``time`` (s)."""
    x, y = dataset[idx]
    t0 = time.perf_counter()
    rec = record(idx, x, int(y))
    rec.update(idx=idx, label=int(y), time=round(time.perf_counter() - t0, 3))
    return rec


@dataclass(frozen=True)
class RunOptions:
    """The options of :func:`certify_dataset` and :func:`predict_dataset` that say which samples,
    where, and how the run folder is treated (their docstrings give the meanings)."""

    seed: int
    start: int
    count: Optional[int]
    skip: int
    device: torch.device | str
    shard: Optional[Shard]
    resume: bool
    overwrite: bool
    progress: Optional[bool]
    run_extra: Optional[dict[str, Any]]
    info: Optional[dict[str, Any]]

    @classmethod
    def of(cls, arguments: dict[str, Any]) -> RunOptions:
        """The run options among a function's ``arguments`` (its ``locals()`` on entry)."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls)})


def _run_dataset(
    out: PathLike,
    command: str,
    settings: dict[str, Any],
    record: Callable[[int, torch.Tensor, int], dict[str, Any]],
    desc: str,
    dataset: Any,
    run: RunOptions,
) -> tuple[Path, list[dict[str, Any]]]:
    """:func:`run_samples` of the selected samples; the config is ``command``, ``settings``, the
    selection, seed and device type, then ``run.run_extra``."""
    indices = select_indices(len(dataset), run.start, run.count, run.skip)
    config = {
        "command": command,
        **settings,
        "seed": run.seed,
        "start": run.start,
        "skip": run.skip,
        "count": len(indices),
        "device_type": torch.device(run.device).type,
        **(run.run_extra or {}),
    }
    return run_samples(
        out,
        command,
        config,
        run.info or {},
        dataset,
        indices,
        record,
        shard=run.shard,
        resume=run.resume,
        overwrite=run.overwrite,
        progress=run.progress,
        desc=desc,
    )


# ---------------------------------------------------------------------------------------------
# Certification and prediction of whole datasets


def _sampling_message(
    n: int, alpha: float, batch_size: int, n0: Optional[int] = None, what: str = "certify"
) -> Optional[str]:
    """:func:`~.certifier.check_sampling` without its warning: the message, or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmoothingWarning)
        return check_sampling(n, alpha, batch_size, n0=n0, what=what)


def _smooths(
    model: nn.Module,
    num_classes: int,
    mode: str,
    sigma_gaussian: Optional[float],
    sigma_uniform: Optional[float],
    device: torch.device | str,
) -> dict[str, Smooth]:
    """The smoothed classifiers of certification ``mode``, keyed by noise name."""
    if mode not in MODES:
        raise UserError(f"unknown certification noise {mode!r}; choose one of {', '.join(MODES)}")
    smooths: dict[str, Smooth] = {}
    if mode in (GAUSSIAN, HYBRID):
        if sigma_gaussian is None:
            raise UserError("Gaussian certification needs a sigma (--sigma or --sigma-gaussian)")
        smooths[GAUSSIAN] = Smooth(model, num_classes, GaussianNoise(sigma_gaussian), device)
    if mode in (UNIFORM, HYBRID):
        if sigma_uniform is None:
            raise UserError("Uniform certification needs a sigma (--sigma or --sigma-uniform)")
        smooths[UNIFORM] = Smooth(model, num_classes, UniformNoise(sigma_uniform), device)
    return smooths


@dataclass(frozen=True)
class CertifyPlan:
    """How :func:`certify_dataset` certifies each sample: its options (``radii`` sorted, without
    repeats)."""

    mode: str
    sequential: str
    n0: int
    n: int
    alpha: float
    joint_alpha: bool
    batch_size: int
    radii: list[float]
    norm_name: str
    precision: float
    max_radius: Optional[float]
    max_n: int
    futility_alpha: float

    @classmethod
    def of(cls, arguments: dict[str, Any]) -> CertifyPlan:
        """The plan of :func:`certify_dataset`'s ``arguments`` (its ``locals()`` on entry);
        refuses an unknown sequential mode or norm."""
        sequential, norm_name = arguments["sequential"], arguments["norm_name"]
        if sequential not in SEQUENTIAL:
            raise UserError(f"unknown sequential mode {sequential!r}; choose one of {SEQUENTIAL}")
        if norm_name not in NORMS:
            raise UserError(f"unknown norm {norm_name!r}; choose one of {', '.join(NORMS)}")
        radii = sorted({float(r) for r in arguments["radii"]})
        return cls(**{**{f.name: arguments[f.name] for f in fields(cls)}, "radii": radii})

    @property
    def alpha_each(self) -> float:
        """The level of each noise's certificate (hybrid: ``alpha / 2`` when ``joint_alpha``)."""
        return split_alpha(self.alpha, 2, self.joint_alpha) if self.mode == HYBRID else self.alpha

    def settings(self, noises: list[dict[str, Any]]) -> dict[str, Any]:
        """The config entries of the certification with these ``noises`` (their descriptions);
        refuses a budget that can never certify."""
        return {
            "sequential": self.sequential,
            "mode": self.mode,
            "noises": noises,
            "n0": self.n0,
            **self.budget(),
            "alpha": self.alpha,
            "alpha_each": self.alpha_each,
            "batch_size": self.batch_size,
        }

    def budget(self) -> dict[str, Any]:
        """The config entries of the draws' budget; refuses one that can never certify."""
        if self.sequential == "off":
            _sampling_message(self.n, self.alpha_each, self.batch_size, n0=self.n0)
            return {"n": self.n}
        check_max_n(self.n0, self.max_n, self.alpha_each, self.batch_size)
        budget = {
            "norm": self.norm_name,
            "max_n": self.max_n,
            "futility_alpha": self.futility_alpha,
        }
        if self.sequential == "decide":
            if not self.radii:
                raise UserError("give at least one radius to decide (e.g. --radii 0.25,0.5,0.75)")
            budget["radii"] = self.radii
        else:
            budget.update(precision=self.precision, max_radius=self.max_radius)
        return budget

    def desc(self) -> str:
        """The progress bar's label."""
        seq = f", sequential {self.sequential}" if self.sequential != "off" else ""
        return f"certify ({self.mode}{seq})"

    def certify(self, smooth: Smooth, x: torch.Tensor) -> Any:
        """One noise's certificate of ``x`` (fixed-n, or sequential 'decide' / 'estimate')."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmoothingWarning)
            if self.sequential == "off":
                return smooth.certify(x, self.n0, self.n, self.alpha_each, self.batch_size)
        a, cap, bs = self.alpha_each, self.max_n, self.batch_size
        kw = {"futility_alpha": self.futility_alpha, "norm_name": self.norm_name}
        if self.sequential == "decide":
            return certify_sequential(smooth, x, self.radii, self.n0, a, cap, bs, **kw)
        return estimate_radius(
            smooth, x, self.precision, self.max_radius, self.n0, a, cap, bs, **kw
        )

    def record(self, certs: dict[str, Any], label: int) -> dict[str, Any]:
        """A sample's record from its certificate per noise: each noise's fields, then the
        combined (hybrid) or only certificate's prediction and radii, then the draws."""
        rec: dict[str, Any] = {}
        for name, c in certs.items():
            rec.update(_per_noise(name, c, self.sequential))
        if self.mode == HYBRID:
            best = combine(certs[GAUSSIAN], certs[UNIFORM])
            rec["rule"] = best.rule
        else:
            best = certs[self.mode]
        rec.update(
            predict=best.label,
            radius_l1=best.radius_l1,
            radius_l2=best.radius_l2,
            correct=int(best.label == label),
        )
        if self.sequential != "off":
            rec["samples"] = sum(c.samples for c in certs.values())
            rec["drawn"] = sum(c.n_drawn for c in certs.values())
        return rec


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


def _certify_sample(
    smooths: dict[str, Smooth], plan: CertifyPlan, seed: int, idx: int, x: torch.Tensor, y: int
) -> dict[str, Any]:
    """The record of sample ``idx``: each noise seeded by ``sample_seed(seed, idx, stream)``."""
    certs = {}
    for name, smooth in smooths.items():
        smooth.manual_seed(sample_seed(seed, idx, STREAMS[name]))
        certs[name] = plan.certify(smooth, x)
    return plan.record(certs, y)


def certify_dataset(
    model: nn.Module,
    num_classes: int,
    dataset: Any,
    out: PathLike,
    *,
    mode: str = GAUSSIAN,
    sigma_gaussian: Optional[float] = None,
    sigma_uniform: Optional[float] = None,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    joint_alpha: bool = True,
    sequential: str = "off",
    radii: Sequence[float] = DECIDE_RADII,
    norm_name: str = L2,
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
    run, plan = RunOptions.of(locals()), CertifyPlan.of(locals())
    smooths = _smooths(model, num_classes, mode, sigma_gaussian, sigma_uniform, device)
    settings = plan.settings([s.noise.describe() for s in smooths.values()])
    record = partial(_certify_sample, smooths, plan, seed)
    return _run_dataset(out, "certify", settings, record, plan.desc(), dataset, run)


def _predict_sample(
    smooth: Smooth,
    n: int,
    alpha: float,
    batch_size: int,
    seed: int,
    idx: int,
    x: torch.Tensor,
    y: int,
) -> dict[str, Any]:
    """PREDICT's record of sample ``idx`` (noise seeded by ``sample_seed``)."""
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
    run = RunOptions.of(locals())
    smooth = Smooth(model, num_classes, noise, device)
    _sampling_message(n, alpha, batch_size, what="predict")
    settings = {
        "mode": noise.name,
        "noises": [noise.describe()],
        "n": n,
        "alpha": alpha,
        "batch_size": batch_size,
    }
    record = partial(_predict_sample, smooth, n, alpha, batch_size, seed)
    return _run_dataset(out, "predict", settings, record, f"predict ({noise.name})", dataset, run)


# ---------------------------------------------------------------------------------------------
# From a checkpoint (what the commands call)


def _stderr(message: str) -> None:
    """The default ``log``: one line on stderr."""
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class BaseClassifier:
    """A base classifier loaded from a checkpoint: ``model`` (eval mode, on the device), the
    dataset it was trained on, the checkpoint file's ``sha256`` and the ``info`` runs store."""

    model: nn.Module
    dataset: DatasetInfo
    sha256: str
    info: dict[str, Any]

    def samples(self, name: Optional[str], split: str, root: Optional[str]) -> Any:
        """Dataset ``name`` (None: the checkpoint's); refuses one of another image shape."""
        own = self.dataset
        if name and name != own.name and dataset_info(name).in_shape != own.in_shape:
            raise UserError(
                f"the checkpoint was trained on {own.name} {own.in_shape}, "
                f"which does not match --dataset {name} {dataset_info(name).in_shape}"
            )
        return load_dataset(name or own.name, split, root)

    def warnings(self, checkpoint: PathLike) -> list[str]:
        """Why certificates of this classifier may be useless (not trained under noise)."""
        if self.info.get("train_sigma") is not None:
            return []
        return [
            f"{checkpoint} was not trained under noise (no sigma in its config); a base "
            "classifier that never saw Gaussian or Uniform noise mostly abstains or certifies tiny "
            "radii. Train one with 'cure-lirpa smooth train --sigma SIGMA'"
        ]


def load_base(checkpoint: PathLike, device: torch.device | str) -> BaseClassifier:
    """The base classifier of a checkpoint file or of a 'smooth train' run folder."""
    from ..io.checkpoint import dataset_info_of, load_checkpoint, model_from_checkpoint
    from .training import CHECKPOINT, checkpoint_summary

    path = Path(checkpoint)
    path = path / CHECKPOINT if path.is_dir() else path
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(device).eval()
    info = {"checkpoint": str(path.resolve()), **checkpoint_summary(ckpt)}
    return BaseClassifier(model, dataset_info_of(ckpt), file_sha256(path), info)


def _with_defaults(function: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` completed with the defaults of ``function``'s keyword-only parameters."""
    params = inspect.signature(function).parameters.values()
    keyword = {
        p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    }
    return {**keyword, **options}


def _source(
    base: BaseClassifier, dataset: Optional[str], split: str, data_root: Optional[str]
) -> dict[str, Any]:
    """The ``run_extra`` (compared) and ``info`` (stored) of a run of ``base``."""
    extra = {"checkpoint_sha256": base.sha256, "dataset": dataset or base.dataset.name}
    return {"run_extra": {**extra, "split": split}, "info": {**base.info, "data_root": data_root}}


RUN_DATASET = {"certify": certify_dataset, "predict": predict_dataset}
"""The function of each command (:func:`run_checkpoint`)."""


def run_checkpoint(
    command: str,
    checkpoint: PathLike,
    out: PathLike,
    *,
    dataset: Optional[str] = None,
    split: str = "test",
    data_root: Optional[str] = None,
    shard: Union[str, Shard, None] = None,
    log: Callable[[str], None] = _stderr,
    **options: Any,
) -> Optional[Path]:
    """What ``cure-lirpa smooth certify`` / ``predict`` run: :func:`certify_dataset`
    (``command`` 'certify') or :func:`predict_dataset` ('predict') of the base classifier in
    ``checkpoint`` (a file or a 'smooth train' run folder) on ``dataset`` [default: the
    checkpoint's] into ``out``.

    ``options`` are the function's keywords; None takes its default (an ``n`` given to a
    sequential certification is not used). ``shard``: "K/N" or a :class:`~cure_lirpa.io.shards.Shard`;
    None: the torchrun rank's or Slurm array task's, and under torchrun rank 0 merges the shards
    when all are done. Warnings (too few draws, ``n0`` above ``n``, an unused ``n``, a model not
    trained under noise) and the shard's lines go to ``log``. Returns the folder whose results to
    show (the run, the shard's folder, or None on a rank that does not merge).
    """
    run_dataset = RUN_DATASET[command]
    given = {k: v for k, v in options.items() if v is not None}
    o = _with_defaults(run_dataset, {**given, "shard": shard_of(shard)})
    base = load_base(checkpoint, o["device"])
    data = base.samples(dataset, split, data_root)
    doubts = _certify_warnings(o, "n" in given) if command == "certify" else _predict_warnings(o)
    for message in doubts + base.warnings(checkpoint):
        log(f"Warning: {message}")
    o.update(_source(base, dataset, split, data_root))
    run_dataset(base.model, base.dataset.num_classes, data, out, **o)
    merge = partial(merge_shards, overwrite=o["overwrite"])
    return finish_shard(Path(out), o["shard"], shard is None, merge, log)


def _certify_warnings(o: dict[str, Any], n_given: bool) -> list[str]:
    """What is doubtful about :func:`certify_dataset`'s options ``o`` (all of them)."""
    if o["sequential"] != "off":
        return ["--n is not used by --sequential; --max-n caps the draws"] if n_given else []
    each = split_alpha(o["alpha"], 2, o["joint_alpha"]) if o["mode"] == HYBRID else o["alpha"]
    found = [_sampling_message(o["n"], each, 1, what="certify")]
    if o["n0"] > o["n"]:
        found.append(
            f"--n0 {o['n0']} is larger than --n {o['n']}: n0 draws only pick the top class, "
            "the certificate rests on the n draws; use n0 much smaller than n (Cohen et al.: "
            "n0 100, n 100000)"
        )
    return [m for m in found if m]


def _predict_warnings(o: dict[str, Any]) -> list[str]:
    """What is doubtful about :func:`predict_dataset`'s options ``o`` (all of them)."""
    message = _sampling_message(o["n"], o["alpha"], 1, what="predict")
    return [message] if message else []


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
