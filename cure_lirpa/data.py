"""Datasets in [0, 1] pixel space: the built-in MNIST sample, MNIST, CIFAR-10 and TinyImageNet.

Every loader returns a ``torch.utils.data.Dataset`` of ``(image (C, H, W) float in [0, 1], label int)``.
Normalisation is *not* applied here: models carry it (see :mod:`cure_lirpa.models`), so every eps and
radius stays in pixel units.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import UserError
from .vocabulary import CIFAR10, DATASETS, DEFAULT_RADII, MNIST, SAMPLE, TINYIMAGENET

SAMPLE_PATH = Path(__file__).parent / "assets" / "mnist_sample.npz"
DATA_ENV = "CURE_LIRPA_DATA"


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, class count and normalisation constants of a dataset."""

    name: str
    in_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_INFO = {
    SAMPLE: DatasetInfo(SAMPLE, (1, 28, 28), 10, (0.1307,), (0.3081,)),
    MNIST: DatasetInfo(MNIST, (1, 28, 28), 10, (0.1307,), (0.3081,)),
    CIFAR10: DatasetInfo(
        CIFAR10, (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    TINYIMAGENET: DatasetInfo(
        TINYIMAGENET, (3, 64, 64), 200, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)
    ),
}


def default_radii(name: str) -> tuple[float, float]:
    """The usual ``(eps_linf, eps_l2)`` of dataset ``name`` in [0, 1] pixel units."""
    from .threats.base import parse_eps

    dataset_info(name)
    linf, l2 = DEFAULT_RADII[name]
    return parse_eps(linf), parse_eps(l2)


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (one of :data:`DATASETS`)."""
    if name not in _INFO:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _INFO[name]


def load_dataset(
    name: str, split: str = "test", root: Optional[str] = None, download: bool = False
) -> Dataset:
    """Load ``split`` ('train' or 'test') of dataset ``name`` from ``root``.

    ``root`` defaults to ``$CURE_LIRPA_DATA`` and then ``./data``. ``sample`` needs no root: it is
    shipped with the package. ``download=True`` lets torchvision fetch MNIST / CIFAR-10.
    """
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    dataset_info(name)
    if name == SAMPLE:
        return load_sample(split)
    base = Path(root or os.environ.get(DATA_ENV) or "data").expanduser()
    if name == MNIST:
        return _load_mnist(base, split, download)
    if name == CIFAR10:
        return _load_cifar10(base, split, download)
    return _load_tinyimagenet(base, split)


def load_sample(split: str) -> TensorDataset:
    """The built-in real MNIST sample (made by ``python -m cure_lirpa.sample``)."""
    if not SAMPLE_PATH.exists():
        raise UserError(
            f"the built-in sample {SAMPLE_PATH} is missing; rebuild it with "
            "'python -m cure_lirpa.sample --mnist-root ../shared/data'"
        )
    with np.load(SAMPLE_PATH) as arrays:
        x = torch.from_numpy(arrays[f"x_{split}"]).float().div_(255.0).unsqueeze(1)
        y = torch.from_numpy(arrays[f"y_{split}"]).long()
    return TensorDataset(x, y)


def _missing(name: str, looked: Sequence[Path], how: str) -> UserError:
    places = ", ".join(str(p) for p in looked)
    return UserError(f"{name} not found (looked in: {places}). {how}")


def _load_mnist(base: Path, split: str, download: bool) -> Dataset:
    from torchvision import datasets, transforms

    if not download and not (base / "MNIST" / "raw").is_dir():
        raise _missing(
            "MNIST",
            [base / "MNIST" / "raw"],
            "Pass --data-root DIR where DIR/MNIST/raw holds the idx files (on a connected machine, "
            "cure_lirpa.data.load_dataset('mnist', root=DIR, download=True) fetches them once).",
        )
    try:
        return datasets.MNIST(
            str(base), train=split == "train", download=download, transform=transforms.ToTensor()
        )
    except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True ..."
        if download or "not found" not in str(exc).lower():
            raise
        raise _missing(
            "the MNIST idx files",
            [base / "MNIST" / "raw"],
            "Put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            "t10k-labels-idx1-ubyte (or their .gz) there.",
        ) from None


def _extract(archive: Path, dest: Path) -> Path:
    """Extract a .tar.gz once into ``dest`` (atomically: to a temporary folder, then renamed)."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(
            tmp
        )
    os.replace(tmp, dest)
    return dest


def _imagefolder_root(path: Path, split_dir: str) -> Optional[Path]:
    """Find the folder holding ``split_dir/<class>/*`` at ``path`` or one level below."""
    for cand in [path, *sorted(p for p in path.iterdir() if p.is_dir())] if path.is_dir() else []:
        if (cand / split_dir).is_dir():
            return cand
    return None


