"""scripts/distill.py: ``--help`` lists ``--teacher`` and ``--allow_clip_mismatch`` (both expanded before
LightningCLI parses), and ``--allow_clip_mismatch`` reaches the teacher of a clipping diffusers folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import distill as distill_script


def test_help_lists_the_teacher_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        distill_script.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # the help text wraps with the terminal width
    assert "--teacher TEACHER teacher: our .safetensors / .ckpt file or a diffusers folder" in out
    assert "--allow_clip_mismatch" in out


def test_help_types_each_methods_hyperparameters_and_the_student_options(capsys):
    """--model.objective / --model.student are dicts: their help lists every registered method's hyperparameters
    and every net's options with types and defaults, from the constructors' signatures."""
    from flowmap.objectives import OBJECTIVES

    with pytest.raises(SystemExit):
        distill_script.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    meanflow = "meanflow(p: float = 1.0, c: float = 0.001, data_velocity: str = 'conditional', source: str = 'teacher',"
    assert meanflow in out
    assert "equal_share: float = 0.75" in out
    assert "cd(steps: int = 8, grid: str = 'uniform'," in out
    assert all(f"{name}(" in out for name in OBJECTIVES)
    assert "unet(data_shape: tuple[int, ...] | list[int] = (1, 8, 8), channels: int = 64" in out
    assert "Without a net: teacher's network(guidance_input: bool = False, freq_dim: int = 128" in out
    assert "lora: dict | None = None" in out


def test_train_teacher_help_has_no_teacher_flag(capsys):
    import train_teacher

    with pytest.raises(SystemExit):
        train_teacher.main(["--help"])
    assert "--teacher " not in capsys.readouterr().out


def test_allow_clip_mismatch_reaches_the_checkpoint_teacher(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from flowmap.io import CheckpointError
    from teachers import CheckpointTeacher

    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    folder = tmp_path / "ddim"
    unet.save_pretrained(folder)
    diffusers.DDIMScheduler(num_train_timesteps=20).save_pretrained(folder)  # clip_sample=True by default
    with pytest.raises(CheckpointError, match="clip_sample=True"):
        distill_script.expand_teacher_flag(["--teacher", str(folder), "--config", "x.yaml"])
    args = distill_script.expand_teacher_flag(["--allow_clip_mismatch", "--teacher", str(folder), "--config", "x.yaml"])
    i = args.index("--model.teacher")
    spec = json.loads(args[i + 1])
    assert (
        spec["init_args"] == {"path": str(folder), "allow_clip_mismatch": True} and "--allow_clip_mismatch" not in args
    )
    teacher = CheckpointTeacher(**spec["init_args"])
    assert any("clip" in note for note in teacher.description["notes"])
