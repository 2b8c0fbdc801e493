"""A strong attack on every certified image of finished benchmark runs (a soundness check).

The certification benchmarks run a cheap attack beside every certificate. This script attacks each
image a run marks as certified under a threat again, far harder, and independently of that check.
Any image it breaks is a wrong certificate. Two kinds of folders (told apart by their files):

* a CURE-table row (``checkpoint.pt``, ``verify/samples.csv``), lp threats: the package's PGD
  (:func:`cure_lirpa.attacks.pgd`) with ``--steps`` steps and ``--restarts`` random restarts, once
  with the margin loss and once with cross-entropy, under the same threat;
* a run of the generalisation suite (``model.json``, ``verify/samples.jsonl``; the checkpoint named
  in ``model.json`` must still have the hash recorded there), patch and geometric threats:

  - geometric (``rotate:D``, ``translate:T``, ``rotate:2+shear:0.02``, ...): the model on the exact
    reference :func:`cure_lirpa.threats.geometry.transform` at a dense grid over the threat's
    parameter ranges (the ranges and integer values of the certificates' own parameter boxes,
    :meth:`GeometricThreat.param_boxes`): ``--grid`` values (end points included) when one
    parameter is continuous, ``--grid-multi`` values per parameter (``grid_multi ** (2 / k)`` for
    k > 2 continuous parameters) when several are, every value of the enumerated ones (integer
    shifts: all (2T+1)^2); then ``--random`` uniformly random parameter vectors; then a local
    refinement: a grid of ``--refine`` values per continuous parameter (about ``refine ** (1/k)``
    for k of them) spanning one grid step on either side of each of the ``--refine-top``
    lowest-margin points, and once more, one local step on either side, around the best of those;
  - patches (``patch:KxL@s``): at every location, the margins of the patch all 0 and all 1 and a
    short signed-gradient search (``--patch-screen-steps`` steps from a random content); then, at the
    ``--patch-top`` locations with the lowest margins so far (0: at every location), PGD on the
    patch content with the margin loss, ``--patch-steps`` signed-gradient steps (step 0.25, halved
    at 50/80/90% of the steps) from ``--patch-restarts`` starts (the screen's best content, then
    random contents).

  An image is broken when the model's prediction at any point tried differs from its label. The
  lowest margin ``f_y - max_{j != y} f_j`` found per image is also compared with the certified
  lower bound on it recorded in ``samples.jsonl``: a margin more than :data:`BOUND_TOL` below its
  bound is a bound violation (an unsound bound, even where it stays positive).

Images are the run's (its ``index`` is the position in :func:`cure_lirpa.data.take`'s order of the
test split) and their labels must equal the test split's. Writes ``<run>/verify/reattack.json``
(per threat: certified images, broken images, their indices, the attack's settings, seconds; for
patch and geometric threats also the lowest margin per image, bound violations, the smallest gap
between a margin found and its bound, a witness per broken image and CPU seconds), prints one line
per run and threat and fails if any certificate is broken or any bound violated::

    python -m benchmarks.reattack benchmarks/results/cure_mnist_blocks/sabr-linf+shi-ctrain
    python -m benchmarks.reattack benchmarks/results/cure_cifar10/* --steps 500 --restarts 10
    python -m benchmarks.reattack benchmarks/results/generalisation/mnist/cure-joint-mtl2-b64
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import click
import torch
from torch import nn

from benchmarks.harness import REPO, data_root_option, file_sha1, log, save_summary
from cure_lirpa.attacks import eval_mode, margin_loss, pgd, step_schedule
from cure_lirpa.data import load_dataset, take
from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint
from cure_lirpa.threats.base import NormBall, Threat, parse_threat
from cure_lirpa.threats.geometry import PARAMS, GeometricThreat, transform
from cure_lirpa.threats.patches import PatchThreat
from cure_lirpa.verification.results import SampleRow, read_samples

REATTACK_JSON = "reattack.json"
BOUND_TOL = 1e-4
"""A margin the attack finds more than this below the certified lower bound on it is a bound
violation (the bound is unsound there, even where it stays positive)."""


@dataclass(frozen=True)
class FamilyAttack:
    """Settings of the attacks on patch and geometric certificates (module docstring)."""

    grid: int = 2001
    grid_multi: int = 201
    random: int = 1000
    refine: int = 201
    refine_top: int = 4
    patch_steps: int = 50
    patch_restarts: int = 3
    patch_screen_steps: int = 5
    patch_top: int = 64
    chunk: int = 2048


@dataclass
class Found:
    """What the attack found on one image: whether a point broke it, the lowest margin
    ``f_y - max_{j != y} f_j`` over the points tried, a witness point and the points tried."""

    broken: bool
    margin: float
    witness: dict[str, Any]
    points: int


def certified_images(rows: list[SampleRow]) -> dict[str, list[tuple[int, int]]]:
    """Per threat of a run's ``rows`` (:func:`read_samples` of ``samples.csv`` or
    ``samples.jsonl``; e.g. ``linf:0.1``): the (index, label) of every image certified under it by
    any bound method (the best-of flag)."""
    return {t: [(r.index, r.label) for r in rows if r.best(t)] for t in rows[0].certified}


def claimed_margins(rows: list[SampleRow]) -> dict[str, dict[int, float]]:
    """Per threat of a run's ``rows``, per certified image with recorded margins: the largest lower
    bound on its margin ``min_j (f_y - f_j)`` among the methods that certified it."""
    return {
        t: {
            r.index: max(r.margins[t][m] for m, ok in r.certified[t].items() if ok)
            for r in rows
            if r.best(t) and all(m in r.margins.get(t, {}) for m in r.certified[t])
        }
        for t in rows[0].certified
    }


def images_of(test, part: list[tuple[int, int]], where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``part`` (index, label) of the run-ordered test split, checking the labels."""
    x = torch.stack([test[i][0] for i, _ in part])
    y = torch.tensor([int(test[i][1]) for i, _ in part])
    if [lab for _, lab in part] != y.tolist():
        raise click.ClickException(f"{where}: the samples' labels differ from the test split")
    return x, y


