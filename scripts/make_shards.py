#!/usr/bin/env python
"""Write webdataset tar shards (plus index.json) from a registered data set, an image folder or an .npz.

    python scripts/make_shards.py --dataset checkerboard --kwargs '{"n_train": 200000}' --out data/cb --max-count 10000
    python scripts/make_shards.py --dataset gmm --kwargs '{"preset": "ring8"}' --out data/ring8 --max-count 10000
    python scripts/make_shards.py --dataset digits --out data/digits --max-bytes 4MB
    python scripts/make_shards.py --image-folder photos/ --image-size 64 --out data/photos --max-bytes 256MB
    python scripts/make_shards.py --npz cifar_train.npz --out data/cifar --max-count 5000
    python scripts/make_shards.py --image-folder photos/ --encode dit_pipeline/ --device cuda --out data/latents \
        --max-count 10000
    python scripts/make_shards.py --from-shards data/photos --encode dit_pipeline/ --out data/latents --max-count 10000
    torchrun --nproc_per_node 8 scripts/make_shards.py --image-folder photos/ --encode dit_pipeline/ --device cuda \
        --out data/latents --max-count 10000
    python scripts/make_shards.py --merge data/latents

``--encode PIPELINE_FOLDER`` encodes the images once with the folder's VAE (``flowmap/latent.py``: the scaled
posterior mean, ``--batch-size`` images at a time on ``--device``) into float32 .npy latent shards with their
labels; distillation then streams latents and never runs the VAE. Images are resized to the VAE's side for the
folder's model unless ``--image-size`` is given. ``--prompts FILE`` (one caption per line, in the images' order:
sorted class folders, sorted files) stores each image's prompt embedding by the folder's text encoder
(``flowmap/text.py``, every text encoder the folder has) as its condition (members ``<key>.emb.npy``, and
``<key>.pool.npy`` / ``<key>.mask.npy`` where the pipeline has pooled embeddings / an attention mask, in place of
the label); the streaming data module reads them back as one ``TextCondition``.

One encode pass on many GPUs: ``--part K --parts N`` (or, under torchrun, RANK and WORLD_SIZE; ``--device cuda``
becomes cuda:LOCAL_RANK) encodes only the K-th of N contiguous ranges of the images (and of the --prompts lines)
into ``OUT/part-KKKKK/`` with its own index.json, keeping each sample's key in the whole set. ``--merge OUT`` then
checks that every part 0..N-1 is there and that they agree (shape, dtype, encoding, classes, source), and writes
``OUT/index.json`` over all their shards: the set reads as one, in the order of a single-process pass.

Image data (image folders, uint8 arrays) is stored as .png, everything else as float32 .npy; labels as .cls.
The set is written into a temporary directory and renamed into place: a failure leaves no partial shards.
Train from it with ``flowmap.lightning.streaming.ShardDataModule`` (see docs/scale_out.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowmap.data.registry import get_dataset  # noqa: E402
from flowmap.data.shards import (  # noqa: E402
    INDEX_NAME,
    PART_NAME,
    ShardIndex,
    merge_parts,
    read_index,
    write_source_shards,
)
from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.runtime import THREADS_HELP, set_cpu_threads  # noqa: E402

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """'4096', '64MB', '1.5GiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot read a byte size from {text!r}; write e.g. 4096, 64MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(
        description=__doc__.split("\n\n")[0],
        epilog="one encode pass on many GPUs: torchrun --nproc_per_node 8 scripts/make_shards.py --image-folder "
        "photos/ --encode PIPELINE --device cuda --out OUT --max-count 10000 (each rank writes OUT/part-RANK), "
        "then scripts/make_shards.py --merge OUT",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a registered data set name (checkerboard, digits, gmm, ...)")
    src.add_argument("--image-folder", help="a folder of images, one subfolder per class (flat: unconditional)")
    src.add_argument("--npz", help="an .npz with 'x' (uint8 (N, H, W, C) images or float (N, ...)) and optional 'y'")
    src.add_argument("--from-shards", help="an existing shard directory of images (with --encode)")
    src.add_argument(
        "--merge",
        metavar="OUT",
        help="write OUT/index.json over the finished parts OUT/part-KKKKK of a split --encode pass (--part/--parts)",
    )
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the data set factory")
    p.add_argument("--image-size", type=int, default=None, help="(image folders) centre-crop and resize to this side")
    p.add_argument("--channels", type=int, default=3, help="(image folders) 1 = grayscale, 3 = RGB")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--out", help="output directory (must not exist unless --overwrite); a part: OUT/part-KKKKK")
    p.add_argument("--max-count", type=int, default=None, help="samples per shard")
    p.add_argument("--max-bytes", type=parse_bytes, default=None, help="bytes per shard file, e.g. 256MB")
    p.add_argument("--encoding", default="auto", choices=["auto", "npy", "png"])
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("latents")
    g.add_argument("--encode", default=None, help="a pipeline folder with vae/: write its scaled latents, not images")
    g.add_argument("--device", default="cpu", help="(--encode) torch device of the VAE, e.g. cuda, cuda:1")
    g.add_argument("--batch-size", type=int, default=64, help="(--encode) images per VAE call")
    g.add_argument(
        "--prompts",
        default=None,
        help="(--encode) a text file of captions, one per image, encoded "
        "once by the folder's text encoder into the shards",
    )
    g.add_argument(
        "--vae-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="(--encode) the VAE's dtype"
    )
    g.add_argument(
        "--parts",
        type=int,
        default=None,
        help="(--encode) split the pass into N processes (default: torchrun's WORLD_SIZE); then --merge OUT",
    )
    g.add_argument("--part", type=int, default=None, help="(--parts) this process's part K in 0..N-1 (default: RANK)")
    return p


