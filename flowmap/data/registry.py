"""Named data sets: ``get_dataset(name, **kwargs) -> DataSource``.

A ``DataSource`` describes one data set: ``data_shape``, ``num_classes`` (0 = unconditional), map-style
datasets and tensors for the ``train`` and ``val`` splits, and, for sets defined by a sampler (toy 2-D sets,
a Gaussian mixture registered by the caller), ``sample(n, generator)`` for fresh draws.

Every dataset item is ``(x, y)``: x (*data_shape) float32, y a long scalar, the class index or -1 when the
data are unconditional. New sets are added with ``register_dataset(name, factory)`` (factory(**kwargs) ->
DataSource, or a ``"module:attribute"`` string imported on first use) or ``register_sampler``. An installed
package adds its sets through the ``flowmap.datasets`` entry-point group (``name = "module:attribute"`` under
``[project.entry-points."flowmap.datasets"]`` in its pyproject.toml), found when a name is first asked for and
not registered; the core names no package of its own (the mixture teacher's ``gmm`` set is such an entry).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
from functools import partial
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from flowmap.data.digits import DIGITS_CLASSES, load_digits_tensors
from flowmap.data.images import UNCONDITIONAL_LABEL, ImageFolderDataset, cifar10_dataset
from flowmap.data.toy2d import TOY_SETS, sample_toy

SPLITS = ("train", "val")
# sampler(n, generator) -> x (n, *data_shape) or (x, y (n,) long)
Sampler = Callable[[int, Union[torch.Generator, None]], Union[Tensor, tuple[Tensor, Tensor]]]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return split


def unconditional_labels(n: int) -> Tensor:
    """(n,) long filled with -1: the label of unconditional data."""
    return torch.full((n,), UNCONDITIONAL_LABEL, dtype=torch.long)


def dataset_to_tensors(ds: Dataset) -> tuple[Tensor, Tensor]:
    """Stack a map-style dataset of (x, y) items into (x (N, ...), y (N,) long)."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1]
    if len(ds) == 0:
        raise ValueError("the dataset is empty")
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys]).long()


class DataSource:
    """A data set description. ``builders`` maps split -> zero-argument callable returning a Dataset of
    (x, y) items; datasets are built on first use and cached."""

    can_sample: bool = False

    def __init__(
        self, name: str, data_shape: tuple[int, ...], num_classes: int, builders: dict[str, Callable[[], Dataset]]
    ) -> None:
        self.name = name
        self.data_shape = tuple(int(d) for d in data_shape)
        self.num_classes = int(num_classes)
        self._builders = dict(builders)
        self._cache: dict[str, Dataset] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, data_shape={self.data_shape}, num_classes={self.num_classes})"
        )

    def has_split(self, split: str) -> bool:
        return _check_split(split) in self._builders

    def dataset(self, split: str = "train") -> Dataset:
        """Map-style dataset of (x (*data_shape), y long scalar) items for ``split`` (train | val)."""
        if not self.has_split(split):
            raise ValueError(f"data set {self.name!r} has no {split!r} split (available: {sorted(self._builders)})")
        if split not in self._cache:
            self._cache[split] = self._builders[split]()
        return self._cache[split]

    def tensors(self, split: str = "train") -> tuple[Tensor, Tensor]:
        """(x (N, *data_shape) float32, y (N,) long, -1 when unconditional); loads the whole split."""
        return dataset_to_tensors(self.dataset(split))

    def tensor_dataset(self, split: str = "train") -> TensorDataset:
        return TensorDataset(*self.tensors(split))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, *data_shape) fresh samples (sampled sets only)."""
        return self.sample_labeled(n, generator)[0]

    def sample_labeled(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        raise ValueError(f"data set {self.name!r} is a fixed set of files/arrays and cannot draw fresh samples")


class SampledSource(DataSource):
    """A data set defined by ``sampler(n, generator)``; its train / val splits are fixed draws of
    ``n_train`` / ``n_val`` samples from generators seeded by ``seed`` (different streams per split)."""

    can_sample = True

    def __init__(
        self,
        name: str,
        sampler: Sampler,
        data_shape: tuple[int, ...],
        num_classes: int = 0,
        n_train: int = 50_000,
        n_val: int = 5_000,
        seed: int = 0,
    ) -> None:
        if n_train < 1 or n_val < 0:
            raise ValueError(f"n_train must be >= 1 and n_val >= 0, got {n_train}, {n_val}")
        self.sampler = sampler
        self.n_train, self.n_val, self.seed = int(n_train), int(n_val), int(seed)
        builders = {"train": partial(self._draw_split, "train")}
        if n_val > 0:
            builders["val"] = partial(self._draw_split, "val")
        super().__init__(name, data_shape, num_classes, builders)

    def split_generator(self, split: str) -> torch.Generator:
        """The generator of one split: seeded by (seed, split), independent of the global RNG."""
        return torch.Generator().manual_seed(mix_seed(self.seed, SPLITS.index(_check_split(split))))

    def _draw_split(self, split: str) -> TensorDataset:
        n = self.n_train if split == "train" else self.n_val
        return TensorDataset(*self.sample_labeled(n, self.split_generator(split)))

    def sample_labeled(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x (n, *data_shape) float32, y (n,) long; -1 for unconditional sets)."""
        out = self.sampler(n, generator)
        x, y = out if isinstance(out, (tuple, list)) else (out, None)
        if tuple(x.shape) != (n, *self.data_shape):
            raise ValueError(
                f"the sampler of {self.name!r} returned shape {tuple(x.shape)}, expected {(n, *self.data_shape)}"
            )
        if y is None:
            if self.num_classes > 0:
                raise ValueError(f"the sampler of the class-conditional set {self.name!r} returned no labels")
            y = unconditional_labels(n)
        return x.float(), y.long().reshape(n)


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (stable across processes, unlike ``hash``)."""
    data = np.asarray(parts, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


# --- tensors from a file --------------------------------------------------------------------------


def load_tensor_file(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """(x, y or None) from ``.npz`` (arrays ``x``, ``y``; no pickles), ``.pt`` (a dict, ``weights_only``) or
    ``.safetensors``. uint8 image arrays (N, H, W, C) with C in (1, 3) become (N, C, H, W) in [-1, 1]; float
    arrays are taken as (N, *data_shape) in model space."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no data file at {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: torch.from_numpy(f[k]) for k in f.files}
    elif suffix in (".pt", ".pth"):
        from flowmap.io import load_torch_file  # the one loading policy (weights_only forced)

        arrays = load_torch_file(path, expected="a .pt data file holding a dict with a tensor 'x'")
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        arrays = load_file(str(path))
    else:
        raise ValueError(f"unsupported data file {str(path)!r}; use .npz, .pt or .safetensors")
    if not isinstance(arrays, dict) or "x" not in arrays:
        raise ValueError(f"{str(path)!r} must hold a mapping with an array 'x' (and optionally 'y')")
    x, y = torch.as_tensor(arrays["x"]), arrays.get("y")
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 'x' must be images (N, H, W, C) with C in (1, 3), got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    elif torch.is_floating_point(x):
        x = x.float()
    else:
        raise ValueError(f"'x' must be float or uint8, got {x.dtype}")
    if y is not None:
        y = torch.as_tensor(y).long().reshape(-1)
        if len(y) != len(x):
            raise ValueError(f"'x' has {len(x)} rows but 'y' has {len(y)}")
    return x.contiguous(), y


