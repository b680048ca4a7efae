"""Every script sets torch's CPU thread count: ``--threads N`` wins, else ``flowmap.runtime.pick_threads``
(1 on a busy machine, all cores otherwise), else a user's OMP_NUM_THREADS is left alone."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _teacher(tmp_path: Path, *extra: str) -> Path:
    import train_teacher

    out = tmp_path / "teacher.safetensors"
    train_teacher.main(
        [
            "--config",
            str(ROOT / "configs/teacher/checkerboard.yaml"),
            "--data.init_args.n_train",
            "512",
            "--data.init_args.batch_size",
            "64",
            "--model.net",
            '{"name": "mlp", "data_shape": [2], "width": 16, "depth": 2}',
            "--run_dir",
            str(tmp_path / "run"),
            "--logger",
            "none",
            "--export",
            str(out),
            "--trainer.max_steps",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
    )
    return out


def test_threads_flag_sets_the_count_in_lightning_and_argparse_scripts(tmp_path, threads_restored):
    import make_shards
    import sample

    torch.set_num_threads(2)
    teacher = _teacher(tmp_path, "--threads", "1")
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    sample.main([str(teacher), "--n", "16", "--steps", "2", "--out", str(tmp_path / "s"), "--threads", "1"])
    assert torch.get_num_threads() == 1
    make_shards.make_shards(
        [
            "--dataset",
            "checkerboard",
            "--kwargs",
            '{"n_train": 64, "n_val": 8}',
            "--out",
            str(tmp_path / "shards"),
            "--max-count",
            "32",
            "--threads",
            "3",
        ]
    )
    assert torch.get_num_threads() == 3
    with pytest.raises(ValueError, match="--threads must be >= 0"):
        sample.main([str(teacher), "--threads", "-1"])


def test_default_follows_the_load_policy_unless_omp_is_set(tmp_path, threads_restored, monkeypatch):
    import sample

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    teacher = _teacher(tmp_path)
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine: every core
    torch.set_num_threads(1)
    sample.main([str(teacher), "--n", "16", "--steps", "2", "--out", str(tmp_path / "s")])
    assert torch.get_num_threads() == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 0.0, 0.0))  # a busy machine: one thread
    _teacher(tmp_path / "busy")
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting is kept when --threads is not given
    torch.set_num_threads(2)
    _teacher(tmp_path / "omp")
    assert torch.get_num_threads() == 2
