"""Per-sample certification under several threats and methods, union accuracy, the cascade.

:func:`certify_dataset` runs every (threat, method) pair on every sample and, as a soundness
cross-check, a PGD attack per lp-ball threat. It returns one :class:`SampleRow` per sample and a
summary dict with clean accuracy, certified accuracy per threat and method, best-of-methods certified
accuracy, union accuracy, PGD accuracy, time per image and peak memory. A sample reported certified and
broken by the attack under the same threat is counted in ``summary["soundness_violations"]`` (it must
stay 0; the tests assert it).

The method ``auto`` is the cheapest-first cascade: IBP, then CROWN-IBP, CROWN and alpha-CROWN, each
only on the samples still open; it certifies exactly the union of what these methods certify. Under
l2 balls SDP-CROWN runs between CROWN and alpha-CROWN (:func:`cascade_for`). For box families
(patches, geometric threats) it runs per (sample, box) pair (:func:`_box_cascade`): a sample is
certified when each of its boxes is certified by some method, so it certifies at least that union.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..attacks import box_pgd, pgd
from ..bounds.classifier import METHODS, BoundedClassifier
from ..errors import UserError
from ..threats.base import BoxFamily, NormBall, Threat
from ..vocabulary import CASCADE_BUDGET

CASCADE = ("ibp", "crown-ibp", "crown", "alpha-crown")
REFUTE_BOXES = 16
"""Open boxes per sample (lowest IBP bounds first) that the box-family cascade attacks."""
REFUTE_STEPS = 20
"""Signed-gradient steps of that attack (:func:`cure_lirpa.attacks.box_pgd`)."""
LAST_STAGE_GROUP = 4
"""Boxes per alpha-CROWN call in the box-family cascade (it stops at a sample's first failure)."""

LP_CASCADE = ("ibp", "crown-ibp", "crown", "sdp-crown", "alpha-crown")
"""The cascade under l2 and l1 balls: SDP-CROWN is tighter than CROWN there (for l1 through the
enclosing l2 ball) and cheaper than alpha-CROWN (benchmarks/certificates.py measures both)."""
BUDGET = CASCADE_BUDGET
TIMEOUT = "timeout"


def cascade_for(threat: Threat) -> tuple[str, ...]:
    """The cascade's stages, cheapest first, for ``threat``."""
    if isinstance(threat, NormBall) and threat.p in (2.0, 1.0):
        return LP_CASCADE
    return CASCADE


ALL_METHODS = (*METHODS, "auto")


@dataclass
class SampleRow:
    """One sample's results. ``margins[threat][method]`` is min_j lb_j (> 0 iff certified).

    For ``auto`` the margin is that of the method that decided and ``decided_by[threat]`` names it.
    ``robust[threat]`` is True when PGD found no adversarial example (None: not attacked).
    ``violations`` lists the threats under which a bound certified the sample and PGD broke it (a
    bug: those certificates are withdrawn, the sample counts as not certified there).
    ``alpha_fallback`` lists the threats under which this sample's alpha-CROWN bound (method
    ``alpha-crown`` or the cascade's last stage) is the CROWN bound, because auto_LiRPA's
    alpha-CROWN failed on its batch (sound, but not optimised; see :mod:`cure_lirpa.bounds.lirpa`).
    ``skipped[threat]`` maps the cascade stages skipped for this sample to the reason (the bound
    method does not support the model or the threat). ``decided_by[threat] == "timeout"``: the
    sample's time budget ran out before a stage certified it (not certified).
    """

    index: int
    label: int
    prediction: int
    margins: dict[str, dict[str, float]] = field(default_factory=dict)
    certified: dict[str, dict[str, bool]] = field(default_factory=dict)
    decided_by: dict[str, str] = field(default_factory=dict)
    robust: dict[str, Optional[bool]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    alpha_fallback: list[str] = field(default_factory=list)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.label == self.prediction

    def best(self, threat: str) -> bool:
        """Certified under ``threat`` by at least one method."""
        return any(self.certified.get(threat, {}).values())


def _margins(
    bc: BoundedClassifier, x: torch.Tensor, y: torch.Tensor, threat: Threat, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Certified margins min_j lb_j (B,) and, per sample, whether its bound fell back to a looser
    method (bool (B,); alpha-CROWN answered by CROWN where auto_LiRPA 0.3 fails)."""
    result = bc.bounds(x, y, threat, method)
    return result.lower.min(1).values.cpu(), result.fell_back


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


def _skip_reason(bc: BoundedClassifier, method: str, threat: Threat) -> Optional[str]:
    """Why the cascade must skip ``method`` for this model and threat (None: run it)."""
    return bc.supports(method, threat)


def _cascade(
    bc: BoundedClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    times: dict,
    correct: torch.Tensor,
    budget: Optional[float] = None,
) -> tuple[torch.Tensor, list[str], torch.Tensor, list[dict[str, str]]]:
    """Cheapest-first: returns the deciding margins (B,), the deciding method per sample (or
    ``timeout``), the alpha-CROWN fallback flags (bool (B,)) and per sample the stages skipped while
    it was open (stage -> reason).

    Misclassified samples are never certifiable and skip every stage (margin -inf, "none").
    """
    margin = torch.full((len(x),), -math.inf)
    fallback = torch.zeros(len(x), dtype=torch.bool)
    by = ["none"] * len(x)
    skipped: list[dict[str, str]] = [{} for _ in range(len(x))]
    clock = Budget(len(x), budget)
    open_idx = torch.arange(len(x))[correct]
    stages = cascade_for(threat)
    for k, method in enumerate(stages):
        if len(open_idx) == 0:
            break
        reason = _skip_reason(bc, method, threat)
        if reason is not None:
            for i in open_idx.tolist():
                skipped[i][method] = reason
            continue
        t0 = time.perf_counter()
        lb, fell = _margins(bc, x[open_idx], y[open_idx], threat, method)
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
    return margin, by, fallback, skipped


def _box_cascade(
    bc: BoundedClassifier,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: BoxFamily,
    times: dict,
    correct: torch.Tensor,
    advance: Callable[[float], None],
    budget: Optional[float] = None,
) -> tuple[torch.Tensor, list[str], list[dict[str, str]]]:
    """The cascade for a box family, run per (sample, box) pair.

    IBP bounds every box of every correctly classified sample; only the boxes it leaves open go on.
    If the boxes lie inside the threat set (patches), a short attack (:func:`box_pgd`) on the open
    boxes refutes samples that have a real counterexample: no sound method can certify them, so they
    skip the other stages (decided by ``"attack"``). The remaining open boxes go through CROWN-IBP,
    CROWN and alpha-CROWN one sample at a time, each stage on the boxes still open; alpha-CROWN
    takes the boxes with the lowest bounds first and stops at the first box it cannot certify.

    Returns the margins (B,) -- the minimum over boxes of the best lower bound found for each box,
    so always a lower bound over the whole threat set --, the last method run per sample (or
    ``timeout`` when its ``budget`` seconds ran out first) and the stages skipped per sample.
    ``advance(images)`` reports progress: half of each sample for IBP, half for the rest.
    """
    name, n, b = threat.name, threat.num_boxes(bc.in_shape), len(x)
    best = torch.full((b, n), -math.inf)
    open_ = correct.view(-1, 1).expand(b, n).clone()
    by = ["ibp" if c else "none" for c in correct.tolist()]
    total = max(1, int(open_.sum()))
    clock = Budget(b, budget)
    skipped: list[dict[str, str]] = [{} for _ in range(b)]

    t0 = time.perf_counter()
    lb = bc.box_margins(
        x, y, threat, "ibp", open_, on_chunk=lambda idx: advance(0.5 * b * len(idx) / total)
    ).cpu()
    times[(name, "auto:ibp")] += time.perf_counter() - t0
    clock.charge(correct.nonzero().view(-1), time.perf_counter() - t0)
    best = torch.where(open_, lb, best)
    open_ &= lb <= 0
    if not correct.any():
        advance(0.5 * b)  # no IBP chunk ran
    if threat.exact_boxes and open_.any():
        t0 = time.perf_counter()
        attacked = open_.any(1).nonzero().view(-1)
        for i in _refuted(bc, model, x, y, threat, open_, best):
            open_[i] = False
            by[i] = "attack"
        times[(name, "auto:attack")] += time.perf_counter() - t0
        clock.charge(attacked, time.perf_counter() - t0)
    reasons = {m: _skip_reason(bc, m, threat) for m in CASCADE[1:]}
    for i in range(b):
        me = torch.tensor([i])
        for stage, method in enumerate(CASCADE[1:], start=2):
            if not open_[i].any():
                break
            if bool(clock.out(me)):
                by[i] = TIMEOUT
                break
            if reasons[method] is not None:
                skipped[i][method] = str(reasons[method])
                continue
            by[i] = method
            index = open_[i].nonzero().view(-1)
            last = stage == len(CASCADE)
            if last:  # hardest boxes first: the sample is decided at its first failure
                index = index[best[i, index].argsort()]
            for group in index.split(LAST_STAGE_GROUP if last else len(index)):
                t0 = time.perf_counter()
                mask = torch.zeros(1, n, dtype=torch.bool)
                mask[0, group] = True
                lb = bc.box_margins(x[i : i + 1], y[i : i + 1], threat, method, mask)[0].cpu()
                best[i, group] = torch.maximum(best[i, group], lb[group])
                open_[i, group] = lb[group] <= 0
                spent = time.perf_counter() - t0
                times[(name, f"auto:{method}")] += spent
                clock.charge(me, spent)
                if last and open_[i, group].any():
                    break
                if open_[i].any() and bool(clock.out(me)):
                    by[i] = TIMEOUT
                    break
            if by[i] == TIMEOUT:
                break
        advance(0.5)
    margin = best.min(1).values
    margin[~correct] = -math.inf
    return margin, by, skipped


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


def pgd_seed(seed: int, index: int) -> int:
    """Seed of the PGD cross-check's random starts for the sample of dataset index ``index``."""
    return seed * 1_000_003 + index


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
) -> list[SampleRow]:
    """Certify one batch ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,).

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
        name = threat.name
        family = isinstance(threat, BoxFamily)
        for method in methods:
            t0 = time.perf_counter()
            fell = torch.zeros(len(y), dtype=torch.bool)
            if method == "auto" and family:
                margin, by, skipped = _box_cascade(
                    bc, model, x, y, threat, times, correct, step, budget
                )
            elif method == "auto":
                margin, by, fell, skipped = _cascade(bc, x, y, threat, times, correct, budget)
            elif family:
                total = len(y) * threat.num_boxes(bc.in_shape)
                margin = bc.box_margins(
                    x, y, threat, method, on_chunk=lambda idx, t=total: step(len(y) * len(idx) / t)
                )
                margin = margin.min(1).values.cpu()
            else:
                margin, fell = _margins(bc, x, y, threat, method)
            if method == "auto":
                for r, b, sk in zip(rows, by, skipped):
                    r.decided_by[name] = b
                    if sk:
                        r.skipped[name] = sk
            else:
                times[(name, method)] += time.perf_counter() - t0
            if not family:
                step(len(y))
            for r, f in zip(rows, fell.tolist()):
                if f and name not in r.alpha_fallback:
                    r.alpha_fallback.append(name)
            ok = (margin > 0) & correct
            for r, m, c in zip(rows, margin.tolist(), ok.tolist()):
                r.margins.setdefault(name, {})[method] = m
                r.certified.setdefault(name, {})[method] = bool(c)
        if attack and isinstance(threat, NormBall):
            t0 = time.perf_counter()
            x_adv = pgd(
                model,
                x.to(bc.device),
                y.to(bc.device),
                threat,
                steps=attack_steps,
                restarts=attack_restarts,
                generator=[
                    torch.Generator().manual_seed(pgd_seed(seed, first_index + i))
                    for i in range(len(y))
                ],
            )
            with torch.no_grad():
                robust = model(x_adv).argmax(1).cpu() == y.cpu()
            times[(name, "pgd")] += time.perf_counter() - t0
            for r, rb in zip(rows, robust.tolist()):
                r.robust[name] = bool(rb)
                if r.best(name) and not rb:  # never report a certificate the attack breaks
                    r.violations.append(name)
                    r.certified[name] = dict.fromkeys(r.certified[name], False)
        else:
            for r in rows:
                r.robust[name] = None
    return rows


def summarize(
    rows: Sequence[SampleRow],
    threats: Sequence[Threat],
    methods: Sequence[str],
    times: Optional[dict] = None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """Accuracies in percent, times in seconds per image, memory in MB."""
    n = len(rows)
    if n == 0:
        raise UserError("no samples to summarise (check --start and --count)")
    pct = lambda k: 100.0 * k / n  # noqa: E731
    names = [t.name for t in threats]
    out: dict[str, Any] = {
        "samples": n,
        "clean_accuracy": pct(sum(r.correct for r in rows)),
        "certified": {
            t: {m: pct(sum(r.certified[t][m] for r in rows)) for m in methods} for t in names
        },
        "certified_best": {t: pct(sum(r.best(t) for r in rows)) for t in names},
        "union": {
            "best": pct(sum(all(r.best(t) for t in names) for r in rows)),
            **{m: pct(sum(all(r.certified[t][m] for t in names) for r in rows)) for m in methods},
        },
        "pgd_accuracy": {},
        "soundness_violations": {},
    }
    if any(m in ("alpha-crown", "auto") for m in methods):
        # samples whose alpha-CROWN bound is the CROWN bound (auto_LiRPA's alpha-CROWN failed)
        out["alpha_crown_fallbacks"] = {
            t: sum(t in getattr(r, "alpha_fallback", ()) for r in rows) for t in names
        }
    if "auto" in methods:
        out["cascade"] = {t: _cascade_summary(rows, t) for t in names}
    for t in names:
        attacked = [r for r in rows if r.robust.get(t) is not None]
        if attacked:
            out["pgd_accuracy"][t] = pct(sum(r.robust[t] for r in attacked))
            out["soundness_violations"][t] = sum(t in r.violations for r in attacked)
    if times:
        out["seconds_per_image"] = {f"{t}/{m}": v / n for (t, m), v in sorted(times.items())}
    out["seconds_total"] = seconds
    out["peak_memory_mb"] = peak_memory_mb()
    return out


def _cascade_summary(rows: Sequence[SampleRow], threat: str) -> dict[str, Any]:
    """Samples per deciding stage, timeouts, and the skipped stages with their reasons."""
    decided: dict[str, int] = defaultdict(int)
    skipped: dict[str, dict[str, Any]] = {}
    for r in rows:
        decided[r.decided_by.get(threat, "none")] += 1
        for stage, reason in r.skipped.get(threat, {}).items():
            entry = skipped.setdefault(stage, {"samples": 0, "reason": reason})
            entry["samples"] += 1
    return {"decided_by": dict(decided), "timeouts": decided.get(TIMEOUT, 0), "skipped": skipped}


PROBE_IMAGES = 16
"""Images timed (after a warm-up call) for the up-front estimate of a verify run."""


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


def peak_memory_mb(device: Optional[torch.device] = None) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MB."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
) -> tuple[list[SampleRow], dict[str, Any]]:
    """Certify every sample of ``dataset``; ``done`` rows (from a resumed run) are skipped.

    ``budget``: seconds of bound computation per sample and threat for the cascade (None: no limit).

    ``on_batch`` is called with each finished batch's rows (the CLI appends them to the run's samples.jsonl).
    """
    methods = list(dict.fromkeys(methods))
    for m in methods:
        if m not in ALL_METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    if not threats:
        raise UserError("give at least one threat, e.g. --threat linf:0.1 --threat l2:0.5")
    device = torch.device(device)
    model = model.to(device).eval()
    bc = BoundedClassifier(model, in_shape, device=device, memory_mb=memory_mb)
    bc.train(False)
    rows = list(done)
    skip = len(rows)
    times: dict = defaultdict(float)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(dataset),
            initial=skip,
            unit="img",
            desc="verify",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} img "
            "[{elapsed}<{remaining}]",
        )
    advance = bar.update if bar is not None else None
    t_start = time.perf_counter()
    seen = 0
    for x, y in loader:
        if seen + len(y) <= skip:
            seen += len(y)
            continue
        lo = max(0, skip - seen)
        x, y = x[lo:], y[lo:]
        if tuple(x.shape[1:]) != tuple(in_shape):
            raise UserError(
                f"dataset images have shape {tuple(x.shape[1:])} but the model expects "
                f"{tuple(in_shape)}; pick the dataset the checkpoint was trained on"
            )
        args = (threats, methods, attack, attack_steps, attack_restarts, times)
        limit = {"budget": budget}
        first = first_index + seen + lo
        if bar is not None and len(rows) == skip and len(dataset) - skip > 1:
            # Time a few images after a warm-up call (first calls pay for set-up) and announce the
            # whole run's estimated time; the results are discarded, so every batch is certified
            # as in a run without a progress bar.
            probe = (threats, methods, attack, attack_steps, attack_restarts, defaultdict(float))
            certify_batch(bc, model, x[:1], y[:1], *probe, first, seed, **limit)
            k = min(len(y), PROBE_IMAGES)
            t0 = time.perf_counter()
            certify_batch(bc, model, x[:k], y[:k], *probe, first, seed, **limit)
            bar.write(estimate_text((time.perf_counter() - t0) / k, len(dataset) - skip, k))
        batch_rows = certify_batch(bc, model, x, y, *args, first, seed, advance, **limit)
        seen += lo + len(batch_rows)
        rows.extend(batch_rows)
        if on_batch is not None:
            on_batch(batch_rows)
        if bar is not None:  # round off the fractional updates
            bar.n = len(rows)
            bar.refresh()
    if bar is not None:
        bar.close()
    summary = summarize(rows, threats, methods, times, time.perf_counter() - t_start)
    summary["peak_memory_mb"] = peak_memory_mb(device)
    return rows, summary


# ---------------------------------------------------------------------------------------------
# Files: a per-sample CSV and a summary JSON (the per-sample records are cure_lirpa.io.runs.Records).


def row_to_json(row: SampleRow) -> str:
    """One line of ``samples.jsonl`` (keys sorted, as :class:`cure_lirpa.io.runs.Records` writes)."""
    return json.dumps(asdict(row), sort_keys=True)


def row_from_json(line: str) -> SampleRow:
    return SampleRow(**json.loads(line))


def csv_text(rows: Sequence[SampleRow], threats: Sequence[Threat], methods: Sequence[str]) -> str:
    """One line per sample: label, prediction, per threat and method certified flag and margin,
    the deciding method of ``auto``, the attack result, and the union flag."""
    names = [t.name for t in threats]
    header = ["index", "label", "prediction", "correct"]
    for t in names:
        for m in methods:
            header += [f"{t}/{m}/certified", f"{t}/{m}/margin"]
        if "auto" in methods:
            header += [f"{t}/auto/decided_by", f"{t}/auto/skipped"]
        header += [f"{t}/certified", f"{t}/pgd_robust"]
    header.append("union/certified")
    lines = [",".join(header)]
    for r in rows:
        cells: list[Any] = [r.index, r.label, r.prediction, int(r.correct)]
        for t in names:
            for m in methods:
                cells += [int(r.certified[t][m]), f"{r.margins[t][m]:.6g}"]
            if "auto" in methods:
                cells += [r.decided_by.get(t, ""), ";".join(r.skipped.get(t, {}))]
            rb = r.robust.get(t)
            cells += [int(r.best(t)), "" if rb is None else int(rb)]
        cells.append(int(all(r.best(t) for t in names)))
        lines.append(",".join(map(str, cells)))
    return "\n".join(lines) + "\n"


def markdown_table(summary: dict[str, Any], methods: Sequence[str]) -> str:
    """The summary as a Markdown table: clean accuracy (the ceiling of every column), then a row
    per threat, a column per method, best and PGD, and the union row."""
    head = ["threat", *methods, "best", "PGD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    clean = f"{summary['clean_accuracy']:.1f}"
    lines.append("| clean (no perturbation) | " + " | ".join([clean] * (len(head) - 1)) + " |")
    for t, per in summary["certified"].items():
        pgd_acc = summary["pgd_accuracy"].get(t)
        cells = [
            t,
            *(f"{per[m]:.1f}" for m in methods),
            f"{summary['certified_best'][t]:.1f}",
            "-" if pgd_acc is None else f"{pgd_acc:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    u = summary["union"]
    lines.append(
        "| **union** | "
        + " | ".join(f"{u[m]:.1f}" for m in methods)
        + f" | **{u['best']:.1f}** | - |"
    )
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: Path,
    rows: Sequence[SampleRow],
    summary: dict[str, Any],
    threats: Sequence[Threat],
    methods: Sequence[str],
) -> None:
    """Write ``samples.csv``, ``summary.json``, ``summary.md`` and the plot of certified accuracy
    per threat and method (``certified_accuracy.png``), each atomically."""
    from ..io.checkpoint import atomic_write_json, atomic_write_text
    from ..plots import PLOT_NAME, plot_certified_accuracy

    atomic_write_text(out_dir / "samples.csv", csv_text(rows, threats, methods))
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", markdown_table(summary, methods))
    plot_certified_accuracy(summary, methods, out_dir / PLOT_NAME)
