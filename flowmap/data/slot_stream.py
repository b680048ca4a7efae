"""What the shard streams share (``flowmap.data.shards.ShardStream``, the project's own shards, and
``flowmap.data.webdataset_source.WebDatasetStream``, any webdataset shard set): reader slots, the epoch's batch
count per slot, the shuffle buffer, resampled shard order and the damage accounting.

Every (rank, DataLoader worker) pair is a *slot*; there are world_size x max(num_workers, 1) of them. Each epoch a
slot restarts from a seed of (seed, epoch, slot), and the slots of one rank together yield exactly
``epoch_length`` batches, so all ranks take the same number of steps. Damage lives in a ``DamageWindow`` in shared
memory, one row per worker, kept across epochs and worker restarts."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flowmap.data.registry import mix_seed


def taken_by(fn: Callable, values: Mapping[str, Any], but: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of ``values`` (a caller's ``locals()``) that ``fn`` takes by name, except those in ``but``:
    ``StreamOptions(**taken_by(StreamOptions, locals()))`` hands a module's options on without listing them."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in values.items() if k in names and k not in but}


class CorruptShardError(RuntimeError):
    """More than ``max_corrupt_fraction`` of the samples a stream tried to read were damaged or missing."""


class DamageWindow:
    """Which of the last ``size`` samples each of ``readers`` readers tried to read were damaged, in shared memory:
    the tally survives epochs and DataLoader worker restarts (each worker writes only its own row).

    ``ring`` (readers, size) uint8 holds 1 for a damaged sample at position (samples recorded) mod size;
    ``state`` (readers, 4) int64 holds samples recorded, damaged ones in the window, intact and damaged in total."""

    def __init__(self, readers: int, size: int) -> None:
        if readers < 1 or size < 1:
            raise ValueError(f"a damage window needs readers >= 1 and size >= 1, got {readers}, {size}")
        self.ring = torch.zeros(readers, size, dtype=torch.uint8).share_memory_()
        self.state = torch.zeros(readers, 4, dtype=torch.long).share_memory_()
        self._views: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_views": None}  # numpy views would pickle as copies; the tensors stay shared

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """numpy views of ``ring`` and ``state``, made once (``Tensor.numpy`` costs a few us). A forked worker
        inherits them still mapped onto the shared memory; a spawned one gets the tensors and makes its own."""
        if self._views is None:
            self._views = (self.ring.numpy(), self.state.numpy())
        return self._views

    def add(self, reader: int, n: int, damaged: bool) -> tuple[int, int]:
        """Record ``n`` samples of ``reader`` as intact or damaged; returns ``recent(reader)``."""
        rings, states = self._rows()
        ring, state, flag = rings[reader], states[reader], int(damaged)
        size, done = len(ring), int(state[0])
        if n == 1:  # the common case (one sample): scalar updates only
            pos = done % size
            if ring[pos] != flag:
                state[1] += 1 if flag else -1
                ring[pos] = flag
        elif n > 1:  # only the last min(n, size) of the n records stay in the window
            k = min(n, size)
            idx = (done + n - k + np.arange(k)) % size
            state[1] += flag * k - int(ring[idx].sum())
            ring[idx] = flag
        state[0] = done + max(n, 0)
        state[2 + flag] += max(n, 0)
        return int(state[1]), min(done + max(n, 0), size)

    def recent(self, reader: int) -> tuple[int, int]:
        """(damaged, samples) over ``reader``'s window: its last ``size`` samples, or all it has read if fewer."""
        rings, states = self._rows()
        return int(states[reader, 1]), int(min(states[reader, 0], rings.shape[1]))

    def record(
        self, reader: int, n: int, damaged: bool, max_fraction: float, min_samples: int, where: str, last_error: str
    ) -> None:
        """Record ``n`` samples of ``reader``; raise ``CorruptShardError`` (naming ``where``) when, once the reader has
        tried ``min_samples``, more than ``max_fraction`` of its window was damaged or missing."""
        bad, total = self.add(reader, n, damaged)
        if total >= min_samples and bad > max_fraction * total:
            raise CorruptShardError(
                f"{bad} of the last {total} samples read from {where} were damaged or missing, more than "
                f"max_corrupt_fraction={max_fraction}; last error: {last_error or 'a short shard'}"
            )

    def totals(self) -> tuple[int, int]:
        """(intact, damaged) samples read by all readers since the window was made."""
        good, bad = self.state[:, 2:].sum(0).tolist()
        return int(good), int(bad)


