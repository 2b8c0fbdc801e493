"""Generalisation of certified models to unseen threats: the CURE paper's generalisation table.

The CURE paper (multi-norm certified training) certifies its models under threats none of them was
trained for and reports CURE minus the single-norm model: +6.8 points on geometric threats and
+16.0 points on patches (CIFAR-10). This suite does the same for the models of the CURE tables of
``benchmarks/cure_training.py``:

* threats (``--dataset``): MNIST rotation ±30° (``rotate:30``), translation ±2 px
  (``translate:2``), 2x2 and 5x5 patches (``patch:2``, ``patch:5``); CIFAR-10 rotation ±10°
  (``rotate:10``), rotation ±2° with shear ±0.02 (``rotate:2+shear:0.02``), 2x2 and 5x5 patches;
* models (``--models``): row folders of the CURE table folder ``benchmarks/results/cure_<dataset>``
  (``cure-joint-mtl2-b64``; ``ibp-linf+shi-b64@8-255`` for CIFAR-10's 8/255 pair), each used once
  its ``row.json`` exists (its training is over), or any checkpoint with ``--checkpoint NAME=PATH``;
* per model one run of the library's verify runner (:func:`cure_lirpa.verification.runner.verify`)
  with the cascade ``auto`` and ``--budget`` seconds per image and threat (a sample whose budget
  runs out is decided by ``timeout`` and counts as not certified) into
  ``<out>/<dataset>/<model>/verify/``, next to ``model.json`` (method, checkpoint hash, timing):
  a killed run resumes where it stopped, a finished one is reused and nothing is recomputed,
  ``--overwrite`` redoes it;
* ``summary.json``, ``summary.md`` and ``generalisation.png`` in ``<out>``, rebuilt after every
  model from every finished run of every dataset (MNIST and CIFAR-10 may run at different times;
  ``--report-only`` only rebuilds them): certified accuracy per threat, union over the geometric
  threats, over the patches and over all, clean accuracy, timeouts, seconds per image, and the
  best CURE model minus the best single-norm model on the same images (95% interval of the paired
  difference and exact sign test, :func:`benchmarks.cure_training.paired_gain`).

``--scaling`` (off by default) adds a cheap study on the first model: IBP alone on ``--scaling-n``
images for threats with more and more boxes (patch strides, parameter sub-intervals), into
``<out>/<dataset>/<model>/scaling/``. ``--quick`` certifies tiny MLPs (trained in seconds into
``<out>/models/``, or given with ``--checkpoint``) on a few images of the built-in sample with
cheap threats, into ``benchmarks/results/generalisation-quick``. Usage::

    python -m benchmarks.generalisation --dataset mnist
    python -m benchmarks.generalisation --dataset cifar10 --models natural,ibp-linf+shi
    python -m benchmarks.generalisation --report-only
    python -m benchmarks.generalisation --quick
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from benchmarks.cure_training import ROWS, is_single_norm, paired_gain
from benchmarks.harness import (
    RESULTS,
    command_line,
    data_root_option,
    file_sha1,
    log,
    named_checkpoints,
    portable,
    reattack_cell,
    save_summary,
    split_commas,
)
from cure_lirpa.errors import UserError
from cure_lirpa.threats.base import Threat, parse_threat
from cure_lirpa.threats.geometry import GeometricThreat
from cure_lirpa.threats.patches import PatchThreat
from cure_lirpa.vocabulary import (
    AUTO,
    CASCADE_BUDGET,
    CIFAR10,
    DATASETS,
    IBP,
    MNIST,
    NATURAL,
    SAMPLE,
    SAMPLES_JSONL,
    SUMMARY_JSON,
    TIMEOUT,
)

GEOMETRIC, PATCH, ALL = "geometric", "patch", "all"
THREAT_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    MNIST: {GEOMETRIC: ("rotate:30", "translate:2"), PATCH: ("patch:2", "patch:5")},
    CIFAR10: {GEOMETRIC: ("rotate:10", "rotate:2+shear:0.02"), PATCH: ("patch:2", "patch:5")},
    SAMPLE: {GEOMETRIC: ("rotate:5@2", "translate:1"), PATCH: ("patch:1@3", "patch:2@4")},
}
"""The CURE paper's generalisation sets per dataset (``sample``: cheap stand-ins for --quick)."""
TABLE_FOLDERS = {MNIST: RESULTS / "cure_mnist", CIFAR10: RESULTS / "cure_cifar10"}
"""Where the CURE tables keep their rows (``<row>/checkpoint.pt`` and ``row.json``)."""
DEFAULT_MODELS: dict[str, tuple[str, ...]] = {
    MNIST: (
        "cure-joint-mtl2-b64",
        "mtl-ibp-l2-a0.3-b64",
        "ibp-linf+shi-b64",
        "cure-finetune-b64",
        "mtl-ibp-linf-b64",
        "cure-max-mtl2-b64+ba",
        "natural-b64",
    ),
    CIFAR10: (
        "cure-joint-l2mtl0.1-b64@8-255",
        "mtl-ibp-l2-a0.1-b64@8-255",
        "ibp-linf+shi-b64@8-255",
        "cure-max-l2mtl0.1-b64+ba@8-255",
        "cure-finetune-l2mtl0.1-b64@8-255",
        "natural-b64@8-255",
    ),
}
"""The rows certified without ``--models``, the CURE-against-single-norm comparison first and the
natural model (nothing certified: the cascade runs to its budget) last; CIFAR-10: the 8/255 pair."""
PAPER_GAIN = {CIFAR10: {GEOMETRIC: 6.8, PATCH: 16.0}}
"""CURE minus the single-norm model in the CURE paper (points; CIFAR-10)."""
TITLE = {MNIST: "MNIST", CIFAR10: "CIFAR-10", SAMPLE: "Built-in MNIST sample (--quick)"}
DEFAULT_N = 500
QUICK_N = 8
QUICK_BUDGET = 5.0
QUICK_MODELS: dict[str, dict[str, Any]] = {
    "natural": {"method": NATURAL},
    "ibp-linf": {"method": "ibp-linf", "eps_linf": 0.02},
    "cure-joint": {"method": "cure-joint", "eps_linf": 0.02, "eps_l2": 0.2},
}
"""The tiny models --quick trains (an MLP, seconds each), with their training overrides."""
SCALING: dict[str, tuple[str, ...]] = {
    MNIST: (
        "rotate:30@15",
        "rotate:30@30",
        "rotate:30@60",
        "rotate:30@120",
        "rotate:30@240",
        "translate:2@1",
        "translate:2@2",
        "translate:2@4",
        "translate:2@8",
        "translate:2",
        "patch:2@4",
        "patch:2@2",
        "patch:2@1",
    ),
    CIFAR10: (
        "rotate:10@5",
        "rotate:10@10",
        "rotate:10@20",
        "rotate:10@40",
        "rotate:10@80",
        "patch:2@4",
        "patch:2@2",
        "patch:2@1",
    ),
    SAMPLE: ("rotate:5@1", "rotate:5@4", "translate:1@1", "translate:1", "patch:2@4", "patch:2@2"),
}
"""The scaling study's threats: the same sets split into more and more boxes."""
VERIFY, SCALING_DIR, MODEL_JSON, ROW_JSON = "verify", "scaling", "model.json", "row.json"
CHECKPOINT = "checkpoint.pt"
PLOT = "generalisation.png"


