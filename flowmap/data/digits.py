"""scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16, 10 classes) as tensors.

Images are (N, 1, 8, 8) float32 in [-1, 1] (x / 8 - 1), labels (N,) long in 0..9; the train/test split is a
seeded permutation, so it is the same on every machine and every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10
SPLITS = ("train", "test", "all")


def _load_all() -> tuple[Tensor, Tensor]:
    """All 1797 images (N, 1, 8, 8) in [-1, 1] and labels (N,) long, in scikit-learn's order."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    x = x / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    return x, y


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random split of range(n) into (train indices, test indices), both sorted."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_test = int(round(test_fraction * n))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def load_digits_tensors(
    split: str = "train", test_fraction: float = 0.2, seed: int = 0, image_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """(x (N, 1, S, S) float32 in [-1, 1], y (N,) long in 0..9) for ``split`` in train | test | all.

    ``image_size`` (optional) resizes the 8x8 images bilinearly (e.g. 16 for a U-Net with two downsamplings)."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose from {SPLITS}")
    x, y = _load_all()
    if split != "all":
        train_idx, test_idx = split_indices(len(x), test_fraction, seed)
        idx = train_idx if split == "train" else test_idx
        x, y = x[idx], y[idx]
    if image_size is not None and image_size != x.shape[-1]:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(-1.0, 1.0)
    return x.contiguous(), y
