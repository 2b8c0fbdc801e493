"""``cure-lirpa smooth ...``: train, certify, predict and analyze with randomized smoothing.

Thin click commands over :mod:`cure_lirpa.smoothing`, with the option conventions of ``train`` and
``verify``: ``--out`` is a run folder, ``--resume`` / ``--overwrite``, ``--seed``, ``--device``
(auto, cpu, cuda, cuda:N), ``--threads``, ``--quiet``; ``certify`` and ``predict`` take
``--shard K/N`` and ``cure-lirpa merge`` combines the shards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import click

from ..data import DATASETS
from ..errors import UserError
from ..vocabulary import (
    CLEAN_ACCURACY,
    DECIDE_RADII,
    GAUSSIAN,
    HYBRID,
    L1,
    L2,
    SAMPLE,
    SMOOTHING_MODES,
    SMOOTHING_NORMS,
    SMOOTHING_OBJECTIVES,
    SMOOTHING_RADII,
    UNIFORM,
)
from . import options as opt
from .common import resolve_device, set_threads, train_count_message
from .options import POSITIVE_RADIUS, RADII, RADIUS

POSITIVE = click.FloatRange(min=0.0, min_open=True)
EPS = RADIUS
SETTINGS = {"show_default": True}


class NumberList(click.ParamType):
    """Comma-separated non-negative numbers, e.g. ``45,50,55``."""

    name = "NUMBERS"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        if isinstance(value, (list, tuple)):
            return [float(v) for v in value]
        try:
            out = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(
                f"{value!r} is not a comma-separated list of numbers (e.g. 90,95)", param, ctx
            )
        if not out or any(not math.isfinite(v) or v < 0 for v in out):
            self.fail(f"{value!r} must hold one or more numbers >= 0", param, ctx)
        return out


def _options(options: list[Callable]) -> Callable:
    def apply(fn: Callable) -> Callable:
        for decorate in reversed(options):
            fn = decorate(fn)
        return fn

    return apply


def _folder_options() -> list[Callable]:
    """``--resume`` and ``--overwrite`` of a run folder (:meth:`cure_lirpa.io.runs.Run.open`)."""
    return [opt.resume_option(), opt.overwrite_option()]


def _run_options(what: str) -> list[Callable]:
    """Options every run command shares (the names of ``train`` and ``verify``)."""
    return [
        opt.seed_option(f"Seed of the {what}."),
        opt.device_option(),
        opt.threads_option(),
        *_folder_options(),
        opt.quiet_option(),
    ]


SAMPLE_OPTIONS = [
    click.option(
        "--checkpoint",
        "-c",
        required=True,
        type=click.Path(path_type=Path),
        help="Base classifier: the run folder of 'smooth train' (or its checkpoint.pt, or any "
        "cure-lirpa checkpoint).",
    ),
    opt.out_option(
        "Run folder: config.json, samples.jsonl (as it goes), then samples.tsv, summary.json, "
        "summary.md."
    ),
    click.option(
        "--n",
        "n",
        type=click.IntRange(min=1),
        default=100_000,
        help="Noisy samples of the estimate.",
    ),
    opt.typed_option(
        "--alpha",
        click.FloatRange(0, 1, min_open=True, max_open=True),
        0.001,
        "Failure probability of each answer.",
    ),
    opt.batch_size_option(1000, "Noisy copies per forward pass."),
    opt.typed_option(
        "--dataset", click.Choice(DATASETS), None, "Dataset [default: the checkpoint's]."
    ),
    opt.typed_option(
        "--data-root", click.Path(), None, "Folder with the dataset (not needed for 'sample')."
    ),
    click.option("--split", type=click.Choice(["test", "train"]), default="test"),
    click.option("--start", type=click.IntRange(min=0), default=0, help="First sample index."),
    opt.typed_option(
        "--count", click.IntRange(min=1), None, "Number of samples [default: all from --start]."
    ),
    opt.typed_option(
        "--skip",
        click.IntRange(min=1),
        1,
        "Take every SKIP-th sample (e.g. 20 on MNIST's 10,000 gives 500 evenly spaced).",
    ),
    click.option(
        "--shard",
        default=None,
        metavar="K/N",
        help="Only shard K of N (0-based) of the samples, into <out>/shard-K-of-N; merge the shards "
        "with 'cure-lirpa merge <out>'. Under torchrun or a Slurm array it is set from the rank.",
    ),
    *_run_options(
        "noise: sample i uses a seed derived from (seed, i), so shards and resumed runs agree"
    ),
]


def _log(message: str) -> None:
    click.echo(message, err=True)


def _sample_keywords(o: dict[str, Any]) -> dict[str, Any]:
    """The keywords of ``smoothing.runner.run_checkpoint`` from the ``SAMPLE_OPTIONS``."""
    return {
        "dataset": o["dataset"],
        "split": o["split"],
        "data_root": o["data_root"],
        "alpha": o["alpha"],
        "batch_size": o["batch_size"],
        "seed": o["seed"],
        "start": o["start"],
        "count": o["count"],
        "skip": o["skip"],
        "device": resolve_device(o["device"]),
        "shard": o["shard"],
        "resume": o["resume"],
        "overwrite": o["overwrite"],
        "progress": False if o["quiet"] else None,
        "log": _log,
    }


def _warn(message: str) -> None:
    click.echo(f"Warning: {message}", err=True)


def _warn_small_train_count(train_count: Optional[int], batch_size: int) -> None:
    if train_count is not None and train_count < batch_size:
        _warn(train_count_message(train_count, batch_size))


@click.group("smooth")
def smooth() -> None:
    """Randomized smoothing for l1 and l2 (Cohen et al.; the NU paper's hybrid certificate).

    \b
    Typical session on the built-in MNIST sample:
      cure-lirpa smooth train --method gaussian --sigma 0.5 --epochs 2 --out runs/g050
      cure-lirpa smooth certify -c runs/g050 --sigma 0.5 --n 10000 --skip 10 --out runs/g050-cert
      cure-lirpa smooth analyze runs/g050-cert --out runs/report
    """


@smooth.command("train", context_settings=SETTINGS)
@opt.out_option(
    "Run folder: config.json, checkpoint.pt (rewritten atomically after every epoch), "
    "metrics.jsonl."
)
@opt.typed_option(
    "--method",
    click.Choice(SMOOTHING_OBJECTIVES),
    GAUSSIAN,
    "gaussian/uniform: noise augmentation; nu: Normal-Uniform noise; nu-rs: NU noise + "
    "similarity regulariser (NU paper Eq. 3); consistency: Jeong & Shin 2020.",
)
@opt.typed_option(
    "--sigma",
    POSITIVE_RADIUS,
    "0.25",
    "Noise std (pixel units, e.g. 0.25, 1/4 or 64/255); sigma_n for nu/nu-rs.",
)
@opt.typed_option(
    "--sigma-u",
    POSITIVE_RADIUS,
    None,
    "Uniform part's std for nu/nu-rs [default: sqrt(3)/2 * sigma, kurtosis -0.22].",
)
@opt.typed_option(
    "--beta", click.FloatRange(min=0), 3.0, "Weight of the similarity regulariser (nu-rs)."
)
@opt.typed_option(
    "--consistency-m", click.IntRange(min=1), 2, "Noisy copies per input (consistency)."
)
@click.option("--consistency-lambda", type=click.FloatRange(min=0), default=10.0)
@click.option("--consistency-eta", type=click.FloatRange(min=0), default=0.5)
@click.option("--dataset", type=click.Choice(DATASETS), default=SAMPLE)
@opt.typed_option("--data-root", click.Path(), None, "Folder with the dataset.")
@click.option(
    "--arch",
    default="cnn-small",
    help="Zoo architecture (mlp, cnn-small, cnn5, cnn7) or 'package.module:factory'.",
)
@opt.typed_option("--width", click.IntRange(min=1), None, "Width of a zoo architecture.")
@click.option("--epochs", type=click.IntRange(min=1), default=4)
@opt.batch_size_option(256, "Training images per optimizer step.")
@opt.typed_option("--lr", POSITIVE, 1e-3, "Adam learning rate.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0)
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="constant")
@opt.typed_option(
    "--train-count",
    click.IntRange(min=1),
    None,
    "Train on N training images only (quick runs): the first N, classes interleaved for "
    "class-sorted ImageFolder data.",
)
@opt.typed_option(
    "--eval-count",
    click.IntRange(min=0),
    1000,
    "Test samples for the per-epoch accuracy report (0 = none).",
)
@opt.typed_option(
    "--stop-after",
    click.IntRange(min=1),
    None,
    "Stop after this many epochs in this call (continue later with --resume).",
)
@_options(_run_options("weights, data order and noise"))
def train_cmd(out: Path, width, seed, device, threads, quiet, stop_after, resume, overwrite, **o):
    """Train a base classifier under noise.

    \b
    Examples:
      cure-lirpa smooth train --method gaussian --sigma 0.25 --out runs/g025
      cure-lirpa smooth train --method nu-rs --sigma 0.5 --beta 3 --dataset mnist \\
          --data-root ../shared/data --epochs 4 --out runs/nu050
      cure-lirpa smooth train ... --out runs/nu050 --resume       # after a kill
    """
    from ..smoothing.training import TrainConfig, train

    set_threads(threads)
    config = TrainConfig(arch_kwargs={} if width is None else {"width": width}, seed=seed, **o)
    _warn_small_train_count(o["train_count"], o["batch_size"])
    res = train(
        config,
        out,
        resume=resume,
        overwrite=overwrite,
        device=resolve_device(device),
        stop_after=stop_after,
        progress=False if quiet else None,
        log=(lambda _m: None) if quiet else (lambda m: click.echo(m, err=True)),
    )
    click.echo(f"{res['checkpoint']} (epoch {res['epoch']}/{config.epochs})")


SEQUENTIAL_OPTIONS = [
    opt.typed_option(
        "--sequential",
        click.Choice(["off", "decide", "estimate"]),
        "off",
        "off: fixed-n CERTIFY. decide: draw noise until every --radii radius is decided "
        "(certified or not) by an anytime-valid test at the same alpha. estimate: until the "
        "largest certified radius is known to --precision.",
    ),
    opt.typed_option(
        "--radii",
        RADII,
        ",".join(map(str, DECIDE_RADII)),
        "decide: radii to decide, in --radius-norm units (e.g. 0.25,0.5,0.75 or 36/255).",
    ),
    opt.typed_option(
        "--radius-norm",
        click.Choice(SMOOTHING_NORMS),
        L2,
        "Norm of --radii, --precision and --max-radius.",
    ),
    opt.typed_option(
        "--max-n",
        click.IntRange(min=1),
        100_000,
        "Sequential: cap on the estimation draws per sample and noise (undecided "
        "radii at the cap are reported as not certified).",
    ),
    opt.typed_option(
        "--futility-alpha",
        click.FloatRange(0, 1, min_open=True, max_open=True),
        0.05,
        "Sequential: level of the 'not certifiable at r' decisions. They only withhold "
        "certificates (the certificate's failure probability stays --alpha); a larger value "
        "stops inputs below a radius' threshold sooner.",
    ),
    opt.typed_option(
        "--precision",
        EPS,
        "0.05",
        "estimate: stop when the certified radius is known to within this radius.",
    ),
    opt.typed_option(
        "--max-radius",
        EPS,
        None,
        "estimate: largest radius of interest [default: the largest reachable within "
        "--max-n draws].",
    ),
]


@smooth.command("certify", context_settings=SETTINGS)
@opt.typed_option(
    "--noise",
    click.Choice(SMOOTHING_MODES),
    GAUSSIAN,
    "Smoothing noise; hybrid = Gaussian and Uniform combined by Table 1.",
)
@opt.typed_option(
    "--sigma",
    POSITIVE_RADIUS,
    None,
    "Noise std for every noise used (pixel units, e.g. 0.5, 1/2 or 128/255).",
)
@opt.typed_option("--sigma-gaussian", POSITIVE_RADIUS, None, "Gaussian std [default: --sigma].")
@opt.typed_option(
    "--sigma-uniform",
    POSITIVE_RADIUS,
    None,
    "Uniform std, half-width sqrt(3)*sigma [default: --sigma].",
)
@opt.typed_option("--n0", click.IntRange(min=1), 100, "Noisy samples that choose the top class.")
@click.option(
    "--joint-alpha/--no-joint-alpha",
    default=True,
    help="hybrid: run each certificate at alpha/2 so the pair holds with probability 1-alpha "
    "(--no-joint-alpha: each at alpha, the pair only 1-2*alpha, as the NU code).",
)
@_options(SEQUENTIAL_OPTIONS)
@_options(SAMPLE_OPTIONS)
@click.pass_context
def certify_cmd(ctx: click.Context, **o: Any) -> None:
    """Certify samples with CERTIFY (Cohen et al.) or sequentially (--sequential) into a run folder.

    samples.tsv has one row per sample: idx label predict radius_l1 radius_l2 correct, then per
    noise its predict, count, p_lower and radii (and for hybrid the Table 1 rule), then time in
    seconds; predict = -1 means abstain. Read it with pandas.read_csv(path, sep='\\t',
    comment='#'), or summarise runs with 'smooth analyze'.

    \b
    Examples:
      cure-lirpa smooth certify -c runs/g050 --sigma 0.5 --out runs/g050-cert
      cure-lirpa smooth certify -c runs/nu050 --noise hybrid --sigma-gaussian 0.5 \\
          --sigma-uniform 0.58 --dataset mnist --data-root ../shared/data --skip 20 --n 10000 \\
          --out runs/nu050-hybrid
      # continue after a kill:
      cure-lirpa smooth certify ... --out runs/g050-cert --resume
      # two shards (on two machines, or as a job array), then merge them:
      cure-lirpa smooth certify ... --shard 0/2 --out runs/g050-cert
      cure-lirpa smooth certify ... --shard 1/2 --out runs/g050-cert
      cure-lirpa merge runs/g050-cert
      # sequential: stop each sample once radii 0.25, 0.5, 0.75 are decided (at most 100,000 draws)
      cure-lirpa smooth certify -c runs/g050 --sigma 0.5 --sequential decide \\
          --radii 0.25,0.5,0.75 --out runs/g050-seq
    """
    from ..smoothing.runner import run_checkpoint

    set_threads(o["threads"])
    keywords = _sample_keywords(o)
    sigma_gaussian, sigma_uniform = _sigmas(o)
    n_given = ctx.get_parameter_source("n").name != "DEFAULT"
    folder = run_checkpoint(
        "certify",
        o["checkpoint"],
        o["out"],
        mode=o["noise"],
        sigma_gaussian=sigma_gaussian,
        sigma_uniform=sigma_uniform,
        n0=o["n0"],
        n=o["n"] if n_given else None,
        joint_alpha=o["joint_alpha"],
        sequential=o["sequential"],
        radii=o["radii"],
        norm_name=o["radius_norm"],
        precision=o["precision"],
        max_radius=o["max_radius"],
        max_n=o["max_n"],
        futility_alpha=o["futility_alpha"],
        **keywords,
    )
    if folder is not None:
        click.echo(certify_line(folder))


def _sigmas(o: dict[str, Any]) -> tuple[Optional[float], Optional[float]]:
    """``(Gaussian sigma, Uniform sigma)`` of ``--noise`` (None for a noise not used), each
    defaulting to ``--sigma``; refuses a used noise without one."""
    noise, sigma = o["noise"], o["sigma"]
    gaussian = o["sigma_gaussian"] if o["sigma_gaussian"] is not None else sigma
    uniform = o["sigma_uniform"] if o["sigma_uniform"] is not None else sigma
    if noise in (GAUSSIAN, HYBRID) and gaussian is None:
        raise UserError(
            "pass --sigma (or --sigma-gaussian): the Gaussian noise std to certify with"
        )
    if noise in (UNIFORM, HYBRID) and uniform is None:
        raise UserError("pass --sigma (or --sigma-uniform): the Uniform noise std to certify with")
    return (gaussian if noise != UNIFORM else None), (uniform if noise != GAUSSIAN else None)


def certify_line(folder: Path) -> str:
    """One line about a finished certification run: samples, clean accuracy, ACR, certified
    accuracy at its radii, mean draws (sequential)."""
    import json

    from ..smoothing.results import SUMMARY_JSON

    s = json.loads((folder / SUMMARY_JSON).read_text())
    line = (
        f"{folder}: {s['samples']} samples, clean accuracy {s[CLEAN_ACCURACY]:.3f}, "
        f"ACR {L2} {s['acr'][L2]:.3f}, ACR {L1} {s['acr'][L1]:.3f}"
    )
    norm = s.get("radius_norm", L2)
    cert = ", ".join(f"{r}: {v:.3f}" for r, v in s["certified_accuracy"][norm].items())
    line += f"; certified accuracy ({norm}) {cert}"
    if "mean_samples_per_image" in s:
        line += f"; mean draws per sample {s['mean_samples_per_image']:.0f}"
    return line


@smooth.command("predict", context_settings=SETTINGS)
@click.option("--noise", type=click.Choice([GAUSSIAN, UNIFORM]), default=GAUSSIAN)
@click.option(
    "--sigma", type=POSITIVE_RADIUS, required=True, help="Noise std (pixel units, e.g. 1/2)."
)
@_options(SAMPLE_OPTIONS)
def predict_cmd(**o: Any) -> None:
    """Predict with PREDICT (Cohen et al.): abstain unless the top class wins a binomial test.

    \b
    Example:
      cure-lirpa smooth predict -c runs/g050 --sigma 0.5 --n 1000 --alpha 0.001 --out runs/g050-pred
    """
    import json

    from ..smoothing.noise import make_noise
    from ..smoothing.results import SUMMARY_JSON
    from ..smoothing.runner import run_checkpoint

    set_threads(o["threads"])
    keywords = _sample_keywords(o)
    noise = make_noise(o["noise"], o["sigma"])
    folder = run_checkpoint("predict", o["checkpoint"], o["out"], noise=noise, n=o["n"], **keywords)
    if folder is not None:
        s = json.loads((folder / SUMMARY_JSON).read_text())
        click.echo(
            f"{folder}: {s['samples']} samples, accuracy {s['accuracy']:.3f}, "
            f"abstained {s['abstained']:.3f}"
        )


def _parse_input(arg: str) -> tuple[Optional[str], str]:
    if "=" in arg and not Path(arg).exists():
        label, _, path = arg.partition("=")
        if label and path:
            return label, path
    return None, arg


@smooth.command("analyze", context_settings=SETTINGS)
@click.argument("inputs", nargs=-1, required=True)
@opt.out_option("Folder for summary.json, summary.md and certified_accuracy.png.")
@opt.typed_option(
    "--radii",
    RADII,
    ",".join(map(str, SMOOTHING_RADII)),
    "l2 radii for the certified-accuracy table.",
)
@opt.typed_option("--radii-l1", RADII, None, "l1 radii [default: --radii].")
@opt.typed_option(
    "--clean-acc",
    NumberList(),
    "45,50,55,60,65,70,75",
    "Clean-accuracy levels (percent, or fractions <= 1) for the comparison at fixed "
    "clean accuracy.",
)
@opt.typed_option("--max-radius", EPS, None, "x-axis limit of the plot.")
@_options(_folder_options())
def analyze_cmd(inputs, out: Path, radii, radii_l1, clean_acc, max_radius, resume, overwrite):
    """Certified accuracy, ACR (l1, l2), a plot, and ACR at fixed clean accuracy.

    INPUTS are run folders of 'smooth certify' (or their samples.tsv), optionally labelled
    METHOD=PATH. Runs with the same label form a method; their (clean accuracy, ACR) points are
    interpolated at each --clean-acc level. Without a label a run's method is '<training method>
    -> <certification noise>'. Runs that differ only in --start/--count are merged.

    \b
    Examples:
      cure-lirpa smooth analyze runs/g025-cert runs/g050-cert --out runs/report
      cure-lirpa smooth analyze gauss=runs/g025-cert gauss=runs/g050-cert nu=runs/nu040-hybrid \\
          nu=runs/nu050-hybrid --clean-acc 90,95 --out runs/report
    """
    from ..smoothing.analysis import analyze
    from ..smoothing.metrics import markdown_report

    levels = [v / 100.0 if v > 1 else v for v in clean_acc]
    result = analyze(
        [_parse_input(a) for a in inputs],
        out,
        radii,
        radii_l1,
        levels,
        max_radius,
        resume=resume,
        overwrite=overwrite,
    )
    click.echo(markdown_report(result["runs"], result["fixed_clean_accuracy"]))
    click.echo(f"wrote {out / 'summary.json'}, summary.md and certified_accuracy.png")


def merge_smoothing(run: Path, shards: tuple[Path, ...], overwrite: bool = False) -> bool:
    """``cure-lirpa merge`` for smoothing runs: merge and report, True; False when ``run`` (or the
    given shards) is not a smoothing run."""
    from ..smoothing.runner import is_smoothing_run, merge_shards

    if not is_smoothing_run(shards[0] if shards else run):
        return False
    summary = merge_shards(run, shards or None, overwrite=overwrite)
    click.echo(f"merged {summary['shards']} shards into {run}")
    if summary["kind"] == "smooth-certify":
        click.echo(certify_line(run))
    else:
        click.echo(f"{run}: {summary['samples']} samples, accuracy {summary['accuracy']:.3f}")
    click.echo(f"results: {run}/samples.tsv, samples.jsonl, summary.json, summary.md")
    return True