# ---------------------------------------------------------------------------------------------
# Threats and models


def threat_kind(threat: Threat | str) -> Optional[str]:
    """``geometric``, ``patch``, or None for a threat of neither kind (an lp ball)."""
    threat = parse_threat(threat) if isinstance(threat, str) else threat
    if isinstance(threat, PatchThreat):
        return PATCH
    if isinstance(threat, GeometricThreat):
        return GEOMETRIC
    return None


def ordered(threats: Sequence[str]) -> list[str]:
    """``threats`` without repeats, the geometric ones first (the table's column order)."""
    unique = list(dict.fromkeys(threats))
    return [t for t in unique if threat_kind(t) == GEOMETRIC] + [
        t for t in unique if threat_kind(t) == PATCH
    ]


def resolve_threats(text: Optional[str], dataset: str) -> list[str]:
    """The canonical names of ``--threats`` (default: the dataset's set), geometric first."""
    given = (
        split_commas(text)
        if text
        else [*THREAT_SETS[dataset][GEOMETRIC], *THREAT_SETS[dataset][PATCH]]
    )
    names = []
    for t in given:
        try:
            threat = parse_threat(t)
        except UserError as exc:
            raise click.BadParameter(str(exc), param_hint="--threats") from None
        if threat_kind(threat) is None:
            raise click.BadParameter(
                f"{t!r} is an lp ball, not an unseen threat; give geometric threats (rotate:D, "
                "translate:T, shear:F, scale:F, ...) or patches (patch:K)",
                param_hint="--threats",
            )
        names.append(threat.name)
    if not names:
        raise click.BadParameter("give at least one threat", param_hint="--threats")
    return ordered(names)


@dataclass(frozen=True)
class Model:
    """One model to certify: its name (the result folder), checkpoint and training method."""

    name: str
    checkpoint: Path
    method: str
    description: str = ""


def checkpoint_method(path: Path) -> str:
    """The training method recorded in a checkpoint of ``cure-lirpa train``."""
    from cure_lirpa.io.checkpoint import load_checkpoint

    try:
        config = load_checkpoint(path).get("config") or {}
    except UserError as exc:
        raise click.BadParameter(str(exc), param_hint="--checkpoint") from None
    return str(config.get("method") or "unknown")


def _check_name(name: str, option: str) -> None:
    if not name or "/" in name or name.startswith(".") or name in (VERIFY, SCALING_DIR):
        raise click.BadParameter(f"{name!r} cannot name a results folder", param_hint=option)


def table_models(folder: Path, names: Sequence[str]) -> list[Model]:
    """The rows ``names`` of the CURE table folder whose training is over (``row.json`` written);
    unknown names are refused, rows not trained yet are logged and left out."""
    for name in names:
        _check_name(name, "--models")
    unknown = [n for n in names if not (folder / n).is_dir() and n.split("@")[0] not in ROWS]
    if unknown:
        have = sorted(p.parent.name for p in folder.glob(f"*/{CHECKPOINT}"))
        raise click.BadParameter(
            f"unknown model(s) {', '.join(unknown)}: neither a row folder of {folder} nor a row "
            f"of benchmarks/cure_training.py; folders with a checkpoint: {', '.join(have) or 'none'}",
            param_hint="--models",
        )
    out = []
    for name in names:
        ckpt, row = folder / name / CHECKPOINT, folder / name / ROW_JSON
        if not ckpt.is_file():
            log(
                f"[{name}] skipped: {ckpt} does not exist (train the row with benchmarks.cure_training)"
            )
        elif not row.is_file():
            log(f"[{name}] skipped: {ckpt} exists but {ROW_JSON} does not yet (still training?)")
        else:
            info = json.loads(row.read_text())
            method = info.get("method") or checkpoint_method(ckpt)
            out.append(Model(name, ckpt, method, info.get("description", "")))
    return out


