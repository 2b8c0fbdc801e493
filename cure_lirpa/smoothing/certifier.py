"""Randomized-smoothing prediction and certification (Cohen et al. 2019, CERTIFY and PREDICT).

:class:`Smooth` wraps any ``nn.Module`` classifier (logits of shape (B, K)) and one smoothing
noise. ``certify`` returns a :class:`Certificate` whose label is, with probability at least
``1 - alpha`` over the noise draws, the prediction of the smoothed classifier at every point of the
l2 ball of radius ``radius_l2`` and of the l1 ball of radius ``radius_l1`` around ``x``.

The lower part of this module streams per-sample results of a whole dataset to a TSV file that can be
resumed after a kill (:func:`certify_dataset`, :func:`predict_dataset`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from ..errors import UserError
from .noise import GaussianNoise, Noise, UniformNoise, make_generator

ABSTAIN = -1
TSV_FORMAT = "cure-lirpa-smoothing-tsv/1"
PathLike = Union[str, Path]


class SmoothingWarning(UserWarning):
    """A smoothing setting that is legal but cannot give a useful answer (e.g. n too small)."""


# ---------------------------------------------------------------------------------------------
# Statistics


def clopper_pearson_lower(count: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper–Pearson lower confidence bound on a binomial proportion.

    Equals ``scipy.stats.beta.ppf(alpha, count, n - count + 1)`` for ``count >= 1`` and 0 for
    ``count == 0`` (computed as the lower end of statsmodels' two-sided ``2 * alpha`` interval).
    """
    if n < 1 or not 0 <= count <= n:
        raise UserError(f"need 0 <= count <= n and n >= 1, got count={count}, n={n}")
    _check_alpha(alpha)
    return float(proportion_confint(int(count), int(n), alpha=2 * alpha, method="beta")[0])


@functools.lru_cache(maxsize=256)
def min_certify_n(alpha: float) -> int:
    """Smallest n for which CERTIFY can ever succeed at ``alpha``.

    CERTIFY certifies iff the lower bound is >= 1/2; the best case is ``count == n``, whose bound is
    ``alpha ** (1 / n)``. So the answer is the smallest n with ``0.5 ** n <= alpha``, i.e.
    ``ceil(log2(1 / alpha))``, checked against the bound actually used (floating point).
    """
    _check_alpha(alpha)
    n = max(1, math.ceil(math.log(alpha) / math.log(0.5)) - 2)
    while clopper_pearson_lower(n, n, alpha) < 0.5:
        n += 1
    return n


@functools.lru_cache(maxsize=256)
def min_predict_n(alpha: float) -> int:
    """Smallest n for which PREDICT can ever answer at ``alpha``.

    Best case: all n draws agree, two-sided p-value ``2 * 0.5 ** n`` (capped at 1) must be ``<= alpha``.
    """
    _check_alpha(alpha)
    n = max(1, math.ceil(math.log(alpha / 2) / math.log(0.5)) - 2)
    while binomtest(n, n, 0.5).pvalue > alpha:
        n += 1
    return n


def _check_alpha(alpha: float) -> None:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(alpha, bool) or not 0.0 < value < 1.0:
        raise UserError(f"alpha must be in (0, 1) (the failure probability), got {alpha!r}")


