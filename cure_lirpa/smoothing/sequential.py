"""Sequential (anytime-valid) certification: stop drawing noise as soon as the answer is known.

Fixed-n CERTIFY (Cohen et al. 2019) spends the same n on every input. Here the noise is drawn in
batches and each input stops as soon as an anytime-valid test decides, at the same alpha:

- ``mode='decide'`` (:func:`certify_sequential`): for a list of radii, is the input certified at
  each radius? Radius r is certified when the test shows ``pA > p_target(r)``, with
  ``p_target = Phi(r / sigma)`` (Gaussian, Cohen et al. Theorem 1) or ``1/2 + r / (2 lambda)``
  (Uniform l1, Yang et al. 2020, ``lambda = sqrt(3) sigma``). The input stops once every radius is
  decided, or at the cap ``max_n`` (undecided radii are then reported as not certified).
- ``mode='estimate'`` (:func:`estimate_radius`): the same test on a grid of radii, stopping when the
  largest certified radius is known to ``precision`` (or the cap is reached).

The test of ``H0: pA <= q`` is a mixture likelihood ratio (a test supermartingale, Robbins' method of
mixtures; the betting/e-process view of Waudby-Smith & Ramdas 2023 and Voráček 2024):

    E_n(q) = integral over p1 in [q, 1] of (p1/q)^S ((1-p1)/(1-q))^F  d pi_q(p1),

S hits and F misses of the top class among the first n draws, ``pi_q`` the density proportional to
``(1 - p1)^(b - 1)`` on ``[q, 1]`` (mass spread over the scales of 1 - p1, so an input whose top
class almost never misses is certified with nearly the fewest samples possible). Each mixture
component is a supermartingale under every ``pA <= q``, so by Ville's inequality
``P(E_n(q) >= 1/alpha for some n) <= alpha``: checking after every sample and stopping at any time
keeps the guarantee. Closed form (B the Beta function, I the regularised incomplete Beta function)::

    E_n(q) = b B(S+1, F+b) I_{1-q}(F+b, S+1) / ((1-q)^b q^S (1-q)^F).

Many radii at one alpha: radius r_j is certified only when the tests of every smaller radius
(including ``p_target = 1/2``, which decides the label) have rejected. A wrong certificate then
needs the test at the smallest false threshold to reject, which has probability <= alpha, however
many radii are listed. "Not certifiable" decisions (the mirror test of ``pA >= q``, or the cap) can
only withhold certificates, so they do not affect the guarantee.

The top class is chosen from ``n0`` separate draws, exactly as in CERTIFY (same draws under the
same seed). The hybrid certificate runs each noise at ``alpha / 2`` (:func:`split_alpha`) and
combines them by the NU paper's Table 1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from scipy.special import betainc, betaln
from scipy.stats import norm

from ..errors import UserError
from ..vocabulary import L1, L2, SMOOTHING_NORMS
from .certifier import ABSTAIN, Certificate, Smooth, SmoothingWarning, _check_alpha, check_sampling
from .noise import GaussianNoise, Noise, UniformNoise

NORMS = SMOOTHING_NORMS
PRIOR_B = 0.1
"""Shape of the mixing density ``(1 - p1)^(b - 1)``: small b favours top-class probabilities near 1."""

FUTILITY_ALPHA = 0.05
"""Default level of the "not certifiable" decisions (they only withhold certificates)."""
UNDECIDED, CERTIFIED, NOT_CERTIFIED = 0, 1, -1


# ---------------------------------------------------------------------------------------------
# The e-processes


def log_e_above(s: Any, f: Any, q: float, b: float = PRIOR_B) -> np.ndarray:
    """log E_n(q) of the test of ``H0: p <= q`` (evidence that p > q) after ``s`` hits, ``f`` misses.

    Mixture over ``p1`` in ``[q, 1]`` with density proportional to ``(1 - p1)^(b - 1)`` (module
    docstring). ``s`` and ``f`` may be arrays of the same shape; ``0 < q < 1``.
    """
    s, f = np.asarray(s, dtype=float), np.asarray(f, dtype=float)
    with np.errstate(divide="ignore"):
        tail = np.log(betainc(f + b, s + 1.0, 1.0 - q))
    log1mq = math.log1p(-q)
    return betaln(s + 1.0, f + b) + tail + math.log(b) - b * log1mq - s * math.log(q) - f * log1mq


def log_e_below(s: Any, f: Any, q: float, b: float = PRIOR_B) -> np.ndarray:
    """log E_n of the mirror test of ``H0: p >= q`` (evidence that p < q): mixture over ``p1`` in
    ``[0, q]`` with density proportional to ``(1 - p1)^(b - 1)``."""
    s, f = np.asarray(s, dtype=float), np.asarray(f, dtype=float)
    with np.errstate(divide="ignore"):
        head = np.log(betainc(s + 1.0, f + b, q))
    log1mq = math.log1p(-q)
    return (
        betaln(s + 1.0, f + b)
        + head
        + math.log(b)
        - math.log(-math.expm1(b * log1mq))
        - s * math.log(q)
        - f * log1mq
    )


# ---------------------------------------------------------------------------------------------
# Radii and target probabilities


def target_probability(noise: Noise, radius: float, norm_name: str, dim: int) -> float:
    """The top-class probability above which ``noise`` certifies ``radius`` in ``norm_name``.

    Gaussian: ``Phi(r / sigma)`` for l2, and for l1 (an l1 ball lies inside the l2 ball of the same
    radius). Uniform: ``1/2 + r / (2 lambda)`` for l1, ``1/2 + r sqrt(d) / (2 lambda)`` for l2.
    Values >= 1 mean the radius can never be certified with this noise.
    """
    if norm_name not in NORMS:
        raise UserError(f"unknown norm {norm_name!r}; choose one of {', '.join(NORMS)}")
    if not (math.isfinite(radius) and radius >= 0):
        raise UserError(f"radii must be finite and >= 0, got {radius!r}")
    if isinstance(noise, GaussianNoise):
        return float(norm.cdf(radius / noise.sigma))
    if isinstance(noise, UniformNoise):
        r1 = radius if norm_name == L1 else radius * math.sqrt(dim)
        return 0.5 + r1 / (2.0 * noise.half_width)
    raise UserError(f"{noise!r} does not certify; use Gaussian or Uniform noise")


def radii_of(noise: Noise, radius: float, norm_name: str, dim: int) -> tuple[float, float]:
    """``(l1, l2)`` radii certified by ``noise`` when ``radius`` in ``norm_name`` is certified
    (the same implications as :meth:`Noise.radii`)."""
    if isinstance(noise, GaussianNoise):
        return radius, radius
    if norm_name == L1:
        return radius, radius / math.sqrt(dim)
    return radius * math.sqrt(dim), radius


# ---------------------------------------------------------------------------------------------
# The sequential test on one Bernoulli stream


class SequentialTest:
    """Anytime-valid decisions "p > q_j?" for thresholds ``q_1 <= ... <= q_K`` on one stream of hits.

    Feed hits (True = the base classifier returned the top class) with :meth:`update`; it consumes
    them in order and stops at the first sample after which every threshold is decided.
    ``status[j]`` is :data:`CERTIFIED`, :data:`NOT_CERTIFIED` or :data:`UNDECIDED`; only a prefix
    of the thresholds can be certified (the chain rule of the module docstring). ``alpha`` bounds
    the probability of certifying any threshold at or above the true p; ``futility_alpha`` bounds
    the probability of calling a threshold below the true p not certifiable (a power setting).
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        alpha: float,
        max_n: int,
        futility_alpha: float = FUTILITY_ALPHA,
        b: float = PRIOR_B,
    ):
        _check_alpha(alpha)
        q = np.asarray(thresholds, dtype=float)
        if q.ndim != 1 or q.size == 0 or np.any(np.diff(q) < 0) or np.any(q < 0.5):
            raise UserError("thresholds must be a non-empty sorted list of values >= 1/2")
        if max_n < 1:
            raise UserError(f"max_n (the cap on samples) must be >= 1, got {max_n}")
        self.q = q
        self.alpha = float(alpha)
        self.futility_alpha = float(futility_alpha)
        _check_alpha(self.futility_alpha)
        self.max_n = int(max_n)
        self.b = float(b)
        self.level = math.log(1.0 / self.alpha)
        self.futility_level = math.log(1.0 / self.futility_alpha)
        self.s = 0
        self.f = 0
        self.status = np.where(q >= 1.0, NOT_CERTIFIED, UNDECIDED)
        self._need: tuple[Any, Optional[int]] = (None, None)
        self.refuted: Optional[int] = None
        """Smallest threshold the mirror test showed to be above p (None when none)."""
        self._grid = np.unique(np.geomspace(1, self.max_n, 48).astype(np.int64))
        self._propagate()

    @property
    def n(self) -> int:
        """Samples consumed so far."""
        return self.s + self.f

    def certified_count(self) -> int:
        """How many thresholds (a prefix) are certified."""
        k = 0
        while k < len(self.q) and self.status[k] == CERTIFIED:
            k += 1
        return k

    def frontier(self) -> Optional[int]:
        """Index of the first threshold not certified, or None when all are."""
        k = self.certified_count()
        return k if k < len(self.q) else None

    @property
    def done(self) -> bool:
        """True when the certified prefix can no longer change (or the cap is reached)."""
        k = self.frontier()
        return k is None or self.status[k] == NOT_CERTIFIED or self.n >= self.max_n

    def _propagate(self) -> None:
        """Not certifiable at q_j implies not certifiable above it (futility only withholds)."""
        bad = np.flatnonzero(self.status == NOT_CERTIFIED)
        if bad.size:
            self.status[bad[0] :] = NOT_CERTIFIED

    def update(self, hits: np.ndarray, every_sample: bool = True) -> int:
        """Consume ``hits`` (bool array) in order; returns how many were consumed.

        With ``every_sample`` the tests are checked after every sample (the stream stops exactly at
        the deciding sample); otherwise only after the whole array (cheaper for many thresholds).
        """
        hits = np.asarray(hits, dtype=bool)
        if self.done or hits.size == 0:
            return 0
        hits = hits[: self.max_n - self.n]
        if every_sample:
            s = self.s + np.cumsum(hits)
            f = self.f + np.cumsum(~hits)
        else:
            s = np.array([self.s + int(hits.sum())])
            f = np.array([self.f + int(hits.size - hits.sum())])
        times = np.arange(1, len(s) + 1) if every_sample else np.array([hits.size])
        # first crossing time of each undecided threshold, in both directions
        # (the mirror test only at the frontier: a futility decision above it changes nothing yet)
        events: list[tuple[int, int, int]] = []
        frontier = self.frontier()
        for j in np.flatnonzero(self.status == UNDECIDED):
            up = np.flatnonzero(log_e_above(s, f, self.q[j], self.b) >= self.level)
            if up.size:
                events.append((int(times[up[0]]), j, CERTIFIED))
            if j != frontier:
                continue
            down = np.flatnonzero(log_e_below(s, f, self.q[j], self.b) >= self.futility_level)
            if down.size:
                events.append((int(times[down[0]]), j, NOT_CERTIFIED))
        # a rejection of "p >= q" overrides one of "p <= q" at the same time (conservative)
        events.sort(key=lambda e: (e[0], e[2]))
        used = int(times[-1])
        for t, j, what in events:
            if self.status[j] == UNDECIDED:
                self.status[j] = what
                if what == NOT_CERTIFIED and (self.refuted is None or j < self.refuted):
                    self.refuted = j
                self._propagate()
            if self.done:
                used = t
                break
        consumed = hits[:used]
        self.s += int(consumed.sum())
        self.f += int(consumed.size - consumed.sum())
        if not self.done:
            self._futile_beyond_cap()
        return used

    def samples_to_certify(self, j: int) -> Optional[int]:
        """Fewest further samples after which threshold ``j`` is certified if they all hit, or None
        when even that does not happen within the cap."""
        key = (self.s, self.f, j)
        if self._need[0] == key:
            return self._need[1]
        room = self.max_n - self.n
        need: Optional[int] = None
        if room > 0:
            # log E grows with every hit: bracket the crossing on a geometric grid, then refine
            m = np.append(self._grid[self._grid < room], room)
            crossed = log_e_above(self.s + m, self.f, self.q[j], self.b) >= self.level
            if crossed[-1]:
                i = int(np.argmax(crossed))
                lo, hi = (int(m[i - 1]) if i > 0 else 0), int(m[i])
                while hi - lo > 1:
                    c = np.unique(np.linspace(lo + 1, hi, min(hi - lo, 512)).astype(np.int64))
                    ok = log_e_above(self.s + c, self.f, self.q[j], self.b) >= self.level
                    i = int(np.argmax(ok))
                    lo, hi = (int(c[i - 1]) if i > 0 else lo), int(c[i])
                need = hi
        self._need = (key, need)
        return need

    def _futile_beyond_cap(self) -> None:
        """Thresholds that cannot be certified within the cap even if every sample hits."""
        k = self.frontier()
        if k is not None and self.status[k] == UNDECIDED and self.samples_to_certify(k) is None:
            self.status[k] = NOT_CERTIFIED
            self._propagate()

    def next_batch(self, batch_size: int, min_batch: int) -> int:
        """A batch size that avoids drawing far past the deciding sample: the samples the frontier
        needs if all hit, but at least ``min_batch`` and at most the samples drawn so far (geometric
        growth), ``batch_size`` and the room left under the cap."""
        room = self.max_n - self.n
        k = self.frontier()
        need = self.samples_to_certify(k) if k is not None else None
        size = max(min_batch, self.n)
        if need is not None:
            size = min(size, need)
        return int(max(1, min(room, batch_size, max(size, min_batch))))


