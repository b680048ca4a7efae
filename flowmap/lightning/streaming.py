"""ShardDataModule: stream training batches from webdataset tar shards (``flowmap.data.shards``); wiring only.

    data:
      class_path: flowmap.lightning.streaming.ShardDataModule
      init_args: {root: data/cb, batch_size: 1024, epoch_length: 1000, num_workers: 4}

Every rank yields exactly ``epoch_length`` batches per epoch (no uneven-batch deadlock under DDP); the rank and
world size come from the Trainer, not from environment variables. Before training (``setup``) the module
checks that the shard directory, its index and every shard file exist and that there are enough shards for
ranks x workers, raising one ValueError on every rank otherwise. Damaged samples are skipped, counted
(``data/corrupt_samples`` in the logger, a warning in the log) and stop the run when more than
``max_corrupt_fraction`` of the last ``corrupt_window`` samples a reader tried were damaged (counts run on
across epochs, so short epochs cannot hide damage). The loader is resumable: the checkpoint stores (epoch, batches
consumed) and a resumed run skips exactly those batches, so it sees the same data as an uninterrupted run.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from flowmap.data.shards import ShardIndex, ShardStream, read_index
from flowmap.data.slot_stream import SlotStream, StreamOptions, taken_by

log = logging.getLogger("flowmap.lightning.streaming")


class ShardLoader(DataLoader):
    """A DataLoader over a ``ShardStream`` that tells the stream its epoch before each pass and, after a resume,
    skips the batches the interrupted run had already consumed. ``state_dict`` / ``load_state_dict`` make it
    resumable in Lightning's sense."""

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int,
        epoch_fn: Callable[[], int | None],
        seed: int = 0,
        timeout: float = 0,
    ) -> None:
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=False,
            timeout=timeout,
            generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched by loader start-up
        )
        self.epoch_fn = epoch_fn  # the trainer's epoch, or None: then passes are counted here
        self.epoch, self.consumed, self.passes = 0, 0, 0
        self.resume_at: tuple[int, int] | None = None

    def __iter__(self):
        epoch = self.epoch_fn()
        self.epoch = int(epoch) if epoch is not None else self.passes
        if self.resume_at is not None and self.resume_at[1] >= len(self.dataset):  # saved after an epoch's last
            self.resume_at = (self.resume_at[0] + 1, 0)  # batch: Lightning goes on with the next epoch in this pass
            self.epoch = max(self.epoch, self.resume_at[0])
        self.passes += 1
        self.dataset.set_epoch(self.epoch)  # copied into the workers, which start with each pass
        it = super().__iter__()
        skip = 0
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            skip = min(self.resume_at[1], len(self.dataset))
        self.resume_at = None
        for _ in range(skip):
            next(it)
        self.consumed = skip
        return it

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = (int(state["epoch"]), int(state["consumed"]))


