"""WebDataModule: train from any standard webdataset shard set (``flowmap.data.webdataset_source``); wiring only.

    data:
      class_path: flowmap.lightning.webdataset_module.WebDataModule
      init_args: {shards: "data/train-{000000..000127}.tar", image_size: 64, batch_size: 256, num_workers: 4}

The rank and world size come from the Trainer. Resume (the position in the stream) and the damage report
(``data/corrupt_samples``) are those of ``ShardDataModule``, which this module extends with another stream.
"""

from __future__ import annotations

import lightning as L

from flowmap.data.slot_stream import taken_by
from flowmap.data.webdataset_source import WebDatasetStream
from flowmap.lightning.streaming import ShardDataModule


class WebDataModule(ShardDataModule):
    """Training batches ``(x (B, C, S, S) in [-1, 1], y (B,))`` (a dict with ``caption`` when ``captions``).

    Args:
        shards: brace pattern or URL list (``data/train-{000000..000127}.tar``), local glob, or directory
            (its flowmap ``index.json`` when present, else its ``*.tar``).
        image_size: side S of the student's images: every image is centre-cropped and resized to S x S.
        channels: 3 (RGB) or 1 (grayscale).
        num_classes: 0 for unconditional training (labels ignored), else labels from ``.cls`` / ``.json``.
        captions: add the captions (``.txt`` / ``.json``) to the batch as strings.
        batch_size, epoch_length, shuffle_buffer, num_workers, seed, resample, max_corrupt_fraction,
            corrupt_window, corrupt_min_samples, timeout: as in ``ShardDataModule``.
        label_key, caption_key: fields of the ``.json`` member.
    """

    def __init__(
        self,
        shards: str,
        image_size: int,
        channels: int = 3,
        num_classes: int = 0,
        captions: bool = False,
        batch_size: int = 256,
        epoch_length: int = 1000,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        resample: bool = True,
        max_corrupt_fraction: float = 0.01,
        corrupt_window: int = 100_000,
        corrupt_min_samples: int = 100,
        timeout: float = 0,
        label_key: str = "label",
        caption_key: str = "caption",
    ) -> None:
        L.LightningDataModule.__init__(self)  # ShardDataModule's own __init__ reads a flowmap index.json
        self.shards = shards
        # the stream's options (``_stream`` adds the shards, rank and world size)
        self.kwargs = taken_by(WebDatasetStream, locals())
        self.num_workers, self.seed, self.timeout = int(num_workers), int(seed), float(timeout)
        self.data_shape: tuple[int, ...] = self._stream(0, 1).data_shape  # validates arguments and shards now
        self.num_classes: int = int(num_classes)
        self.loader = None
        self._resume = None
        self._logged_bad = 0

    def _stream(self, rank: int, world: int) -> WebDatasetStream:
        return WebDatasetStream(self.shards, rank=rank, world_size=world, **self.kwargs)

    def setup(self, stage: str) -> None:
        """On every rank before training: the shard list resolves and feeds every (rank, worker) reader."""
        self._stream(*self._rank_world()).check_slots()
