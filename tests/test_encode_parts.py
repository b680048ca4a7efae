"""One encode pass on many processes: scripts/make_shards.py --encode ... --part K --parts N, then --merge OUT.

- test_parts_merge_to_the_single_process_set: 10 labelled images encoded by a tiny AutoencoderKL as 2 parts (part 0
  by --part/--parts, part 1 by torchrun's RANK / WORLD_SIZE) into OUT/part-0000K; the merged set read back by the
  training reader (read_all, and ShardStream split by rank) equals a single-process --encode sample for sample in
  the same order (latents to 1e-6, labels exactly, keys 0..9). A missing part, and a part from another source,
  make --merge exit 2 with one line and no OUT/index.json. Image shards re-encoded (--from-shards) as 3 parts that
  start mid-shard merge to the same set. Re-encoding a part of a merged set needs --overwrite and removes the
  merged index.json.
- test_parts_keep_each_latent_with_its_prompt: 7 images with --prompts as 3 parts: every latent keeps its own
  prompt embedding (equal to the single-process set to 1e-6).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from flowmap.data.shards import ShardStream, read_all, read_index
from flowmap.data.slot_stream import StreamOptions
from scripts.make_shards import main as make_shards
from tests.latent_parts import dit_folder, text_folder
from tests.test_latent_shards import image_folder

ROOT = Path(__file__).resolve().parents[1]


def merge_in_subprocess(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_shards.py"), "--merge", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


def test_parts_merge_to_the_single_process_set(tmp_path, monkeypatch):
    folder = dit_folder(tmp_path / "dit")
    images = image_folder(tmp_path / "images", n=10)
    common = ["--image-folder", str(images), "--encode", str(folder), "--max-count", "3", "--batch-size", "4"]
    make_shards([*common, "--out", str(tmp_path / "single")])
    out = tmp_path / "parts"
    part0 = make_shards([*common, "--out", str(out), "--part", "0", "--parts", "2"])
    assert part0.count == 5 and [s["start"] for s in part0.shards] == [0, 3]

    run = merge_in_subprocess(out)  # part 1 is missing
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "part-00001" in run.stderr
    assert not (out / "index.json").exists()

    other = tmp_path / "images_copy"  # the same pixels from another folder: another source, not one pass
    shutil.copytree(images, other)
    make_shards([*common[2:], "--image-folder", str(other), "--out", str(out), "--part", "1", "--parts", "2"])
    run = merge_in_subprocess(out)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "source" in run.stderr
    assert not (out / "index.json").exists()

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts rank 1 of 2
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    part1 = make_shards([*common, "--out", str(out), "--overwrite"])
    monkeypatch.delenv("WORLD_SIZE")
    assert part1.root == out / "part-00001" and part1.source["range"] == [5, 10]
    merged = make_shards(["--merge", str(out)])
    assert [s["name"] for s in merged.shards] == [
        "part-00000/shard-000000.tar",
        "part-00000/shard-000001.tar",
        "part-00001/shard-000000.tar",
        "part-00001/shard-000001.tar",
    ]
    assert [s["start"] for s in merged.shards] == [0, 3, 5, 8] and merged.count == 10

    z1, y1 = read_all(tmp_path / "single")
    z2, y2 = read_all(out)
    assert z2.shape == (10, 4, 8, 8) and float((z1 - z2).abs().max()) < 1e-6
    assert torch.equal(y1, y2) and sorted(set(y2.tolist())) == [0, 1]
    single = read_index(tmp_path / "single")
    assert (merged.shape, merged.num_classes, merged.classes) == (single.shape, single.num_classes, single.classes)
    assert merged.source["encoded_by"] == single.source["encoded_by"] and merged.source["parts"] == 2

    for rank in (0, 1):  # the training stream over the part folders: rank r reads keys r, r + 2, ...
        stream = ShardStream(
            out, StreamOptions(batch_size=5, epoch_length=1, shuffle_buffer=0, rank=rank, world_size=2), split="by_rank"
        )
        zb, yb = next(iter(stream))
        assert float((zb - z1[rank::2]).abs().max()) < 1e-6 and torch.equal(yb, y1[rank::2])

    run = merge_in_subprocess(out)  # merged already: refused without --overwrite, the index kept
    assert run.returncode == 2 and "--overwrite" in run.stderr and read_index(out).count == 10
    with pytest.raises(ValueError, match="merged already"):  # re-encoding a part of a merged set needs --overwrite
        make_shards([*common, "--out", str(out), "--part", "1", "--parts", "2"])
    make_shards([*common, "--out", str(out), "--part", "1", "--parts", "2", "--overwrite"])
    assert not (out / "index.json").exists()  # the merged index would be stale: gone until --merge again

    # re-encoding image shards [0, 4), [4, 8), [8, 10) as 3 parts [0, 3), [3, 6), [6, 10): parts start mid-shard
    make_shards(
        ["--image-folder", str(images), "--image-size", "16", "--out", str(tmp_path / "img"), "--max-count", "4"]
    )
    for k in range(3):
        make_shards(
            [
                *common[2:],
                "--from-shards",
                str(tmp_path / "img"),
                "--out",
                str(tmp_path / "re"),
                "--part",
                str(k),
                "--parts",
                "3",
            ]
        )
    assert [s["start"] for s in make_shards(["--merge", str(tmp_path / "re")]).shards] == [0, 3, 6, 9]
    z3, y3 = read_all(tmp_path / "re")
    assert float((z1 - z3).abs().max()) < 1e-6 and torch.equal(y1, y3)


def test_parts_keep_each_latent_with_its_prompt(tmp_path):
    folder = text_folder(tmp_path / "sd")
    images = image_folder(tmp_path / "images", n=7)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a red cat", "two dogs", "blue sky", "a cat", "red sky", "dogs", "a"]) + "\n")
    common = ["--image-folder", str(images), "--encode", str(folder), "--prompts", str(prompts), "--max-count", "2"]
    make_shards([*common, "--out", str(tmp_path / "single")])
    for k in range(3):
        make_shards([*common, "--out", str(tmp_path / "parts"), "--part", str(k), "--parts", "3"])
    merged = make_shards(["--merge", str(tmp_path / "parts")])
    assert merged.count == 7 and [s["start"] for s in merged.shards] == [0, 2, 4, 6]  # parts [0, 2), [2, 4), [4, 7)
    z1, e1 = read_all(tmp_path / "single")
    z2, e2 = read_all(tmp_path / "parts")
    assert e2.shape == (7, 12, 16) and float((e1 - e2).abs().max()) < 1e-6 and float(e2.std()) > 0.1
    assert float((z1 - z2).abs().max()) < 1e-6
