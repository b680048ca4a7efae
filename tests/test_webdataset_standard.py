"""Standard webdataset shard sets (written here by webdataset's own ShardWriter: JPEG / PNG / WebP images of
varying sizes, .cls labels, .txt captions, a .json) streamed by ``WebDatasetStream`` / ``WebDataModule``:
batch shape, range and labels, pixel round trip after resize-crop, disjoint equal streams for two ranks,
no unpickling of .pth / .pkl members, damaged JPEGs skipped and counted, a short teacher run."""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from flowmap.data.shards import CorruptShardError, read_all, write_shards
from flowmap.data.slot_stream import StreamOptions
from flowmap.data.webdataset_source import Decoding, WebDatasetStream, resolve_shards
from flowmap.lightning.webdataset_module import WebDataModule

ROOT = Path(__file__).resolve().parents[1]
N, PER_SHARD, S = 48, 12, 24
SIZES = [(40, 56), (64, 48), (72, 72), (33, 45)]
FORMATS = ["JPEG", "PNG", "WEBP"]


def smooth_image(i: int, h: int, w: int) -> np.ndarray:
    """A smooth uint8 (h, w, 3) image, different for every i (JPEG and resizing keep smooth images close)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(i)
    f, p = rng.uniform(1.0, 3.0, 3), rng.uniform(0, 6.28, 3)
    img = [127.5 + 100 * np.sin(f[c] * 3 * xx + p[c]) * np.cos(f[c] * 2 * yy - p[c]) for c in range(3)]
    return np.stack(img, -1).round().clip(0, 255).astype(np.uint8)


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    extra = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(img).save(buf, format=fmt, **extra)
    return buf.getvalue()


def write_set(root: Path, n: int = N, extra=None, broken: set[int] = frozenset()) -> dict[int, np.ndarray]:
    """n samples in shards of PER_SHARD via wds.ShardWriter; ``extra(i)`` adds members; ``broken`` samples get a
    truncated JPEG. Returns the original images by sample id."""
    root.mkdir(parents=True, exist_ok=True)
    originals = {}
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(n):
            img = smooth_image(i, *SIZES[i % len(SIZES)])
            fmt = FORMATS[i % len(FORMATS)]
            data = encode(img, fmt)
            if i in broken:
                data, fmt = encode(img, "JPEG")[:200], "JPEG"
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
            sample = {
                "__key__": f"s{i:06d}",
                ext: data,
                "cls": i % 10,
                "txt": f"sample {i}",
                "json": {"label": i % 10, "caption": f"sample {i}", "id": i},
            }
            sample.update(extra(i) if extra else {})
            sink.write({k: v for k, v in sample.items() if v is not None})  # extra may drop a member with None
            originals[i] = img
    return originals


def resize_crop(img: np.ndarray, size: int) -> torch.Tensor:
    """Centre square crop + antialiased bicubic resize in torch (independent of the PIL path under test)."""
    h, w, _ = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.from_numpy(img[top : top + side, left : left + side]).permute(2, 0, 1).float()[None] / 127.5 - 1
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0].clamp(-1, 1)


def ids(batch) -> list[int]:
    return [int(c.split()[1]) for c in batch["caption"]]


def make_stream(source: str, **kw) -> WebDatasetStream:
    """A ``WebDatasetStream`` from flat keywords: the ``Decoding`` fields, the rest the ``StreamOptions``."""
    names = {f.name for f in dataclasses.fields(Decoding)}
    decoding = Decoding(**{k: v for k, v in kw.items() if k in names})
    return WebDatasetStream(source, decoding, StreamOptions(**{k: v for k, v in kw.items() if k not in names}))


def one_pass(tmp_path: Path, **kw) -> list:
    """Every batch of one pass over the set, in stream order (no resampling, no shuffle)."""
    kw = {
        "batch_size": 4,
        "epoch_length": N // 4,
        "image_size": S,
        "captions": True,
        "shuffle_buffer": 0,
        "resample": False,
        "rank": 0,
        "world_size": 1,
        **kw,
    }
    return list(make_stream(str(tmp_path / "train-*.tar"), **kw))


@pytest.fixture
def shard_set(tmp_path):
    return tmp_path, write_set(tmp_path)


def test_shard_lists_brace_glob_and_directory(shard_set):
    tmp_path, _ = shard_set
    brace = resolve_shards(str(tmp_path / "train-{000000..000003}.tar"))[0]
    assert brace == sorted(resolve_shards(str(tmp_path / "train-*.tar"))[0]) == resolve_shards(str(tmp_path))[0]
    assert len(brace) == N // PER_SHARD
    with pytest.raises(ValueError, match="do not exist"):
        resolve_shards(str(tmp_path / "train-{000000..000009}.tar"))


def test_batches_have_the_students_shape_range_and_labels(shard_set):
    tmp_path, _ = shard_set
    dm = WebDataModule(
        str(tmp_path / "train-*.tar"),
        image_size=S,
        num_classes=10,
        captions=True,
        batch_size=8,
        epoch_length=3,
        shuffle_buffer=16,
    )
    assert dm.data_shape == (3, S, S) and dm.num_classes == 10
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for b in batches:
        assert b["x"].shape == (8, 3, S, S) and b["x"].dtype == torch.float32
        assert -1.0 <= float(b["x"].min()) and float(b["x"].max()) <= 1.0 and float(b["x"].std()) > 0.2
        assert torch.equal(b["y"], torch.tensor(ids(b)) % 10)  # labels from .cls match each sample
    # without captions the batch is the project's (x, y) pair; num_classes=0 -> unconditional labels
    x, y = next(iter(make_stream(str(tmp_path), batch_size=4, epoch_length=1, image_size=S, shuffle_buffer=0)))
    assert x.shape == (4, 3, S, S) and torch.equal(y, torch.full((4,), -1))


def test_labels_and_captions_from_json_alone(tmp_path):
    write_set(tmp_path, n=24, extra=lambda i: {"cls": None, "txt": None})
    b = one_pass(tmp_path, num_classes=10, epoch_length=6)[0]
    assert torch.equal(b["y"], torch.tensor(ids(b)) % 10)


def test_images_round_trip_after_resize_and_crop(shard_set):
    tmp_path, originals = shard_set
    errors = {fmt: [] for fmt in FORMATS}
    for b in one_pass(tmp_path):
        for x, i in zip(b["x"], ids(b)):
            errors[FORMATS[i % 3]].append(float((x - resize_crop(originals[i], S)).abs().mean()))
    assert sum(len(e) for e in errors.values()) == N
    # mean |decoded - reference| in [-1, 1] units (one uint8 level = 0.0078); measured: JPEG q95 <= 0.0083,
    # lossless PNG / WebP <= 0.0025 (the rest is PIL's bicubic against torch's)
    assert max(errors["JPEG"]) < 0.02, errors["JPEG"]
    assert max(errors["PNG"] + errors["WEBP"]) < 0.0078
    # a wrong pairing (another sample's image) would be far off
    other = float((resize_crop(originals[0], S) - resize_crop(originals[1], S)).abs().mean())
    assert other > 0.2


def test_two_ranks_read_disjoint_equal_streams(shard_set, monkeypatch):
    tmp_path, _ = shard_set
    per_rank = N // 2 // 4  # each rank owns 2 of the 4 shards: 24 samples = 6 batches of 4
    seen = {}
    for rank in (0, 1):
        batches = one_pass(tmp_path, rank=rank, world_size=2, epoch_length=per_rank)
        assert len(batches) == per_rank
        seen[rank] = [i for b in batches for i in ids(b)]
    assert len(seen[0]) == len(seen[1]) == N // 2
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(N))
    # the same split from the environment (webdataset's view of the process), as under torchrun
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = one_pass(tmp_path, rank=None, world_size=None, epoch_length=per_rank)
    assert [i for b in from_env for i in ids(b)] == seen[1]
    # resampled and shuffled, two workers per rank: still equal length and disjoint
    resampled = {}
    for rank in (0, 1):
        stream = make_stream(
            str(tmp_path),
            batch_size=4,
            epoch_length=5,
            image_size=S,
            captions=True,
            shuffle_buffer=8,
            rank=rank,
            world_size=2,
            num_workers=2,
            seed=3,
        )
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        batches = list(loader)
        assert len(batches) == 5
        resampled[rank] = {i for b in batches for i in ids(b)}
    assert not resampled[0] & resampled[1]


class _Marker:
    """Unpickling this object creates ``path`` (what a malicious pickle would do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)))
    write_set(tmp_path, n=24, extra=lambda i: {"pth": payload, "pkl": payload, "pyd": payload})
    batches = one_pass(tmp_path, epoch_length=6)
    dm = WebDataModule(str(tmp_path), image_size=S, batch_size=4, epoch_length=2, num_workers=2, shuffle_buffer=8)
    batches += list(dm.train_dataloader())
    assert len(batches) == 8 and not marker.exists()
    pickle.loads(payload)  # the payload is live: unpickling it does create the marker
    assert marker.exists()


