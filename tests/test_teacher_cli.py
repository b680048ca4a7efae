"""Teacher training through LightningCLI: the safetensors export records everything needed to rebuild
the model; user errors end in one clear line and leave nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmap.io import CheckpointError, read_config, save_model
from flowmap.models import load_model
from flowmap.nets import build_net

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _train(tmp_path: Path, config: str, *extra: str) -> Path:
    import train_teacher

    out = tmp_path / "teacher.safetensors"
    train_teacher.main(
        [
            "--config",
            str(ROOT / config),
            "--run_dir",
            str(tmp_path / "run"),
            "--logger",
            "csv",
            "--export",
            str(out),
            "--trainer.max_steps",
            "30",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.log_every_n_steps",
            "5",
            *extra,
        ]
    )
    return out


def test_checkerboard_teacher_export_rebuilds_the_model(tmp_path):
    out = _train(tmp_path, "configs/teacher/checkerboard.yaml", "--data.init_args.n_train", "4096")
    cfg = read_config(out)
    assert cfg["kind"] == "teacher" and cfg["net"]["name"] == "mlp"
    assert cfg["path"]["name"] == "linear" and cfg["prediction"] == "velocity"
    assert cfg["data_shape"] == [2] and cfg["num_classes"] == 0
    teacher = load_model(out, expect="teacher")
    x = torch.randn(16, 2)
    v = teacher.velocity(x, torch.full((16,), 0.5))
    assert v.shape == (16, 2) and torch.isfinite(v).all()
    # the CSV logger saw the loss, the learning rate and the gradient norm
    metrics = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()[0]
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert key in metrics
    # periodic + last checkpoints written by the CLI
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_vp_eps_teacher_reaches_the_linear_axis(tmp_path):
    """A DDPM-style (VP, eps) teacher is used through the change of path: its velocity on the linear
    axis is finite everywhere, including near t = 0 and t = 1."""
    out = _train(tmp_path, "configs/teacher/checkerboard_vp_eps.yaml", "--data.init_args.n_train", "4096")
    teacher = load_model(out)
    assert read_config(out)["path"]["name"] == "vp" and teacher.prediction == "eps"
    t = torch.tensor([1e-3, 0.3, 0.7, 0.999])
    v = teacher.velocity(torch.randn(4, 2), t)
    assert torch.isfinite(v).all()


@pytest.mark.slow
def test_digits_unet_teacher_guided_sampling(tmp_path):
    out = _train(tmp_path, "configs/teacher/digits.yaml", "--data.init_args.batch_size", "32")
    teacher = load_model(out)
    assert teacher.num_classes == 10 and teacher.data_shape == (1, 8, 8)
    from flowmap.solvers import solve

    y = torch.arange(4)
    x = solve(teacher, torch.randn(4, 1, 8, 8), 4, "euler", cond=y, guidance=2.0)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="class labels must lie"):
        teacher.velocity(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([3, 11]))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_teacher.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_config_key_is_one_clear_line(tmp_path):
    r = _cli(
        "--config",
        str(ROOT / "configs/teacher/checkerboard.yaml"),
        "--model.not_a_key",
        "1",
        "--run_dir",
        str(tmp_path / "r"),
        "--logger",
        "none",
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "not_a_key" in last
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_unknown_data_set_is_one_clear_line(tmp_path):
    r = _cli(
        "--config",
        str(ROOT / "configs/teacher/checkerboard.yaml"),
        "--data.init_args.name",
        "no_such_set",
        "--run_dir",
        str(tmp_path / "r"),
        "--logger",
        "none",
        cwd=tmp_path,
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "no_such_set" in last
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_checkpoint_for_another_net_is_refused(tmp_path):
    small = build_net({"name": "mlp", "data_shape": [2], "width": 32, "depth": 2})
    path = save_model(
        tmp_path / "t.safetensors",
        small,
        {"kind": "teacher", "net": {"name": "mlp", "data_shape": [2], "width": 64, "depth": 2}},
    )
    with pytest.raises(CheckpointError, match="does not fit|mis-shaped|shape"):
        load_model(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "junk.safetensors")