def _load_cifar10(base: Path, split: str, download: bool) -> Dataset:
    from torchvision import datasets, transforms

    to_tensor = transforms.ToTensor()
    looked = [base / "cifar-10-batches-py", base]
    if (base / "cifar-10-batches-py").is_dir() or download:
        try:
            return datasets.CIFAR10(
                str(base), train=split == "train", download=download, transform=to_tensor
            )
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. ..."
            if download or "not found" not in str(exc).lower():
                raise
            raise _missing(
                "the CIFAR-10 batches",
                [base / "cifar-10-batches-py"],
                "That folder must hold data_batch_1 .. data_batch_5 and test_batch, as extracted "
                "from cifar-10-python.tar.gz.",
            ) from None
    archive = base if base.suffixes[-2:] == [".tar", ".gz"] else base / "cifar10-jpeg.tar.gz"
    if archive.is_file():
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cure_lirpa"
        base = _extract(archive, cache / "cifar10-jpeg")
        looked.append(base)
    folder = _imagefolder_root(base, "test")
    if folder is None:
        raise _missing(
            "CIFAR-10",
            looked,
            "Pass --data-root DIR with DIR/cifar-10-batches-py (torchvision), an ImageFolder "
            "layout DIR/train/<class>/, DIR/test/<class>/, or the cifar10-jpeg.tar.gz archive "
            "(on a connected machine, load_dataset('cifar10', root=DIR, download=True) fetches it).",
        )
    for other in ("train", "test"):
        if not (folder / other).is_dir():
            raise UserError(
                f"{folder} has no {other}/ folder; CIFAR-10 in ImageFolder layout needs both "
                "train/<class>/ and test/<class>/"
            )
    return _image_folder(folder / split, dataset_info(CIFAR10))


def _load_tinyimagenet(base: Path, split: str) -> Dataset:
    split_dir = "train" if split == "train" else "val"
    for cand in (base / "tiny-imagenet-200", base):
        if (cand / split_dir).is_dir() and any((cand / split_dir).iterdir()):
            # Both splits must be there: a run that trains without val/ fails only at verify.
            for needed in ("train", "val"):
                sub = cand / needed
                if not sub.is_dir() or not any(sub.iterdir()):
                    raise UserError(
                        f"{cand} has no {needed}/ folder (or it is empty); TinyImageNet needs "
                        "train/<wnid>/ and val/<wnid>/ (the test split is val/)"
                    )
                if (sub / "images").is_dir() and not any(
                    p.is_dir() for p in sub.iterdir() if p.name != "images"
                ):
                    raise UserError(
                        f"{sub} is in the raw TinyImageNet layout ({needed}/images + "
                        f"annotations); arrange it as {needed}/<wnid>/*.JPEG (a folder per class) "
                        "first."
                    )
            return _image_folder(cand / split_dir, dataset_info(TINYIMAGENET))
    raise _missing(
        "TinyImageNet",
        [base / "tiny-imagenet-200", base],
        "Pass --data-root DIR with DIR/train/<wnid>/ and DIR/val/<wnid>/ in ImageFolder layout.",
    )


def _image_folder(folder: Path, info: DatasetInfo) -> Dataset:
    """An ImageFolder of ``info``'s classes whose images are checked for ``info``'s size."""
    from torchvision import datasets, transforms

    try:
        data = datasets.ImageFolder(
            str(folder), transform=transforms.ToTensor(), loader=SizedLoader(info.in_shape)
        )
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images
        raise UserError(f"{folder} is not a usable ImageFolder: {exc}") from None
    if len(data.classes) != info.num_classes:
        raise UserError(
            f"{folder} holds {len(data.classes)} class folders, but {info.name} has "
            f"{info.num_classes} classes; point --data-root at the full dataset (one folder per "
            "class)"
        )
    return data


class SizedLoader:
    """ImageFolder loader: the RGB image at a path, refused with the path when it is not
    ``in_shape`` (C, H, W) -- one odd image would otherwise stop a run deep inside torch."""

    def __init__(self, in_shape: Sequence[int]):
        self.in_shape = tuple(in_shape)

    def __call__(self, path: str):
        from torchvision.datasets.folder import default_loader

        image = default_loader(path)
        _, h, w = self.in_shape
        if image.size != (w, h):
            raise UserError(
                f"{path} is {image.size[0]}x{image.size[1]} pixels, but the dataset's images are "
                f"{w}x{h}; resize or remove it"
            )
        return image


def take(dataset: Dataset, start: int = 0, count: Optional[int] = None) -> Dataset:
    """Samples ``start .. start+count-1`` of ``dataset`` in :func:`sample_order` (all from
    ``start`` when count is None): the stored order, classes interleaved for ImageFolder data."""
    n = len(dataset)
    if start < 0 or start >= n:
        raise UserError(f"--start {start} is outside the dataset (it has {n} samples)")
    stop = n if count is None else min(n, start + count)
    return Subset(dataset, sample_order(dataset)[start:stop])


def stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise a (small) dataset as tensors ``x (N, C, H, W)`` and ``y (N,)``."""
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def sample_order(dataset: Dataset) -> Sequence[int]:
    """The order in which runs take ``dataset``'s samples (``--start``/``--count``, training subsets).

    Data already in random order (MNIST, torchvision CIFAR-10, the built-in sample) keep their stored
    order, so "the first N test images" means what it means in the papers. Class-sorted data
    (torchvision ``DatasetFolder``/``ImageFolder``: each class in one block) are interleaved round
    robin, the first image of every class, then the second of every class, ..., so that every prefix
    and every ``--start``/``--count`` range holds the classes in proportion.
    """
    from torchvision.datasets import DatasetFolder

    if not isinstance(dataset, DatasetFolder):
        return range(len(dataset))
    blocks: dict[int, list[int]] = {}
    for i, target in enumerate(dataset.targets):
        blocks.setdefault(int(target), []).append(i)
    queues = [blocks[c] for c in sorted(blocks)]
    longest = max((len(q) for q in queues), default=0)
    return [q[k] for k in range(longest) for q in queues if k < len(q)]


def subset_indices(dataset: Dataset, count: Optional[int]) -> Sequence[int]:
    """Indices of the ``count`` samples a run uses when it asks for fewer than all of ``dataset``:
    the first ``count`` of :func:`sample_order` (every index when ``count`` is None or too large)."""
    n = len(dataset)
    if count is None or count >= n:
        return range(n)
    if count < 1:
        raise UserError(f"a subset needs at least one sample, got count={count}")
    return sample_order(dataset)[:count]


def in_memory(
    dataset: Dataset, indices: Sequence[int], max_mb: float = 2048.0
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(x (N, C, H, W), y (N,))`` of ``dataset[indices]`` held in memory, or None when it would
    take more than ``max_mb`` megabytes (then callers load items one by one).

    The built-in sample and torchvision MNIST are sliced directly (the values ``ToTensor`` gives,
    without a PIL round trip per image); other datasets (ImageFolder JPEGs) are decoded once.
    """
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][idx], dataset.tensors[1][idx].long()
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        inner = torch.as_tensor(list(dataset.indices), dtype=torch.long)[idx]
        return dataset.dataset.tensors[0][inner], dataset.dataset.tensors[1][inner].long()
    from torchvision import datasets, transforms

    if (
        isinstance(dataset, datasets.MNIST)
        and isinstance(dataset.transform, transforms.ToTensor)
        and dataset.target_transform is None
    ):
        return dataset.data[idx].unsqueeze(1).float().div(255.0), dataset.targets[idx].long()
    if len(idx) == 0:
        return None
    first = dataset[int(idx[0])][0]
    if len(idx) * first.numel() * first.element_size() / 2**20 > max_mb:
        return None
    x = torch.empty((len(idx), *first.shape), dtype=first.dtype)
    y = torch.empty(len(idx), dtype=torch.long)
    for k, i in enumerate(idx.tolist()):
        image, label = dataset[i]
        x[k], y[k] = image, int(label)
    return x, y


class TrainData:
    """The ``count`` images of :func:`subset_indices` batched by index: held in memory when that is
    cheap (:func:`in_memory`), else loaded per item. Positions ``0 .. size-1`` index the subset."""

    def __init__(self, dataset: Dataset, count: Optional[int] = None):
        self.dataset = dataset
        self.indices = subset_indices(dataset, count)
        self.size = len(self.indices)
        self.tensors = in_memory(dataset, self.indices)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) and labels (B,) at subset positions ``idx``."""
        if self.tensors is not None:
            return self.tensors[0][idx], self.tensors[1][idx]
        items = [self.dataset[self.indices[int(i)]] for i in idx]
        return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])

    def order(self, batch_size: int, gen: Optional[torch.Generator]) -> list[torch.Tensor]:
        """One epoch's batches of positions, shuffled by ``gen`` (in order when None); a trailing
        batch of 1 joins the previous one (BatchNorm cannot train on a single sample)."""
        perm = (
            torch.randperm(self.size, generator=gen) if gen is not None else torch.arange(self.size)
        )
        chunks = list(perm.split(batch_size))
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
        return chunks

    def steps_per_epoch(self, batch_size: int) -> int:
        n = -(-self.size // batch_size)
        return n - 1 if n > 1 and self.size % batch_size == 1 else n

    def batches(
        self, batch_size: int, gen: Optional[torch.Generator] = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(x, y)`` batches in the order of :meth:`order`."""
        for idx in self.order(batch_size, gen):
            yield self.batch(idx)
