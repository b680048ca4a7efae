"""WebDataset tar shards: write them from any data set, read them back as a stream of (x, y) batches.

Layout of a shard directory (written atomically by ``write_shards``)::

    index.json            {"format": "flowmap-shards", "count", "shape", "dtype", "encoding", "num_classes",
                           "classes", "shards": [{"name", "start", "count", "bytes"}, ...], "source"}
    shard-000000.tar      members <key>.npy (float32 array) or <key>.png (uint8 image), and <key>.cls
    shard-000001.tar      (the class index as ASCII, -1 for unconditional data); key = sample index, 9 digits;
                          a text condition adds <key>.emb.npy (L, D) [, .pool.npy (P,), .mask.npy (L,)]

Only ``.npy`` / ``.png`` / ``.cls`` members are written and read: nothing is ever unpickled
(``np.load(..., allow_pickle=False)``). PNG samples are images whose values are exactly v / 127.5 - 1 for
uint8 v (image folders, uint8 ``.npz``), so a round trip returns the source tensors bit for bit.

``ShardStream`` is the reader: a ``torch.utils.data.IterableDataset`` built from webdataset's tar reader
(``tar_file_expander`` + ``group_by_keys``), its seeded ``ResampledShards`` and ``shuffle``, with explicit
per-rank and per-worker splitting and a fixed number of batches per epoch, so every DDP rank yields the same
number of batches. Damaged samples (truncated tar, undecodable member, missing shard file) are skipped and
counted; when more than ``max_corrupt_fraction`` of the last ``corrupt_window`` samples a reader tried to read
were damaged (judged once it has tried ``corrupt_min_samples``; counts run on across epochs and worker restarts),
the stream stops with ``CorruptShardError``.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import random
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from flowmap.data.images import ImageFolderDataset, UInt8ImageDataset, model_to_uint8, uint8_to_model
from flowmap.data.registry import DataSource
from flowmap.data.slot_stream import (  # noqa: F401  (re-exported)
    CorruptShardError,
    DamageWindow,
    SlotStream,
    StreamOptions,
    taken_by,
)

log = logging.getLogger("flowmap.data.shards")

FORMAT = "flowmap-shards"
VERSION = 1
INDEX_NAME = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
ENCODINGS = ("npy", "png")
SPLIT_MODES = ("by_shard", "by_rank")
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads a closed archive to a multiple of 10 KiB
KEY_DIGITS = 9


# --- the index -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    """The contents of ``index.json``: sample count, per-sample shape (model space), stored dtype and
    encoding, classes, and per shard its file name, first key, sample count and byte size."""

    root: Path
    count: int
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    num_classes: int
    classes: list[str] | None
    shards: list[dict]
    source: dict

    @property
    def paths(self) -> list[Path]:
        return [self.root / s["name"] for s in self.shards]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "count": self.count,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "encoding": self.encoding,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "shards": self.shards,
            "source": self.source,
        }


def read_index(root: str | Path) -> ShardIndex:
    """The ``ShardIndex`` of a shard directory; one ValueError when the directory or its index is missing or bad."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"shard directory {str(root)!r} does not exist (write one with scripts/make_shards.py)")
    path = root / INDEX_NAME
    if not path.is_file():
        raise ValueError(
            f"{str(root)!r} has no {INDEX_NAME}: not a flowmap shard directory (write one with scripts/make_shards.py)"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not readable JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r} is not a {FORMAT} index (a JSON {type(meta).__name__}, expected an object)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a {FORMAT} index (format {meta.get('format')!r})")
    if meta.get("encoding") not in ENCODINGS or not meta.get("shards"):
        raise ValueError(f"{str(path)!r}: encoding must be one of {ENCODINGS} and the shard list non-empty")
    field = partial(_field, path)
    shards = field(meta, "shards", list)
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise ValueError(f"{str(path)!r}: shards[{i}] is a JSON {type(shard).__name__}, expected an object")
        for name, kind in (("name", str), ("start", int), ("count", int)):
            field(shard, name, kind, f"shards[{i}].")
    return ShardIndex(
        root=root,
        count=field(meta, "count", int),
        shape=field(meta, "shape", lambda v: tuple(int(d) for d in v)),
        dtype=field(meta, "dtype", str),
        encoding=meta["encoding"],
        num_classes=field(meta, "num_classes", int),
        classes=meta.get("classes"),
        shards=shards,
        source=dict(meta.get("source") or {}),
    )