def named_models(items: Sequence[str]) -> list[Model]:
    """The ``--checkpoint NAME=PATH`` models."""
    out = []
    for name, path in named_checkpoints(items).items():
        _check_name(name, "--checkpoint")
        if not path.is_file():
            raise click.BadParameter(f"{name}={path}: no such file", param_hint="--checkpoint")
        out.append(Model(name, path, checkpoint_method(path)))
    return out


def quick_models(folder: Path, names: Sequence[str]) -> list[Model]:
    """The tiny models of :data:`QUICK_MODELS` called ``names``, trained into ``folder/<name>``
    the first time (seconds each)."""
    from cure_lirpa.training.certified import train
    from cure_lirpa.training.config import TrainConfig

    unknown = [n for n in names if n not in QUICK_MODELS]
    if unknown:
        raise click.BadParameter(
            f"unknown model(s) {', '.join(unknown)}; --quick trains {', '.join(QUICK_MODELS)}",
            param_hint="--models",
        )
    out = []
    for name in names:
        overrides = QUICK_MODELS[name]
        ckpt = folder / name / CHECKPOINT
        if not ckpt.is_file():
            log(f"[{name}] training a tiny MLP on the built-in sample")
            cfg = TrainConfig(dataset=SAMPLE, arch="mlp", arch_kwargs={"width": 32, "depth": 1},
                              epochs=3, warmup_epochs=0.0, ramp_epochs=1.0, batch_size=100,
                              lr=3e-3, train_count=1000, train_cert=False, **overrides)  # fmt: skip
            train(cfg, folder / name, overwrite=True, progress=False, log=None)
        out.append(Model(name, ckpt, overrides["method"], "tiny MLP on the built-in sample"))
    return out


def scaling_threats(dataset: str) -> tuple[str, ...]:
    """The canonical names of the scaling study's threats on ``dataset``."""
    return tuple(parse_threat(t).name for t in SCALING[dataset])


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class Plan:
    """The settings of this invocation's runs."""

    dataset: str
    threats: tuple[str, ...]
    n: int
    start: int
    budget: float
    data_root: Optional[str]
    batch: int
    memory_mb: float
    progress: bool
    overwrite: bool


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dataset_length(p: Plan) -> int:
    from cure_lirpa.data import load_dataset

    return len(load_dataset(p.dataset, "test", p.data_root))


def conflicts(
    model: Model,
    run_dir: Path,
    threats: Sequence[str],
    methods: Sequence[str],
    count: int,
    budget: Optional[float],
    p: Plan,
) -> list[str]:
    """Why the run in ``run_dir`` can neither be reused nor resumed with these settings (another
    configuration, or a checkpoint changed since); empty when it can, when there is no run yet,
    and with ``--overwrite``."""
    from cure_lirpa.io.runs import read_config

    stored = None if p.overwrite else read_config(run_dir)
    if stored is None:
        return []
    old = stored["config"]
    want = {
        "checkpoint": str(model.checkpoint.resolve()),
        "threats": list(threats),
        "methods": list(methods),
        "dataset": p.dataset,
        "start": p.start,
        "budget": budget,
    }
    diff = [f"{k}: run {old.get(k)!r}, now {v!r}" for k, v in want.items() if old.get(k) != v]
    if old.get("count") != count and not (
        old.get("count", 0) < count and old.get("count") == _dataset_length(p) - p.start
    ):
        diff.append(f"count: run {old.get('count')!r}, now {count!r}")
    meta = _read_json(run_dir.parent / MODEL_JSON) or {}
    if meta.get("checkpoint_sha1") not in (None, file_sha1(model.checkpoint)):
        diff.append(f"the checkpoint {model.checkpoint} changed since the run started")
    if not diff:
        return []
    return [f"{run_dir} was made with other settings ({'; '.join(diff)})"]


