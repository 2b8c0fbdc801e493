"""The cheapest-first cascade (bound method ``auto``): its stages per threat, the per-sample time
budget, the cascade over norm balls, the one over box families and the attack that refutes boxes.

Under a norm ball the cascade runs IBP, then CROWN-IBP, CROWN (SDP-CROWN under l2 and l1 balls) and
alpha-CROWN, each only on the samples still open; it certifies exactly the union of what these
methods certify (:func:`ball_cascade`). For box families (patches, geometric threats) it runs per
(sample, box) pair (:func:`box_cascade`): a sample is certified when each of its boxes is certified
by some method, so it certifies at least that union. Margins are ``min_j lb_j`` (> 0: certified),
times are seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..attacks import box_pgd
from ..bounds.classifier import BoundedClassifier
from ..threats.base import BoxFamily, NormBall, Threat
from ..vocabulary import BOX, CASCADE_BUDGET, CASCADE_STAGES, IBP, L2, TIMEOUT
from .results import NONE

CASCADE = CASCADE_STAGES[BOX]
"""The stages under l∞ balls and box families."""
LP_CASCADE = CASCADE_STAGES[L2]
"""The stages under l2 and l1 balls: SDP-CROWN is tighter than CROWN there (for l1 through the
enclosing l2 ball) and cheaper than alpha-CROWN (benchmarks/certificates.py measures both)."""
BUDGET = CASCADE_BUDGET
REFUTE_BOXES = 16
"""Open boxes per sample (lowest IBP bounds first) that the box-family cascade attacks."""
REFUTE_STEPS = 20
"""Signed-gradient steps of that attack (:func:`cure_lirpa.attacks.box_pgd`)."""
LAST_STAGE_GROUP = 4
"""Boxes per alpha-CROWN call in the box-family cascade (it stops at a sample's first failure)."""
ATTACK = "attack"
"""The deciding stage of a sample the box attack refuted."""

Stages = Callable[[Threat], Sequence[str]]
"""The cascade's stages for a threat, cheapest first (the first is IBP for box families)."""
Times = dict
"""Seconds per ``(threat name, "auto:<stage>")``, added to (a ``defaultdict(float)``)."""


def cascade_for(threat: Threat) -> tuple[str, ...]:
    """The cascade's stages, cheapest first, for ``threat``."""
    if isinstance(threat, NormBall):
        return CASCADE_STAGES[threat.norm]
    return CASCADE


@dataclass
class Decision:
    """What the cascade decided for a batch of B samples.

    ``margin`` (B,): the deciding lower bound (-inf for misclassified samples); ``by``: the deciding
    stage per sample (:data:`NONE`, :data:`ATTACK` or :data:`~cure_lirpa.vocabulary.TIMEOUT`
    besides the stages); ``fallback`` bool (B,): alpha-CROWN answered by CROWN; ``skipped``: per
    sample the stages skipped while it was open, stage -> reason.
    """

    margin: torch.Tensor
    by: list[str]
    fallback: torch.Tensor
    skipped: list[dict[str, str]]


class Budget:
    """Seconds of bound computation left per sample (None: unlimited). A batched stage's time is
    shared equally by the samples it ran on."""

    def __init__(self, samples: int, seconds: Optional[float]):
        self.seconds = seconds
        self.spent = torch.zeros(samples, dtype=torch.float64)

    def charge(self, index: torch.Tensor, seconds: float) -> None:
        self.spent[index] += seconds / max(1, len(index))

    def out(self, index: torch.Tensor) -> torch.Tensor:
        """Bool (len(index),): which of these samples have spent their budget."""
        if self.seconds is None:
            return torch.zeros(len(index), dtype=torch.bool)
        return self.spent[index] >= self.seconds


def margins(
    bc: BoundedClassifier, x: torch.Tensor, y: torch.Tensor, threat: Threat, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Certified margins min_j lb_j (B,) and, per sample, whether its bound fell back to a looser
    method (bool (B,); alpha-CROWN answered by CROWN where auto_LiRPA 0.3 fails)."""
    result = bc.bounds(x, y, threat, method)
    return result.lower.min(1).values.cpu(), result.fell_back


def run_cascade(
    bc: BoundedClassifier,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    times: Times,
    correct: torch.Tensor,
    advance: Callable[[float], None],
    budget: Optional[float] = BUDGET,
    stages: Stages = cascade_for,
) -> Decision:
    """The cascade on one batch ``x`` (B, C, H, W) under ``threat``: :func:`box_cascade` for box
    families, else :func:`ball_cascade`. ``correct`` bool (B,) marks the correctly classified
    samples (the others are never certified); ``advance(images)`` reports progress of box families."""
    if isinstance(threat, BoxFamily):
        return box_cascade(bc, model, x, y, threat, times, correct, advance, budget, stages(threat))
    return ball_cascade(bc, x, y, threat, times, correct, budget, stages(threat))


def ball_cascade(
    bc: BoundedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    times: Times,
    correct: torch.Tensor,
    budget: Optional[float] = BUDGET,
    stages: Sequence[str] = CASCADE,
) -> Decision:
    """Cheapest-first over ``stages``, each on the samples still open; a sample whose ``budget``
    seconds are spent before a stage certified it is decided by ``timeout`` (not certified).

    Misclassified samples are never certifiable and skip every stage (margin -inf, "none").
    """
    margin = torch.full((len(x),), -math.inf)
    fallback = torch.zeros(len(x), dtype=torch.bool)
    by = [NONE] * len(x)
    skipped: list[dict[str, str]] = [{} for _ in range(len(x))]
    clock = Budget(len(x), budget)
    open_idx = torch.arange(len(x))[correct]
    for k, method in enumerate(stages):
        if len(open_idx) == 0:
            break
        reason = bc.supports(method, threat)
        if reason is not None:
            for i in open_idx.tolist():
                skipped[i][method] = reason
            continue
        t0 = time.perf_counter()
        lb, fell = margins(bc, x[open_idx], y[open_idx], threat, method)
        fallback[open_idx] = fell
        spent = time.perf_counter() - t0
        times[(threat.name, f"auto:{method}")] += spent
        clock.charge(open_idx, spent)
        for i, v in zip(open_idx.tolist(), lb.tolist()):
            margin[i] = v
            by[i] = method
        open_idx = open_idx[lb <= 0]
        if k == len(stages) - 1:
            break
        late = clock.out(open_idx)
        for i in open_idx[late].tolist():
            by[i] = TIMEOUT
        open_idx = open_idx[~late]
    return Decision(margin, by, fallback, skipped)


@dataclass
class _Boxes:
    """The box-family cascade on B samples ``x`` (labels ``y``) of N boxes each: its inputs and
    state."""

    bc: BoundedClassifier
    x: torch.Tensor
    y: torch.Tensor
    threat: BoxFamily
    times: Times
    best: torch.Tensor  # (B, N) best lower bound found per box
    open: torch.Tensor  # bool (B, N) boxes no stage has certified yet
    by: list[str]  # last stage run per sample
    skipped: list[dict[str, str]]  # stage -> reason, per sample
    clock: Budget


def box_cascade(
    bc: BoundedClassifier,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: BoxFamily,
    times: Times,
    correct: torch.Tensor,
    advance: Callable[[float], None],
    budget: Optional[float] = BUDGET,
    stages: Sequence[str] = CASCADE,
) -> Decision:
    """The cascade for a box family, run per (sample, box) pair.

    IBP (``stages[0]``) bounds every box of every correctly classified sample; only the boxes it
    leaves open go on. If the boxes lie inside the threat set (patches), a short attack
    (:func:`box_pgd`) on the open boxes refutes samples that have a real counterexample: no sound
    method can certify them, so they skip the other stages (decided by ``"attack"``). The remaining
    open boxes go through the other stages one sample at a time, each stage on the boxes still
    open; the last stage takes the boxes with the lowest bounds first and stops at the first box it
    cannot certify.

    The margins (B,) are the minimum over boxes of the best lower bound found for each box, so
    always a lower bound over the whole threat set; ``by`` is the last stage run per sample (or
    ``timeout`` when its ``budget`` seconds ran out first). ``advance(images)`` reports progress:
    half of each sample for IBP, half for the rest.
    """
    if stages[0] != IBP:
        raise ValueError(f"the box-family cascade starts with {IBP}, not {stages[0]}")
    n, b = threat.num_boxes(bc.in_shape), len(x)
    state = _Boxes(
        bc,
        x,
        y,
        threat,
        times,
        best=torch.full((b, n), -math.inf),
        open=correct.view(-1, 1).expand(b, n).clone(),
        by=[IBP if c else NONE for c in correct.tolist()],
        skipped=[{} for _ in range(b)],
        clock=Budget(b, budget),
    )
    _box_first_stage(state, model, correct, advance)
    later = tuple(stages[1:])
    reasons = {m: bc.supports(m, threat) for m in later}
    for i in range(b):
        _box_later_stages(state, i, later, reasons)
        advance(0.5)
    margin = state.best.min(1).values
    margin[~correct] = -math.inf
    return Decision(margin, state.by, torch.zeros(b, dtype=torch.bool), state.skipped)


def _box_first_stage(
    state: _Boxes, model: nn.Module, correct: torch.Tensor, advance: Callable[[float], None]
) -> None:
    """IBP on every open box, then the refuting attack on the boxes it leaves open (patches)."""
    bc, x, y, threat, times = state.bc, state.x, state.y, state.threat, state.times
    name, b = threat.name, len(x)
    total = max(1, int(state.open.sum()))
    t0 = time.perf_counter()
    lb = bc.box_margins(
        x, y, threat, IBP, state.open, on_chunk=lambda idx: advance(0.5 * b * len(idx) / total)
    ).cpu()
    times[(name, f"auto:{IBP}")] += time.perf_counter() - t0
    state.clock.charge(correct.nonzero().view(-1), time.perf_counter() - t0)
    state.best = torch.where(state.open, lb, state.best)
    state.open &= lb <= 0
    if not correct.any():
        advance(0.5 * b)  # no IBP chunk ran
    if threat.exact_boxes and state.open.any():
        t0 = time.perf_counter()
        attacked = state.open.any(1).nonzero().view(-1)
        for i in _refuted(bc, model, x, y, threat, state.open, state.best):
            state.open[i] = False
            state.by[i] = ATTACK
        times[(name, f"auto:{ATTACK}")] += time.perf_counter() - t0
        state.clock.charge(attacked, time.perf_counter() - t0)


def _box_later_stages(
    state: _Boxes, i: int, stages: Sequence[str], reasons: dict[str, Optional[str]]
) -> None:
    """The stages after IBP on sample ``i``'s open boxes, until they are all certified, a box of
    the last stage fails, or the sample's time runs out."""
    bc, x, y, threat, times = state.bc, state.x, state.y, state.threat, state.times
    me = torch.tensor([i])
    n = state.open.shape[1]
    for stage, method in enumerate(stages):
        if not state.open[i].any():
            break
        if bool(state.clock.out(me)):
            state.by[i] = TIMEOUT
            break
        if reasons[method] is not None:
            state.skipped[i][method] = str(reasons[method])
            continue
        state.by[i] = method
        index = state.open[i].nonzero().view(-1)
        last = stage == len(stages) - 1
        if last:  # hardest boxes first: the sample is decided at its first failure
            index = index[state.best[i, index].argsort()]
        for group in index.split(LAST_STAGE_GROUP if last else len(index)):
            t0 = time.perf_counter()
            mask = torch.zeros(1, n, dtype=torch.bool)
            mask[0, group] = True
            lb = bc.box_margins(x[i : i + 1], y[i : i + 1], threat, method, mask)[0].cpu()
            state.best[i, group] = torch.maximum(state.best[i, group], lb[group])
            state.open[i, group] = lb[group] <= 0
            spent = time.perf_counter() - t0
            times[(threat.name, f"auto:{method}")] += spent
            state.clock.charge(me, spent)
            if last and state.open[i, group].any():
                break
            if state.open[i].any() and bool(state.clock.out(me)):
                state.by[i] = TIMEOUT
                break
        if state.by[i] == TIMEOUT:
            break


def _refuted(
    bc: BoundedClassifier,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: BoxFamily,
    open_: torch.Tensor,
    best: torch.Tensor,
) -> list[int]:
    """Samples with a point misclassified by ``model`` in one of their open boxes (attacking the
    :data:`REFUTE_BOXES` boxes with the lowest bounds per sample)."""
    samples, lo, hi, labels = [], [], [], []
    for i in open_.any(1).nonzero().view(-1).tolist():
        index = open_[i].nonzero().view(-1)
        index = index[best[i, index].argsort()][:REFUTE_BOXES]
        box_lo, box_hi = threat.boxes_at(x[i : i + 1], index)
        samples += [i] * len(index)
        lo.append(box_lo[0])
        hi.append(box_hi[0])
        labels.append(y[i].repeat(len(index)))
    found, _ = box_pgd(
        model,
        torch.cat(lo).to(bc.device),
        torch.cat(hi).to(bc.device),
        torch.cat(labels).to(bc.device),
        steps=REFUTE_STEPS,
    )
    found = found.cpu()
    return sorted({i for i, m in zip(samples, found.tolist()) if m < 0})