def _field(path: Path, obj: dict, name: str, convert: Callable, where: str = ""):
    """``convert(obj[name])``, one ValueError naming the index file and the field when it is missing or bad."""
    if name not in obj:
        raise ValueError(
            f"{str(path)!r} lacks the required field {where + name!r}; rewrite it with scripts/make_shards.py"
        )
    try:
        return convert(obj[name])
    except (TypeError, ValueError):
        raise ValueError(f"{str(path)!r}: the field {where + name!r} has the bad value {obj[name]!r}") from None


# --- encoding one sample -------------------------------------------------------------------------------


def sample_key(i: int) -> str:
    return f"{i:0{KEY_DIGITS}d}"


def encode_sample(x: Tensor, y: int, encoding: str) -> dict[str, bytes]:
    """x (*shape) in model space -> {"npy" or "png": bytes, "cls": bytes}. png needs (C, H, W), C in (1, 3),
    with values exactly representable as uint8 (v / 127.5 - 1)."""
    if encoding == "npy":
        buf = io.BytesIO()
        np.save(buf, x.detach().cpu().float().numpy(), allow_pickle=False)
        data = {"npy": buf.getvalue()}
    elif encoding == "png":
        from PIL import Image

        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"png shards hold (C, H, W) images with C in (1, 3), got shape {tuple(x.shape)}")
        u8 = model_to_uint8(x)
        if not torch.equal(uint8_to_model(u8), x.float()):
            raise ValueError("png encoding needs values v / 127.5 - 1 for uint8 v; use encoding='npy' for other data")
        arr = u8.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
        data = {"png": buf.getvalue()}
    else:
        raise ValueError(f"unknown encoding {encoding!r}; choose from {ENCODINGS}")
    data["cls"] = str(int(y)).encode("ascii")
    return data


@functools.lru_cache(maxsize=32)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The exact .npy header ``np.save`` writes for a little-endian float32 C-order array of ``shape``; a member
    that starts with it is decoded by ``frombuffer`` (numpy's header parser costs ~0.5 ms a sample)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()[: buf.tell() - 4 * math.prod(shape)]


def decode_sample(sample: dict, encoding: str, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """A webdataset sample dict (member suffix -> bytes) -> (x (*shape) float32, y long scalar).
    Raises ValueError for a missing or undecodable member or a wrong shape."""
    if encoding not in sample or "cls" not in sample:
        raise ValueError(
            f"sample {sample.get('__key__')!r} lacks its .{encoding} or .cls member "
            f"(found {sorted(k for k in sample if not k.startswith('__'))})"
        )
    if encoding == "npy":
        raw = sample["npy"]
        header = _npy_header(tuple(shape))
        if len(raw) == len(header) + 4 * math.prod(shape) and raw.startswith(
            header
        ):  # what we write: skip np.load's parser
            x = torch.frombuffer(bytearray(raw[len(header) :]), dtype=torch.float32).reshape(shape)
        else:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
            if arr.dtype != np.float32:
                raise ValueError(f"sample {sample.get('__key__')!r}: .npy dtype {arr.dtype}, expected float32")
            x = torch.from_numpy(arr.copy())
    else:
        from PIL import Image

        with Image.open(io.BytesIO(sample["png"])) as img:
            img.load()
            arr = np.asarray(img, dtype=np.uint8).copy()
        x = uint8_to_model(torch.from_numpy(arr if arr.ndim == 3 else arr[:, :, None]).permute(2, 0, 1))
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"sample {sample.get('__key__')!r} has shape {tuple(x.shape)}, the index says {tuple(shape)}")
    y = torch.tensor(int(sample["cls"].decode("ascii")), dtype=torch.long)
    if "emb.npy" in sample:  # a prompt embedding (L, D) float32 is the sample's condition
        y = _npy(sample["emb.npy"])
        if "pool.npy" in sample or "mask.npy" in sample:  # with pooled embeddings (P,) / attention mask (L,)
            y = {"encoder_hidden_states": y}
            if "pool.npy" in sample:
                y["pooled_projections"] = _npy(sample["pool.npy"])
            if "mask.npy" in sample:
                y["encoder_attention_mask"] = _npy(sample["mask.npy"]).long()
    return x, y


def _npy(raw: bytes) -> Tensor:
    return torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False).copy())