def certify_run(
    model: Model,
    run_dir: Path,
    threats: Sequence[str],
    methods: Sequence[str],
    count: int,
    budget: Optional[float],
    p: Plan,
    what: str = "",
) -> Optional[int]:
    """The verify run of ``model`` in ``run_dir``: reused when finished, resumed when killed, else
    started (over, with ``--overwrite``); ``what`` describes it in the log. Returns the images
    certified by this call (None: a finished run was reused)."""
    from cure_lirpa.io.checkpoint import atomic_write_json
    from cure_lirpa.io.runs import Records, read_config
    from cure_lirpa.verification.runner import verify

    stored = None if p.overwrite else read_config(run_dir)
    summary_file = run_dir / SUMMARY_JSON
    done = len(Records(run_dir / SAMPLES_JSONL).read()) if stored else 0
    if stored and summary_file.is_file() and stored["config"].get("count") == count:
        return None  # finished with these settings (conflicts() checked the others)
    log(f"[{model.name}] {what} -> {run_dir}" + (f", resumed after {done} images" if done else ""))
    try:
        result = verify(model.checkpoint, threats=list(threats), methods=list(methods),
                        dataset=p.dataset, data_root=p.data_root, start=p.start, count=count,
                        batch_size=p.batch, memory_mb=p.memory_mb, budget=budget, out=run_dir,
                        resume=stored is not None, overwrite=p.overwrite,
                        progress=p.progress)  # fmt: skip
    except UserError as exc:
        raise click.ClickException(
            f"{model.name}: {exc}" + ("; or pass --overwrite to redo it" if stored else "")
        ) from None
    new = len(result.rows) - done
    # the summary (committed) names the checkpoint by its machine path: make it portable
    atomic_write_json(summary_file, portable(json.loads(summary_file.read_text())))
    return new