# ---------------------------------------------------------------------------------------------
# Geometric threats


@dataclass(frozen=True)
class Axis:
    """The range of one parameter of :data:`PARAMS` in a threat: ``values`` is its exact finite set
    (a parameter the threat does not move, integer shifts), None for a continuous range."""

    lo: float
    hi: float
    values: Optional[torch.Tensor]


def parameter_axes(threat: GeometricThreat) -> list[Axis]:
    """Per parameter, the union of the certificates' parameter boxes: degenerate boxes everywhere
    (fixed values, integer shifts) make a finite set, others a continuous range."""
    boxes = threat.param_boxes()  # (N, 7, 2) float64
    axes = []
    for j in range(len(PARAMS)):
        lo, hi = boxes[:, j, 0], boxes[:, j, 1]
        finite = torch.unique(lo) if bool((lo == hi).all()) else None
        axes.append(Axis(float(lo.min()), float(hi.max()), finite))
    return axes


def product(columns: list[torch.Tensor]) -> torch.Tensor:
    """All combinations (M, len(columns)) of the values of ``columns``."""
    grids = torch.meshgrid(*columns, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], 1)


def grid_params(axes: list[Axis], s: FamilyAttack) -> tuple[torch.Tensor, int]:
    """The grid (M, 7) float64 and the number of values per continuous parameter."""
    k = sum(a.values is None for a in axes)
    n = s.grid if k == 1 else max(3, round(s.grid_multi ** (2 / max(k, 2))))
    cols = [a.values if a.values is not None else _linspace(a.lo, a.hi, n) for a in axes]
    return product(cols), n


def _linspace(lo: float, hi: float, n: int) -> torch.Tensor:
    out = torch.linspace(lo, hi, n, dtype=torch.float64)
    out[0], out[-1] = lo, hi
    return out