# ---------------------------------------------------------------------------------------------
# Certificates of one input


@dataclass(frozen=True)
class SequentialCertificate(Certificate):
    """Result of a sequential certification of one input with one noise.

    ``label`` is :data:`ABSTAIN` unless ``pA > 1/2`` was shown. ``radius_l1``/``radius_l2`` are the
    radii implied by the largest certified radius of the list (0 when none); ``p_lower`` is the
    target probability of that radius (1/2 when only the label is certified, 0 when abstained).
    ``count`` hits of ``label`` among the ``n`` estimation draws (after the ``n0`` selection
    draws); ``n_drawn`` counts every noisy sample evaluated, including ``n0`` and the unused tail of
    the last batch. ``decisions`` maps each radius to 'certified', 'not certified' or
    'cap' (undecided when ``max_n`` was reached). ``radius_upper`` (estimation) is the smallest grid
    radius shown to be above the true radius, or ``inf``.
    """

    n0: int
    n_drawn: int
    stop: str
    decisions: dict[float, str] = field(default_factory=dict)
    radius: float = 0.0
    radius_upper: float = math.inf

    @property
    def samples(self) -> int:
        """Samples the statistics used: ``n0 + n``."""
        return self.n0 + self.n


class _Sampler:
    """Predicted classes of the base classifier on noisy copies of one input, batch by batch."""

    def __init__(self, smooth: Smooth, x: torch.Tensor, batch_size: int):
        self.smooth = smooth
        self.x = x.to(smooth.device)
        self.buf = torch.empty(
            (batch_size, *self.x.shape), dtype=self.x.dtype, device=smooth.device
        )
        self.drawn = 0

    def __call__(self, k: int) -> np.ndarray:
        batch = self.buf[:k]
        self.smooth.noise.sample_into(batch, self.smooth.generator).add_(self.x)
        self.drawn += k
        return self.smooth.base_classifier(batch).argmax(dim=1).cpu().numpy()