def certify_model(model: Model, folder: Path, p: Plan, scaling_n: Optional[int] = None) -> None:
    """Certify ``model`` into ``folder/<name>/verify`` (and, with ``scaling_n``, the scaling
    study into ``folder/<name>/scaling``); ``model.json`` records the method, the checkpoint's
    hash and the command that finished each run."""
    from cure_lirpa.io.checkpoint import dataset_info_of, load_checkpoint

    model_dir = folder / model.name
    model_dir.mkdir(parents=True, exist_ok=True)
    meta_path = model_dir / MODEL_JSON
    meta = _read_json(meta_path) or {}
    meta.update(
        name=model.name,
        method=model.method,
        description=model.description,
        checkpoint=str(model.checkpoint),
        checkpoint_sha1=file_sha1(model.checkpoint),
        dataset=p.dataset,
        in_shape=list(dataset_info_of(load_checkpoint(model.checkpoint)).in_shape),
    )
    meta.setdefault("commands", {})
    save_summary(meta_path, meta)  # before certifying: a resumed run checks the checkpoint's hash
    if scaling_n is None:
        kind, threats, methods, count, budget = VERIFY, p.threats, [AUTO], p.n, p.budget
        what = (
            f"{count} images, {', '.join(threats)}, cascade with {budget:g} s per image and threat"
        )
    else:
        threats = scaling_threats(p.dataset)
        kind, methods, count, budget = SCALING_DIR, [IBP], scaling_n, None
        what = f"scaling study, IBP on {count} images, {len(threats)} threats"
    run_dir = model_dir / kind
    t0 = time.perf_counter()
    new = certify_run(model, run_dir, threats, methods, count, budget, p, what)
    if new is None:
        log(f"[{model.name}] {run_dir} is finished: reused, nothing recomputed")
        return
    meta["commands"][kind] = {
        "command": command_line(),
        "finished": time.strftime("%Y-%m-%d %H:%M"),
    }
    save_summary(meta_path, meta)
    log(f"[{model.name}] certified {new} images in {time.perf_counter() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------
# The report


def _share(k: int, n: int) -> dict[str, Any]:
    return {"count": k, "percent": 100.0 * k / n if n else 0.0}


def _seconds(summary: dict[str, Any], threats: Sequence[str], n: int) -> dict[str, Any]:
    """Seconds per image of each threat (the bound methods' and attacks' time) and in total (the
    whole run, every session of a resumed one); None where not recorded."""
    per = summary.get("seconds_per_image")
    out: dict[str, Any] = {}
    for t in threats:
        spent = [v for k, v in (per or {}).items() if k.rsplit("/", 1)[0] == t]
        out[t] = sum(spent) if per else None
    total = summary.get("seconds_total")
    out["total"] = total / n if total is not None and n else None
    return out


def model_result(model_dir: Path) -> Optional[dict[str, Any]]:
    """The numbers of one finished model run, from its files (None while it is not finished)."""
    from cure_lirpa.verification.results import read_samples, read_summary

    run_dir = model_dir / VERIFY
    meta = _read_json(model_dir / MODEL_JSON)
    if meta is None or not (run_dir / SUMMARY_JSON).is_file():
        return None
    summary = read_summary(run_dir)
    rows = read_samples(run_dir)
    n = len(rows)
    threats = ordered(summary["config"]["threats"])
    groups = {
        GEOMETRIC: [t for t in threats if threat_kind(t) == GEOMETRIC],
        PATCH: [t for t in threats if threat_kind(t) == PATCH],
        ALL: threats,
    }
    timeouts = {t: sum(r.decided_by.get(t) == TIMEOUT for r in rows) for t in threats}
    config = summary["config"]
    return {
        "method": meta.get("method", "unknown"),
        "description": meta.get("description", ""),
        "checkpoint": meta.get("checkpoint"),
        "checkpoint_sha1": meta.get("checkpoint_sha1"),
        "n": n,
        "start": config.get("start"),
        "budget": config.get("budget"),
        "threats": threats,
        "clean": _share(sum(r.correct for r in rows), n),
        "certified": {t: _share(sum(r.best(t) for r in rows), n) for t in threats},
        "union": {
            g: _share(sum(all(r.best(t) for t in ts) for r in rows), n) if ts else None
            for g, ts in groups.items()
        },
        "timeouts": {**timeouts, "total": sum(timeouts.values())},
        "violations": sum((summary.get("soundness_violations") or {}).values()),
        "reattack": reattack_cell(model_dir),
        "seconds_per_image": _seconds(summary, threats, n),
        "commands": meta.get("commands", {}),
    }


def scaling_result(model_dir: Path) -> Optional[dict[str, Any]]:
    """The scaling study of one model (None if it has none): per threat, boxes per image,
    seconds per image and IBP-certified accuracy."""
    from cure_lirpa.verification.results import read_samples, read_summary

    run_dir = model_dir / SCALING_DIR
    meta = _read_json(model_dir / MODEL_JSON)
    if meta is None or not (run_dir / SUMMARY_JSON).is_file():
        return None
    summary = read_summary(run_dir)
    rows = read_samples(run_dir)
    n = len(rows)
    threats = summary["config"]["threats"]
    secs = _seconds(summary, threats, n)
    in_shape = tuple(meta["in_shape"])
    return {
        "n": n,
        "threats": {
            t: {
                "boxes_per_image": parse_threat(t).num_boxes(in_shape),
                "seconds_per_image": secs[t],
                "certified": _share(sum(r.best(t) for r in rows), n),
            }
            for t in threats
        },
    }


def _score(result: dict[str, Any], group: Optional[str], threat: Optional[str]) -> Optional[float]:
    if group is not None:
        u = result["union"].get(group)
        return None if u is None else u["percent"]
    c = result["certified"].get(threat)
    return None if c is None else c["percent"]


def comparisons(
    dataset_dir: Path, dataset: str, results: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The best CURE model minus the best single-norm model (by each column) on the geometric
    union, the patch union and each threat, paired on the same images."""
    threats = ordered([t for r in results.values() for t in r["threats"]])
    cure = [k for k, r in results.items() if r["method"].startswith("cure-")]
    single = [k for k, r in results.items() if is_single_norm(r)]
    columns = [
        (group, None, [t for t in threats if threat_kind(t) == group])
        for group in (GEOMETRIC, PATCH)
    ] + [(None, t, [t]) for t in threats]
    out = []
    for group, threat, picked in columns:
        if not picked:
            continue
        cs = [k for k in cure if _score(results[k], group, threat) is not None]
        ss = [k for k in single if _score(results[k], group, threat) is not None]
        if not cs or not ss:
            continue
        bc = max(cs, key=lambda k: _score(results[k], group, threat))
        bs = max(ss, key=lambda k: _score(results[k], group, threat))
        entry: dict[str, Any] = {
            "column": f"{group} union" if group else threat,
            "threats": picked,
            "cure_model": bc,
            "cure_percent": _score(results[bc], group, threat),
            "single_norm_model": bs,
            "single_norm_percent": _score(results[bs], group, threat),
            "paper": PAPER_GAIN.get(dataset, {}).get(group) if group else None,
        }
        g = paired_gain(dataset_dir, {"folder": bc}, {"folder": bs}, picked)
        if g is None:
            entry["paired"] = None  # not certified on the same images
        else:
            d, low, high, p, a_only, b_only, n = g
            entry["paired"] = {"difference": d, "low": low, "high": high, "sign_test_p": p,
                               "cure_only": a_only, "single_norm_only": b_only, "n": n}  # fmt: skip
        out.append(entry)
    return out


def _model_order(dataset: str, names: Sequence[str]) -> list[str]:
    known = list(QUICK_MODELS) if dataset == SAMPLE else list(DEFAULT_MODELS.get(dataset, ()))
    return [m for m in known if m in names] + sorted(m for m in names if m not in known)


def collect(out: Path) -> dict[str, dict[str, Any]]:
    """Every dataset's finished model runs in ``out`` with their comparisons."""
    datasets: dict[str, dict[str, Any]] = {}
    for dataset in (MNIST, CIFAR10, *(d for d in DATASETS if d not in (MNIST, CIFAR10))):
        folder = out / dataset
        if not folder.is_dir():
            continue
        names = [p.parent.name for p in folder.glob(f"*/{MODEL_JSON}")]
        results, pending, scaling = {}, [], {}
        for name in _model_order(dataset, names):
            res = model_result(folder / name)
            if res is None:
                pending.append(name)
            else:
                results[name] = res
            study = scaling_result(folder / name)
            if study is not None:
                scaling[name] = study
        if not results and not scaling:
            continue
        datasets[dataset] = {
            "threats": ordered([t for r in results.values() for t in r["threats"]]),
            "models": results,
            "unfinished": pending,
            "comparison": comparisons(folder, dataset, results),
            "scaling": scaling,
        }
    return datasets


def _percent(share: Optional[dict[str, Any]]) -> float:
    return 0.0 if share is None else share["percent"]


def _pct(share: Optional[dict[str, Any]]) -> str:
    return "-" if share is None else f"{share['percent']:.1f}"


def _secs(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def _signed(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:+.1f}"


def _timeouts(r: dict[str, Any]) -> str:
    t = r["timeouts"]
    parts = [f"{k} {v}" for k, v in t.items() if k != "total" and v]
    return str(t["total"]) + (f" ({', '.join(parts)})" if parts else "")


def dataset_section(dataset: str, d: dict[str, Any]) -> list[str]:
    """The Markdown of one dataset: the table, seconds per threat, the comparison, scaling."""
    results, threats = d["models"], d["threats"]
    geo = [t for t in threats if threat_kind(t) == GEOMETRIC]
    patch = [t for t in threats if threat_kind(t) == PATCH]
    ns = sorted({r["n"] for r in results.values()})
    budgets = sorted({r["budget"] for r in results.values() if r["budget"] is not None})
    size = f"{ns[0]} test images" if len(ns) == 1 else f"{'/'.join(map(str, ns))} test images"
    lines = [f"## {TITLE.get(dataset, dataset)}", ""]
    if results:
        lines += [
            f"The first {size}; budget {', '.join(f'{b:g}' for b in budgets)} s per image and "
            "threat. Certified accuracy (%):",
            "",
        ]
        head = ["model", "method", "N", *(f"`{t}`" for t in threats), "union geometric",
                "union patch", "union all", "clean", "timeouts", "reattack", "s/image"]  # fmt: skip
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in results.items():
            cells = [name, r["method"], str(r["n"]), *(_pct(r["certified"].get(t)) for t in threats),
                     _pct(r["union"][GEOMETRIC]), _pct(r["union"][PATCH]), _pct(r["union"][ALL]),
                     _pct(r["clean"]), _timeouts(r), r.get("reattack", "not yet"),
                     _secs(r["seconds_per_image"]["total"])]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Seconds per image and threat (the cascade's bound computations and attacks; "
            "s/image above is the whole run):",
            "",
            "| model | " + " | ".join(f"`{t}`" for t in threats) + " |",
            "|---|" + "---|" * len(threats),
        ]
        for name, r in results.items():
            spi = r["seconds_per_image"]
            lines.append(f"| {name} | " + " | ".join(_secs(spi.get(t)) for t in threats) + " |")
        lines += ["", *comparison_lines(dataset, d["comparison"], geo, patch)]
    if d["unfinished"]:
        lines += ["", f"Not finished yet (not in the table): {', '.join(d['unfinished'])}."]
    if d["scaling"]:
        lines += ["", *scaling_lines(d["scaling"])]
    return lines


def comparison_lines(
    dataset: str, comparison: list[dict[str, Any]], geo: Sequence[str], patch: Sequence[str]
) -> list[str]:
    """The paired comparison of the best CURE and the best single-norm model, with the paper's."""
    paper = PAPER_GAIN.get(CIFAR10, {})
    said = (
        f"The CURE paper reports {paper[GEOMETRIC]:+.1f} points on geometric threats and "
        f"{paper[PATCH]:+.1f} points on patches for CIFAR-10"
    )
    if not comparison:
        return [
            "CURE against single-norm training: needs at least one finished CURE model (method "
            f"cure-...) and one single-norm model. {said}."
        ]
    lines = [
        "**CURE against single-norm training**: the best CURE model minus the best single-norm "
        "model by each column, on the same images: difference in points, 95% interval of the "
        "paired difference, images only one of the two certifies, two-sided exact sign test.",
        "",
        "| column | best CURE model | best single-norm model | difference | 95% interval | "
        "CURE only / single-norm only | sign test p | paper (CIFAR-10) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparison:
        g = c["paired"]
        column = (
            c["column"] if len(c["threats"]) == 1 else f"{c['column']} ({', '.join(c['threats'])})"
        )
        stats = (
            ["not on the same images", "-", "-", "-"]
            if g is None
            else [
                f"{g['difference']:+.1f}",
                f"{g['low']:+.1f} to {g['high']:+.1f}",
                f"{g['cure_only']} / {g['single_norm_only']}",
                f"{g['sign_test_p']:.2g}",
            ]
        )
        lines.append(
            f"| {column} | {c['cure_model']} {c['cure_percent']:.1f} | {c['single_norm_model']} "
            f"{c['single_norm_percent']:.1f} | " + " | ".join(stats) + f" | {_signed(c['paper'])} |"
        )
    ours = {c["column"]: c["paired"] for c in comparison}
    mine = [
        f"{label} {ours[f'{group} union']['difference']:+.1f}"
        for group, label in ((GEOMETRIC, "geometric"), (PATCH, "patches"))
        if ours.get(f"{group} union")
    ]
    here = f"; here on {TITLE.get(dataset, dataset)}: {', '.join(mine)} points" if mine else ""
    return [*lines, "", f"{said}{here}."]


def scaling_lines(scaling: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, s in scaling.items():
        lines += [
            f"Scaling (model {name}, IBP alone on {s['n']} images): time grows linearly with the "
            "number of boxes (patch locations, or the product of parameter sub-intervals); more "
            "sub-intervals give tighter hulls. Patch strides change the threat set (fewer "
            "locations), sub-interval counts do not.",
            "",
            "| threat | boxes per image | seconds per image | ms per box | certified by IBP (%) |",
            "|---|---|---|---|---|",
        ]
        for t, e in s["threats"].items():
            spi = e["seconds_per_image"]
            per_box = "-" if spi is None else f"{1000 * spi / e['boxes_per_image']:.2f}"
            lines.append(
                f"| `{t}` | {e['boxes_per_image']} | {_secs(spi)} | {per_box} | "
                f"{_pct(e['certified'])} |"
            )
        lines.append("")
    return lines


NOTES = (
    "Certified = by the library's cascade (`auto`: IBP, then CROWN-IBP, CROWN and alpha-CROWN on "
    "the boxes still open); a geometric threat is bounded through sound interval hulls of its "
    "parameter sub-intervals, a patch through every location with arbitrary content. Union = "
    "certified under every threat of the group at once.",
    "timeouts = images whose budget (seconds per image and threat) ran out before the cascade "
    "decided: counted as not certified, so a larger budget can only raise certified accuracy.",
    "Seconds count every session of a resumed run (one thread, a shared 2-core machine).",
)


def markdown(datasets: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Generalisation of certified models to unseen threats",
        "",
        "Certified accuracy under threats no model was trained for, the CURE paper's "
        "generalisation sets (geometric: rotation, translation, shear; patches), for the models "
        "of the CURE tables. Written by `benchmarks/generalisation.py` from the finished runs in "
        "`<dataset>/<model>/verify/` next to this file (summary.json holds every number).",
    ]
    for dataset, d in datasets.items():
        lines += ["", *dataset_section(dataset, d)]
    if any(d["models"] for d in datasets.values()):
        lines += ["", "![certified accuracy per model and threat](generalisation.png)", ""]
        lines += [f"- {note}" for note in NOTES]
        broken = sum(
            r.get("violations", 0) for d in datasets.values() for r in d["models"].values()
        )
        lines.append(
            "- Every correctly classified image is also attacked under each threat (patches: both "
            "corners of every location, then PGD in the closest ones; geometric: the centre and "
            "random transformations of every sub-interval); a certificate the attack breaks is "
            f"withdrawn and counted. Certificates broken, all runs: {broken} (must be 0)."
        )
        lines.append(
            "- reattack = certificates broken / attacked by `python -m benchmarks.reattack "
            "<dataset>/<model>`, an independent and far denser attack on every certificate "
            "(geometric: a grid of 2001 values per parameter range, or 201 x 201 for two, 1000 "
            "random points and a local refinement around the lowest margins, on the exact "
            "transformation; patches: corners and a short search at every location, 50-step PGD "
            "from 3 starts at the 64 weakest), which also checks that no margin it finds lies below "
            "the certified lower bound; 'not yet' where it has not run."
        )
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(datasets: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bars per model: certified accuracy per threat and the three unions, one panel per
    dataset; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, d) for k, d in datasets.items() if d["models"]]
    widest = max(len(d["models"]) for _, d in panels)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(7.0, 1.4 * widest), 4.0 * len(panels)), squeeze=False
    )
    for ax, (dataset, d) in zip(axes[:, 0], panels):
        results = d["models"]
        series: list[tuple[str, list[float], Optional[str]]] = [
            (t, [_percent(r["certified"].get(t)) for r in results.values()], None)
            for t in d["threats"]
        ]
        for group, color in ((GEOMETRIC, "silver"), (PATCH, "dimgrey"), (ALL, "black")):
            vals = [_percent(r["union"][group]) for r in results.values()]
            series.append((f"union {group}", vals, color))
        width = 0.8 / len(series)
        for i, (label, vals, color) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(results))]
            ax.bar(xs, vals, width, label=label, color=color)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels(list(results), rotation=25, ha="right")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{TITLE.get(dataset, dataset)}: certified accuracy under unseen threats")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(out: Path) -> bool:
    """Rebuild summary.json, summary.md and the plot in ``out`` from every finished run; False
    (nothing written) when there is none."""
    datasets = collect(out)
    if not datasets:
        return False
    report = {
        "suite": "generalisation",
        "rebuilt": time.strftime("%Y-%m-%d %H:%M"),
        "command": command_line(),
        "paper_gain": PAPER_GAIN,
        "datasets": datasets,
    }
    if any(d["models"] for d in datasets.values()):
        plot(datasets, out / PLOT)
    save_summary(out / "summary.json", report)
    save_summary(out / "summary.md", markdown(datasets))
    log(f"wrote summary.json, summary.md{', ' + PLOT if (out / PLOT).is_file() else ''} in {out}")
    return True


