"""Shard writing: every kind of source (toy set, mixture samples, digits, image folder, .npz) round-trips to
exactly the source tensors; the index JSON describes the set; shard sizes obey the count / byte limits;
only .npy / .png / .cls members are written; a failed write leaves no partial set."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmap.data import get_dataset, write_image_folder
from flowmap.data.images import ImageFolderDataset
from flowmap.data.registry import load_tensor_file
from flowmap.data.shards import INDEX_NAME, read_all, read_index, write_shards, write_source_shards

ROOT = Path(__file__).resolve().parents[1]


def _members(root: Path) -> list[str]:
    names = []
    for tar in sorted(root.glob("shard-*.tar")):
        with tarfile.open(tar) as f:
            names += f.getnames()
    return names


def _make_shards(*args: str):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_shards

    return make_shards.make_shards(list(args))


def test_toy_set_round_trip_and_index(tmp_path):
    source = get_dataset("checkerboard", n_train=300, n_val=10)
    index = write_source_shards(source, tmp_path / "cb", max_count=64)
    x, y = read_all(tmp_path / "cb")
    X, Y = source.tensors("train")
    assert torch.equal(x, X) and torch.equal(y, Y) and bool((y == -1).all())
    meta = json.loads((tmp_path / "cb" / INDEX_NAME).read_text())
    assert meta["count"] == 300 and meta["shape"] == [2] and meta["dtype"] == "float32" and meta["encoding"] == "npy"
    assert meta["num_classes"] == 0 and meta["classes"] is None and meta["source"]["name"] == "checkerboard"
    assert [s["count"] for s in meta["shards"]] == [64, 64, 64, 64, 44]
    assert [s["start"] for s in meta["shards"]] == [0, 64, 128, 192, 256]
    assert [s["bytes"] for s in meta["shards"]] == [p.stat().st_size for p in index.paths]
    names = _members(tmp_path / "cb")
    assert len(names) == 600 and {n.rsplit(".", 1)[1] for n in names} == {"npy", "cls"}
    # fixed tar metadata: the same input gives byte-identical shards
    write_source_shards(source, tmp_path / "cb2", max_count=64)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(index.paths, read_index(tmp_path / "cb2").paths))


def test_mixture_samples_and_digits_by_bytes(tmp_path):
    gmm = get_dataset("gmm", preset="grid4", n_train=200, n_val=10)
    write_source_shards(gmm, tmp_path / "gmm", max_count=50)
    x, y = read_all(tmp_path / "gmm")
    assert torch.equal(x, gmm.tensors("train")[0]) and torch.equal(y, gmm.tensors("train")[1])
    assert read_index(tmp_path / "gmm").num_classes == gmm.num_classes

    digits = get_dataset("digits")
    limit = 300_000
    index = _make_shards("--dataset", "digits", "--out", str(tmp_path / "digits"), "--max-bytes", "300KB")
    x, y = read_all(tmp_path / "digits")
    X, Y = digits.tensors("train")
    assert torch.equal(x, X) and torch.equal(y, Y)
    assert index.num_classes == 10 and index.shape == (1, 8, 8) and index.encoding == "npy"  # not 8-bit values
    sizes = [p.stat().st_size for p in index.paths]
    assert len(sizes) >= 5 and max(sizes) <= limit and sum(sizes) > 0.8 * limit * (len(sizes) - 1)  # full shards


def test_image_folder_and_npz_store_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 8, 6, 3), dtype=torch.uint8, generator=g).numpy()
    labels = [0, 1] * 5
    write_image_folder(images, labels, tmp_path / "folder", classes=["cat", "dog"])
    index = _make_shards("--image-folder", str(tmp_path / "folder"), "--out", str(tmp_path / "img"), "--max-count", "4")
    assert index.encoding == "png" and index.dtype == "uint8" and index.shape == (3, 8, 6)
    assert index.classes == ["cat", "dog"] and index.num_classes == 2 and len(index.shards) == 3
    x, y = read_all(tmp_path / "img")
    ds = ImageFolderDataset(tmp_path / "folder")
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(len(ds))])) and torch.equal(y, ds.labels)
    assert {n.rsplit(".", 1)[1] for n in _members(tmp_path / "img")} == {"png", "cls"}

    gray = torch.randint(0, 256, (7, 5, 5, 1), dtype=torch.uint8, generator=g).numpy()
    np.savez(tmp_path / "gray.npz", x=gray, y=np.arange(7) % 3)
    index = _make_shards("--npz", str(tmp_path / "gray.npz"), "--out", str(tmp_path / "gray"), "--max-count", "3")
    X, Y = load_tensor_file(tmp_path / "gray.npz")
    x, y = read_all(tmp_path / "gray")
    assert index.encoding == "png" and index.shape == (1, 5, 5) and torch.equal(x, X) and torch.equal(y, Y)

    floats = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=floats)
    index = _make_shards("--npz", str(tmp_path / "f.npz"), "--out", str(tmp_path / "f"), "--max-count", "5")
    assert index.encoding == "npy" and torch.equal(read_all(tmp_path / "f")[0], torch.from_numpy(floats))


def _samples(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("source died")
        yield torch.full((2,), float(i)), -1


def test_failed_write_leaves_no_partial_set(tmp_path):
    with pytest.raises(RuntimeError, match="source died"):
        write_shards(_samples(100, fail_at=70), tmp_path / "s", shape=(2,), max_count=16)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary directory
    write_shards(_samples(40), tmp_path / "s", shape=(2,), max_count=16)
    with pytest.raises(RuntimeError, match="source died"):
        write_shards(_samples(100, fail_at=70), tmp_path / "s", shape=(2,), max_count=16, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["s"] and read_index(tmp_path / "s").count == 40
    assert torch.equal(read_all(tmp_path / "s")[0][:, 0], torch.arange(40.0))
    write_shards(_samples(50), tmp_path / "s", shape=(2,), max_count=16, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["s"] and read_index(tmp_path / "s").count == 50


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="already exists"):
        write_shards(_samples(4), tmp_path, shape=(2,), max_count=2)
    with pytest.raises(ValueError, match="max_count .* max_bytes"):
        write_shards(_samples(4), tmp_path / "a", shape=(2,))
    with pytest.raises(ValueError, match="NaN"):
        write_shards([(torch.tensor([0.0, float("nan")]), -1)], tmp_path / "a", shape=(2,), max_count=2)
    with pytest.raises(ValueError, match="label 3"):
        write_shards([(torch.zeros(2), 3)], tmp_path / "a", shape=(2,), num_classes=2, max_count=2)
    with pytest.raises(ValueError, match="shape"):
        write_shards([(torch.zeros(3), -1)], tmp_path / "a", shape=(2,), max_count=2)
    with pytest.raises(ValueError, match="uint8"):
        write_shards([(torch.full((1, 2, 2), 0.3), -1)], tmp_path / "a", shape=(1, 2, 2), encoding="png", max_count=2)
    with pytest.raises(ValueError, match="cannot read a byte size from 'lots'"):  # one line through main_guard
        _make_shards("--dataset", "digits", "--out", str(tmp_path / "a"), "--max-bytes", "lots")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="does not exist"):
        read_index(tmp_path / "missing")
    with pytest.raises(ValueError, match="no index.json"):
        read_index(tmp_path)
