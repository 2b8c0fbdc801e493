"""Code shared by the dataset examples (``mnist.py``, ``cifar10.py``, ``tinyimagenet.py``).

Each example trains a single-norm baseline and a CURE multi-norm model with
:func:`cure_lirpa.training.certified.train`, certifies both with
:func:`cure_lirpa.verification.runner.certify_dataset` and prints and writes the comparison; the scripts
keep only what differs (dataset, defaults, paper settings, data checks). ``own_model.py`` and
``smoothing.py`` share :func:`run_main` (a UserError becomes ``error: ...`` and status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from cure_lirpa.cli.common import resolve_device
from cure_lirpa.data import dataset_info, take
from cure_lirpa.errors import UserError
from cure_lirpa.io.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    model_from_checkpoint,
)
from cure_lirpa.threats.base import NormBall, Threat, parse_threat
from cure_lirpa.training.certified import train
from cure_lirpa.training.config import TrainConfig, apply_preset
from cure_lirpa.verification.results import to_percent, write_results
from cure_lirpa.verification.runner import certify_dataset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("CURE_LIRPA_DATA") or str(REPO.parent / "shared" / "data")


@dataclass(frozen=True)
class Mode:
    """Training and verification settings of one mode (the schedule is in epochs)."""

    arch: str
    width: Optional[int] = None  # None: the architecture's own width
    train_count: Optional[int] = None  # None: the whole training set
    epochs: int = 1
    warmup_epochs: float = 0.0
    ramp_epochs: float = 0.0
    batch_size: int = 64
    lr: float = 1e-3
    l2_factor: float = 1.0  # CURE's l2 training radius over the evaluation radius
    count: int = 50  # test images
    methods: tuple[str, ...] = ("ibp", "crown-ibp")
    attack_steps: int = 50


def modes(*, quick: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Mode]:
    """The three modes of a dataset example; ``quick`` and ``cpu`` add what the dataset sets itself.

    - ``quick``: a smoke run of cnn-small, one epoch (warm-up 0.4, ramp 0.6), batches of 16, 50 test
      images, a 10-step attack; it checks the pipeline, the numbers are noisy.
    - ``cpu``: cnn-small on the whole training set, one warm-up epoch, 1000 test images certified
      with IBP, CROWN-IBP and CROWN.
    - ``paper``: GPU scale (CURE paper): CNN7 with BatchNorm, the schedule of the cure-scratch
      preset; the first 1000 test images certified with the cascade IBP -> CROWN-IBP -> CROWN ->
      alpha-CROWN.
    """
    smoke = dict(epochs=1, warmup_epochs=0.4, ramp_epochs=0.6, batch_size=16, attack_steps=10)
    bounds = ("ibp", "crown-ibp", "crown")
    return {
        "quick": Mode(arch="cnn-small", count=50, **smoke, **quick),
        "cpu": Mode(arch="cnn-small", warmup_epochs=1.0, count=1000, methods=bounds, **cpu),
        "paper": Mode(arch="cnn7", count=1000, methods=("auto",)),
    }


RGB_MODES = modes(
    quick=dict(width=8, train_count=2000),
    cpu=dict(epochs=8, ramp_epochs=4.0, batch_size=128),
)
"""The modes of the RGB examples (CIFAR-10, TinyImageNet): ``quick`` with a narrow network (width 8)
on 2000 training images (classes interleaved for the class-sorted ImageFolder data); ``cpu``
cnn-small (width 16), 8 epochs, the eps ramp over 4, Adam 1e-3, batch 128."""


def radius(text: str) -> float:
    """A radius in [0, 1] pixel units: a number or a fraction such as ``2/255``."""
    num, _, den = text.partition("/")
    try:
        return float(num) / float(den or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction") from None


def parse_args(
    argv: Optional[Sequence[str]],
    title: str,
    modes: dict[str, Mode],
    eps: tuple[Any, Any],
    data_root_help: str,
    threat_examples: str,
    out_name: str,
    add_dataset_args: Optional[Callable[[argparse.ArgumentParser], None]] = None,
) -> argparse.Namespace:
    """The examples' shared command line.

    ``title`` names the dataset in the description, ``modes["quick"]`` sizes --quick's help,
    ``eps`` holds the default l∞ and l2 radii (written as text, they may be fractions such as
    ``2/255``; as numbers, the options take numbers), ``threat_examples`` are --extra-threat's
    examples and ``out_name`` the dataset part of the default output folder;
    ``add_dataset_args`` adds options before --data-root.
    """
    quick = modes["quick"]
    eps_type: Callable[[str], float] = radius if isinstance(eps[0], str) else float
    p = argparse.ArgumentParser(
        description=f"Train a CURE multi-norm model and a single-norm baseline on {title}, "
        "certify both under l∞ and l2, and compare their union accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {quick.train_count} images, {quick.epochs} epoch",
    )
    mode.add_argument("--paper", action="store_true", help="the paper's settings (GPU scale)")
    if add_dataset_args:
        add_dataset_args(p)
    p.add_argument(
        "--data-root",
        default=DEFAULT_DATA,
        help=f"{data_root_help} (default: $CURE_LIRPA_DATA, else the repo's ../shared/data)",
    )
    p.add_argument("--eps-linf", type=eps_type, default=eps[0], help="l∞ radius, pixel units")
    p.add_argument("--eps-l2", type=eps_type, default=eps[1], help="l2 radius, pixel units")
    p.add_argument(
        "--extra-threat",
        action="append",
        default=[],
        metavar="THREAT",
        help=f"another threat to certify (e.g. {threat_examples}); repeatable, enters the union",
    )
    p.add_argument(
        "--cure-method",
        choices=("cure-joint", "cure-max", "cure-random"),
        default="cure-joint",
        help="multi-norm method (--paper: the cure-scratch preset)",
    )
    p.add_argument(
        "--baseline",
        choices=("ibp-linf", "sabr-linf", "ibp-l2", "l2-defence", "natural"),
        default="ibp-linf",
        help="single-norm method (--paper: sabr-linf)",
    )
    p.add_argument("--epochs", type=int, default=None, help="override the mode's epochs")
    p.add_argument(
        "--train-count",
        type=int,
        default=None,
        help="train on N images (classes interleaved for class-sorted ImageFolder data)",
    )
    p.add_argument("--count", type=int, default=None, help="number of test images to certify")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated bound methods: ibp, crown-ibp, crown, alpha-crown, auto",
    )
    p.add_argument(
        "--memory-mb",
        type=float,
        default=4096.0,
        help="memory budget of one bound computation (batches are split to fit)",
    )
    p.add_argument("--out", default=None, help=f"output folder [runs/examples/{out_name}-<mode>]")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue killed training runs in --out (otherwise they are replaced)",
    )
    add_device_args(p)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sample_parser(description: str, quick_help: str) -> argparse.ArgumentParser:
    """The start of the command line of ``own_model.py`` and ``smoothing.py``: --quick, and
    --dataset and --data-root (the built-in MNIST sample, or MNIST)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--dataset", choices=("sample", "mnist"), default="sample")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw (for mnist)")
    return p


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --threads."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def make_configs(args: argparse.Namespace, mode: Mode, dataset: str) -> dict[str, TrainConfig]:
    """TrainConfigs of the baseline and of the CURE model, keyed by their row in the table."""
    common: dict[str, Any] = dict(
        dataset=dataset,
        data_root=args.data_root,
        arch=mode.arch,
        arch_kwargs={"width": mode.width} if mode.width else {},
        eps_linf=args.eps_linf,
        eps_l2=args.eps_l2,
        seed=args.seed,
        memory_mb=args.memory_mb,
    )
    if args.paper:
        # The preset fills every field not named in `explicit`; an explicit --epochs scales the
        # preset's warm-up, ramp and lr milestones along.
        explicit = {"epochs"} if args.epochs else set()
        if args.epochs:
            common["epochs"] = args.epochs
        cure = apply_preset(TrainConfig(**common), "cure-scratch", explicit)
        # The baseline: the same recipe and schedule without the multi-norm parts (SABR l∞ alone).
        base = apply_preset(
            TrainConfig(method="sabr-linf", **common),
            "cure-scratch",
            explicit | {"method", "ba_eta", "gp_beta"},
        )
        return {
            "baseline: sabr-linf": dataclasses.replace(base, preset=None),
            "CURE: cure-scratch": cure,
        }
    schedule = dict(
        epochs=args.epochs or mode.epochs,
        warmup_epochs=mode.warmup_epochs,
        ramp_epochs=mode.ramp_epochs,
        batch_size=mode.batch_size,
        lr=mode.lr,
        train_count=args.train_count or mode.train_count,
    )
    base = TrainConfig(method=args.baseline, **common, **schedule)
    cure = TrainConfig(
        method=args.cure_method, train_eps_l2=mode.l2_factor * args.eps_l2, **common, **schedule
    )
    return {f"baseline: {args.baseline}": base, f"CURE: {args.cure_method}": cure}


