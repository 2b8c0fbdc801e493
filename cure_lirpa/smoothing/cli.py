"""``cure-lirpa smooth ...``: train, certify, predict and analyze with randomized smoothing.

The group is standalone-usable (``python -m cure_lirpa.smoothing.cli``); the main CLI attaches it
with ``main.add_command(smooth)``. Every command is a thin call into the library.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click
import torch

from ..data import DATASETS, dataset_info, load_dataset
from ..errors import UserError

DEVICES = ("auto", "cpu", "cuda")
POSITIVE = click.FloatRange(min=0.0, min_open=True)


def _user_errors(fn: Callable) -> Callable:
    """Turn :class:`UserError` into a clean ``click.ClickException`` (message, exit code 1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is a :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but no CUDA device is available; use --device cpu"
        )
    return torch.device(name)


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


class FloatList(click.ParamType):
    """Comma-separated floats, e.g. ``0.25,0.5,1``."""

    name = "FLOATS"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        if isinstance(value, (list, tuple)):
            return [float(v) for v in value]
        try:
            out = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(
                f"{value!r} is not a comma-separated list of numbers (e.g. 0.25,0.5,1)", param, ctx
            )
        if not out or any(not math.isfinite(v) or v < 0 for v in out):
            self.fail(f"{value!r} must hold one or more non-negative numbers", param, ctx)
        return out


