"""Checkpoints and results files written atomically, and models rebuilt from checkpoints.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "cure-lirpa-checkpoint/1", "arch": "cnn-small", "arch_kwargs": {...},
     "dataset": {"name", "in_shape", "num_classes", "mean", "std"},
     "state_dict": <the original model's state_dict (never the BoundedModule's)>,
     "config": {...the full run configuration...}, "versions": {...}, "epoch": int,
     "trainer_state": {...optimizer, schedule and RNG state for --resume...}}
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..data import DatasetInfo
from ..errors import UserError
from ..models import build_model

FORMAT = "cure-lirpa-checkpoint/1"
PathLike = Union[str, os.PathLike]


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    from .. import __version__

    out = {
        "cure_lirpa": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:  # read the metadata only: importing auto_LiRPA is slow and the smoothing side needs none
        out["auto_LiRPA"] = importlib.metadata.version("auto-LiRPA")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def _tempfile(path: Path) -> str:
    """A temporary file beside ``path`` with the permissions a plain ``open`` would give."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def write_error(path: PathLike, exc: BaseException) -> UserError:
    """A :class:`UserError` for a failed write to ``path`` (full disk, read-only folder, ...)."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
    return UserError(
        f"cannot write {path}: {reason}; free some disk space or choose a writable folder"
    )


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A failed write (full disk, read-only folder) leaves no temporary file and raises
    :class:`UserError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tempfile(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if tmp is not None:  # gone after a successful os.replace
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a half-written file behind; a failed write (full disk,
    read-only folder) raises :class:`UserError`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tempfile(path)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        raise write_error(path, exc) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def make_checkpoint(
    model: nn.Module,
    arch: str,
    info: DatasetInfo,
    config: dict[str, Any],
    arch_kwargs: dict[str, Any] | None = None,
    epoch: int = 0,
    trainer_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` and to resume or reproduce the run."""
    return {
        "format": FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "dataset": {
            "name": info.name,
            "in_shape": list(info.in_shape),
            "num_classes": info.num_classes,
            "mean": list(info.mean),
            "std": list(info.std),
        },
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
        "versions": versions(),
        "epoch": epoch,
        "trainer_state": trainer_state or {},
    }


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`make_checkpoint`, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train one with 'cure-lirpa train'")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise UserError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a cure-lirpa checkpoint (expected format {FORMAT!r}); "
            "checkpoints come from 'cure-lirpa train' or cure_lirpa.io.checkpoint.make_checkpoint"
        )
    return ckpt


def dataset_info_of(ckpt: dict[str, Any]) -> DatasetInfo:
    d = ckpt["dataset"]
    return DatasetInfo(
        d["name"], tuple(d["in_shape"]), int(d["num_classes"]), tuple(d["mean"]), tuple(d["std"])
    )


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the model of ``ckpt`` and load its weights (eval mode, on CPU)."""
    info = dataset_info_of(ckpt)
    model = build_model(
        ckpt["arch"], info.in_shape, info.num_classes, info.mean, info.std, **ckpt["arch_kwargs"]
    )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise UserError(
            f"checkpoint weights do not match architecture {ckpt['arch']!r}: {str(exc)[:300]}"
        ) from None
    return model.eval()


def smoothing_noise(ckpt: dict[str, Any]) -> str | None:
    """``"gaussian noise, sigma 0.5"`` for a base classifier trained by ``cure-lirpa smooth train``
    (its config records the noise sigma), None for any other checkpoint."""
    config = ckpt.get("config") or {}
    sigma = config.get("sigma")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool):
        return None
    return f"{config.get('method', 'noise')} noise, sigma {sigma:g}"
