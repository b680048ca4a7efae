#!/usr/bin/env python
"""Write webdataset tar shards (plus index.json) from a registered data set, an image folder or an .npz.

    python scripts/make_shards.py --dataset checkerboard --kwargs '{"n_train": 200000}' --out data/cb --max-count 10000
    python scripts/make_shards.py --dataset gmm --kwargs '{"preset": "ring8"}' --out data/ring8 --max-count 10000
    python scripts/make_shards.py --dataset digits --out data/digits --max-bytes 4MB
    python scripts/make_shards.py --image-folder photos/ --image-size 64 --out data/photos --max-bytes 256MB
    python scripts/make_shards.py --npz cifar_train.npz --out data/cifar --max-count 5000

Image data (image folders, uint8 arrays) is stored as .png, everything else as float32 .npy; labels as .cls.
The set is written into a temporary directory and renamed into place: a failure leaves no partial shards.
Train from it with ``flowmap.lightning.streaming.ShardDataModule`` (see docs/scale_out.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowmap.runtime import THREADS_HELP, set_cpu_threads  # noqa: E402
from flowmap.data.registry import get_dataset  # noqa: E402
from flowmap.data.shards import ShardIndex, write_source_shards  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """'4096', '64MB', '1.5GiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot read a byte size from {text!r}; write e.g. 4096, 64MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a registered data set name (checkerboard, digits, gmm, ...)")
    src.add_argument("--image-folder", help="a folder of images, one subfolder per class (flat: unconditional)")
    src.add_argument("--npz", help="an .npz with 'x' (uint8 (N, H, W, C) images or float (N, ...)) and optional 'y'")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the data set factory")
    p.add_argument("--image-size", type=int, default=None, help="(image folders) centre-crop and resize to this side")
    p.add_argument("--channels", type=int, default=3, help="(image folders) 1 = grayscale, 3 = RGB")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--max-count", type=int, default=None, help="samples per shard")
    p.add_argument("--max-bytes", type=parse_bytes, default=None, help="bytes per shard file, e.g. 256MB")
    p.add_argument("--encoding", default="auto", choices=["auto", "npy", "png"])
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.add_argument("--overwrite", action="store_true")
    return p


def make_shards(args: list[str] | None = None) -> ShardIndex:
    a = build_parser().parse_args(args)
    set_cpu_threads(a.threads)
    try:
        kwargs = json.loads(a.kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--kwargs must be a JSON object: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--kwargs must be a JSON object, got {a.kwargs!r}")
    if a.image_folder:
        kwargs = {"root": a.image_folder, "image_size": a.image_size, "channels": a.channels, **kwargs}
        name = "image_folder"
    elif a.npz:
        if Path(a.npz).suffix.lower() != ".npz":
            raise ValueError(f"--npz expects an .npz file, got {a.npz!r}")
        name, kwargs = "tensor_file", {"path": a.npz, **kwargs}
    else:
        name = a.dataset
    source = get_dataset(name, **kwargs)
    meta = {"dataset": name, "kwargs": kwargs}
    index = write_source_shards(source, a.out, split=a.split, encoding=a.encoding, max_count=a.max_count,
                                max_bytes=a.max_bytes, overwrite=a.overwrite, meta=meta)
    print(f"wrote {index.count} samples of shape {list(index.shape)} ({index.encoding}, {index.num_classes} classes) "
          f"into {len(index.shards)} shard(s) under {a.out}")
    return index


def main(args: list[str] | None = None) -> ShardIndex:
    """``make_shards``; run through ``main_guard``, a user error (bad flag value, unknown data set, existing --out)
    is one line, exit 2."""
    return make_shards(args)


if __name__ == "__main__":
    main_guard(main)