@dataclass(frozen=True)
class StreamOptions:
    """The options every shard stream takes (``SlotStream.setup_slots``), checked once here."""

    batch_size: int
    """Samples per batch (per rank)."""
    epoch_length: int
    """Batches per rank per epoch (the same on every rank)."""
    shuffle_buffer: int = 1000
    """Samples in each reader's shuffle buffer (0 or 1: stream order)."""
    seed: int = 0
    """Seeds the shard order and shuffling (mixed with epoch and slot)."""
    resample: bool = True
    """Draw shards with replacement (webdataset's ``ResampledShards``), else in reshuffled passes."""
    rank: int | None = None
    """This process's rank; None: webdataset's view (``RANK`` or torch.distributed; 0 in a single process)."""
    world_size: int | None = None
    """Processes reading the stream; None: webdataset's view (``WORLD_SIZE`` or torch.distributed; else 1)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: the main process)."""
    max_corrupt_fraction: float = 0.01
    """Damaged share of a reader's window above which the stream stops with ``CorruptShardError``."""
    corrupt_window: int = 100_000
    """Samples (per reader) over which the damaged share is judged; it slides across epochs."""
    corrupt_min_samples: int = 100
    """Samples a reader must have tried before the share is judged."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epoch_length < 1 or self.shuffle_buffer < 0 or self.num_workers < 0:
            raise ValueError(
                "batch_size and epoch_length must be >= 1, shuffle_buffer and num_workers >= 0; "
                f"got {self.batch_size}, {self.epoch_length}, {self.shuffle_buffer}, {self.num_workers}"
            )
        if not 0.0 <= self.max_corrupt_fraction <= 1.0:
            raise ValueError(f"max_corrupt_fraction must lie in [0, 1], got {self.max_corrupt_fraction}")
        if self.corrupt_window < 1 or self.corrupt_min_samples < 1:
            raise ValueError(
                "corrupt_window and corrupt_min_samples must be >= 1, got "
                f"{self.corrupt_window}, {self.corrupt_min_samples}"
            )
        rank, world_size = self.rank, self.world_size
        if rank is None or world_size is None:
            from webdataset.utils import pytorch_worker_info

            seen = pytorch_worker_info()[:2]
            rank, world_size = seen[0] if rank is None else rank, seen[1] if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        kinds = {"int": int, "float": float, "bool": bool, "int | None": int}
        values = {"rank": rank, "world_size": world_size}
        for f in fields(self):
            object.__setattr__(self, f.name, kinds[f.type](values.get(f.name, getattr(self, f.name))))


class SlotStream(IterableDataset):
    """Subclasses call ``setup_slots`` in ``__init__`` and implement ``_samples(slot, worker, rng)`` (an endless
    iterator of samples, usually through ``read_passes``) and ``check_slots``; ``collate`` turns a list of
    samples into a batch (default: ``(stack of x, stack of y)``)."""

    options: StreamOptions

    def setup_slots(self, options: StreamOptions) -> None:
        """Keep the stream's options (``options``), check that the shard set feeds every slot and make the damage
        window (one row per worker)."""
        self.options = options
        self.epoch = 0
        self.check_slots()
        self.damage = DamageWindow(max(options.num_workers, 1), options.corrupt_window)

    @property
    def slots(self) -> int:
        return self.options.world_size * max(self.options.num_workers, 1)

    def check_slots(self) -> None:
        """Raise ValueError when the shard set cannot feed every slot."""

    def __len__(self) -> int:
        return self.options.epoch_length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def counts(self) -> tuple[int, int]:
        """(good, damaged) samples read so far by all slots of this rank, over all epochs."""
        return self.damage.totals()

    def collate(self, batch: list) -> object:
        ys = [b[1] for b in batch]
        if isinstance(ys[0], dict):  # a text condition's fields (flowmap.data.shards.decode_sample), each stacked
            return torch.stack([b[0] for b in batch]), {k: torch.stack([y[k] for y in ys]) for k in ys[0]}
        return torch.stack([b[0] for b in batch]), torch.stack(ys)

    def __iter__(self) -> Iterator:
        o, info = self.options, get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(o.num_workers, 1):
            raise ValueError(
                f"{type(self).__name__} was set up for {o.num_workers} worker(s) but runs in a loader with {workers}"
            )
        slot = o.rank * workers + worker
        n_batches = o.epoch_length // workers + (worker < o.epoch_length % workers)
        rng = random.Random(mix_seed(o.seed, self.epoch, slot))
        samples = self._samples(slot, worker, rng)
        if o.shuffle_buffer > 1:
            from webdataset.filters import shuffle

            samples = shuffle(o.shuffle_buffer, initial=o.shuffle_buffer, rng=rng)(samples)
        for _ in range(n_batches):
            yield self.collate([next(samples) for _ in range(o.batch_size)])

    def _samples(self, slot: int, worker: int, rng: random.Random) -> Iterator:
        raise NotImplementedError

    def shard_order(self, own: Sequence, slot: int, rng: random.Random) -> Iterator:
        """The shards ``own`` of ``slot``, forever: drawn with replacement (webdataset's ``ResampledShards``,
        seeded by the slot's rng) or, with ``resample=False``, as reshuffled passes."""
        own = list(own)
        if self.options.resample:
            from webdataset.shardlists import ResampledShards

            keys = [str(k) for k in range(len(own))]
            drawn = ResampledShards(keys, seed=rng.getrandbits(63), worker_seed=partial(int, slot), deterministic=True)
            yield from (own[int(d["url"])] for d in drawn)
        else:
            while True:
                rng.shuffle(own)
                yield from list(own)

    def read_passes(self, reader, order: Iterator, per_pass: int, worker: int, where: str) -> Iterator:
        """``reader.read(*item)`` for each item of ``order``, counting every sample in the damage window (through
        ``reader.on_count(n, damaged)``); a pass of ``per_pass`` items that gives no readable sample raises
        ``CorruptShardError``, whatever the limit. ``reader`` has ``read``, ``good`` and ``last_error``."""

        def count(n: int, damaged: bool) -> None:
            o = self.options
            self.damage.record(
                worker, n, damaged, o.max_corrupt_fraction, o.corrupt_min_samples, where, reader.last_error
            )

        reader.on_count = count
        good_at_pass = 0
        for n, item in enumerate(order, start=1):
            yield from reader.read(*item)
            if n % per_pass == 0:
                if reader.good == good_at_pass:
                    raise CorruptShardError(
                        f"no readable sample in {per_pass} shard(s) of {where}; last error: {reader.last_error}"
                    )
                good_at_pass = reader.good
