"""Randomized-smoothing prediction and certification (Cohen et al. 2019, CERTIFY and PREDICT).

:class:`Smooth` wraps any ``nn.Module`` classifier (logits of shape (B, K)) and one smoothing
noise. ``certify`` returns a :class:`Certificate` whose label is, with probability at least
``1 - alpha`` over the noise draws, the prediction of the smoothed classifier at every point of the
l2 ball of radius ``radius_l2`` and of the l1 ball of radius ``radius_l1`` around ``x``.

Whole datasets go through :mod:`.runner` (a resumable run folder per certification).
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from ..errors import UserError
from .noise import GaussianNoise, Noise, UniformNoise, make_generator

ABSTAIN = -1
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


class _Answer:
    """What every certificate has: a ``label``, :data:`ABSTAIN` when the classifier abstains."""

    label: int

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


@dataclass(frozen=True)
class Certificate(_Answer):
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
# Files


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file (identifies the checkpoint a run was made with)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