def random_params(axes: list[Axis], n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random parameter vectors (n, 7): uniform in each range, uniform over each finite set."""
    cols = []
    for a in axes:
        if a.values is None:
            u = torch.rand(n, generator=gen, dtype=torch.float64)
            cols.append((a.lo + u * (a.hi - a.lo)).clamp(a.lo, a.hi))
        else:
            cols.append(a.values[torch.randint(len(a.values), (n,), generator=gen)])
    return torch.stack(cols, 1)


def local_grid(axes: list[Axis], centre: torch.Tensor, half: list[float], n: int) -> torch.Tensor:
    """A grid of ``n`` values per continuous parameter over ``centre ± half`` (inside its range);
    finite parameters stay at the centre's value."""
    cols = []
    for a, c, h in zip(axes, centre.tolist(), half):
        if a.values is None:
            cols.append(_linspace(max(a.lo, c - h), min(a.hi, c + h), n))
        else:
            cols.append(torch.tensor([c], dtype=torch.float64))
    return product(cols)


def transformed_margins(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins (M,) and misclassification flags (M,) of the model on ``transform(x, params)`` for
    one image x (1, C, H, W) of label y (1,) and parameter vectors ``params`` (M, 7)."""
    margins, wrong = [], []
    for s in range(0, len(params), chunk):
        p = params[s : s + chunk]
        kwargs = {name: p[:, j].to(x.dtype) for j, name in enumerate(PARAMS)}
        logits = model(transform(x.expand(len(p), *x.shape[1:]), **kwargs))
        margins.append(-margin_loss(logits, y.expand(len(p))))
        wrong.append(logits.argmax(1) != y)
    return torch.cat(margins), torch.cat(wrong)


def attack_geometric(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: GeometricThreat,
    s: FamilyAttack,
    gen: torch.Generator,
) -> Found:
    """Grid, random points and local refinement (module docstring) on one image x (1, C, H, W)."""
    axes = parameter_axes(threat)
    params, n = grid_params(axes, s)
    k = sum(a.values is None for a in axes)
    if k:
        params = torch.cat([params, random_params(axes, s.random, gen)])
    with eval_mode(model), torch.no_grad():
        m, wrong = transformed_margins(model, x, y, params, s.chunk)
        if k and s.refine_top:
            r = s.refine if k == 1 else max(3, round(s.refine ** (1 / k)))
            r += 1 - r % 2  # odd: the centre is a grid value
            half = [(a.hi - a.lo) / (n - 1) if a.values is None else 0.0 for a in axes]
            centres = params[m.argsort()[: s.refine_top]]
            for _ in range(2):
                local = torch.cat([local_grid(axes, c, half, r) for c in centres])
                ml, wl = transformed_margins(model, x, y, local, s.chunk)
                params, m, wrong = (
                    torch.cat([params, local]),
                    torch.cat([m, ml]),
                    torch.cat([wrong, wl]),
                )
                centres, half = local[ml.argmin()][None], [2 * h / (r - 1) for h in half]
    at = int(wrong.nonzero()[0]) if bool(wrong.any()) else int(m.argmin())
    witness = {name: float(params[at, j]) for j, name in enumerate(PARAMS)}
    return Found(bool(wrong.any()), float(m.min()), witness, len(params))


# ---------------------------------------------------------------------------------------------
# Patches


def box_search(
    model: nn.Module,
    lo: torch.Tensor,
    hi: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    starts: list[Optional[torch.Tensor]],
    gen: torch.Generator,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed-gradient descent of the margin inside each box ``[lo, hi]`` (N, C, H, W) (label y
    (1,)) from each of ``starts`` (a point per box, or None: uniformly random), step 0.25 of the
    box width halved at 50/80/90% of the steps. Returns the lowest margin (N,), its point, and
    whether any iterate was misclassified (N,)."""
    sizes = step_schedule(0.25, steps, factor=0.5)
    best = torch.full((len(lo),), math.inf)
    points, wrong = lo.clone(), torch.zeros(len(lo), dtype=torch.bool)
    for a in range(0, len(lo), chunk):
        bl, bh = lo[a : a + chunk], hi[a : a + chunk]
        yy = y.expand(len(bl))
        for start in starts:
            if start is None:
                z = bl + (bh - bl) * torch.rand(bl.shape, generator=gen)
            else:
                z = start[a : a + chunk]
            for i in range(steps + 1):
                z = z.detach().requires_grad_(i < steps)
                with torch.set_grad_enabled(i < steps):
                    logits = model(z)
                    m = -margin_loss(logits, yy)
                better = m.detach() < best[a : a + chunk]
                best[a : a + chunk] = torch.where(better, m.detach(), best[a : a + chunk])
                points[a : a + chunk][better] = z.detach()[better]
                wrong[a : a + chunk] |= logits.detach().argmax(1) != yy
                if i < steps:
                    (g,) = torch.autograd.grad(m.sum(), z)
                    z = torch.minimum(torch.maximum(z - sizes[i] * (bh - bl) * g.sign(), bl), bh)
    return best, points, wrong


def attack_patch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: PatchThreat,
    s: FamilyAttack,
    gen: torch.Generator,
) -> Found:
    """Corners and a short search at every location, then long PGD at the ``patch_top`` locations
    of lowest margin (module docstring), on one image x (1, C, H, W)."""
    shape = tuple(x.shape[1:])
    n = threat.num_boxes(shape)
    lo, hi = (b[0] for b in threat.boxes_at(x, torch.arange(n)))  # (N, C, H, W)
    with eval_mode(model):
        with torch.no_grad():
            logits_lo, logits_hi = model(lo), model(hi)
        yy = y.expand(n)
        margin = torch.minimum(-margin_loss(logits_lo, yy), -margin_loss(logits_hi, yy))
        wrong = (logits_lo.argmax(1) != yy) | (logits_hi.argmax(1) != yy)
        screen, z, w = box_search(model, lo, hi, y, s.patch_screen_steps, [None], gen, s.chunk)
        margin, wrong = torch.minimum(margin, screen), wrong | w
        top = margin.argsort()[: s.patch_top or n]
        starts = [z[top]] + [None] * (s.patch_restarts - 1)
        deep, _, w = box_search(model, lo[top], hi[top], y, s.patch_steps, starts, gen, s.chunk)
        margin[top], wrong[top] = torch.minimum(margin[top], deep), wrong[top] | w
    at = int(wrong.nonzero()[0]) if bool(wrong.any()) else int(margin.argmin())
    row, col = (int(v) for v in threat.locations(shape)[at])
    tries = n * (3 + s.patch_screen_steps) + len(top) * s.patch_restarts * (s.patch_steps + 1)
    return Found(bool(wrong.any()), float(margin.min()), {"row": row, "col": col}, tries)


# ---------------------------------------------------------------------------------------------
# One threat, one run


def attack_lp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: NormBall,
    steps: int,
    restarts: int,
    gen: torch.Generator,
) -> list[bool]:
    """Whether each image survives the package's PGD with the margin and the CE loss."""
    robust = torch.ones(len(y), dtype=torch.bool)
    for loss in ("margin", "ce"):
        x_adv = pgd(model, x, y, threat, steps, restarts, loss=loss, generator=gen)
        with torch.no_grad():
            robust &= model(x_adv).argmax(1) == y
    return robust.tolist()


