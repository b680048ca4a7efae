#!/usr/bin/env python
"""Data throughput of the standard-webdataset reader at realistic image sizes, beside a model's training step.

    python scripts/benchmark_loader.py                              # 64x64 and 256x256, 0/1/2/4 workers
    python scripts/benchmark_loader.py --sizes 64 --count 256 --dim 96 --depth 2    # a quick check

For each image side S it writes ``--count`` JPEG samples (quality 90, with .cls and .txt members) with
webdataset's ``ShardWriter`` into a temporary directory, streams them through ``WebDatasetStream`` in a
DataLoader with each worker count (JPEG decode, centre crop, resize to S, scaling to [-1, 1]) and times at
least ``--batches`` batches and ``--seconds`` seconds after ``--warmup`` batches (worker start-up, the shuffle
buffer's first fill and the batches the workers had prefetched by then are left out). Beside it: samples per
second of a flow-matching training step (``DenoisingLoss``, Adam) of a DiT with 256 tokens (patch S / 16;
DiT-S: dim 384, depth 12, 6 heads by default) on the same (3, S, S) batches, run in the main process with its
thread count. The loader keeps up when its samples/s exceed the step's. Prints a markdown table and returns
the numbers as a dict.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from flowmap.data.slot_stream import StreamOptions
from flowmap.data.webdataset_source import Decoding, WebDatasetStream
from flowmap.runtime import THREADS_HELP, set_cpu_threads

TOKENS_SIDE = 16  # patch = S / 16: 256 tokens, as DiT-S/2 on 4 x 32 x 32 latents


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 image with smooth structure plus fine texture (JPEG sizes close to photos')."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    f, p = rng.uniform(2, 8, 3), rng.uniform(0, 6.28, 3)
    img = np.stack([np.sin(f[c] * xx * 6 + p[c]) * np.cos(f[c] * yy * 4) for c in range(3)], -1) * 90 + 128
    img += rng.normal(0, 12, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def write_jpeg_shards(root: Path, size: int, count: int, shards: int, seed: int = 0) -> tuple[str, float]:
    """``count`` JPEG samples of side ``size`` in ``shards`` tar files under ``root`` (webdataset's ShardWriter);
    returns (brace pattern, mean JPEG bytes per sample)."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    per_shard = -(-count // shards)
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(photo_like(rng, size)).save(buf, format="JPEG", quality=90)
            total += buf.tell()
            sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "cls": i % 10, "txt": f"image {i}"})
    written = len(list(root.glob("train-*.tar")))
    return str(root / f"train-{{000000..{written - 1:06d}}}.tar"), total / count


def loader_rate(
    shards: str, size: int, workers: int, batch_size: int, batches: int, warmup: int, seconds: float = 2.0
) -> float:
    """Samples per second of ``WebDatasetStream`` in a DataLoader with ``workers`` workers (0: main process),
    timed over at least ``batches`` batches and ``seconds`` seconds, after ``warmup`` batches plus the batches
    the workers prefetch (which would otherwise arrive at no cost at the start of the timed window)."""
    prefetch = 2
    warmup += prefetch * workers
    stream = WebDatasetStream(
        shards,
        Decoding(size, num_classes=10),
        StreamOptions(batch_size, 10**6, shuffle_buffer=batch_size, num_workers=workers, rank=0, world_size=1),
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, prefetch_factor=prefetch if workers else None
    )
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, seen, n = time.perf_counter(), 0, 0
    while n < batches or time.perf_counter() - start < seconds:
        seen, n = seen + len(next(it)[0]), n + 1
    rate = seen / (time.perf_counter() - start)
    del it  # stops the workers
    return rate


