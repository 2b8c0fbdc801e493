"""Build the built-in MNIST sample shipped with the package (``cure_lirpa/assets/mnist_sample.npz``).

Run ``python -m cure_lirpa.sample --mnist-root ../shared/data``: it takes a class-balanced, seeded
subset of the real MNIST train and test sets (raw idx files under ``ROOT/MNIST/raw``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .data import SAMPLE_PATH


def _read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random samples of every class, shuffled."""
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    )
    return rng.permutation(idx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mnist-root", default="../shared/data")
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(SAMPLE_PATH))
    args = parser.parse_args()
    raw = Path(args.mnist_root) / "MNIST" / "raw"
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, prefix, per_class in (
        ("train", "train", args.train_per_class),
        ("test", "t10k", args.test_per_class),
    ):
        x = _read_idx(raw / f"{prefix}-images-idx3-ubyte")
        y = _read_idx(raw / f"{prefix}-labels-idx1-ubyte")
        keep = balanced_subset(y, per_class, rng)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x[keep], y[keep].astype(np.int64)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