def attack_threat(
    model: nn.Module,
    test,
    images: list[tuple[int, int]],
    threat: Threat,
    lp: dict[str, int],
    s: FamilyAttack,
    where: Path,
    claimed: Optional[dict[int, float]] = None,
) -> dict[str, Any]:
    """Attack ``images`` (index, label) under ``threat``; {certified, broken, broken_indices, ...}.
    ``claimed``: the certified lower bounds on the images' margins (patch and geometric threats:
    margins found below them are counted as bound violations)."""
    if isinstance(threat, NormBall):
        gen = torch.Generator().manual_seed(lp["seed"])
        broken: list[int] = []
        t0 = time.perf_counter()
        for k in range(0, len(images), lp["batch"]):
            part = images[k : k + lp["batch"]]
            x, y = images_of(test, part, where)
            ok = attack_lp(model, x, y, threat, lp["steps"], lp["restarts"], gen)
            broken += [i for (i, _), good in zip(part, ok) if not good]
        seconds = round(time.perf_counter() - t0, 1)
        return {"certified": len(images), "broken": len(broken), "broken_indices": broken,
                "seconds": seconds}  # fmt: skip
    return attack_family(model, test, images, threat, s, lp["seed"], where, claimed or {})


def attack_family(
    model: nn.Module,
    test,
    images: list[tuple[int, int]],
    threat: Threat,
    s: FamilyAttack,
    seed: int,
    where: Path,
    claimed: dict[int, float],
) -> dict[str, Any]:
    """:func:`attack_geometric` or :func:`attack_patch` on every image of ``images``; the lowest
    margin found per image is compared with its certified lower bound ``claimed`` (if given)."""
    if isinstance(threat, GeometricThreat):
        attack, kind = attack_geometric, "geometric"
    elif isinstance(threat, PatchThreat):
        attack, kind = attack_patch, "patch"
    else:
        raise click.ClickException(f"{where}: no attack for the threat {threat}")
    t0, c0 = time.perf_counter(), time.process_time()
    found: dict[int, Found] = {}
    for k, (i, label) in enumerate(images):
        x, y = images_of(test, [(i, label)], where)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        found[i] = attack(model, x, y, threat, s, gen)
        if (k + 1) % 50 == 0:
            log(f"{where.name} {threat}: {k + 1}/{len(images)} images")
    broken = [i for i, f in found.items() if f.broken]
    lowest = min(found, key=lambda i: found[i].margin, default=None)
    gaps = {i: found[i].margin - claimed[i] for i in found if i in claimed}
    below = [i for i, gap in gaps.items() if gap < -BOUND_TOL]
    closest = min(gaps, key=gaps.__getitem__, default=None)
    return {
        "certified": len(images),
        "broken": len(broken),
        "broken_indices": broken,
        "witnesses": {str(i): found[i].witness for i in sorted(set(broken) | set(below))},
        "lowest_margin": None if lowest is None else found[lowest].margin,
        "lowest_margin_index": lowest,
        "bounds_compared": len(gaps),
        "bound_violations": len(below),
        "bound_violation_indices": below,
        "smallest_gap_to_bound": None if closest is None else gaps[closest],
        "smallest_gap_index": closest,
        "lowest_margins": {str(i): f.margin for i, f in found.items()},
        "attack": {"kind": kind, **family_settings(kind, s, seed)},
        "points_per_image": max((f.points for f in found.values()), default=0),
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
    }