TEXT_MEMBERS = (("emb.npy", "prompt_embeds"), ("pool.npy", "pooled_embeds"), ("mask.npy", "attention_mask"))


def text_members(y) -> dict[str, Tensor] | None:
    """The members of a sample's text condition (``<key>.emb.npy`` (L, D), ``.pool.npy`` (P,), ``.mask.npy`` (L,),
    float32) from a prompt embedding (L, D) or a one-row ``flowmap.conditions.TextCondition``; None for a label."""
    if isinstance(y, Tensor) and y.dim() > 0:
        return {"emb.npy": y}
    if not hasattr(y, "prompt_embeds"):
        return None
    if len(y) != 1:
        raise ValueError(f"a sample's text condition must be one row, got {len(y)}")
    return {name: getattr(y, field)[0] for name, field in TEXT_MEMBERS if getattr(y, field) is not None}


# --- writing -------------------------------------------------------------------------------------------


def _tar_member_bytes(size: int) -> int:
    """Bytes one member takes in a ustar archive: a header block plus the data padded to whole blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_bytes(members: int) -> int:
    """Size of a closed archive holding ``members`` bytes of members (end marker, padding to a record)."""
    return -(-(members + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical input, identical bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[tuple[Tensor, int | Tensor]],
    out_dir: str | Path,
    *,
    shape: Sequence[int],
    num_classes: int = 0,
    classes: Sequence[str] | None = None,
    encoding: str = "npy",
    max_count: int | None = None,
    max_bytes: int | None = None,
    overwrite: bool = False,
    source: dict | None = None,
    first_key: int = 0,
) -> ShardIndex:
    """Write (x (*shape), y) samples as tar shards plus ``index.json`` into ``out_dir``; keys count from
    ``first_key`` (a part of a split pass keeps its samples' keys in the whole set, see ``merge_parts``).

    A shard closes when it holds ``max_count`` samples or when the next sample would make its file larger than
    ``max_bytes`` (a single larger sample gets a shard of its own); at least one limit is required. All files
    are written into a temporary sibling directory that is renamed into place at the end, so an error leaves
    no partial shard set (and, with ``overwrite``, the previous set intact)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose from {ENCODINGS}")
    if max_count is None and max_bytes is None:
        raise ValueError("give the shard size: max_count (samples per shard) and/or max_bytes")
    if (max_count is not None and max_count < 1) or (max_bytes is not None and max_bytes < _TAR_RECORD):
        raise ValueError(f"max_count must be >= 1 and max_bytes >= {_TAR_RECORD}, got {max_count}, {max_bytes}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{str(out_dir)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    shape = tuple(int(d) for d in shape)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished set gets the usual permissions
    try:
        shards = _write_tars(samples, tmp, shape, num_classes, encoding, max_count, max_bytes, first_key)
        index = ShardIndex(
            out_dir,
            sum(s["count"] for s in shards),
            shape,
            "uint8" if encoding == "png" else "float32",
            encoding,
            int(num_classes),
            list(classes) if classes else None,
            shards,
            dict(source or {}),
        )
        (tmp / INDEX_NAME).write_text(json.dumps(index.to_json(), indent=1))
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _write_tars(samples, tmp: Path, shape, num_classes, encoding, max_count, max_bytes, first_key=0) -> list[dict]:
    shards: list[dict] = []
    tar, members, count = None, 0, 0
    for i, (x, y) in enumerate(samples, first_key):
        text = text_members(y)  # a prompt embedding (L, D) or a one-row text condition: <key>.emb.npy, ...
        x, y = torch.as_tensor(x), (-1 if text is not None else int(y))
        if tuple(x.shape) != shape:
            raise ValueError(f"sample {i} has shape {tuple(x.shape)}, expected {shape}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"sample {i} holds NaN or inf values")
        if not (y == -1 if num_classes == 0 else 0 <= y < num_classes):
            raise ValueError(
                f"sample {i} has label {y}; "
                f"expected {'-1 (unconditional)' if num_classes == 0 else f'0..{num_classes - 1}'}"
            )
        data = encode_sample(x, y, encoding)
        for name, value in (text or {}).items():
            data[name] = encode_sample(value.float(), -1, "npy")["npy"]
        size = sum(_tar_member_bytes(len(v)) for v in data.values())
        full = tar is not None and (
            (max_count is not None and count >= max_count)
            or (max_bytes is not None and _tar_file_bytes(members + size) > max_bytes)
        )
        if tar is None or full:
            if tar is not None:
                tar.close()
                shards[-1].update(count=count, bytes=(tmp / shards[-1]["name"]).stat().st_size)
            name = SHARD_NAME.format(len(shards))
            shards.append({"name": name, "start": i})
            tar, members, count = tarfile.open(tmp / name, "w", format=tarfile.USTAR_FORMAT), 0, 0
        for ext, payload in data.items():
            _add_member(tar, f"{sample_key(i)}.{ext}", payload)
        members, count = members + size, count + 1
    if tar is None:
        raise ValueError("no samples to write")
    tar.close()
    shards[-1].update(count=count, bytes=(tmp / shards[-1]["name"]).stat().st_size)
    return shards


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary directory to ``out_dir`` (replacing an old one only after success)."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.rename(out_dir, old / "set")
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


PART_NAME = "part-{:05d}"
_PART_FIELDS = ("part", "range")  # what differs between the parts' "source" entries


def merge_parts(out_dir: str | Path, overwrite: bool = False) -> ShardIndex:
    """Write ``out_dir/index.json`` over the parts ``part-00000`` .. ``part-{N-1}`` of a split pass (each written
    by one process with ``write_shards(..., first_key=lo)`` and the source entries "part" K, "parts" N, "range"
    [lo, hi), "total"): shard names become "part-KKKKK/shard-....tar", keys and ``start`` run on through the parts,
    so the streams read the merged set as one. Every part must be present and finished, the ranges must tile
    0 .. total, and the parts must agree on shape, dtype, encoding, classes and source; otherwise one ValueError
    and nothing is written."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"{str(out_dir)!r} does not exist: nothing to merge (write its parts with --part K --parts N)")
    if (out_dir / INDEX_NAME).exists() and not overwrite:
        raise ValueError(f"{str(out_dir / INDEX_NAME)!r} already exists; pass --overwrite to merge again")
    found = sorted(p.name for p in out_dir.glob("part-*") if p.is_dir())
    done = [name for name in found if (out_dir / name / INDEX_NAME).is_file()]
    if not done:
        raise ValueError(f"{str(out_dir)!r} has no finished part-KKKKK/{INDEX_NAME}: nothing to merge")
    first = read_index(out_dir / done[0])
    n = first.source.get("parts")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{str(out_dir / done[0])!r} was not written as a part (no 'parts' in its source entry)")
    names = [PART_NAME.format(k) for k in range(n)]
    missing = [name for name in names if name not in done]
    if missing:
        raise ValueError(
            f"{str(out_dir)!r}: {len(missing)} of {n} parts missing or unfinished ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}); run them (--part K --parts {n}) and merge again"
        )
    if set(found) - set(names):
        raise ValueError(f"{str(out_dir)!r}: parts beyond the {n} the parts name: {sorted(set(found) - set(names))}")

    def common(ix: ShardIndex) -> dict:
        source = {k: v for k, v in ix.source.items() if k not in _PART_FIELDS}
        return {
            "shape": ix.shape,
            "dtype": ix.dtype,
            "encoding": ix.encoding,
            "num_classes": ix.num_classes,
            "classes": ix.classes,
            "source": source,
        }

    base = common(first)
    shards: list[dict] = []
    for k, name in enumerate(names):
        ix = read_index(out_dir / name)
        differ = [field for field, value in common(ix).items() if value != base[field]]
        if differ:
            raise ValueError(f"{str(out_dir / name)!r} differs from {done[0]} in {', '.join(differ)}: not one pass")
        at = sum(s["count"] for s in shards)
        if ix.source.get("part") != k or ix.source.get("range") != [at, at + ix.count]:
            raise ValueError(
                f"{str(out_dir / name)!r} holds part {ix.source.get('part')} samples {ix.source.get('range')}, "
                f"expected part {k} samples [{at}, {at + ix.count}]"
            )
        for s in ix.shards:
            if s["start"] != sum(t["count"] for t in shards):
                raise ValueError(f"{str(out_dir / name / s['name'])!r}: its first key does not follow the last shard")
            shards.append({**s, "name": f"{name}/{s['name']}"})
    count = sum(s["count"] for s in shards)
    if count != first.source.get("total"):
        raise ValueError(f"{str(out_dir)!r}: the parts hold {count} samples, the pass had {first.source.get('total')}")
    source = {k: v for k, v in first.source.items() if k not in _PART_FIELDS}
    index = ShardIndex(
        out_dir, count, first.shape, first.dtype, first.encoding, first.num_classes, first.classes, shards, source
    )
    fd, name = tempfile.mkstemp(dir=out_dir, prefix=f".{INDEX_NAME}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.write_text(json.dumps(index.to_json(), indent=1))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out_dir / INDEX_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    return index


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def dataset_encoding(ds: Dataset, data_shape: tuple[int, ...]) -> str:
    """``png`` for 8-bit image data (image folders, uint8 arrays, float tensors that are exactly v / 127.5 - 1),
    ``npy`` for everything else."""
    if isinstance(ds, (ImageFolderDataset, UInt8ImageDataset)):
        return "png"
    if isinstance(ds, TensorDataset) and len(data_shape) == 3 and data_shape[0] in (1, 3):
        x = ds.tensors[0]
        if torch.equal(uint8_to_model(model_to_uint8(x)), x.float()):
            return "png"
    return "npy"


def write_source_shards(
    data: DataSource,
    out_dir: str | Path,
    split: str = "train",
    encoding: str = "auto",
    meta: dict | None = None,
    **kwargs,
) -> ShardIndex:
    """Shards of one split of a registered data set (``get_dataset(...)``), in its item order; ``kwargs`` go to
    ``write_shards`` (max_count, max_bytes, overwrite), ``meta`` into the index's "source" entry.
    ``encoding="auto"`` picks png for 8-bit images."""
    ds = data.dataset(split)
    if encoding == "auto":
        encoding = dataset_encoding(ds, data.data_shape)
    classes = getattr(ds, "classes", None) or None
    items = (ds[i] for i in range(len(ds)))
    return write_shards(
        items,
        out_dir,
        shape=data.data_shape,
        num_classes=data.num_classes,
        classes=classes,
        encoding=encoding,
        source={"name": data.name, "split": split, **dict(meta or {})},
        **kwargs,
    )


def read_all(root: str | Path) -> tuple[Tensor, Tensor]:
    """Every sample of a shard directory in key order: (x (N, *shape), y (N,) labels, (N, L, D) prompt embeddings or,
    with pooled embeddings / masks, a ``TextCondition``); errors on any damage."""
    index = read_index(root)
    stream = _ShardReader(index, mine=None)
    xs, ys = [], []
    for path, shard in zip(index.paths, index.shards):
        got = list(stream.read(path, shard))
        if len(got) != shard["count"]:
            raise ValueError(f"{str(path)!r}: read {len(got)} good samples, the index lists {shard['count']}")
        xs += [x for x, _ in got]
        ys += [y for _, y in got]
    if isinstance(ys[0], dict):  # text conditions with pooled embeddings / masks: one TextCondition
        from flowmap.conditions import as_condition

        return torch.stack(xs), as_condition({k: torch.stack([y[k] for y in ys]) for k in ys[0]})
    return torch.stack(xs), torch.stack(ys)


# --- reading: one shard, with damage accounting ----------------------------------------------------------


class _ShardReader:
    """Reads the samples of one shard through webdataset's tar reader, keeping those with ``mine(key)``.
    ``good`` counts samples yielded, ``bad`` samples lost: undecodable ones at once, and at the end of a shard
    whatever else the index promised but did not arrive (truncated tar, missing member or file). ``on_count``,
    if given, is called as ``on_count(n, damaged)`` for every count added (before the next sample is yielded)."""

    def __init__(
        self, index: ShardIndex, mine: Callable[[int], bool] | None, on_count: Callable[[int, bool], None] | None = None
    ) -> None:
        self.index, self.mine, self.on_count = index, mine, on_count
        self.good, self.bad = 0, 0
        self.shard_errors: list[str] = []  # errors met while reading the current shard
        self.last_error = ""

    def expected(self, shard: dict) -> int:
        keys = range(int(shard["start"]), int(shard["start"]) + int(shard["count"]))
        return len(keys) if self.mine is None else sum(1 for k in keys if self.mine(k))

    def _handler(self, exn: Exception) -> bool:
        self.last_error = f"{type(exn).__name__}: {str(exn)[:200]}"
        if len(self.shard_errors) < 5:
            self.shard_errors.append(self.last_error)
        return True  # skip and continue; the damage is counted from the index

    def _count(self, good: int = 0, bad: int = 0) -> None:
        self.good, self.bad = self.good + good, self.bad + bad
        if self.on_count is not None:
            if good:
                self.on_count(good, False)
            if bad:
                self.on_count(bad, True)

    def read(self, path: Path, shard: dict) -> Iterator[tuple[Tensor, Tensor]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        seen = 0  # own samples met in this shard, intact or not
        self.shard_errors = []
        files = tar_file_expander(url_opener([{"url": str(path)}], handler=self._handler), handler=self._handler)
        for sample in group_by_keys(files, handler=self._handler):
            try:
                key = int(sample["__key__"].rsplit("/", 1)[-1])
            except ValueError:
                self._handler(ValueError(f"member key {sample['__key__']!r} is not a sample index"))
                continue
            if self.mine is not None and not self.mine(key):
                continue
            seen += 1
            try:
                item = decode_sample(sample, self.index.encoding, self.index.shape)
            except Exception as exn:  # undecodable or incomplete sample: skip and count
                self._handler(exn)
                self._count(bad=1)
                continue
            self._count(good=1)
            yield item
        self._count(bad=max(self.expected(shard) - seen, 0))
        if self.shard_errors:
            log.warning(
                "damaged samples skipped in %s (%s); %d lost so far",
                path.name,
                "; ".join(self.shard_errors[:2]),
                self.bad,
            )


# --- the stream ----------------------------------------------------------------------------------------


class ShardStream(SlotStream):
    """Batches (x (B, *shape) float32, y (B,) long) from a shard directory; ``len()`` = ``epoch_length`` batches.

    Every (rank, DataLoader worker) pair is a *slot*; there are world_size x num_workers slots.

    - ``split="by_shard"`` (default, for real data): slot k reads the shards k, k + slots, k + 2 slots, ...
      (per-node then per-worker splitting of the shard list), drawn with replacement (webdataset's
      ``ResampledShards``, seeded by (seed, epoch, slot)) or, with ``resample=False``, as reshuffled passes.
      Needs at least as many shards as slots (``check_slots`` raises before training otherwise).
    - ``split="by_rank"``: every slot reads all shards in order and keeps the samples whose key is
      congruent to its slot modulo slots: deterministic, disjoint samples per rank, any shard count.

    A shuffle buffer of ``shuffle_buffer`` samples (0: off) mixes samples within a slot. Each epoch every slot
    restarts from a seed of (seed, epoch, slot) and the slots of one rank together yield exactly
    ``epoch_length`` batches, so all ranks take the same number of steps.

    Damage: ``damage`` is a ``DamageWindow`` in shared memory with one row per worker, kept across epochs and
    worker restarts. A slot stops with ``CorruptShardError`` as soon as more than ``max_corrupt_fraction`` of
    the last ``corrupt_window`` samples it tried to read were damaged or missing, judged once it has tried at
    least ``corrupt_min_samples`` (fewer would let one bad sample among the first few stop a run). A slot whose
    whole pass over its shards gives no readable sample stops too, whatever the limit.
    """

    def __init__(self, root: str | Path, options: StreamOptions, split: str = "by_shard") -> None:
        """options: batch size, epoch length, shuffling, rank / world size, workers and damage limits."""
        super().__init__()
        if split not in SPLIT_MODES:
            raise ValueError(f"unknown split {split!r}; choose from {SPLIT_MODES}")
        self.index = read_index(root)
        self.split = split
        self.setup_slots(options)

    def check_slots(self) -> None:
        """Raise ValueError when the shard set cannot feed every (rank, worker) slot."""
        o = self.options
        n_shards, who = len(self.index.shards), f"{o.world_size} rank(s) x {max(o.num_workers, 1)} worker(s)"
        if self.split == "by_shard" and n_shards < self.slots:
            raise ValueError(
                f"{n_shards} shard(s) in {str(self.index.root)!r} for {who} = {self.slots} readers: "
                f"every reader needs its own shard. Write at least {self.slots} shards "
                "(scripts/make_shards.py --max-count), use fewer workers, or split='by_rank'"
            )
        if self.split == "by_rank" and self.index.count < self.slots:
            raise ValueError(f"{self.index.count} sample(s) in {str(self.index.root)!r} cannot be split over {who}")

    def _shard_order(self, slot: int, rng: random.Random) -> Iterator[int]:
        """Indices of the shards this slot reads, forever."""
        n = len(self.index.shards)
        if self.split == "by_rank":
            while True:
                yield from range(n)
        yield from self.shard_order(range(slot, n, self.slots), slot, rng)

    def _samples(self, slot: int, worker: int, rng: random.Random) -> Iterator[tuple[Tensor, Tensor]]:
        slots = self.slots
        mine = (lambda key: key % slots == slot) if self.split == "by_rank" else None
        reader = _ShardReader(self.index, mine)
        n_own = len(self.index.shards) if self.split == "by_rank" else len(range(slot, len(self.index.shards), slots))
        order = ((self.index.paths[i], self.index.shards[i]) for i in self._shard_order(slot, rng))
        where = f"{str(self.index.root)!r} (rank {self.options.rank}, slot {slot})"
        yield from self.read_passes(reader, order, n_own, worker, where)


# --- benchmark ---------------------------------------------------------------------------------------


def streaming_throughput(
    root: str | Path,
    batch_size: int = 256,
    num_batches: int = 50,
    workers: int | Sequence[int] = (1, 2),
    shuffle_buffer: int = 1000,
) -> dict:
    """Samples per second reading ``num_batches`` batches from the shards at ``root`` (``ShardStream`` in a
    DataLoader with each worker count in ``workers``; 0 = main process) against the same data held in memory
    (a shuffled TensorDataset DataLoader). Returns {"memory": s/s, "shards_w1": s/s, ..., "ratio_w1": shards / memory,
    "batch_size", "num_batches", "shards", "count"}. Timings include worker start-up; the in-memory baseline
    decodes the whole set first (meant for benchmark-sized sets)."""
    from torch.utils.data import DataLoader

    workers = [workers] if isinstance(workers, int) else list(workers)
    x, y = read_all(root)
    index = read_index(root)
    result: dict = {
        "batch_size": int(batch_size),
        "num_batches": int(num_batches),
        "shards": len(index.shards),
        "count": index.count,
    }

    def rate(loader) -> float:
        start, seen = time.perf_counter(), 0
        it = iter(loader)
        for _ in range(num_batches):
            seen += len(next(it)[0])
        return seen / (time.perf_counter() - start)

    mem = TensorDataset(x, y)
    if len(mem) < batch_size:
        raise ValueError(f"{len(mem)} samples are fewer than one batch of {batch_size}")
    sampler = torch.utils.data.RandomSampler(
        mem, replacement=True, num_samples=batch_size * num_batches, generator=torch.Generator().manual_seed(0)
    )
    result["memory"] = rate(DataLoader(mem, batch_size=batch_size, sampler=sampler, drop_last=True))
    for w in workers:
        split = "by_shard" if len(index.shards) >= max(w, 1) else "by_rank"
        options = StreamOptions(batch_size, num_batches, shuffle_buffer=shuffle_buffer, num_workers=w)
        stream = ShardStream(root, options, split=split)
        loader = DataLoader(stream, batch_size=None, num_workers=w, generator=torch.Generator().manual_seed(0))
        result[f"shards_w{w}"] = rate(loader)
        result[f"ratio_w{w}"] = result[f"shards_w{w}"] / result["memory"]
    return result