def check_sampling(
    n: int,
    alpha: float,
    batch_size: int,
    n0: Optional[int] = None,
    what: str = "certify",
) -> Optional[str]:
    """Validate sample counts; raise :class:`UserError` for impossible values.

    Returns (and emits as a :class:`SmoothingWarning`) a message when ``n`` is too small to ever
    certify (or predict) at ``alpha``; returns None otherwise.
    """
    _check_alpha(alpha)
    if n0 is not None and (not isinstance(n0, (int, np.integer)) or n0 < 1):
        raise UserError(f"n0 (the selection samples) must be an integer >= 1, got {n0!r}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"n (the estimation samples) must be an integer >= 1, got {n!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"batch size must be an integer >= 1, got {batch_size!r}")
    smallest = min_certify_n(alpha) if what == "certify" else min_predict_n(alpha)
    if n < smallest:
        verb = "certify" if what == "certify" else "give a prediction (it will always abstain)"
        msg = (
            f"n={n} is too small to ever {verb} at alpha={alpha:g}: "
            f"the smallest useful n is {smallest}"
        )
        warnings.warn(msg, SmoothingWarning, stacklevel=3)
        return msg
    return None


# ---------------------------------------------------------------------------------------------
# The smoothed classifier


@dataclass(frozen=True)
class Certificate:
    """Result of CERTIFY for one input.

    ``label`` is :data:`ABSTAIN` (-1) when the smoothed classifier abstains; radii are then 0.
    ``count`` of the ``n`` estimation draws hit ``label``; ``p_lower`` is the Clopper–Pearson bound.
    """

    label: int
    p_lower: float
    radius_l1: float
    radius_l2: float
    count: int
    n: int

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


class Smooth:
    """A smoothed classifier ``g(x) = argmax_c P(f(x + noise) = c)`` (Cohen et al.'s ``core.Smooth``).

    ``base_classifier`` maps a batch (B, *in_shape) to logits (B, num_classes); ``noise`` is a
    :class:`GaussianNoise` or :class:`UniformNoise`. Noise is drawn on the model's device with
    ``self.generator`` (seed it with :meth:`manual_seed` for reproducible results).
    """

    ABSTAIN = ABSTAIN

    def __init__(
        self,
        base_classifier: nn.Module,
        num_classes: int,
        noise: Noise,
        device: torch.device | str | None = None,
        seed: Optional[int] = None,
    ):
        if not isinstance(noise, (GaussianNoise, UniformNoise)):
            raise UserError(
                f"smoothing needs Gaussian or Uniform noise (got {noise!r}); "
                "Normal-Uniform noise is for training only"
            )
        if num_classes < 2:
            raise UserError(f"num_classes must be >= 2, got {num_classes}")
        self.base_classifier = base_classifier
        self.num_classes = int(num_classes)
        self.noise = noise
        if device is None:
            param = next(iter(base_classifier.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.generator = make_generator(self.device, seed)

    def manual_seed(self, seed: int) -> Smooth:
        """Reseed the noise generator (e.g. once per test sample)."""
        self.generator.manual_seed(int(seed))
        return self

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int
    ) -> Certificate:
        """CERTIFY: choose the top class from ``n0`` draws, bound its probability from ``n`` fresh draws.

        ``x`` is one input without batch dimension, shape ``in_shape``. Abstains when the one-sided
        ``(1 - alpha)`` Clopper–Pearson lower bound is below 1/2.
        """
        check_sampling(n, alpha, batch_size, n0=n0, what="certify")
        counts0 = self.sample_counts(x, n0, batch_size)
        top = int(counts0.argmax())
        counts = self.sample_counts(x, n, batch_size)
        count = int(counts[top])
        p_lower = clopper_pearson_lower(count, n, alpha)
        if p_lower < 0.5:
            return Certificate(ABSTAIN, p_lower, 0.0, 0.0, count, n)
        r1, r2 = self.noise.radii(p_lower, int(x.numel()))
        return Certificate(top, p_lower, r1, r2, count, n)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> int:
        """PREDICT: the top class of ``n`` draws, or :data:`ABSTAIN` when the two-sided binomial test
        of the top two counts against p = 1/2 has a p-value above ``alpha``.

        The returned class differs from the smoothed classifier's with probability at most ``alpha``.
        """
        return self.predict_details(x, n, alpha, batch_size)[0]

    def predict_details(
        self, x: torch.Tensor, n: int, alpha: float, batch_size: int
    ) -> tuple[int, int, int, float]:
        """``(label, top count, runner-up count, p-value)`` of PREDICT."""
        check_sampling(n, alpha, batch_size, what="predict")
        counts = self.sample_counts(x, n, batch_size)
        order = np.argsort(-counts, kind="stable")[:2]
        n1, n2 = int(counts[order[0]]), int(counts[order[1]])
        p_value = float(binomtest(n1, n1 + n2, 0.5).pvalue)
        label = ABSTAIN if p_value > alpha else int(order[0])
        return label, n1, n2, p_value

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        """Class counts (num_classes,) of the base classifier on ``num`` noisy copies of ``x``."""
        model = self.base_classifier
        was_training = model.training
        model.eval()
        x = x.to(self.device)
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
        try:
            with torch.inference_mode():
                buf = torch.empty(
                    (min(batch_size, num), *x.shape), dtype=x.dtype, device=self.device
                )
                remaining = num
                while remaining > 0:
                    b = min(batch_size, remaining)
                    batch = buf[:b]
                    self.noise.sample_into(batch, self.generator).add_(x)
                    pred = model(batch).argmax(dim=1)
                    counts += torch.bincount(pred, minlength=self.num_classes)[: self.num_classes]
                    remaining -= b
        finally:
            model.train(was_training)
        return counts.cpu().numpy()


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """Seed for test sample ``index`` and noise ``stream``: results do not depend on sharding/resume."""
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(2)
    return int(state[0]) << 31 ^ int(state[1])


# ---------------------------------------------------------------------------------------------
# Streaming per-sample results to a resumable TSV


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file (identifies the checkpoint a TSV was made with)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


def read_tsv(path: PathLike) -> tuple[dict[str, Any], list[str], list[dict[str, str]]]:
    """Read a smoothing TSV: ``(header, columns, rows)``; rows are dicts of strings.

    Only complete lines are returned (a line cut by a kill is ignored). The file is
    ``# <TSV_FORMAT> <json header>`` then a tab-separated column line then one row per sample;
    pandas reads it with ``pd.read_csv(path, sep='\\t', comment='#')``.
    """
    header, columns, rows, _ = _parse_tsv(Path(path))
    return header, columns, rows


def _parse_tsv(path: Path) -> tuple[dict[str, Any], list[str], list[dict[str, str]], int]:
    """Also returns the byte length of the complete part of the file."""
    data = path.read_bytes()
    first_end = data.find(b"\n")
    prefix = f"# {TSV_FORMAT} ".encode()
    if first_end < 0 or not data.startswith(prefix):
        raise UserError(
            f"{path} is not a cure-lirpa smoothing TSV (its first line must start with "
            f"'# {TSV_FORMAT}'); choose another --out or pass --overwrite"
        )
    try:
        header = json.loads(data[len(prefix) : first_end].decode())
    except ValueError:
        raise UserError(
            f"{path}: the header line is damaged; pass --overwrite to start over"
        ) from None
    second_end = data.find(b"\n", first_end + 1)
    if second_end < 0:
        return header, [], [], first_end + 1
    columns = data[first_end + 1 : second_end].decode().split("\t")
    rows: list[dict[str, str]] = []
    good = second_end + 1
    pos = good
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            break
        fields = data[pos:end].decode(errors="replace").split("\t")
        if len(fields) != len(columns):
            break
        rows.append(dict(zip(columns, fields)))
        pos = good = end + 1
    return header, columns, rows, good


class TsvStream:
    """Append-only TSV of per-sample rows, flushed after every row, resumable after a kill.

    ``run`` is the configuration that determines the rows (compared on resume); ``info`` is
    informational (paths, versions) and not compared.
    """

    def __init__(
        self,
        path: PathLike,
        columns: Sequence[str],
        run: dict[str, Any],
        info: Optional[dict[str, Any]] = None,
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.columns = list(columns)
        self.header = {"format": TSV_FORMAT, "run": run, "info": info or {}}
        self.rows: list[dict[str, str]] = []
        good = 0
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and resume:
            old, old_columns, self.rows, good = _parse_tsv(self.path)
            self._check_same_run(old.get("run", {}), run)
            if old_columns and old_columns != self.columns:
                raise UserError(f"{self.path} has columns {old_columns}, expected {self.columns}")
        elif exists and not overwrite:
            raise UserError(
                f"{self.path} already exists; pass --resume to continue it or --overwrite to start over"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if good > 0:
            with open(self.path, "r+b") as f:  # drop a line cut by a kill
                f.truncate(good)
            self._f = open(self.path, "a", encoding="utf-8", newline="\n")
            if not old_columns:
                self._write_line(self.columns)
        else:
            self._f = open(self.path, "w", encoding="utf-8", newline="\n")
            line = f"# {TSV_FORMAT} {json.dumps(self.header, sort_keys=True)}\n"
            self._f.write(line)
            self._write_line(self.columns)

    def _check_same_run(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        keys = sorted(set(old) | set(new))
        diff = [k for k in keys if old.get(k) != new.get(k)]
        if diff:
            details = "; ".join(
                f"{k}: file has {old.get(k)!r}, this run has {new.get(k)!r}" for k in diff
            )
            raise UserError(
                f"{self.path} was written by a different run ({details}). Use the same options to "
                "resume it, or choose another --out (or --overwrite to replace it)"
            )

    def _write_line(self, fields: Iterable[Any]) -> None:
        self._f.write("\t".join(_fmt(v) for v in fields) + "\n")
        self._f.flush()

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (a dict with every column) and flush it to the OS."""
        self._write_line(row[c] for c in self.columns)
        self.rows.append({c: _fmt(row[c]) for c in self.columns})

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TsvStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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


def _noise_columns(name: str) -> list[str]:
    return [f"{name}_{c}" for c in ("predict", "count", "p_lower", "radius_l1", "radius_l2")]


def certify_columns(mode: str) -> list[str]:
    """TSV columns of a certification run (``mode`` 'gaussian', 'uniform' or 'hybrid')."""
    base = ["idx", "label", "predict", "radius_l1", "radius_l2", "correct"]
    if mode == "hybrid":
        return base + ["rule", *_noise_columns("gaussian"), *_noise_columns("uniform"), "time"]
    return base + _noise_columns(mode) + ["time"]


PREDICT_COLUMNS = [
    "idx",
    "label",
    "predict",
    "correct",
    "count_top",
    "count_second",
    "p_value",
    "time",
]
MODES = ("gaussian", "uniform", "hybrid")


def _per_noise(prefix: str, cert: Certificate) -> dict[str, Any]:
    return {
        f"{prefix}_predict": cert.label,
        f"{prefix}_count": cert.count,
        f"{prefix}_p_lower": cert.p_lower,
        f"{prefix}_radius_l1": cert.radius_l1,
        f"{prefix}_radius_l2": cert.radius_l2,
    }


def _progress(total: int, initial: int, enabled: Optional[bool], desc: str):
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled  # None: only on a terminal
    return tqdm(total=total, initial=initial, disable=disable, desc=desc, unit="sample")


def _run_loop(
    stream: TsvStream,
    dataset: Any,
    indices: list[int],
    make_row: Callable[[int, torch.Tensor, int], dict[str, Any]],
    progress: Optional[bool],
    desc: str,
) -> list[dict[str, str]]:
    done = len(stream.rows)
    expected = [str(i) for i in indices[:done]]
    found = [r["idx"] for r in stream.rows]
    if found != expected[: len(found)] or done > len(indices):
        raise UserError(
            f"{stream.path} holds rows for samples {found[:3]}... that do not match "
            "--start/--skip/--count of this run; resume with the options it was written with"
        )
    bar = _progress(len(indices), done, progress, desc)
    try:
        for idx in indices[done:]:
            x, y = dataset[idx]
            t0 = time.perf_counter()
            row = make_row(idx, x, int(y))
            row["idx"], row["label"] = idx, int(y)
            row["time"] = round(time.perf_counter() - t0, 3)
            stream.write(row)
            bar.update(1)
    finally:
        bar.close()
    return stream.rows


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
    seed: int = 0,
    start: int = 0,
    count: Optional[int] = None,
    skip: int = 1,
    device: torch.device | str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    run_extra: Optional[dict[str, Any]] = None,
    info: Optional[dict[str, Any]] = None,
) -> list[dict[str, str]]:
    """Certify samples ``select_indices(len(dataset), start, count, skip)`` and stream one TSV row each.

    ``mode`` 'gaussian' or 'uniform' runs one certificate at ``alpha``; 'hybrid' runs both and
    combines them with the NU paper's Table 1 (:func:`cure_lirpa.smoothing.hybrid.combine`), each at
    ``alpha / 2`` when ``joint_alpha`` (so the pair holds with probability >= 1 - alpha), else each at
    ``alpha``. Noise for sample i is seeded by ``sample_seed(seed, i, stream)``, so sharded and
    resumed runs give the same rows as one uninterrupted run. ``run_extra`` is added to the run
    configuration that ``resume`` checks (e.g. the checkpoint hash). Returns all rows of the file.
    """
    from .hybrid import combine, split_alpha

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
    each_alpha = split_alpha(alpha, 2, joint_alpha) if mode == "hybrid" else alpha
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmoothingWarning)
        check_sampling(n, each_alpha, batch_size, n0=n0, what="certify")
    indices = select_indices(len(dataset), start, count, skip)
    run = {
        "command": "certify",
        "mode": mode,
        "noises": [s.noise.describe() for s in smooths.values()],
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "alpha_each": each_alpha,
        "batch_size": batch_size,
        "seed": seed,
        "start": start,
        "skip": skip,
        "device_type": torch.device(device).type,
        **(run_extra or {}),
    }
    streams = {"gaussian": 0, "uniform": 1}

    def make_row(idx: int, x: torch.Tensor, y: int) -> dict[str, Any]:
        certs = {}
        for name, smooth in smooths.items():
            smooth.manual_seed(sample_seed(seed, idx, streams[name]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SmoothingWarning)
                certs[name] = smooth.certify(x, n0, n, each_alpha, batch_size)
        row: dict[str, Any] = {}
        for name, cert in certs.items():
            row.update(_per_noise(name, cert))
        if mode == "hybrid":
            h = combine(certs["gaussian"], certs["uniform"])
            label, r1, r2 = h.label, h.radius_l1, h.radius_l2
            row["rule"] = h.rule
        else:
            c = certs[mode]
            label, r1, r2 = c.label, c.radius_l1, c.radius_l2
        row.update(predict=label, radius_l1=r1, radius_l2=r2, correct=int(label == y))
        return row

    with TsvStream(out, certify_columns(mode), run, info, resume, overwrite) as stream:
        return _run_loop(stream, dataset, indices, make_row, progress, f"certify ({mode})")


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
    resume: bool = False,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    run_extra: Optional[dict[str, Any]] = None,
    info: Optional[dict[str, Any]] = None,
) -> list[dict[str, str]]:
    """PREDICT every selected sample and stream one TSV row each (see :func:`certify_dataset`)."""
    smooth = Smooth(model, num_classes, noise, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmoothingWarning)
        check_sampling(n, alpha, batch_size, what="predict")
    indices = select_indices(len(dataset), start, count, skip)
    run = {
        "command": "predict",
        "mode": noise.name,
        "noises": [noise.describe()],
        "n": n,
        "alpha": alpha,
        "batch_size": batch_size,
        "seed": seed,
        "start": start,
        "skip": skip,
        "device_type": torch.device(device).type,
        **(run_extra or {}),
    }

    def make_row(idx: int, x: torch.Tensor, y: int) -> dict[str, Any]:
        smooth.manual_seed(sample_seed(seed, idx, 2))
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

    with TsvStream(out, PREDICT_COLUMNS, run, info, resume, overwrite) as stream:
        return _run_loop(stream, dataset, indices, make_row, progress, f"predict ({noise.name})")