def check_max_n(n0: int, max_n: int, alpha: float, batch_size: int) -> None:
    """Raise :class:`UserError` for impossible counts, a ``max_n`` below ``n0`` or too small to
    ever certify."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmoothingWarning)
        msg = check_sampling(max_n, alpha, batch_size, n0=n0, what="certify")
    if msg:
        raise UserError(msg.replace("n=", "max_n=") + " (raise --max-n)")
    if max_n < n0:
        raise UserError(
            f"--max-n {max_n} is below --n0 {n0}: the n0 draws only choose the top class, the "
            "certificate rests on the at most max-n draws after them; use a max-n much larger "
            "than n0 (e.g. --n0 100 --max-n 100000)"
        )


def run_test(
    smooth: Smooth,
    x: torch.Tensor,
    thresholds: Sequence[float],
    n0: int,
    alpha: float,
    max_n: int,
    batch_size: int,
    every_sample: bool = True,
    stop_early: Optional[Callable[[SequentialTest], bool]] = None,
    min_batch: int = 50,
    futility_alpha: float = FUTILITY_ALPHA,
) -> tuple[int, SequentialTest, int]:
    """Select the top class from ``n0`` draws (as CERTIFY), then run a :class:`SequentialTest` of
    ``thresholds`` on fresh draws. Returns ``(top class, test, samples drawn)``."""
    check_max_n(n0, max_n, alpha, batch_size)
    model = smooth.base_classifier
    was_training = model.training
    model.eval()
    try:
        counts0 = smooth.sample_counts(x, n0, batch_size)
        top = int(counts0.argmax())
        test = SequentialTest(thresholds, alpha, max_n, futility_alpha)
        with torch.inference_mode():
            draw = _Sampler(smooth, x, batch_size)
            while not test.done and not (stop_early is not None and stop_early(test)):
                k = test.next_batch(batch_size, min_batch)
                test.update(draw(k) == top, every_sample)
    finally:
        model.train(was_training)
    return top, test, n0 + draw.drawn


def certify_sequential(
    smooth: Smooth,
    x: torch.Tensor,
    radii: Sequence[float],
    n0: int = 100,
    alpha: float = 0.001,
    max_n: int = 100_000,
    batch_size: int = 1000,
    norm_name: str = L2,
    min_batch: int = 50,
    futility_alpha: float = FUTILITY_ALPHA,
) -> SequentialCertificate:
    """Decide, for every radius in ``radii`` (``norm_name``), whether ``x`` is certified, drawing
    noise only until every radius is decided (or ``max_n`` estimation draws).

    The certified radius is the largest listed radius whose test (and every smaller one's) rejected
    ``pA <= p_target``; the certificate is wrong with probability at most ``alpha``. A radius is
    called not certifiable when the mirror test shows ``pA < p_target`` at ``futility_alpha`` (a
    power setting: it cannot make a certificate wrong) or when all-hit draws could not certify it
    within ``max_n``.
    """
    radii = sorted({float(r) for r in radii})
    if not radii:
        raise UserError("give at least one radius to decide (e.g. --radii 0.25,0.5,0.75)")
    dim = int(x.numel())
    thresholds = [0.5] + [target_probability(smooth.noise, r, norm_name, dim) for r in radii]
    top, test, drawn = run_test(
        smooth,
        x,
        thresholds,
        n0,
        alpha,
        max_n,
        batch_size,
        min_batch=min_batch,
        futility_alpha=futility_alpha,
    )
    return _certificate(
        smooth.noise, norm_name, dim, [0.0, *radii], thresholds, top, test, drawn, n0
    )


def estimate_radius(
    smooth: Smooth,
    x: torch.Tensor,
    precision: float = 0.05,
    max_radius: Optional[float] = None,
    n0: int = 100,
    alpha: float = 0.001,
    max_n: int = 100_000,
    batch_size: int = 1000,
    norm_name: str = L2,
    min_batch: int = 50,
    futility_alpha: float = FUTILITY_ALPHA,
) -> SequentialCertificate:
    """The largest certified radius of ``x`` to within ``precision`` (``norm_name`` units).

    Runs the sequential test on the radius grid ``precision/2, precision, ...`` up to ``max_radius``
    (default: the largest radius any input can reach within ``max_n``) and stops when the certified
    radius and the smallest radius out of reach (by the mirror test, or not certifiable within
    ``max_n``) differ by at most ``precision``, when ``max_radius`` is certified, or at the cap.
    ``radius_upper`` is the smallest grid radius the mirror test showed to be above the true radius
    (``inf`` when none). Certificates hold with probability >= 1 - alpha, ``radius_upper`` with
    probability >= 1 - ``futility_alpha`` on its own.
    """
    if not (math.isfinite(precision) and precision > 0):
        raise UserError(f"precision must be a positive radius, got {precision!r}")
    dim = int(x.numel())
    if max_radius is None:
        p_best = alpha ** (1.0 / max_n)  # Clopper–Pearson bound when all max_n draws hit
        max_radius = radii_for_probability(smooth.noise, p_best, norm_name, dim)
    step = precision / 2.0
    radii = [step * k for k in range(1, int(math.floor(max_radius / step + 1e-9)) + 1)]
    if not radii or radii[-1] < max_radius - 1e-12:
        radii.append(float(max_radius))
    thresholds = [0.5] + [target_probability(smooth.noise, r, norm_name, dim) for r in radii]
    grid = [0.0, *radii]

    def precise(test: SequentialTest) -> bool:
        k = test.frontier()
        if k is None:
            return True
        out = np.flatnonzero(test.status == NOT_CERTIFIED)
        return out.size > 0 and k > 0 and grid[out[0]] - grid[k - 1] <= precision

    top, test, drawn = run_test(
        smooth,
        x,
        thresholds,
        n0,
        alpha,
        max_n,
        batch_size,
        False,
        precise,
        min_batch,
        futility_alpha,
    )
    cert = _certificate(smooth.noise, norm_name, dim, grid, thresholds, top, test, drawn, n0)
    upper = grid[test.refuted] if test.refuted is not None else math.inf
    return _replace(cert, radius_upper=upper, decisions={})


def radii_for_probability(noise: Noise, p: float, norm_name: str, dim: int) -> float:
    """Inverse of :func:`target_probability`: the radius in ``norm_name`` certified at ``p``."""
    r1, r2 = noise.radii(p, dim)
    return r2 if norm_name == L2 else r1


def _replace(cert: SequentialCertificate, **changes: Any) -> SequentialCertificate:
    import dataclasses

    return dataclasses.replace(cert, **changes)


def _certificate(
    noise: Noise,
    norm_name: str,
    dim: int,
    grid: Sequence[float],
    thresholds: Sequence[float],
    top: int,
    test: SequentialTest,
    drawn: int,
    n0: int,
) -> SequentialCertificate:
    k = test.certified_count()
    decisions = {}
    for r, status in zip(grid[1:], test.status[1:]):
        name = {CERTIFIED: "certified", NOT_CERTIFIED: "not certified", UNDECIDED: "cap"}
        decisions[r] = name[int(status)]
    frontier = test.frontier()
    if frontier is None or test.status[frontier] != UNDECIDED:
        stop = "decided"
    else:
        stop = "cap" if test.n >= test.max_n else "precision"
    # a certified threshold above an undecided one does not count (the chain rule)
    for j in range(k, len(grid)):
        if test.status[j] == CERTIFIED:
            decisions[grid[j]] = "cap" if stop == "cap" else "not certified"
    if k == 0:
        return SequentialCertificate(
            ABSTAIN, 0.0, 0.0, 0.0, test.s, test.n, n0, drawn, stop, decisions
        )
    radius = grid[k - 1]
    r1, r2 = radii_of(noise, radius, norm_name, dim)
    return SequentialCertificate(
        top, float(thresholds[k - 1]), r1, r2, test.s, test.n, n0, drawn, stop, decisions, radius
    )


# ---------------------------------------------------------------------------------------------
# Hybrid (NU paper, Table 1)


def certify_sequential_hybrid(
    gaussian: Smooth,
    uniform: Smooth,
    x: torch.Tensor,
    radii: Sequence[float],
    n0: int = 100,
    alpha: float = 0.001,
    max_n: int = 100_000,
    batch_size: int = 1000,
    norm_name: str = L1,
    joint_alpha: bool = True,
    futility_alpha: float = FUTILITY_ALPHA,
):
    """Sequential Gaussian and Uniform certificates, each at :func:`split_alpha` (alpha / 2 by
    default), combined by Table 1. Returns ``(hybrid, gaussian, uniform)``."""
    from .hybrid import combine, split_alpha

    a = split_alpha(alpha, 2, joint_alpha)
    kw = {"norm_name": norm_name, "futility_alpha": futility_alpha}
    g = certify_sequential(gaussian, x, radii, n0, a, max_n, batch_size, **kw)
    u = certify_sequential(uniform, x, radii, n0, a, max_n, batch_size, **kw)
    return combine(g, u), g, u


__all__ = [
    "SequentialCertificate",
    "SequentialTest",
    "certify_sequential",
    "certify_sequential_hybrid",
    "estimate_radius",
    "log_e_above",
    "log_e_below",
    "target_probability",
]