# ---------------------------------------------------------------------------------------------


def pick_models(
    quick: bool,
    dataset: str,
    table: Optional[Path],
    models: Optional[str],
    named: Sequence[str],
    out: Path,
) -> list[Model]:
    """The models of ``--models`` / ``--checkpoint`` (defaults: the dataset's rows, or the tiny
    models of --quick)."""
    names = split_commas(models) if models else []
    if models is not None and not names:
        raise click.BadParameter("give at least one model", param_hint="--models")
    picked = named_models(named)
    if quick:
        picked += quick_models(out / "models", names or ([] if named else list(QUICK_MODELS)))
    else:
        folder = table or TABLE_FOLDERS[dataset]
        picked += table_models(folder, names or ([] if named else list(DEFAULT_MODELS[dataset])))
    seen = [m.name for m in picked]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise click.BadParameter(f"model name(s) given twice: {', '.join(twice)}")
    return picked


@click.command()
@click.option(
    "--dataset",
    type=click.Choice([MNIST, CIFAR10]),
    default=MNIST,
    show_default=True,
    help="The threat set and the CURE table folder (benchmarks/results/cure_<dataset>): MNIST "
    f"{', '.join(sum(THREAT_SETS[MNIST].values(), ()))}; CIFAR-10 "
    f"{', '.join(sum(THREAT_SETS[CIFAR10].values(), ()))}.",
)
@click.option(
    "--models",
    default=None,
    help="Comma-separated row folders of the CURE table folder (CIFAR-10 8/255 rows: "
    "<row>@8-255); rows whose training is not over are skipped [default: MNIST "
    f"{', '.join(DEFAULT_MODELS[MNIST])}; CIFAR-10 {', '.join(DEFAULT_MODELS[CIFAR10])}; "
    "--quick: the tiny models].",
)
@click.option(
    "--checkpoints",
    "table",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The CURE table folder holding <row>/checkpoint.pt and <row>/row.json "
    "[default: benchmarks/results/cure_<dataset>].",
)
@click.option(
    "--checkpoint",
    "named",
    multiple=True,
    help="NAME=PATH of a checkpoint to certify (repeatable); without --models, only these.",
)
@click.option(
    "--threats",
    default=None,
    help="Comma-separated geometric or patch threats [default: the dataset's set].",
)
@click.option(
    "--n",
    type=click.IntRange(min=1),
    default=None,
    help=f"Test images, the first from --start [default: {DEFAULT_N}; --quick: {QUICK_N}].",
)
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds of the cascade per image and threat; an image still open then is a timeout "
    f"(not certified) [default: {CASCADE_BUDGET:g}, the library's; --quick: {QUICK_BUDGET:g}].",
)
@data_root_option(help="Folder holding MNIST/raw and cifar10-jpeg.tar.gz.")
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Images per batch (a killed run loses at most the batch it was on).",
)
@click.option("--memory-mb", type=float, default=2048.0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Results folder [default: benchmarks/results/generalisation, or generalisation-quick].",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Redo the runs of the models given (their old results are deleted); otherwise a "
    "finished run is reused and a killed one resumed.",
)
@click.option(
    "--scaling/--no-scaling",
    default=False,
    show_default=True,
    help="Also time IBP on the first model for threats split into more and more boxes.",
)
@click.option("--scaling-n", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--progress/--no-progress",
    default=False,
    show_default=True,
    help="Progress bars; their up-front time estimate certifies the first batch's images once "
    "more (up to the budget each), so they cost time.",
)
@click.option(
    "--report-only",
    is_flag=True,
    help="Only rebuild summary.json, summary.md and the plot from the finished runs.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Tiny MLPs on a few images of the built-in sample with cheap threats (seconds).",
)
def main(
    dataset: str,
    models: Optional[str],
    table: Optional[Path],
    named: tuple[str, ...],
    threats: Optional[str],
    n: Optional[int],
    start: int,
    budget: Optional[float],
    data_root: str,
    batch: int,
    memory_mb: float,
    threads: int,
    out: Optional[Path],
    overwrite: bool,
    scaling: bool,
    scaling_n: int,
    progress: bool,
    report_only: bool,
    quick: bool,
) -> None:
    """Certify the CURE tables' models under unseen threats and write the generalisation table."""
    import torch

    torch.set_num_threads(threads)
    out = out or RESULTS / ("generalisation-quick" if quick else "generalisation")
    try:
        if report_only:
            if not write_report(out):
                raise click.ClickException(
                    f"--report-only: no finished run in {out}/<dataset>/<model>/verify yet"
                )
            return
        ds = SAMPLE if quick else dataset
        plan = Plan(
            dataset=ds,
            threats=tuple(resolve_threats(threats, ds)),
            n=n or (QUICK_N if quick else DEFAULT_N),
            start=start,
            budget=budget or (QUICK_BUDGET if quick else CASCADE_BUDGET),
            data_root=None if ds == SAMPLE else data_root,
            batch=batch,
            memory_mb=memory_mb,
            progress=progress,
            overwrite=overwrite,
        )
        picked = pick_models(quick, dataset, table, models, named, out)
        certify_all(picked, out, plan, scaling_n if scaling else None)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None