def tensor_source(
    name: str,
    x: Tensor,
    y: Tensor | None = None,
    num_classes: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> DataSource:
    """A DataSource over in-memory tensors; ``val_fraction`` > 0 holds out a seeded random share as ``val``.

    y (N,) long class labels (or None / all -1 for unconditional data); num_classes defaults to max(y) + 1."""
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"x must be (N, *data_shape) with N >= 1, got {tuple(x.shape)}")
    if y is None or bool((y < 0).all()):
        y, n_cls = unconditional_labels(len(x)), 0
    else:
        if bool((y < 0).any()):
            raise ValueError("labels must be all >= 0 (conditional) or all -1 (unconditional)")
        n_cls = int(y.max()) + 1 if num_classes is None else int(num_classes)
        if int(y.max()) >= n_cls:
            raise ValueError(f"labels reach {int(y.max())} but num_classes is {n_cls}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))
    n_val = int(round(val_fraction * len(x)))
    tr, va = perm[n_val:].sort().values, perm[:n_val].sort().values
    builders = {"train": lambda: TensorDataset(x[tr], y[tr])}
    if n_val > 0:
        builders["val"] = lambda: TensorDataset(x[va], y[va])
    return DataSource(name, tuple(x.shape[1:]), n_cls, builders)


# --- factories of the built-in sets -----------------------------------------------------------------


def _toy(name: str, n_train: int = 50_000, n_val: int = 5_000, seed: int = 0) -> SampledSource:
    return SampledSource(name, partial(sample_toy, name), (2,), 0, n_train=n_train, n_val=n_val, seed=seed)


def _digits(test_fraction: float = 0.2, seed: int = 0, image_size: int | None = None) -> DataSource:
    load = partial(load_digits_tensors, test_fraction=test_fraction, seed=seed, image_size=image_size)
    side = image_size or 8
    return DataSource(
        "digits",
        (1, side, side),
        DIGITS_CLASSES,
        {"train": lambda: TensorDataset(*load("train")), "val": lambda: TensorDataset(*load("test"))},
    )


def _image_folder(
    root: str,
    image_size: int | None = None,
    channels: int = 3,
    val_root: str | None = None,
    class_conditional: bool = True,
) -> DataSource:
    train = ImageFolderDataset(root, image_size=image_size, channels=channels)
    if not class_conditional:
        train.labels.fill_(UNCONDITIONAL_LABEL)
        train.num_classes = 0
    builders = {"train": lambda: train}
    if val_root is not None:

        def build_val() -> Dataset:
            val = ImageFolderDataset(val_root, image_size=image_size, channels=channels, classes=train.classes or None)
            if not class_conditional:
                val.labels.fill_(UNCONDITIONAL_LABEL)
            if val.data_shape != train.data_shape:
                raise ValueError(f"val images have shape {val.data_shape}, train images {train.data_shape}")
            return val

        builders["val"] = build_val
    return DataSource("image_folder", train.data_shape, train.num_classes, builders)


def _cifar10(root: str, image_size: int | None = None, class_conditional: bool = True) -> DataSource:
    train = cifar10_dataset(root, "train", image_size=image_size)
    builders: dict[str, Callable[[], Dataset]] = {"train": lambda: train}
    root_path = Path(root)
    if root_path.suffix != ".npz" and ((root_path / "test.npz").is_file() or (root_path / "test").is_dir()):
        builders["val"] = lambda: cifar10_dataset(root, "test", image_size=image_size)
    num_classes = 10
    if not class_conditional:
        builders = {k: partial(_unlabeled, b) for k, b in builders.items()}
        num_classes = 0
    return DataSource("cifar10", train.data_shape, num_classes, builders)


def _unlabeled(build: Callable[[], Dataset]) -> Dataset:
    ds = build()
    ds.labels = unconditional_labels(len(ds))
    return ds


def _tensor_file(path: str, val_fraction: float = 0.0, seed: int = 0, num_classes: int | None = None) -> DataSource:
    x, y = load_tensor_file(path)
    return tensor_source(Path(path).stem, x, y, num_classes=num_classes, val_fraction=val_fraction, seed=seed)


# --- the registry --------------------------------------------------------------------------------

Factory = Union[Callable[..., DataSource], str]
DATASETS: dict[str, Factory] = {name: partial(_toy, name) for name in TOY_SETS}
DATASETS.update({"digits": _digits, "image_folder": _image_folder, "cifar10": _cifar10, "tensor_file": _tensor_file})
ENTRY_POINT_GROUP = "flowmap.datasets"


def register_dataset(name: str, factory: Factory, overwrite: bool = False) -> None:
    """Add ``name`` -> ``factory(**kwargs) -> DataSource`` (or a ``"package.module:attribute"`` string,
    imported when the set is first requested, so configs can name sets from outside the core)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a data set name must be a non-empty string, got {name!r}")
    if name in DATASETS and not overwrite:
        raise ValueError(f"data set {name!r} is already registered (pass overwrite=True to replace it)")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"a factory string must look like 'package.module:attribute', got {factory!r}")
    if not isinstance(factory, str) and not callable(factory):
        raise ValueError(f"the factory of {name!r} must be callable or a 'module:attribute' string")
    DATASETS[name] = factory


def register_sampler(
    name: str, sampler: Sampler, data_shape: tuple[int, ...], num_classes: int = 0, overwrite: bool = False
) -> None:
    """Register a sampled set: ``get_dataset(name, n_train=..., n_val=..., seed=...)`` -> SampledSource."""

    def factory(n_train: int = 50_000, n_val: int = 5_000, seed: int = 0) -> SampledSource:
        return SampledSource(name, sampler, data_shape, num_classes, n_train=n_train, n_val=n_val, seed=seed)

    register_dataset(name, factory, overwrite=overwrite)


def _resolve(name: str) -> Callable[..., DataSource]:
    factory = DATASETS[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"data set {name!r}: cannot import its factory {DATASETS[name]!r} ({err})") from err
        DATASETS[name] = factory
    return factory


def register_entry_points() -> None:
    """Register, as ``"module:attribute"`` strings imported on first use, the sets installed packages declare in
    the ``flowmap.datasets`` entry-point group; a name already registered keeps its factory."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in DATASETS:
            register_dataset(ep.name, ep.value.split("[")[0].strip())


def get_dataset(name: str, **kwargs) -> DataSource:
    """The DataSource ``name`` built with ``kwargs``; one ValueError for an unknown name or argument."""
    if name not in DATASETS:
        register_entry_points()
    if name not in DATASETS:
        raise ValueError(
            f"unknown data set {name!r}; known: {sorted(DATASETS)} (installed packages add sets through the "
            f"{ENTRY_POINT_GROUP!r} entry points: reinstall flowmap with `pip install -e .` if one is missing)"
        )
    factory = _resolve(name)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"data set {name!r}: bad arguments {sorted(kwargs)} ({err}); signature {inspect.signature(factory)}"
        ) from err
    source = factory(**kwargs)
    if not isinstance(source, DataSource):
        raise ValueError(f"the factory of {name!r} returned {type(source).__name__}, not a DataSource")
    return source