def test_a_corrupt_jpeg_is_skipped_and_counted(tmp_path):
    write_set(tmp_path, n=24, broken={5})
    stream = make_stream(
        str(tmp_path / "train-*.tar"),
        batch_size=23,
        epoch_length=1,
        image_size=S,
        captions=True,
        shuffle_buffer=0,
        resample=False,
        max_corrupt_fraction=0.1,
    )
    (batch,) = list(stream)
    assert stream.counts() == (23, 1)
    assert sorted(ids(batch)) == [i for i in range(24) if i != 5]
    # past max_corrupt_fraction (1 of 24 > 1%, judged from 100 samples on) the stream stops with the shard
    # reader's error, also when every epoch is shorter than that: the counts run on across epochs
    strict = make_stream(
        str(tmp_path),
        batch_size=4,
        epoch_length=5,
        image_size=S,
        shuffle_buffer=0,
        max_corrupt_fraction=0.01,
        corrupt_min_samples=100,
    )
    with pytest.raises(CorruptShardError, match="more than max_corrupt_fraction=0.01") as err:
        for epoch in range(10):
            strict.set_epoch(epoch)
            list(strict)
    assert epoch >= 4 and sum(strict.counts()) >= 100, (epoch, strict.counts(), str(err.value))


def test_flowmap_shards_with_index_are_read_exactly(tmp_path):
    """The project's own shards: index.json supplies the shard list and counts; PNG samples at their own
    size come back bit for bit, and a truncated shard counts exactly the samples it lost."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), generator=g).float() / 127.5 - 1
    samples = [(x[i], i % 4) for i in range(16)]
    write_shards(samples, tmp_path / "own", shape=(3, 8, 8), num_classes=4, encoding="png", max_count=8)
    ref_x, ref_y = read_all(tmp_path / "own")
    stream = make_stream(
        str(tmp_path / "own"),
        batch_size=16,
        epoch_length=1,
        image_size=8,
        num_classes=4,
        shuffle_buffer=0,
        resample=False,
    )
    got_x, got_y = next(iter(stream))
    match = (got_x[:, None] == ref_x[None]).flatten(2).all(2)  # (16 read, 16 reference): bit-equal images
    idx = match.float().argmax(1)
    assert bool(match.any(1).all()) and sorted(idx.tolist()) == list(range(16))
    assert torch.equal(got_y, ref_y[idx])
    shard = tmp_path / "own" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 3 * 1024])  # keeps the first sample or two of 8
    stream = make_stream(
        str(tmp_path / "own"),
        batch_size=1,
        epoch_length=100,
        image_size=8,
        shuffle_buffer=0,
        resample=False,
        max_corrupt_fraction=0.2,
        corrupt_min_samples=16,
    )
    with pytest.raises(CorruptShardError) as err:
        list(stream)
    bad, total = (int(v) for v in re.match(r"(\d+) of the last (\d+) samples", str(err.value)).groups())
    assert total == 16 and bad >= 6  # after one pass: every listed sample was either read or counted as lost
    assert stream.counts() == (16 - bad, bad)


def test_train_teacher_on_webdataset_shards(shard_set, tmp_path):
    """scripts/train_teacher.py with configs/data/webdataset.yaml and a tiny class-conditional DiT: 6 steps over
    2 epochs of 4 batches (2 workers), finite losses, an export."""
    shards, _ = shard_set
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_teacher

    model = tmp_path / "model.yaml"
    model.write_text(
        "model:\n  net: {name: dit, data_shape: [3, 16, 16], patch: 4, dim: 32, depth: 1, heads: 2, num_classes: 10}\n"
        "  lr: 0.001\n"
    )
    out = tmp_path / "teacher.safetensors"
    train_teacher.main(
        [
            "--config",
            str(model),
            "--config",
            str(ROOT / "configs/data/webdataset.yaml"),
            "--data.init_args.shards",
            str(shards / "train-{000000..000003}.tar"),
            "--data.init_args.image_size",
            "16",
            "--data.init_args.num_classes",
            "10",
            "--data.init_args.batch_size",
            "8",
            "--data.init_args.num_workers",
            "2",
            "--data.init_args.shuffle_buffer",
            "16",
            "--data.init_args.epoch_length",
            "4",
            "--data.init_args.captions",
            "true",  # dict batches with caption strings pass through the module
            "--run_dir",
            str(tmp_path / "run"),
            "--logger",
            "csv",
            "--export",
            str(out),
            "--trainer.max_steps",
            "6",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.log_every_n_steps",
            "1",
            "--threads",
            "1",
        ]
    )
    assert out.is_file()
    rows = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()
    col = rows[0].split(",").index("train/loss")
    losses = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert len(losses) == 6 and all(np.isfinite(losses))