def certify_all(picked: Sequence[Model], out: Path, plan: Plan, scaling_n: Optional[int]) -> None:
    """Check the old runs of the ``picked`` models (all before any work), certify the models one
    after the other and rebuild the report after each; with ``scaling_n``, then the scaling study
    of the first."""
    if not picked:
        raise click.ClickException(
            "no model to certify: none of the rows has finished training (see above); pass "
            "--models or --checkpoint NAME=PATH"
        )
    folder = out / plan.dataset
    problems = []
    for m in picked:
        run_dir = folder / m.name / VERIFY
        problems += conflicts(m, run_dir, plan.threats, [AUTO], plan.n, plan.budget, plan)
    if scaling_n is not None:
        run_dir = folder / picked[0].name / SCALING_DIR
        threats = scaling_threats(plan.dataset)
        problems += conflicts(picked[0], run_dir, threats, [IBP], scaling_n, None, plan)
    if problems:
        raise click.ClickException(
            "\n".join(problems)
            + "\npass --overwrite to redo these runs (their results are deleted), or --out "
            "another folder"
        )
    names = ", ".join(m.name for m in picked)
    log(f"{len(picked)} model(s) on {plan.dataset}: {names}; results in {folder}")
    t0 = time.perf_counter()
    for m in picked:
        certify_model(m, folder, plan)
        write_report(out)
    if scaling_n is not None:
        certify_model(picked[0], folder, plan, scaling_n=scaling_n)
        write_report(out)
    log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
