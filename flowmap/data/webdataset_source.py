"""Standard webdataset shard sets (written by any tool: img2dataset, webdataset's ``ShardWriter``, ...) read
as a stream of training batches.

A sample is the group of tar members sharing a key (``<key>.<suffix>``). Read here:

- the image: the first of ``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp``, decoded with PIL and, like image folders
  (``flowmap.data.images.load_image``), centre-cropped to a square, resized to ``image_size`` (bicubic) and
  scaled to the model range v / 127.5 - 1, giving x (C, S, S) float32 in [-1, 1];
- the label (class-conditional data only): ``.cls`` (an ASCII integer) or ``.json[label_key]``;
- the caption (only when asked for): ``.txt`` (UTF-8) or ``.json[caption_key]``.

Every other member (``.pth``, ``.pkl``, ``.pyd``, ...) is dropped unread: nothing is ever unpickled.

The shard list is a brace pattern or URL list (``data/train-{000000..000127}.tar``, ``pipe:``, ``http://``),
a local glob (``data/*.tar``) or a directory. A directory holding flowmap's ``index.json``
(``flowmap.data.shards``) takes its shard list from the index, which also gives each shard's sample count: a
truncated shard then counts exactly the samples it lost. Without an index, each tar-level error counts as one
damaged sample.

``WebDatasetStream`` splits the shards by rank then by DataLoader worker (what ``wds.split_by_node`` and
``wds.split_by_worker`` do, with the rank given by the trainer), draws each reader's shards with replacement
(webdataset's ``ResampledShards``, seeded by (seed, epoch, reader)) and yields a fixed number of batches per
epoch, so every rank takes the same number of steps. Damaged samples are skipped and counted per reader in
shared memory, across epochs; once a reader has tried ``corrupt_min_samples`` samples, a damaged share above
``max_corrupt_fraction`` stops the stream with the shard reader's ``CorruptShardError``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from flowmap.data.images import UNCONDITIONAL_LABEL, load_image
from flowmap.data.shards import INDEX_NAME, decode_sample, read_index
from flowmap.data.slot_stream import SlotStream, StreamOptions

log = logging.getLogger("flowmap.data.webdataset_source")

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
LABEL_SUFFIXES = ("cls", "json")
CAPTION_SUFFIXES = ("txt", "json")


# --- the shard list --------------------------------------------------------------------------------------


def resolve_shards(source: str | Sequence[str]) -> tuple[list[str], dict[str, int] | None, str | None]:
    """(shard URLs, samples per URL or None, flowmap encoding or None) of a shard set.

    ``source``: a list of URLs, a directory (its ``index.json`` when present, else its ``*.tar`` files), a local
    glob (``*``, ``?``, ``[``) or a brace pattern / ``::``-separated URL list (webdataset's ``expand_urls``)."""
    from webdataset.shardlists import expand_urls

    if not isinstance(source, str):
        urls = [str(u) for u in source]
        if not urls:
            raise ValueError("the shard list is empty")
        return urls, None, None
    path = Path(source)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            index = read_index(path)
            counts = {str(p): int(s["count"]) for p, s in zip(index.paths, index.shards)}
            return [str(p) for p in index.paths], counts, index.encoding
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise ValueError(f"directory {source!r} holds no .tar shards and no {INDEX_NAME}")
        return urls, None, None
    if any(c in source for c in "*?[") and "://" not in source:
        urls = sorted(glob.glob(source))
        if not urls:
            raise ValueError(f"no shard files match {source!r}")
        return urls, None, None
    urls = expand_urls(source)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {len(urls)} shard file(s) of {source!r} do not exist, e.g. {missing[0]!r}")
    return urls, None, None


# --- one sample ------------------------------------------------------------------------------------------


def _json(sample: dict) -> dict:
    if "json" not in sample:
        return {}
    meta = json.loads(sample["json"].decode("utf-8"))
    return meta if isinstance(meta, dict) else {}  # a list or scalar carries no label or caption field


@dataclass(frozen=True)
class Decoding:
    """How a webdataset sample becomes a training item (``decode_webdataset_sample``)."""

    image_size: int
    """Side S of the student's images: every image is centre-cropped and resized to S x S."""
    channels: int = 3
    """3 (RGB) or 1 (grayscale)."""
    num_classes: int = 0
    """0 for unconditional data (labels ignored, y = -1), else labels in 0..num_classes - 1."""
    captions: bool = False
    """Read the caption (``.txt`` / ``.json[caption_key]``) as a str."""
    label_key: str = "label"
    """The label's field in the ``.json`` member."""
    caption_key: str = "caption"
    """The caption's field in the ``.json`` member."""
    encoding: str | None = None
    """``"npy"`` for flowmap's own float shards (``.npy`` + ``.cls``), else None (images); a
    ``WebDatasetStream`` sets it from the shard set's ``index.json``."""

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.channels not in (1, 3) or self.num_classes < 0:
            raise ValueError(
                f"image_size must be >= 1, channels 1 or 3, num_classes >= 0; got {self.image_size}, "
                f"{self.channels}, {self.num_classes}"
            )
        for name, kind in (("image_size", int), ("channels", int), ("num_classes", int), ("captions", bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, S, S) of a decoded image."""
        return (self.channels, self.image_size, self.image_size)


def decode_webdataset_sample(sample: dict, decoding: Decoding) -> tuple[Tensor, Tensor, str | None]:
    """A webdataset sample (member suffix -> bytes) -> (x (channels, image_size, image_size) in [-1, 1],
    y long scalar (-1 when ``num_classes`` is 0), caption str or None when ``captions`` is False), as
    ``decoding`` says.

    ``encoding="npy"`` (flowmap's own float shards, from ``index.json``) reads ``.npy`` + ``.cls`` instead.
    Raises ValueError (or PIL's error) for a missing or undecodable image or label."""
    d = decoding
    key = sample.get("__key__")
    meta = _json(sample) if "json" in sample and (d.captions or d.num_classes > 0) else {}
    if d.encoding == "npy":
        x, y = decode_sample(sample, "npy", d.shape)
        y = y if d.num_classes > 0 else torch.tensor(UNCONDITIONAL_LABEL)
    else:
        suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
        if suffix is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"sample {key!r} has no image member ({', '.join(IMAGE_SUFFIXES)}); found {found}")
        x = load_image(io.BytesIO(sample[suffix]), d.image_size, d.channels)
        y = torch.tensor(UNCONDITIONAL_LABEL)
        if d.num_classes > 0:
            if "cls" in sample:
                label = int(sample["cls"].decode("ascii").strip())
            elif d.label_key in meta:
                label = int(meta[d.label_key])
            else:
                raise ValueError(f"sample {key!r} has no label (.cls or .json[{d.label_key!r}])")
            if not 0 <= label < d.num_classes:
                raise ValueError(f"sample {key!r} has label {label}, outside 0..{d.num_classes - 1}")
            y = torch.tensor(label)
    caption = None
    if d.captions:
        caption = sample["txt"].decode("utf-8") if "txt" in sample else str(meta.get(d.caption_key, ""))
    return x, y.long(), caption


# --- the stream ------------------------------------------------------------------------------------------


class WebDatasetStream(SlotStream):
    """Batches from a standard webdataset shard set; ``len()`` = ``epoch_length`` batches.

    A batch is ``(x (B, C, S, S) float32 in [-1, 1], y (B,) long)``, or with ``decoding.captions`` the dict
    ``{"x", "y", "caption": list of B str}``. Every (rank, DataLoader worker) pair is a reader; reader k owns
    shards k, k + readers, ... (split by rank, then by worker) and draws among them with replacement
    (``options.resample``) or in reshuffled passes. The rank and world size (``options``) default to webdataset's
    view of the process (``RANK`` / ``WORLD_SIZE`` or torch.distributed). The readers of one rank together yield exactly
    ``epoch_length`` batches an epoch. Damage is tallied as by the shard reader (``flowmap.data.shards.DamageWindow``,
    shared memory, one row per worker, kept across epochs): a reader stops with ``CorruptShardError`` when more than
    ``max_corrupt_fraction`` of its last ``corrupt_window`` samples were damaged or missing, judged once it has
    tried at least ``corrupt_min_samples``.
    """

    def __init__(self, source: str | Sequence[str], decoding: Decoding, options: StreamOptions) -> None:
        """decoding: how a sample is read (its ``encoding`` comes from the shard set); options: batch size, epoch
        length, shuffling, rank / world size, workers and damage limits."""
        super().__init__()
        self.source = source if isinstance(source, str) else list(source)
        self.urls, self.expected, self.encoding = resolve_shards(source)
        if self.encoding not in (None, "npy", "png"):
            raise ValueError(f"unknown flowmap shard encoding {self.encoding!r}")
        self.decoding = replace(decoding, encoding="npy" if self.encoding == "npy" else None)
        self.data_shape = self.decoding.shape
        self.captions = self.decoding.captions
        self.setup_slots(options)

    def check_slots(self) -> None:
        """Raise ValueError when the shard set cannot give every (rank, worker) reader its own shard."""
        o = self.options
        if len(self.urls) < self.slots:
            raise ValueError(
                f"{len(self.urls)} shard(s) for {o.world_size} rank(s) x {max(o.num_workers, 1)} worker(s) = "
                f"{self.slots} readers: every reader needs its own shard. Use fewer workers or more, smaller shards"
            )

    def own_urls(self, slot: int) -> list[str]:
        """The shards of reader ``slot`` (= rank x workers + worker): by rank, then by worker."""
        o = self.options
        by_rank = self.urls[o.rank :: o.world_size]
        workers = max(o.num_workers, 1)
        return by_rank[slot - o.rank * workers :: workers]

    def collate(self, batch: list) -> tuple | dict:
        x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        return {"x": x, "y": y, "caption": [b[2] for b in batch]} if self.captions else (x, y)

    def _samples(self, slot: int, worker: int, rng: random.Random) -> Iterator[tuple[Tensor, Tensor, str | None]]:
        own = self.own_urls(slot)
        order = ((url,) for url in self.shard_order(own, slot, rng))
        where = f"{self.source!r} (rank {self.options.rank}, reader {slot})"
        yield from self.read_passes(
            _Reader(partial(decode_webdataset_sample, decoding=self.decoding), self.expected),
            order,
            len(own),
            worker,
            where,
        )


class _Reader:
    """Reads shards through webdataset's tar reader, decoding each sample with ``decode``; counts samples
    yielded (``good``) and lost (``bad``) and reports each count to ``on_count(n, damaged)`` when set."""

    def __init__(self, decode, expected: dict[str, int] | None) -> None:
        self.decode, self.expected, self.on_count = decode, expected, None
        self.good, self.bad, self.last_error = 0, 0, ""
        self.errors: list[str] = []
        self.suffixes = set(IMAGE_SUFFIXES + LABEL_SUFFIXES + CAPTION_SUFFIXES + ("npy",))

    def _count(self, good: int = 0, bad: int = 0) -> None:
        self.good, self.bad = self.good + good, self.bad + bad
        for n, damaged in ((good, False), (bad, True)):
            if n and self.on_count is not None:
                self.on_count(n, damaged)

    def _handler(self, exn: Exception) -> bool:
        """Tar-level error (unreadable file, truncated archive): without an index it counts one damaged sample;
        with one, the samples the shard did not deliver are counted at its end."""
        self._note(exn)
        if self.expected is None:
            self._count(bad=1)
        return True

    def _note(self, exn: Exception) -> None:
        self.last_error = f"{type(exn).__name__}: {str(exn)[:200]}"
        if len(self.errors) < 2:
            self.errors.append(self.last_error)

    def read(self, url: str) -> Iterator[tuple[Tensor, Tensor, str | None]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        self.errors, seen = [], 0
        files = tar_file_expander(url_opener([{"url": url}], handler=self._handler), handler=self._handler)
        for sample in group_by_keys(files, suffixes=self.suffixes, handler=self._handler):
            seen += 1
            try:
                item = self.decode(sample)
            except Exception as exn:  # noqa: BLE001 - any undecodable or incomplete sample is skipped and counted
                self._note(exn)
                self._count(bad=1)
                continue
            self._count(good=1)
            yield item
        if self.expected is not None:
            self._count(bad=max(self.expected.get(url, 0) - seen, 0))
        if self.errors:
            log.warning("damaged samples skipped in %s (%s); %d lost so far", url, "; ".join(self.errors), self.bad)


__all__ = ["Decoding", "WebDatasetStream", "decode_webdataset_sample", "resolve_shards"]
