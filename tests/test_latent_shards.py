"""Latent shards, made once: scripts/make_shards.py --encode PIPELINE_FOLDER (flowmap/latent.encode_items).

- test_encode_image_folder_and_image_shards_to_latents: an image folder (and the same images as image shards)
  encoded in chunks of 4 into latent shards; latents equal a direct encode of the images to 1e-5, labels kept;
  the index records the VAE reference; a mismatched image size is refused with one line (exit 2).
- test_distill_streams_latent_shards_without_the_vae: scripts/distill.py --teacher FOLDER on the latent shards
  for 3 steps, starting from the teacher's weights, with the VAE's encode/decode made to raise (never called);
  the exported student records the VAE and decodes to (3, 16, 16) images.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from PIL import Image

from flowmap.app import load_student
from flowmap.data.registry import get_dataset
from flowmap.data.shards import read_all, read_index
from flowmap.latent import LatentCodec, codec_of
from scripts.make_shards import main as make_shards
from tests.latent_parts import dit_folder

ROOT = Path(__file__).resolve().parents[1]


def image_folder(root: Path, n: int = 6, side: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_encode_image_folder_and_image_shards_to_latents(tmp_path):
    folder = dit_folder(tmp_path / "dit")
    images = image_folder(tmp_path / "images")
    make_shards(
        [
            "--image-folder",
            str(images),
            "--encode",
            str(folder),
            "--out",
            str(tmp_path / "lat"),
            "--max-count",
            "4",
            "--batch-size",
            "4",
        ]
    )
    z, y = read_all(tmp_path / "lat")
    ds = get_dataset("image_folder", root=str(images), image_size=16, channels=3).dataset("train")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    direct = LatentCodec.from_folder(folder).encode(x)
    assert z.shape == (6, 4, 8, 8) and float((z - direct).abs().max()) < 1e-5
    assert torch.equal(y, labels) and sorted(set(y.tolist())) == [0, 1]
    index = read_index(tmp_path / "lat")
    assert len(index.shards) == 2 and index.source["encoded_by"]["scaling_factor"] == pytest.approx(0.18215)

    make_shards(
        ["--image-folder", str(images), "--image-size", "16", "--out", str(tmp_path / "img"), "--max-count", "5"]
    )
    make_shards(
        [
            "--from-shards",
            str(tmp_path / "img"),
            "--encode",
            str(folder),
            "--out",
            str(tmp_path / "lat2"),
            "--max-count",
            "6",
            "--batch-size",
            "5",
        ]
    )
    z2, y2 = read_all(tmp_path / "lat2")
    assert float((z2 - direct).abs().max()) < 1e-5 and torch.equal(y2, labels)

    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_shards.py"),
            "--image-folder",
            str(images),
            "--image-size",
            "8",
            "--encode",
            str(folder),
            "--out",
            str(tmp_path / "bad"),
            "--max-count",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "--image-size 16" in run.stderr
    assert not (tmp_path / "bad").exists()


def test_distill_streams_latent_shards_without_the_vae(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import distill

    folder = dit_folder(tmp_path / "dit")
    make_shards(
        [
            "--image-folder",
            str(image_folder(tmp_path / "images")),
            "--encode",
            str(folder),
            "--out",
            str(tmp_path / "lat"),
            "--max-count",
            "4",
        ]
    )

    def never(*args, **kwargs):
        raise AssertionError("the VAE ran during training")

    monkeypatch.setattr(LatentCodec, "encode", never)
    monkeypatch.setattr(LatentCodec, "decode", never)
    config = tmp_path / "cd.yaml"
    config.write_text(
        "model:\n"
        "  objective: {name: cd, steps: 4, solver: euler}\n"
        "  ema_decay: 0.5\n"
        "data:\n"
        "  class_path: flowmap.lightning.streaming.ShardDataModule\n"
        f"  init_args: {{root: {tmp_path / 'lat'}, batch_size: 4, epoch_length: 3, shuffle_buffer: 4}}\n"
        "trainer: {max_steps: 3, enable_progress_bar: false}\n"
    )
    out = tmp_path / "student.safetensors"
    cli = distill.main(
        [
            "--teacher",
            str(folder),
            "--config",
            str(config),
            "--run_dir",
            str(tmp_path / "run"),
            "--logger",
            "none",
            "--export",
            str(out),
        ]
    )
    module = cli.model
    assert module.global_step == 3 and codec_of(module.teacher) is not None
    teacher_state = module.teacher.teacher.net.model.state_dict()
    student_state = module.student.net.model.state_dict()
    diff = sum(float((student_state[k] - v).square().sum()) for k, v in teacher_state.items())
    norm = sum(float(v.square().sum()) for v in teacher_state.values())
    assert 0 < (diff / norm) ** 0.5 < 0.1  # trained, from the teacher's weights
    monkeypatch.undo()
    student = load_student(out)
    images = codec_of(student).decode(student.sample(2, labels=1, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