def family_settings(kind: str, s: FamilyAttack, seed: int) -> dict[str, Any]:
    """The settings of ``s`` that the attack of ``kind`` uses."""
    patch = kind == "patch"
    keys = [k for k in asdict(s) if k.startswith("patch_") == patch and k != "chunk"]
    return {**{k: getattr(s, k) for k in keys}, "seed": seed}


def attack_row(
    row: Path, data_root: str, steps: int, restarts: int, batch: int, seed: int
) -> dict[str, dict]:
    """Attack the certified images of the CURE-table row ``row``; per threat {certified, broken,
    ...}."""
    ckpt = load_checkpoint(row / "checkpoint.pt")
    model = model_from_checkpoint(ckpt).eval()
    dataset = json.loads((row / "config.json").read_text())["config"]["dataset"]
    test = take(load_dataset(dataset, "test", root=data_root))
    lp = {"steps": steps, "restarts": restarts, "batch": batch, "seed": seed}
    return {
        t: attack_threat(model, test, images, parse_threat(t), lp, FamilyAttack(), row)
        for t, images in certified_images(read_samples(row / "verify" / "samples.csv")).items()
    }


def run_checkpoint(run: Path) -> tuple[Path, str, str]:
    """The checkpoint, its SHA-1 and the dataset of the generalisation run ``run``
    (``model.json``), refusing a checkpoint whose hash changed since the run."""
    meta = json.loads((run / "model.json").read_text())
    path = Path(meta["checkpoint"])
    path = path if path.is_absolute() else REPO / path
    if not path.is_file():
        raise click.ClickException(f"{run}: the checkpoint {path} of model.json does not exist")
    sha1 = file_sha1(path)
    if meta.get("checkpoint_sha1") not in (None, sha1):
        raise click.ClickException(f"{run}: {path} changed since the run (its hash differs)")
    config = json.loads((run / "verify" / "config.json").read_text())["config"]
    if config.get("split", "test") != "test" or config.get("dataset") != meta["dataset"]:
        raise click.ClickException(
            f"{run}: verify/config.json is not a test-split run of model.json"
        )
    return path, sha1, meta["dataset"]


def attack_run(
    run: Path, data_root: str, lp: dict[str, int], s: FamilyAttack
) -> tuple[dict[str, Any], dict[str, dict]]:
    """Attack the certified images of the generalisation run ``run``: (header, per threat)."""
    path, sha1, dataset = run_checkpoint(run)
    model = model_from_checkpoint(load_checkpoint(path)).eval()
    test = take(load_dataset(dataset, "test", root=data_root))
    rows = read_samples(run / "verify" / "samples.jsonl")
    claimed = claimed_margins(rows)
    out = {
        t: attack_threat(model, test, images, parse_threat(t), lp, s, run, claimed[t])
        for t, images in certified_images(rows).items()
    }
    header = {"checkpoint": str(path), "checkpoint_sha1": sha1, "dataset": dataset,
              "samples": len(rows)}  # fmt: skip
    return header, out


def kind_of(folder: Path) -> Optional[str]:
    """``row`` (a CURE-table row), ``run`` (a generalisation run) or None."""
    if (folder / "checkpoint.pt").is_file() and (folder / "verify/samples.csv").is_file():
        return "row"
    if (folder / "model.json").is_file() and (folder / "verify/samples.jsonl").is_file():
        return "run"
    return None


