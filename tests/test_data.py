"""Training and evaluation subsets: every class of class-sorted data, the same pixels in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets, transforms

from cure_lirpa.data import TrainData, in_memory, load_dataset, sample_order, subset_indices, take
from cure_lirpa.errors import UserError


def _sorted_imagefolder(root: Path, classes: int = 4, per_class: int = 5) -> datasets.ImageFolder:
    """An ImageFolder (sorted by class by construction) of small PNGs whose pixels name the class."""
    from PIL import Image

    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((6, 6, 3), 40 * c + i, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return datasets.ImageFolder(str(root), transform=transforms.ToTensor())


def test_subset_of_class_sorted_data_covers_every_class(tmp_path):
    folder = _sorted_imagefolder(tmp_path / "train")
    assert folder.targets == sorted(folder.targets)  # the premise: one block per class
    for count in (4, 7, 12):
        idx = list(subset_indices(folder, count))
        assert len(idx) == len(set(idx)) == count
        assert {folder.targets[i] for i in idx} == {0, 1, 2, 3}
    assert list(subset_indices(folder, None)) == list(range(20))
    assert list(subset_indices(folder, 99)) == list(range(20))


def test_sample_order_interleaves_classes_and_take_follows_it(tmp_path):
    folder = _sorted_imagefolder(tmp_path / "train", classes=3, per_class=4)
    order = list(sample_order(folder))
    assert sorted(order) == list(range(12))  # a permutation: nothing lost, nothing twice
    assert [folder.targets[i] for i in order] == [0, 1, 2] * 4
    shard = take(folder, start=3, count=3)  # a --start/--count shard: one image of each class
    assert sorted(folder.targets[i] for i in shard.indices) == [0, 1, 2]
    assert list(take(folder, 9).indices) == order[9:]
    sample = load_dataset("sample", "test")
    assert list(take(sample, 5, 3).indices) == [5, 6, 7]  # stored order kept


def test_subset_of_shuffled_data_is_the_first_images():
    sample = load_dataset("sample", "train")
    assert list(subset_indices(sample, 10)) == list(range(10))
    with pytest.raises(UserError, match="at least one sample"):
        subset_indices(sample, 0)


def test_in_memory_holds_the_same_pixels_and_labels(tmp_path):
    folder = _sorted_imagefolder(tmp_path / "train")
    idx = subset_indices(folder, 6)
    x, y = in_memory(folder, idx)
    for k, i in enumerate(idx):
        image, label = folder[i]
        assert torch.equal(x[k], image) and int(y[k]) == label
    assert in_memory(folder, idx, max_mb=1e-6) is None  # too large: callers read per item

    sample = load_dataset("sample", "train")
    x, y = in_memory(sample, [3, 1])
    assert torch.equal(x[0], sample[3][0]) and int(y[1]) == int(sample[1][1])


def test_train_data_batches_come_from_the_subset_with_and_without_memory(tmp_path):
    folder = _sorted_imagefolder(tmp_path / "train")
    data = TrainData(folder, 8)
    assert data.size == 8 and data.tensors is not None
    per_item = TrainData(folder, 8)
    per_item.tensors = None  # the path large datasets take
    order = torch.arange(8)
    xa, ya = data.batch(order)
    xb, yb = per_item.batch(order)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert set(ya.tolist()) == {0, 1, 2, 3}


def test_cifar10_imagefolder_needs_ten_classes_and_both_splits(tmp_path):
    for split in ("train", "test"):
        _sorted_imagefolder(tmp_path / "three" / split, classes=3, per_class=1)
    with pytest.raises(UserError, match="holds 3 class folders, but cifar10 has 10"):
        load_dataset("cifar10", "train", str(tmp_path / "three"))
    from PIL import Image

    for c in range(10):
        (tmp_path / "no-train" / "test" / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "no-train" / "test" / f"c{c}" / "0.png")
    with pytest.raises(UserError, match="no train/ folder"):
        load_dataset("cifar10", "test", str(tmp_path / "no-train"))


def test_empty_cifar10_batches_folder_is_explained(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(UserError, match="data_batch_1"):
        load_dataset("cifar10", "test", str(tmp_path))