def comparison_table(results: dict[str, dict[str, Any]], threats: Sequence[Threat]) -> str:
    """One row per model: clean, certified per threat (best of the methods), union, PGD per threat,
    in percent (``results`` holds the summaries, accuracies as fractions)."""
    names = [t.name for t in threats]
    rows = [["model", "clean", *names, "union", *(f"PGD {n}" for n in names)]]
    for label, s in ((k, to_percent(v)) for k, v in results.items()):
        pgd = s["pgd_accuracy"]
        rows.append(
            [label, f"{s['clean_accuracy']:.1f}"]
            + [f"{s['certified_best'][n]:.1f}" for n in names]
            + [f"{s['union']['best']:.1f}"]
            + [f"{pgd[n]:.1f}" if n in pgd else "-" for n in names]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


@dataclass
class Setup:
    """What a run needs before its data are loaded: mode, device, output folder, threats."""

    name: str
    mode: Mode
    device: Any
    out: Path
    threats: list[Threat]
    methods: tuple[str, ...]


def prepare(args: argparse.Namespace, modes: dict[str, Mode], dataset: str) -> Setup:
    """The mode, device, output folder, threats and bound methods of this run."""
    name = "paper" if args.paper else "quick" if args.quick else "cpu"
    mode = modes[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out or f"runs/examples/{dataset}-{name}")
    threats: list[Threat] = [NormBall(math.inf, args.eps_linf), NormBall(2.0, args.eps_l2)]
    threats += [parse_threat(t) for t in args.extra_threat]
    methods = tuple(args.methods.split(",")) if args.methods else mode.methods
    return Setup(name, mode, device, out, threats, methods)


def run_example(
    args: argparse.Namespace,
    modes: dict[str, Mode],
    dataset: str,
    load_test: Callable[[argparse.Namespace], Dataset],
    images: str = "test",
) -> int:
    """A dataset example's run: set up, load the images to certify (the first ones of
    ``load_test(args)``, which fails early when the data are missing), train and compare."""
    s = prepare(args, modes, dataset)
    test = take(load_test(args), 0, args.count or s.mode.count)
    print(f"{s.name} run on {dataset} ({s.device}); results in {s.out}")
    configs = make_configs(args, s.mode, dataset)
    in_shape = dataset_info(dataset).in_shape
    return train_and_compare(args, s, dataset, configs, test, in_shape, images)


def train_and_compare(
    args: argparse.Namespace,
    s: Setup,
    dataset: str,
    configs: dict[str, TrainConfig],
    test: Dataset,
    in_shape: Any,
    images: str = "test",
) -> int:
    """Train and certify every model, print and write the comparison; 1 on a soundness bug."""
    results: dict[str, dict[str, Any]] = {}
    for label, config in configs.items():
        run_dir = s.out / config.method
        print(f"\n== {label}: training {config.arch} for {config.epochs} epoch(s)")
        result = train(
            config,
            run_dir,
            resume=args.resume and (run_dir / "checkpoint.pt").exists(),
            overwrite=True,
            device=s.device,
            log=lambda msg: print("   " + msg),
        )
        model = model_from_checkpoint(load_checkpoint(result.checkpoint))
        print(f"== {label}: certifying {len(test)} {images} images ({', '.join(s.methods)}, PGD)")
        rows, summary = certify_dataset(
            model,
            test,
            s.threats,
            s.methods,
            in_shape,
            device=s.device,
            memory_mb=args.memory_mb,
            attack_steps=s.mode.attack_steps,
            attack_restarts=1,
        )
        write_results(run_dir / "verify", rows, summary, s.threats, s.methods)
        results[label] = summary

    out, threats, methods = s.out, s.threats, s.methods
    table = comparison_table(results, threats)
    (_, base), (_, cure) = results.items()
    gain = 100 * (cure["union"]["best"] - base["union"]["best"])  # percentage points
    print(
        f"\nCertified accuracy (%) on {len(test)} {images} images of {dataset}, best of "
        f"{', '.join(methods)}; union = certified under all {len(threats)} threats at once\n"
    )
    print(table)
    print(f"union accuracy, CURE minus baseline: {gain:+.1f} points")
    atomic_write_text(out / "comparison.md", table)
    atomic_write_json(
        out / "comparison.json",
        {
            "mode": s.name,
            "threats": [t.name for t in threats],
            "methods": list(methods),
            "results": results,
        },
    )
    print(f"files: {out}/comparison.md, {out}/<method>/verify/summary.md (per bound method)")
    bad = {k: v for r in results.values() for k, v in r["soundness_violations"].items() if v}
    if bad:  # a certified image broken by PGD would be a bug in the bounds: say so loudly
        print(f"SOUNDNESS VIOLATION (certified but broken by PGD): {bad}", file=sys.stderr)
        return 1
    return 0


def run_main(
    run: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    hint: Callable[[UserError], str] = lambda exc: "",
) -> int:
    """``run(args)``; a UserError becomes ``error: ...`` (plus ``hint``) on stderr and status 2."""
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}{hint(exc)}", file=sys.stderr)
        return 2
