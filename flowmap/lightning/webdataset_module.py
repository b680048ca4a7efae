"""WebDataModule: train from any standard webdataset shard set (``flowmap.data.webdataset_source``); wiring only.

    data:
      class_path: flowmap.lightning.webdataset_module.WebDataModule
      init_args: {shards: "data/train-{000000..000127}.tar", image_size: 64, batch_size: 256, num_workers: 4}

The rank and world size come from the Trainer. Resume (the position in the stream) and the damage report
(``data/corrupt_samples``) are those of ``StreamDataModule``, as for ``ShardDataModule``.
"""

from __future__ import annotations

from flowmap.data.webdataset_source import Decoding, WebDatasetStream
from flowmap.lightning.streaming import StreamDataModule


class WebDataModule(StreamDataModule):
    """Training batches ``(x (B, C, S, S) in [-1, 1], y (B,))`` (a dict with ``caption`` when ``captions``).

    Args:
        shards: brace pattern or URL list (``data/train-{000000..000127}.tar``), local glob, or directory
            (its flowmap ``index.json`` when present, else its ``*.tar``).
        image_size: side S of the student's images: every image is centre-cropped and resized to S x S.
        channels: 3 (RGB) or 1 (grayscale).
        num_classes: 0 for unconditional training (labels ignored), else labels from ``.cls`` / ``.json``.
        captions: add the captions (``.txt`` / ``.json``) to the batch as strings.
        batch_size, epoch_length, shuffle_buffer, num_workers, seed, resample, max_corrupt_fraction,
            corrupt_window, corrupt_min_samples, timeout: the stream's options (``StreamDataModule``).
        label_key, caption_key: fields of the ``.json`` member.
    """

    def __init__(
        self,
        shards: str,
        image_size: int,
        channels: int = 3,
        num_classes: int = 0,
        captions: bool = False,
        label_key: str = "label",
        caption_key: str = "caption",
        **kwargs,
    ) -> None:
        self.shards = shards
        self.decoding = Decoding(image_size, channels, num_classes, captions, label_key, caption_key)
        super().__init__(**kwargs)
        self.data_shape: tuple[int, ...] = self._stream(0, 1).data_shape  # validates arguments and shards now
        self.num_classes: int = self.decoding.num_classes

    def _stream(self, rank: int, world: int) -> WebDatasetStream:
        return WebDatasetStream(self.shards, self.decoding, self.options_for(rank, world))

    def setup(self, stage: str) -> None:
        """On every rank before training: the shard list resolves and feeds every (rank, worker) reader."""
        self._stream(*self._rank_world()).check_slots()