@click.command()
@click.argument("rows", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--restarts", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@data_root_option(help="Folder holding the rows' dataset.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--grid",
    type=click.IntRange(min=2),
    default=FamilyAttack.grid,
    show_default=True,
    help="Geometric: grid values of a single continuous parameter.",
)
@click.option(
    "--grid-multi",
    type=click.IntRange(min=2),
    default=FamilyAttack.grid_multi,
    show_default=True,
    help="Geometric: grid values per parameter when several are continuous.",
)
@click.option(
    "--random",
    type=click.IntRange(min=0),
    default=FamilyAttack.random,
    show_default=True,
    help="Geometric: random parameter vectors.",
)
@click.option(
    "--refine",
    type=click.IntRange(min=3),
    default=FamilyAttack.refine,
    show_default=True,
    help="Geometric: local grid values (one continuous parameter).",
)
@click.option(
    "--refine-top",
    type=click.IntRange(min=0),
    default=FamilyAttack.refine_top,
    show_default=True,
    help="Geometric: lowest-margin points refined (0: none).",
)
@click.option(
    "--patch-steps", type=click.IntRange(min=1), default=FamilyAttack.patch_steps, show_default=True
)
@click.option(
    "--patch-restarts",
    type=click.IntRange(min=1),
    default=FamilyAttack.patch_restarts,
    show_default=True,
)
@click.option(
    "--patch-screen-steps",
    type=click.IntRange(min=0),
    default=FamilyAttack.patch_screen_steps,
    show_default=True,
)
@click.option(
    "--patch-top",
    type=click.IntRange(min=0),
    default=FamilyAttack.patch_top,
    show_default=True,
    help="Patches: locations given the long PGD (0: all).",
)
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    default=FamilyAttack.chunk,
    show_default=True,
    help="Images per forward pass of the patch and geometric attacks.",
)
def main(
    rows: tuple[str, ...],
    steps: int,
    restarts: int,
    batch: int,
    seed: int,
    data_root: str,
    threads: int,
    **family: int,
) -> None:
    """Attack every certified image of each folder: a CURE-table ROW (checkpoint.pt,
    verify/samples.csv) or a generalisation run (model.json, verify/samples.jsonl)."""
    torch.set_num_threads(threads)
    s = FamilyAttack(**family)
    lp = {"steps": steps, "restarts": restarts, "batch": batch, "seed": seed}
    total = below = 0
    for row in map(Path, rows):
        kind = kind_of(row)
        if kind is None:
            click.echo(f"{row}: skipped (neither checkpoint.pt and verify/samples.csv nor "
                       "model.json and verify/samples.jsonl)", err=True)  # fmt: skip
            continue
        settings = {"steps": steps, "restarts": restarts, "losses": ["margin", "ce"], "seed": seed}
        if kind == "row":
            header, result = {}, attack_row(row, data_root, steps, restarts, batch, seed)
        else:
            header, result = attack_run(row, data_root, lp, s)
            settings = {"lp": settings, "family": asdict(s)}
        content = {"attack": settings, **header, "threats": result}
        save_summary(row / "verify" / REATTACK_JSON, content)
        for t, r in result.items():
            total += r["broken"]
            below += r.get("bound_violations", 0)
            click.echo(f"{row.name} {t}: {line(r)}")
    if total:
        raise click.ClickException(f"{total} certified image(s) broken: wrong certificates")
    if below:
        raise click.ClickException(
            f"{below} certified image(s) with a margin below its certified lower bound: unsound "
            "bounds (see bound_violation_indices in reattack.json)"
        )


def line(r: dict[str, Any]) -> str:
    """One threat's result as printed: certified, broken (and, for patch and geometric threats,
    margins below their bounds, the lowest margin and the smallest gap to a bound), seconds."""
    text = f"{r['certified']} certified, {r['broken']} broken"
    if r.get("lowest_margin") is not None:
        text += (
            f", {r['bound_violations']} below their bound, lowest margin {r['lowest_margin']:.4g}"
        )
    if r.get("smallest_gap_to_bound") is not None:
        text += f", smallest gap to a bound {r['smallest_gap_to_bound']:.3g}"
    return f"{text} ({r['seconds']} s)"


if __name__ == "__main__":
    main()