class StreamDataModule(L.LightningDataModule):
    """What the streamed data modules share (``ShardDataModule``, ``WebDataModule``): the stream's reader options,
    the resumable loader and the damage report. This ``__init__`` builds the stream's ``StreamOptions`` once
    (``self.options``, for rank 0 of 1); a subclass keeps its own options (and its ``data_shape``, ``num_classes``),
    hands the rest to this ``__init__`` and implements ``_stream(rank, world)`` with ``self.options_for(rank, world)``.

    Args:
        batch_size: per-rank batch size.
        epoch_length: batches per rank per epoch (the same on every rank).
        shuffle_buffer: samples in the shuffle buffer of each reader (0: stream order).
        num_workers: DataLoader worker processes per rank.
        seed: seeds shard order and shuffling (mixed with epoch, rank and worker).
        resample: draw shards with replacement (webdataset's ResampledShards) or, if False, in reshuffled passes.
        max_corrupt_fraction: share of damaged samples (per reader, over its last ``corrupt_window`` samples)
            beyond which training stops with ``CorruptShardError``.
        corrupt_window: samples (per reader) over which the damaged share is judged; it slides across epochs.
        corrupt_min_samples: samples a reader must have tried before the share is judged.
        timeout: seconds to wait for a worker's batch before failing (0: no limit).
    """

    def __init__(
        self,
        batch_size: int = 256,
        epoch_length: int = 1000,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        resample: bool = True,
        max_corrupt_fraction: float = 0.01,
        timeout: float = 0,
        corrupt_window: int = 100_000,
        corrupt_min_samples: int = 100,
    ) -> None:
        super().__init__()
        self.options = StreamOptions(**taken_by(StreamOptions, locals()), rank=0, world_size=1)
        self.num_workers, self.seed, self.timeout = int(num_workers), int(seed), float(timeout)
        self.loader: ShardLoader | None = None
        self._resume: dict[str, int] | None = None
        self._logged_bad = 0

    def _stream(self, rank: int, world: int) -> SlotStream:
        raise NotImplementedError

    def options_for(self, rank: int, world: int) -> StreamOptions:
        """The stream's options for process ``rank`` of ``world``."""
        return replace(self.options, rank=rank, world_size=world)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def train_dataloader(self) -> ShardLoader:
        rank, world = self._rank_world()
        stream = self._stream(rank, world)
        self.loader = ShardLoader(stream, self.num_workers, self._current_epoch, seed=self.seed, timeout=self.timeout)
        if self._resume:
            self.loader.load_state_dict(self._resume)
            self._resume = None
        return self.loader

    def _current_epoch(self) -> int | None:
        trainer = self._trainer_or_none()
        return int(trainer.current_epoch) if trainer is not None else None

    # --- resume and damage accounting ---------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Called once per training batch: counts consumed batches (for resume) and reports new damage."""
        trainer = self._trainer_or_none()
        if self.loader is not None and (trainer is None or trainer.training):
            self.loader.consumed += 1
            good, bad = self.loader.dataset.counts()
            if bad > self._logged_bad:
                self._logged_bad = bad
                rank = trainer.global_rank if trainer is not None else 0
                log.warning("rank %d: %d damaged sample(s) skipped so far (%d read intact)", rank, bad, good)
                if trainer is not None and trainer.is_global_zero:
                    for logger in trainer.loggers:
                        logger.log_metrics({"data/corrupt_samples": float(bad)}, step=trainer.global_step)
        return batch

    def corrupt_samples(self) -> int:
        """Damaged samples skipped so far by this rank's readers."""
        return self.loader.dataset.counts()[1] if self.loader is not None else 0

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict() if self.loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume = dict(state_dict)
            if self.loader is not None:
                self.loader.load_state_dict(self._resume)


class ShardDataModule(StreamDataModule):
    """Training batches ``(x (B, *shape), y (B,))`` streamed from the shard directory ``root``.

    Args:
        root: directory written by ``scripts/make_shards.py`` (``index.json`` + ``shard-*.tar``).
        split: ``by_shard`` (each rank x worker reads its own shards, resampled) or ``by_rank`` (every reader
            reads all shards and keeps every (ranks x workers)-th sample: deterministic, any shard count).
        batch_size, epoch_length, shuffle_buffer, num_workers, seed, resample, max_corrupt_fraction, corrupt_window,
            corrupt_min_samples, timeout: the stream's options (``StreamDataModule``).
    """

    def __init__(self, root: str, split: str = "by_shard", **kwargs) -> None:
        self.index: ShardIndex = read_index(root)  # a missing directory or index fails here, before anything else
        self.root = str(root)
        self.split = split
        super().__init__(**kwargs)
        self.data_shape: tuple[int, ...] = self.index.shape
        self.num_classes: int = self.index.num_classes
        self._stream(0, 1)  # validates the arguments and the shard count for one process now

    def _stream(self, rank: int, world: int) -> ShardStream:
        return ShardStream(self.root, self.options_for(rank, world), self.split)

    def check_files(self) -> None:
        """Every shard the index lists must exist; a size that differs from the index is logged as damage."""
        missing = [p.name for p in self.index.paths if not p.is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} shard file(s) listed in {self.root}/index.json are missing: {missing[:5]}"
            )
        for path, shard in zip(self.index.paths, self.index.shards):
            size = path.stat().st_size
            if "bytes" in shard and size != int(shard["bytes"]):
                log.warning(
                    "%s has %d bytes, the index says %d: damaged samples will be skipped and counted",
                    path,
                    size,
                    shard["bytes"],
                )

    def setup(self, stage: str) -> None:
        """Runs on every rank before training: the same checks, so all ranks fail alike (no rank left waiting)."""
        if not self.index.root.is_dir():
            raise ValueError(f"shard directory {self.root!r} does not exist")
        self.check_files()
        self._stream(*self._rank_world()).check_slots()