def step_rate(size: int, batch_size: int, steps: int, dim: int, depth: int, heads: int) -> dict:
    """Samples per second of a flow-matching training step of a DiT (256 tokens) on (3, size, size) batches:
    {"samples_per_s", "step_s" (median), "params"}."""
    from flowmap.nets import build_net
    from flowmap.objectives.denoising import DenoisingLoss
    from flowmap.optim import adam

    net = build_net(
        {
            "name": "dit",
            "data_shape": [3, size, size],
            "patch": max(size // TOKENS_SIDE, 1),
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "num_classes": 10,
        }
    )
    loss_fn = DenoisingLoss("linear", "velocity", "logit_normal")
    opt = adam(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((batch_size, 3, size, size), generator=g) * 2 - 1
    y = torch.randint(0, 10, (batch_size,), generator=g)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss_fn(net, x0, y).loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step allocates and warms up
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"samples_per_s": batch_size / step, "step_s": step, "params": sum(p.numel() for p in net.parameters())}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64,256", help="image sides, comma-separated")
    p.add_argument("--workers", default="0,1,2,4", help="DataLoader worker counts, comma-separated")
    p.add_argument("--count", type=int, default=1024, help="JPEG samples written per size")
    p.add_argument("--shards", type=int, default=8, help="shard files per size (>= the largest worker count)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="timed batches per loader (at least)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per loader (at least)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up, shuffle fill)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (median)")
    p.add_argument("--dim", type=int, default=384, help="DiT width (384: DiT-S)")
    p.add_argument("--depth", type=int, default=12, help="DiT blocks (12: DiT-S)")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--out", default=None, help="directory for the shards (default: a temporary one, removed)")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    return p.parse_args(argv)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise ValueError(f"--{name} takes comma-separated integers >= 0, got {text!r}")
    return values


def table(result: dict) -> str:
    """The markdown table of ``run``'s result."""
    workers = result["workers"]
    head = ["image", "JPEG KiB"] + [f"loader, {w} worker{'s' if w != 1 else ''}" for w in workers]
    head += ["DiT step (train)", "loader(2) / train"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in result["rows"]:
        cells = [f"{row['size']}x{row['size']}", f"{row['jpeg_bytes'] / 1024:.1f}"]
        cells += [f"{row['loader'][w]:.0f}" for w in workers]
        cells += [
            f"{row['train']['samples_per_s']:.1f} ({row['train']['step_s'] * 1e3:.0f} ms / {result['batch_size']})"
        ]
        cells += [f"{row['keeps_up_ratio']:.1f}x" if row["keeps_up_ratio"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> dict:
    sizes, workers = _ints(a.sizes, "sizes"), _ints(a.workers, "workers")
    if a.shards < max(max(workers), 1) or a.count < a.shards:
        raise ValueError(f"--shards ({a.shards}) must be >= the largest worker count and <= --count ({a.count})")
    threads = set_cpu_threads(a.threads)
    result = {
        "threads": threads,
        "batch_size": a.batch_size,
        "workers": workers,
        "rows": [],
        "model": {"dim": a.dim, "depth": a.depth, "heads": a.heads, "tokens": TOKENS_SIDE**2},
    }
    with tempfile.TemporaryDirectory(prefix="flowmap-loader-") as tmp:
        base = Path(a.out) if a.out else Path(tmp)
        for size in sizes:
            shards, jpeg_bytes = write_jpeg_shards(base / f"jpeg{size}", size, a.count, a.shards)
            loader = {w: loader_rate(shards, size, w, a.batch_size, a.batches, a.warmup, a.seconds) for w in workers}
            torch.set_num_threads(threads)  # DataLoader start-up may change the main process's count
            train = step_rate(size, a.batch_size, a.steps, a.dim, a.depth, a.heads)
            ratio = loader[2] / train["samples_per_s"] if 2 in loader else None
            result["rows"].append(
                {"size": size, "jpeg_bytes": jpeg_bytes, "loader": loader, "train": train, "keeps_up_ratio": ratio}
            )
    return result


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    result = run(a)
    print(
        f"samples/s; {result['threads']} torch thread(s) for the step, loader workers 1 thread each; DiT "
        f"dim {a.dim}, depth {a.depth}, {TOKENS_SIDE**2} tokens; batch {a.batch_size}"
    )
    print(table(result))
    return result


if __name__ == "__main__":
    from flowmap.lightning.cli import main_guard

    main_guard(main)