def make_shards(args: list[str] | None = None) -> ShardIndex:
    a = build_parser().parse_args(args)
    set_cpu_threads(a.threads)
    if a.merge:
        index = merge_parts(a.merge, overwrite=a.overwrite)
        parts = len({s["name"].split("/")[0] for s in index.shards})
        print(f"merged {parts} part(s): {index.count} samples in {len(index.shards)} shard(s) under {a.merge}")
        return index
    if not a.out:
        raise ValueError("make_shards.py: the following arguments are required: --out")
    a.split_part = part_of(a)
    try:
        kwargs = json.loads(a.kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--kwargs must be a JSON object: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--kwargs must be a JSON object, got {a.kwargs!r}")
    if a.from_shards and not a.encode:
        raise ValueError("--from-shards re-encodes existing image shards: give --encode PIPELINE_FOLDER")
    codec, latent_shape = (None, None) if not a.encode else load_encoder(a)
    if a.image_folder:
        size = a.image_size or (None if codec is None else codec.image_shape(latent_shape)[1])
        kwargs = {"root": a.image_folder, "image_size": size, "channels": a.channels, **kwargs}
        name = "image_folder"
    elif a.npz:
        if Path(a.npz).suffix.lower() != ".npz":
            raise ValueError(f"--npz expects an .npz file, got {a.npz!r}")
        name, kwargs = "tensor_file", {"path": a.npz, **kwargs}
    elif a.from_shards:
        name = "shards"
    else:
        name = a.dataset
    meta = {"dataset": name, "kwargs": kwargs}
    if codec is not None:
        return encode_shards(a, codec, latent_shape, name, kwargs, meta)
    source = get_dataset(name, **kwargs)
    index = write_source_shards(
        source,
        a.out,
        split=a.split,
        encoding=a.encoding,
        max_count=a.max_count,
        max_bytes=a.max_bytes,
        overwrite=a.overwrite,
        meta=meta,
    )
    print(
        f"wrote {index.count} samples of shape {list(index.shape)} ({index.encoding}, {index.num_classes} classes) "
        f"into {len(index.shards)} shard(s) under {a.out}"
    )
    return index


def part_of(a: argparse.Namespace) -> tuple[int, int] | None:
    """(K, N): this process encodes part K of N, from --part / --parts or torchrun's RANK / WORLD_SIZE (when
    WORLD_SIZE > 1); None: the whole set. Sets --device cuda to cuda:LOCAL_RANK under a launcher."""
    n, k = a.parts, a.part
    if n is None and k is not None:
        raise ValueError("--part K needs --parts N")
    if n is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        n = int(os.environ["WORLD_SIZE"])
    if n is None:
        return None
    if k is None:
        if "RANK" not in os.environ:
            raise ValueError(f"--parts {n} needs --part K (0..{n - 1}) outside torchrun")
        k = int(os.environ["RANK"])
    if not a.encode:
        raise ValueError("--part / --parts split an --encode pass; give --encode PIPELINE_FOLDER")
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--part must be in 0..N-1 for --parts N >= 1, got --part {k} --parts {n}")
    if a.device == "cuda" and "LOCAL_RANK" in os.environ:
        a.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return k, n


def load_encoder(a: argparse.Namespace):
    """(codec, latent shape (c, h, w)) of the --encode pipeline folder: its VAE and its model's input size."""
    import torch

    from flowmap.latent import LatentCodec, find_vae
    from teachers.diffusers_adapter import find_model_and_scheduler

    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {a.batch_size}")
    if find_vae(a.encode) is None:
        raise ValueError(f"--encode {a.encode}: not a pipeline folder with a vae/ (model_index.json naming a vae)")
    _, model_cfg, _ = find_model_and_scheduler(a.encode)
    codec = LatentCodec.from_folder(a.encode, dtype=None if a.vae_dtype == "float32" else getattr(torch, a.vae_dtype))
    size = model_cfg["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return codec, (int(model_cfg["in_channels"]), int(h), int(w))


def encode_shards(a: argparse.Namespace, codec, latent_shape, name: str, kwargs: dict, meta: dict) -> ShardIndex:
    """The images of the source, encoded once by the VAE, as float32 latent shards (labels kept)."""
    from tqdm import tqdm

    from flowmap.data.shards import _ShardReader, write_shards
    from flowmap.latent import encode_items

    if a.from_shards:
        index = read_index(a.from_shards)
        shape, count, num_classes, classes = index.shape, index.count, index.num_classes, index.classes
        lo, hi = part_range(a.split_part, count)
        reader = _ShardReader(index, mine=None)
        mine = [(p, s) for p, s in zip(index.paths, index.shards) if s["start"] < hi and s["start"] + s["count"] > lo]
        skip = lo - mine[0][1]["start"]  # samples before the part in its first shard
        items = islice((item for path, shard in mine for item in reader.read(path, shard)), skip, skip + hi - lo)
    else:
        data = get_dataset(name, **kwargs)
        ds = data.dataset(a.split)
        shape, count, num_classes = tuple(data.data_shape), len(ds), data.num_classes
        classes = getattr(ds, "classes", None) or None
        lo, hi = part_range(a.split_part, count)
        items = (ds[i] for i in range(lo, hi))
    want = codec.image_shape(latent_shape)
    if tuple(shape) != want:
        raise ValueError(
            f"the images are {tuple(shape)}, the VAE of {a.encode} makes {latent_shape} latents from "
            f"{want} images: resize them (--image-size {want[1]}, --channels {want[0]})"
        )
    conds = None
    if a.prompts:
        conds = prompt_rows(a, count, lo, hi)
        num_classes, classes = 0, None
    bar = tqdm(total=hi - lo, unit="image", desc="encoding", file=sys.stderr, mininterval=2.0)

    def rows():
        for z, y in encode_items(codec, items, a.batch_size, a.device):
            bar.update(1)
            yield z, (int(y) if conds is None else next(conds))

    source = {**meta, "encoded_by": codec.reference(latent_shape), "images": list(shape), "prompts": a.prompts}
    out = a.out
    if a.split_part is not None:  # this process's part: OUT/part-KKKKK, its keys those of the whole set
        out = Path(a.out) / PART_NAME.format(a.split_part[0])
        source.update(part=a.split_part[0], parts=a.split_part[1], range=[lo, hi], total=count)
        drop_merged_index(a)
    index = write_shards(
        rows(),
        out,
        shape=latent_shape,
        num_classes=num_classes,
        classes=classes,
        encoding="npy",
        max_count=a.max_count,
        max_bytes=a.max_bytes,
        overwrite=a.overwrite,
        source=source,
        first_key=lo,
    )
    bar.close()
    part = "" if a.split_part is None else f" (part {a.split_part[0]} of {a.split_part[1]}: images {lo}..{hi - 1})"
    print(
        f"encoded {index.count} images{part} of shape {list(shape)} into latents of shape {list(index.shape)} "
        f"({codec.describe(latent_shape)}) in {len(index.shards)} shard(s) under {out}"
    )
    if a.split_part is not None:
        print(f"once every part is written: python scripts/make_shards.py --merge {a.out}")
    return index


def drop_merged_index(a: argparse.Namespace) -> None:
    """Before a part is (re)written into --out: a merged OUT/index.json goes (with --overwrite; merge again after),
    an ordinary shard set in OUT is refused."""
    path = Path(a.out) / INDEX_NAME
    try:
        merged = read_index(a.out) if path.is_file() else None
    except ValueError:  # another rank removed it meanwhile
        merged = None
    if merged is None:
        return
    if "parts" not in merged.source:
        raise ValueError(f"--out {a.out} holds a shard set of its own ({INDEX_NAME}), not the parts of a split pass")
    if not a.overwrite:
        raise ValueError(f"--out {a.out} is merged already; pass --overwrite to re-encode a part, then --merge again")
    path.unlink(missing_ok=True)


def part_range(part: tuple[int, int] | None, count: int) -> tuple[int, int]:
    """Samples [lo, hi) of part K of N: the K-th of N contiguous, near-equal ranges of 0..count (all for None)."""
    if part is None:
        return 0, count
    k, n = part
    if n > count:
        raise ValueError(f"--parts {n} is more than the {count} images: every part needs at least one")
    return k * count // n, (k + 1) * count // n


def prompt_rows(a: argparse.Namespace, count: int, lo: int = 0, hi: int | None = None):
    """The text condition (one-row ``TextCondition``: embeddings (L, D), pooled embeddings, mask where the pipeline
    has them) of each line lo..hi-1 of the --prompts file (one per image, ``count`` lines), encoded --batch-size at
    a time."""
    from flowmap.text import PromptEncoder, find_text_encoder

    try:
        lines = Path(a.prompts).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {a.prompts}: unreadable ({err})") from None
    if len(lines) != count:
        raise ValueError(
            f"--prompts {a.prompts} has {len(lines)} lines, the source has {count} images (one caption each)"
        )
    if not find_text_encoder(a.encode):
        raise ValueError(f"--prompts needs a text-to-image folder: {a.encode} has no tokenizer/ and text_encoder/")
    encoder = PromptEncoder.from_folder(a.encode).to(a.device)

    lines = lines[lo:hi]

    def rows():
        for i in range(0, len(lines), a.batch_size):
            cond = encoder.condition(lines[i : i + a.batch_size]).to("cpu")
            yield from (cond[j] for j in range(len(cond)))

    return rows()


def main(args: list[str] | None = None) -> ShardIndex:
    """``make_shards``; run through ``main_guard``, a user error (bad flag value, unknown data set, existing --out)
    is one line, exit 2."""
    return make_shards(args)


if __name__ == "__main__":
    main_guard(main)
