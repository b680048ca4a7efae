"""LightningDataModules over ``flowmap.data``: wiring only.

Batch convention (every module here): a batch is a pair ``(x, y)``; x (B, *data_shape) float32, y (B,) long,
the class index, or -1 everywhere for unconditional data (``flowmap.lightning.batches.unpack_batch`` turns
an all-negative y into ``cond = None``). Training loaders shuffle and drop the last partial batch; all
datasets are map-style, so under DDP Lightning swaps in a DistributedSampler and every rank sees its own
shard with the same number of batches. ``data_shape`` and ``num_classes`` are set in ``__init__`` (the CLI
links them into the model). There is no ``val_dataloader`` (the modules have no validation step);
``val_tensors()`` gives held-out data to evaluation code.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flowmap.data.registry import DataSource, SampledSource, get_dataset, load_tensor_file, mix_seed, tensor_source


class FreshSampleDataset(Dataset):
    """``length`` items, each a fresh draw from ``source.sample_labeled``. A batch of indices is drawn in one
    call (``__getitems__``) from a generator seeded by (seed, indices), so a run is reproducible given the
    sampler's index order (which Lightning re-seeds every epoch) and different epochs see different data."""

    def __init__(self, source: DataSource, length: int, seed: int = 0) -> None:
        if not source.can_sample:
            raise ValueError(f"data set {source.name!r} cannot draw fresh samples (fresh=True needs a sampled set)")
        self.source, self.length, self.seed = source, int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, *indices))
        x, y = self.source.sample_labeled(len(indices), g)
        return list(zip(x.unbind(0), y.unbind(0)))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.__getitems__([i])[0]


class SourceDataModule(L.LightningDataModule):
    """A DataModule over any ``DataSource``: shuffled, drop_last training batches ``(x, y)``."""

    def __init__(self, source: DataSource, batch_size: int = 256, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.source = source
        self.batch_size, self.seed, self.num_workers = int(batch_size), int(seed), int(num_workers)
        self.data_shape: tuple[int, ...] = source.data_shape
        self.num_classes: int = source.num_classes

    def train_set(self) -> Dataset:
        return self.source.dataset("train")

    def train_dataloader(self) -> DataLoader:
        ds = self.train_set()
        if len(ds) < self.batch_size:
            raise ValueError(f"the training set has {len(ds)} samples, fewer than one batch of {self.batch_size}")
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_tensors(self) -> tuple[Tensor, Tensor]:
        """Held-out (x (N, *data_shape), y (N,)); the training set when the data set has no val split."""
        return self.source.tensors("val" if self.source.has_split("val") else "train")

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Fresh (n, *data_shape) samples (sampled sets only)."""
        return self.source.sample(n, generator)


class DatasetDataModule(SourceDataModule):
    """Any registered data set by name: ``get_dataset(dataset, **dataset_kwargs)`` (e.g. cifar10, gmm)."""

    def __init__(
        self,
        dataset: str,
        dataset_kwargs: dict[str, Any] | None = None,
        batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(get_dataset(dataset, **dict(dataset_kwargs or {})), batch_size, seed, num_workers)


class ToyDataModule(SourceDataModule):
    """A sampled set (toy 2-D sets, or any set registered with a sampler): a fixed seeded draw of ``n_train``
    points reshuffled every epoch, or with ``fresh=True`` new samples for every batch (epoch = n_train / batch).
    ``dataset_kwargs`` go to the set's factory besides n_train, n_val, seed (e.g. parameters of a registered gmm)."""

    def __init__(
        self,
        name: str = "checkerboard",
        n_train: int = 100_000,
        n_val: int = 5_000,
        batch_size: int = 256,
        seed: int = 0,
        fresh: bool = False,
        num_workers: int = 0,
        dataset_kwargs: dict[str, Any] | None = None,
    ) -> None:
        source = get_dataset(name, n_train=n_train, n_val=n_val, seed=seed, **dict(dataset_kwargs or {}))
        if not isinstance(source, SampledSource):
            raise ValueError(f"ToyDataModule needs a sampled data set, {name!r} is not one; use DatasetDataModule")
        super().__init__(source, batch_size, seed, num_workers)
        self.fresh = bool(fresh)

    def train_set(self) -> Dataset:
        if self.fresh:
            return FreshSampleDataset(self.source, self.source.n_train, seed=self.seed)
        return self.source.dataset("train")


class DigitsDataModule(SourceDataModule):
    """scikit-learn digits: (1, S, S) images in [-1, 1] (S = 8 or ``image_size``), 10 classes
    (``class_conditional=False`` drops the labels)."""

    def __init__(
        self,
        batch_size: int = 128,
        seed: int = 0,
        test_fraction: float = 0.2,
        image_size: int | None = None,
        class_conditional: bool = True,
        num_workers: int = 0,
    ) -> None:
        source = get_dataset("digits", test_fraction=test_fraction, seed=seed, image_size=image_size)
        if not class_conditional:
            source = _drop_labels(source)
        super().__init__(source, batch_size, seed, num_workers)


class ImageFolderDataModule(SourceDataModule):
    """Images under ``root`` (one subfolder per class, or flat = unconditional), (C, S, S) in [-1, 1]."""

    def __init__(
        self,
        root: str,
        image_size: int | None = None,
        channels: int = 3,
        batch_size: int = 64,
        seed: int = 0,
        val_root: str | None = None,
        class_conditional: bool = True,
        num_workers: int = 0,
    ) -> None:
        source = get_dataset(
            "image_folder",
            root=root,
            image_size=image_size,
            channels=channels,
            val_root=val_root,
            class_conditional=class_conditional,
        )
        super().__init__(source, batch_size, seed, num_workers)


class TensorDataModule(SourceDataModule):
    """Arrays from a file (``.npz`` / ``.pt`` / ``.safetensors`` with ``x`` and optional ``y``; see
    ``flowmap.data.registry.load_tensor_file``), e.g. teacher samples saved to disk. Tensors in memory need no
    module of their own: ``SourceDataModule(tensor_source("tensors", x, y), batch_size, seed, num_workers)``."""

    def __init__(
        self,
        path: str,
        batch_size: int = 256,
        seed: int = 0,
        val_fraction: float = 0.0,
        num_classes: int | None = None,
        num_workers: int = 0,
    ) -> None:
        x, y = load_tensor_file(path)
        source = tensor_source("tensor_file", x, y, num_classes=num_classes, val_fraction=val_fraction, seed=seed)
        super().__init__(source, batch_size, seed, num_workers)


def _drop_labels(source: DataSource) -> DataSource:
    """The same data with every label -1 and num_classes 0."""
    splits = [s for s in ("train", "val") if source.has_split(s)]
    tensors = {s: source.tensors(s) for s in splits}
    from torch.utils.data import TensorDataset

    builders = {s: (lambda s=s: TensorDataset(tensors[s][0], torch.full_like(tensors[s][1], -1))) for s in splits}
    return DataSource(source.name, source.data_shape, 0, builders)