def _common_run_options(fn: Callable) -> Callable:
    """Options shared by certify and predict."""
    options = [
        click.option(
            "--checkpoint",
            "-c",
            required=True,
            type=click.Path(dir_okay=False),
            help="Model checkpoint from 'smooth train' (or any cure-lirpa checkpoint).",
        ),
        click.option(
            "--out",
            "-o",
            required=True,
            type=click.Path(dir_okay=False),
            help="TSV to write, one row per sample, flushed as it goes.",
        ),
        click.option(
            "--n",
            "n",
            type=click.IntRange(min=1),
            default=100_000,
            show_default=True,
            help="Noisy samples used for the estimate.",
        ),
        click.option(
            "--alpha",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            default=0.001,
            show_default=True,
            help="Failure probability of each answer.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=1000,
            show_default=True,
            help="Noisy copies per forward pass.",
        ),
        click.option(
            "--dataset",
            type=click.Choice(DATASETS),
            default=None,
            help="Dataset to certify [default: the checkpoint's dataset].",
        ),
        click.option(
            "--data-root",
            type=click.Path(file_okay=True),
            default=None,
            help="Folder with the dataset (not needed for 'sample').",
        ),
        click.option(
            "--split", type=click.Choice(["test", "train"]), default="test", show_default=True
        ),
        click.option(
            "--start",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="First sample index (for sharding).",
        ),
        click.option(
            "--count",
            type=click.IntRange(min=1),
            default=None,
            help="Number of samples to process [default: all from --start].",
        ),
        click.option(
            "--skip",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Take every SKIP-th sample (e.g. 20 on MNIST's 10,000 gives 500 evenly spaced).",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed; sample i uses a seed derived from (seed, i), so shards and resumed runs agree.",
        ),
        click.option(
            "--device",
            type=click.Choice(DEVICES),
            default="auto",
            show_default=True,
            help="auto = cuda if available, else cpu.",
        ),
        click.option(
            "--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads."
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue an interrupted TSV (refused if it was written with other options).",
        ),
        click.option("--overwrite", is_flag=True, help="Replace an existing TSV."),
        click.option(
            "--progress/--no-progress",
            default=None,
            help="Progress bar on stderr [default: only on a terminal].",
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _load_model(checkpoint: str, device: torch.device):
    from ..checkpoint import dataset_info_of, load_checkpoint, model_from_checkpoint, versions
    from .certifier import file_sha256
    from .training import checkpoint_summary

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt).to(device).eval()
    info = dataset_info_of(ckpt)
    header_info = {
        "checkpoint": str(checkpoint),
        **checkpoint_summary(ckpt),
        "versions": versions(),
    }
    return model, info, file_sha256(checkpoint), header_info


def _dataset(name: Optional[str], default: str, split: str, root: Optional[str]):
    """The dataset to certify; refuses one whose image shape differs from the model's."""
    if name and name != default and dataset_info(name).in_shape != dataset_info(default).in_shape:
        raise UserError(
            f"the checkpoint was trained on {default} {dataset_info(default).in_shape}, "
            f"which does not match --dataset {name} {dataset_info(name).in_shape}"
        )
    return load_dataset(name or default, split, root)


def _warn_small_n(n: int, alpha: float, what: str) -> None:
    import warnings

    from .certifier import SmoothingWarning, check_sampling

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmoothingWarning)
        msg = check_sampling(n, alpha, 1, what=what)
    if msg:
        click.echo(f"Warning: {msg}", err=True)


def _warn_not_noise_trained(checkpoint: str, header_info: dict) -> None:
    """Warn when the checkpoint's config records no training noise (not from 'smooth train')."""
    if header_info.get("train_sigma") is None:
        click.echo(
            f"Warning: {checkpoint} was not trained under noise (no sigma in its config); a base "
            "classifier that never saw Gaussian or Uniform noise mostly abstains or certifies tiny "
            "radii. Train one with 'cure-lirpa smooth train --sigma SIGMA'",
            err=True,
        )


@click.group("smooth")
def smooth() -> None:
    """Randomized smoothing for l1 and l2 (Cohen et al.; the NU paper's hybrid certificate).

    \b
    Typical session on the built-in MNIST sample:
      cure-lirpa smooth train --method gaussian --sigma 0.5 --epochs 2 --out g050.pt
      cure-lirpa smooth certify -c g050.pt --noise gaussian --sigma 0.5 --n 10000 --skip 10 -o g050.tsv
      cure-lirpa smooth analyze g050.tsv --out-dir report/
    """


@smooth.command("train")
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="Checkpoint file, rewritten atomically after every epoch.",
)
@click.option(
    "--method",
    type=click.Choice(["gaussian", "uniform", "nu", "nu-rs", "consistency"]),
    default="gaussian",
    show_default=True,
    help="gaussian/uniform: noise augmentation; nu: Normal-Uniform noise; nu-rs: NU noise + "
    "similarity regulariser (NU paper Eq. 3); consistency: Jeong & Shin 2020.",
)
@click.option(
    "--sigma",
    type=POSITIVE,
    default=0.25,
    show_default=True,
    help="Noise std (pixel units); sigma_n for nu/nu-rs.",
)
@click.option(
    "--sigma-u",
    type=POSITIVE,
    default=None,
    help="Uniform part's std for nu/nu-rs [default: sqrt(3)/2 * sigma, kurtosis -0.22].",
)
@click.option(
    "--beta",
    type=click.FloatRange(min=0),
    default=3.0,
    show_default=True,
    help="Weight of the similarity regulariser (nu-rs).",
)
@click.option(
    "--consistency-m",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Noisy copies per input (consistency).",
)
@click.option("--consistency-lambda", type=click.FloatRange(min=0), default=10.0, show_default=True)
@click.option("--consistency-eta", type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option("--dataset", type=click.Choice(DATASETS), default="sample", show_default=True)
@click.option("--data-root", type=click.Path(), default=None, help="Folder with the dataset.")
@click.option(
    "--arch",
    default="cnn-small",
    show_default=True,
    help="Zoo architecture (mlp, cnn-small, cnn5, cnn7) or 'package.module:factory'.",
)
@click.option(
    "--width", type=click.IntRange(min=1), default=None, help="Width of a zoo architecture."
)
@click.option("--epochs", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--lr", type=POSITIVE, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option(
    "--schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True
)
@click.option(
    "--train-count",
    type=click.IntRange(min=1),
    default=None,
    help="Train on N training images only (quick runs): the first N, classes interleaved for "
    "class-sorted ImageFolder data.",
)
@click.option(
    "--eval-count",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Test samples for the per-epoch accuracy report (0 = none).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out (same options).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option(
    "--stop-after",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many epochs in this call (continue later with --resume).",
)
@click.option("--progress/--no-progress", default=None)
@_user_errors
def train_cmd(
    out,
    method,
    sigma,
    sigma_u,
    beta,
    consistency_m,
    consistency_lambda,
    consistency_eta,
    dataset,
    data_root,
    arch,
    width,
    epochs,
    batch_size,
    lr,
    weight_decay,
    schedule,
    train_count,
    eval_count,
    seed,
    device,
    threads,
    resume,
    overwrite,
    stop_after,
    progress,
):
    """Train a base classifier under noise.

    \b
    Examples:
      cure-lirpa smooth train --method gaussian --sigma 0.25 --out g025.pt
      cure-lirpa smooth train --method nu-rs --sigma 0.5 --beta 3 --dataset mnist \\
          --data-root ../shared/data --epochs 4 --out nu050.pt
    """
    from .training import TrainConfig, train

    _set_threads(threads)
    config = TrainConfig(
        dataset=dataset,
        data_root=data_root,
        arch=arch,
        arch_kwargs={} if width is None else {"width": width},
        method=method,
        sigma=sigma,
        sigma_u=sigma_u,
        beta=beta,
        consistency_m=consistency_m,
        consistency_lambda=consistency_lambda,
        consistency_eta=consistency_eta,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        seed=seed,
        train_count=train_count,
        eval_count=eval_count,
    )
    res = train(
        config,
        out,
        resume=resume,
        overwrite=overwrite,
        device=resolve_device(device),
        stop_after=stop_after,
        progress=progress,
        log=click.echo,
    )
    click.echo(f"checkpoint: {res['out']} (epoch {res['epoch']}/{epochs})")


def _sequential_options(fn: Callable) -> Callable:
    """Options of the sequential modes of ``certify`` (cure_lirpa.smoothing.sequential)."""
    options = [
        click.option(
            "--sequential",
            type=click.Choice(["off", "decide", "estimate"]),
            default="off",
            show_default=True,
            help="off: fixed-n CERTIFY. decide: draw noise until every --radii radius is decided "
            "(certified or not) by an anytime-valid test at the same alpha. estimate: until the "
            "largest certified radius is known to --precision.",
        ),
        click.option(
            "--radii",
            type=FloatList(),
            default="0.25,0.5,0.75",
            show_default=True,
            help="decide: radii to decide, in --radius-norm units (e.g. 0.25,0.5,0.75).",
        ),
        click.option(
            "--radius-norm",
            type=click.Choice(["l2", "l1"]),
            default="l2",
            show_default=True,
            help="Norm of --radii, --precision and --max-radius.",
        ),
        click.option(
            "--max-n",
            type=click.IntRange(min=1),
            default=100_000,
            show_default=True,
            help="Sequential: cap on the estimation draws per sample and noise (undecided "
            "radii at the cap are reported as not certified).",
        ),
        click.option(
            "--futility-alpha",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            default=0.05,
            show_default=True,
            help="Sequential: level of the 'not certifiable at r' decisions. They only withhold "
            "certificates (the certificate's failure probability stays --alpha); a larger value "
            "stops inputs below a radius' threshold sooner.",
        ),
        click.option(
            "--precision",
            type=POSITIVE,
            default=0.05,
            show_default=True,
            help="estimate: stop when the certified radius is known to within this radius.",
        ),
        click.option(
            "--max-radius",
            type=POSITIVE,
            default=None,
            help="estimate: largest radius of interest [default: the largest reachable within "
            "--max-n draws].",
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@smooth.command("certify")
@click.option(
    "--noise",
    type=click.Choice(["gaussian", "uniform", "hybrid"]),
    default="gaussian",
    show_default=True,
    help="Smoothing noise; hybrid = Gaussian and Uniform combined by Table 1.",
)
@click.option(
    "--sigma", type=POSITIVE, default=None, help="Noise std for every noise used (pixel units)."
)
@click.option(
    "--sigma-gaussian", type=POSITIVE, default=None, help="Gaussian std [default: --sigma]."
)
@click.option(
    "--sigma-uniform",
    type=POSITIVE,
    default=None,
    help="Uniform std, half-width sqrt(3)*sigma [default: --sigma].",
)
@click.option(
    "--n0",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Noisy samples used to choose the top class.",
)
@click.option(
    "--joint-alpha/--no-joint-alpha",
    default=True,
    show_default=True,
    help="hybrid: run each certificate at alpha/2 so the pair holds with probability 1-alpha "
    "(--no-joint-alpha: each at alpha, the pair only 1-2*alpha, as the NU code).",
)
@_sequential_options
@_common_run_options
@_user_errors
def certify_cmd(
    checkpoint,
    out,
    n,
    alpha,
    batch_size,
    dataset,
    data_root,
    split,
    start,
    count,
    skip,
    seed,
    device,
    threads,
    resume,
    overwrite,
    progress,
    noise,
    sigma,
    sigma_gaussian,
    sigma_uniform,
    n0,
    joint_alpha,
    sequential,
    radii,
    radius_norm,
    max_n,
    futility_alpha,
    precision,
    max_radius,
):
    """Certify samples with CERTIFY (Cohen et al.) or sequentially (--sequential); one TSV row each.

    \b
    Columns: idx label predict radius_l1 radius_l2 correct, then per noise its predict, count,
    p_lower and radii (and for hybrid the Table 1 rule), then time in seconds; predict = -1 means
    abstain. Read it with pandas.read_csv(path, sep='\\t', comment='#').
    \b
    Examples:
      cure-lirpa smooth certify -c g050.pt --noise gaussian --sigma 0.5 -o g050.tsv
      cure-lirpa smooth certify -c nu.pt --noise hybrid --sigma-gaussian 0.5 --sigma-uniform 0.58 \\
          --dataset mnist --data-root ../shared/data --skip 20 --n 10000 -o nu_hybrid.tsv
      # continue after a kill, or run a second shard:
      cure-lirpa smooth certify ... -o g050.tsv --resume
      cure-lirpa smooth certify ... --start 5000 --skip 20 -o g050_shard2.tsv
      # sequential: stop each sample once radii 0.25, 0.5, 0.75 are decided (at most 100,000 draws)
      cure-lirpa smooth certify -c g050.pt --sigma 0.5 --sequential decide --radii 0.25,0.5,0.75 \\
          -o g050_seq.tsv
      # sequential: the largest certified radius to within 0.05
      cure-lirpa smooth certify -c g050.pt --sigma 0.5 --sequential estimate --precision 0.05 \\
          -o g050_est.tsv
    """
    from .analysis import average_certified_radius, load_run
    from .certifier import certify_dataset
    from .hybrid import split_alpha

    _set_threads(threads)
    dev = resolve_device(device)
    sg = sigma_gaussian if sigma_gaussian is not None else sigma
    su = sigma_uniform if sigma_uniform is not None else sigma
    if noise in ("gaussian", "hybrid") and sg is None:
        raise UserError(
            "pass --sigma (or --sigma-gaussian): the Gaussian noise std to certify with"
        )
    if noise in ("uniform", "hybrid") and su is None:
        raise UserError("pass --sigma (or --sigma-uniform): the Uniform noise std to certify with")
    model, info, sha, header_info = _load_model(checkpoint, dev)
    ds_name = dataset or info.name
    data = _dataset(dataset, info.name, split, data_root)
    each = split_alpha(alpha, 2, joint_alpha) if noise == "hybrid" else alpha
    if sequential != "off":
        from .sequential import certify_dataset_sequential

        if click.get_current_context().get_parameter_source("n").name != "DEFAULT":
            click.echo("Warning: --n is not used by --sequential; --max-n caps the draws", err=True)
        certify_dataset_sequential(
            model,
            info.num_classes,
            data,
            out,
            sequential=sequential,
            mode=noise,
            sigma_gaussian=sg if noise != "uniform" else None,
            sigma_uniform=su if noise != "gaussian" else None,
            radii=radii,
            norm_name=radius_norm,
            precision=precision,
            max_radius=max_radius,
            n0=n0,
            max_n=max_n,
            alpha=alpha,
            futility_alpha=futility_alpha,
            batch_size=batch_size,
            joint_alpha=joint_alpha,
            seed=seed,
            start=start,
            count=count,
            skip=skip,
            device=dev,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            run_extra={"checkpoint_sha256": sha, "dataset": ds_name, "split": split},
            info={**header_info, "data_root": data_root},
        )
        click.echo(_sequential_summary(out, sequential, radii, radius_norm))
        return
    _warn_small_n(n, each, "certify")
    if n0 > n:
        click.echo(
            f"Warning: --n0 {n0} is larger than --n {n}: n0 draws only pick the top class, the "
            "certificate rests on the n draws; use n0 much smaller than n (Cohen et al.: n0 100, "
            "n 100000)",
            err=True,
        )
    _warn_not_noise_trained(checkpoint, header_info)
    certify_dataset(
        model,
        info.num_classes,
        data,
        out,
        mode=noise,
        sigma_gaussian=sg if noise != "uniform" else None,
        sigma_uniform=su if noise != "gaussian" else None,
        n0=n0,
        n=n,
        alpha=alpha,
        batch_size=batch_size,
        joint_alpha=joint_alpha,
        seed=seed,
        start=start,
        count=count,
        skip=skip,
        device=dev,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        run_extra={"checkpoint_sha256": sha, "dataset": ds_name, "split": split},
        info={**header_info, "data_root": data_root},
    )
    run = load_run(out)
    click.echo(
        f"{out}: {run.size} samples, clean accuracy {run.correct.mean():.3f}, "
        f"ACR l2 {average_certified_radius(run.radius['l2'], run.correct):.3f}, "
        f"ACR l1 {average_certified_radius(run.radius['l1'], run.correct):.3f}"
    )


def _sequential_summary(out: str, sequential: str, radii: list[float], norm_name: str) -> str:
    """One line: samples, clean accuracy, mean draws per sample, certified accuracy at the radii."""
    from .certifier import read_tsv

    _, _, rows = read_tsv(out)
    size = max(1, len(rows))
    acc = sum(int(r["correct"]) for r in rows) / size
    samples = sum(int(r["samples"]) for r in rows) / size
    line = (
        f"{out}: {len(rows)} samples, clean accuracy {acc:.3f}, mean draws per sample {samples:.0f}"
    )
    if sequential == "decide":
        key = f"radius_{norm_name}"
        cert = ", ".join(
            f"{r:g}: {sum(int(x['correct']) and float(x[key]) >= r for x in rows) / size:.3f}"
            for r in sorted(radii)
        )
        line += f", certified accuracy ({norm_name}) {cert}"
    return line


@smooth.command("predict")
@click.option(
    "--noise", type=click.Choice(["gaussian", "uniform"]), default="gaussian", show_default=True
)
@click.option("--sigma", type=POSITIVE, required=True, help="Noise std (pixel units).")
@_common_run_options
@_user_errors
def predict_cmd(
    checkpoint,
    out,
    n,
    alpha,
    batch_size,
    dataset,
    data_root,
    split,
    start,
    count,
    skip,
    seed,
    device,
    threads,
    resume,
    overwrite,
    progress,
    noise,
    sigma,
):
    """Predict with PREDICT (Cohen et al.): abstain unless the top class wins a binomial test.

    \b
    Example:
      cure-lirpa smooth predict -c g050.pt --sigma 0.5 --n 1000 --alpha 0.001 -o g050_pred.tsv
    """
    from .certifier import predict_dataset, read_tsv
    from .noise import make_noise

    _set_threads(threads)
    dev = resolve_device(device)
    model, info, sha, header_info = _load_model(checkpoint, dev)
    data = _dataset(dataset, info.name, split, data_root)
    _warn_small_n(n, alpha, "predict")
    _warn_not_noise_trained(checkpoint, header_info)
    predict_dataset(
        model,
        info.num_classes,
        data,
        out,
        noise=make_noise(noise, sigma),
        n=n,
        alpha=alpha,
        batch_size=batch_size,
        seed=seed,
        start=start,
        count=count,
        skip=skip,
        device=dev,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        run_extra={"checkpoint_sha256": sha, "dataset": dataset or info.name, "split": split},
        info={**header_info, "data_root": data_root},
    )
    _, _, rows = read_tsv(out)
    acc = sum(int(r["correct"]) for r in rows) / max(1, len(rows))
    abstain = sum(r["predict"] == "-1" for r in rows) / max(1, len(rows))
    click.echo(f"{out}: {len(rows)} samples, accuracy {acc:.3f}, abstained {abstain:.3f}")


def _parse_input(arg: str) -> tuple[Optional[str], str]:
    if "=" in arg and not Path(arg).exists():
        label, _, path = arg.partition("=")
        if label and path:
            return label, path
    return None, arg


@smooth.command("analyze")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out-dir",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for summary.json, summary.md and certified_accuracy.png.",
)
@click.option(
    "--radii",
    type=FloatList(),
    default="0.25,0.5,0.75,1.0",
    show_default=True,
    help="l2 radii for the certified-accuracy table.",
)
@click.option("--radii-l1", type=FloatList(), default=None, help="l1 radii [default: --radii].")
@click.option(
    "--clean-acc",
    type=FloatList(),
    default="45,50,55,60,65,70,75",
    show_default=True,
    help="Clean-accuracy levels (percent, or fractions <= 1) for the comparison at fixed "
    "clean accuracy.",
)
@click.option("--max-radius", type=POSITIVE, default=None, help="x-axis limit of the plot.")
@_user_errors
def analyze_cmd(inputs, out_dir, radii, radii_l1, clean_acc, max_radius):
    """Certified accuracy, ACR (l1, l2), a plot, and ACR at fixed clean accuracy.

    INPUTS are certification TSVs, optionally labelled METHOD=PATH. Runs with the same label form a
    method; their (clean accuracy, ACR) points are interpolated at each --clean-acc level. Without a
    label a run's method is '<training method> -> <certification noise>'. Shards of one run (same
    options except --start) are merged.

    \b
    Examples:
      cure-lirpa smooth analyze g025.tsv g050.tsv --out-dir report/
      cure-lirpa smooth analyze gauss=g025.tsv gauss=g050.tsv nu=nu040.tsv nu=nu050.tsv \\
          --clean-acc 90,95 --out-dir report/
    """
    from .analysis import analyze, markdown_report

    levels = [v / 100.0 if v > 1 else v for v in clean_acc]
    result = analyze(
        [_parse_input(a) for a in inputs], out_dir, radii, radii_l1, levels, max_radius
    )
    click.echo(markdown_report(result["runs"], result["fixed_clean_accuracy"]))
    click.echo(f"wrote {Path(out_dir) / 'summary.json'}, summary.md and certified_accuracy.png")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(smooth())
