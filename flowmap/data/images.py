"""Image data from files: a folder of images (one subfolder per class, or a flat folder for unconditional
data) and CIFAR-10 "as files" (PNG folders ``<root>/<split>/<class>/*.png`` or ``.npz`` arrays).

Every dataset here is map-style (works with DistributedSampler) and yields ``(x, y)``: x (C, H, W) float32
in [-1, 1] (uint8 v -> v / 127.5 - 1), y a long scalar: the class index, or -1 for unconditional data.
Python pickles are never read (``np.load(..., allow_pickle=False)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
UNCONDITIONAL_LABEL = -1


def uint8_to_model(x: Tensor) -> Tensor:
    """uint8 values 0..255 -> float32 in [-1, 1]: v / 127.5 - 1."""
    return x.float() / 127.5 - 1.0


def model_to_uint8(x: Tensor) -> Tensor:
    """float in [-1, 1] -> uint8 0..255 (clamped, rounded): inverse of ``uint8_to_model``."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def find_images(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, class names) under ``root``.

    Subfolders of ``root`` are classes (sorted names, or the order of ``classes`` when given); a root with
    images but no subfolders is unconditional (labels -1, no class names)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        paths = sorted(p for p in root.iterdir() if _is_image(p))
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) and no class subfolders in {str(root)!r}")
        return paths, [UNCONDITIONAL_LABEL] * len(paths), []
    names = [p.name for p in subdirs]
    if classes is None:
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ValueError(
                f"class folder(s) {unknown} in {str(root)!r} are not among the known classes {list(classes)}"
            )
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for d in subdirs:
        files = sorted(p for p in d.rglob("*") if _is_image(p))
        paths += files
        labels += [index[d.name]] * len(files)
    if not paths:
        raise ValueError(f"the class folders of {str(root)!r} hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, list(classes)


def load_image(path: str | Path, image_size: int | None = None, channels: int = 3) -> Tensor:
    """One image file -> (C, H, W) float32 in [-1, 1]; with ``image_size`` centre-cropped to a square and
    resized to (image_size, image_size) (bicubic)."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if image_size is not None:
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            if side != image_size:
                img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8).copy()
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return uint8_to_model(torch.from_numpy(arr).permute(2, 0, 1))


class ImageFolderDataset(Dataset):
    """Images read lazily from ``root`` (see ``find_images``); item i -> (x (C, H, W) in [-1, 1], y long).

    Without ``image_size`` every image must have the size of the first one."""

    def __init__(
        self, root: str | Path, image_size: int | None = None, channels: int = 3, classes: Sequence[str] | None = None
    ) -> None:
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.paths, labels, self.classes = find_images(self.root, classes)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.image_size = image_size
        self.channels = channels
        first = load_image(self.paths[0], image_size, channels)
        self.data_shape: tuple[int, ...] = tuple(first.shape)
        self.num_classes: int = len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = load_image(self.paths[i], self.image_size, self.channels)
        if tuple(x.shape) != self.data_shape:
            raise ValueError(
                f"image {str(self.paths[i])!r} has shape {tuple(x.shape)}, expected {self.data_shape}; "
                "pass image_size to resize"
            )
        return x, self.labels[i]


class UInt8ImageDataset(Dataset):
    """In-memory uint8 images (N, H, W, C) (kept as uint8: 4x smaller than float) -> (x (C, H', W') in [-1, 1], y).

    ``labels`` (N,) long, or None for unconditional data (y = -1)."""

    def __init__(
        self,
        images: np.ndarray | Tensor,
        labels: np.ndarray | Tensor | None = None,
        num_classes: int | None = None,
        image_size: int | None = None,
    ) -> None:
        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 (N, H, W, C) with C in (1, 3), got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images
        if labels is None:
            self.labels = torch.full((len(images),), UNCONDITIONAL_LABEL, dtype=torch.long)
            self.num_classes = 0
        else:
            self.labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
            if len(self.labels) != len(images):
                raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
            if len(self.labels) and int(self.labels.min()) < 0:
                raise ValueError("class labels must be >= 0")
            found = int(self.labels.max()) + 1 if len(self.labels) else 0
            self.num_classes = int(num_classes) if num_classes is not None else found
            if found > self.num_classes:
                raise ValueError(f"labels reach {found - 1} but num_classes is {self.num_classes}")
        self.image_size = image_size
        h, w, c = images.shape[1:]
        self.data_shape: tuple[int, ...] = (c, image_size, image_size) if image_size else (c, h, w)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = uint8_to_model(self.images[i].permute(2, 0, 1))
        if self.image_size and tuple(x.shape[1:]) != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bicubic", antialias=True)[0].clamp(-1, 1)
        return x, self.labels[i]


def load_npz_images(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An ``.npz`` with ``x`` (N, H, W, C) uint8 and optional ``y`` (N,) ints -> (x, y or None); no pickles."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no .npz file at {str(path)!r}")
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data.files:
            raise ValueError(f"{str(path)!r} has no array 'x' (found {data.files})")
        x = data["x"]
        y = data["y"] if "y" in data.files else None
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"'x' in {str(path)!r} must be uint8 (N, H, W, C), got {x.dtype} {x.shape}")
    return x, y


def cifar10_dataset(root: str | Path, split: str = "train", image_size: int | None = None) -> Dataset:
    """CIFAR-10 from files (never the python-pickle batches). ``root`` may be

    - an ``.npz`` file with ``x`` (N, 32, 32, 3) uint8 and ``y`` (N,) labels 0..9;
    - a directory holding ``<split>.npz``;
    - a directory holding ``<split>/<class>/*.png`` with the ten CIFAR-10 class names as folders.
    Labels follow ``CIFAR10_CLASSES`` (alphabetical, as in the original release)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown CIFAR-10 split {split!r}; choose train or test")
    root = Path(root)
    if root.suffix == ".npz":
        npz = root
    elif (root / f"{split}.npz").is_file():
        npz = root / f"{split}.npz"
    elif (root / split).is_dir():
        return ImageFolderDataset(root / split, image_size=image_size, channels=3, classes=CIFAR10_CLASSES)
    else:
        raise ValueError(f"no CIFAR-10 {split} data under {str(root)!r}: expected {split}.npz or {split}/<class>/*.png")
    x, y = load_npz_images(npz)
    return UInt8ImageDataset(x, y, num_classes=len(CIFAR10_CLASSES), image_size=image_size)


def write_image_folder(
    images: np.ndarray | Tensor,
    labels: Sequence[int] | np.ndarray | Tensor | None,
    root: str | Path,
    classes: Sequence[str] | None = None,
) -> list[Path]:
    """Write uint8 (N, H, W, C) images as PNGs ``root/<class>/<i>.png`` (flat ``root/<i>.png`` without labels)."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, H, W, C) with C in (1, 3), got {images.dtype} {images.shape}")
    root = Path(root)
    written = []
    for i, img in enumerate(images):
        if labels is None:
            folder = root
        else:
            label = int(labels[i])
            folder = root / (classes[label] if classes is not None else f"{label:04d}")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.png"
        Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img).save(path)
        written.append(path)
    return written
