"""scripts/benchmark.py --diffusers runs scripts/benchmark_diffusers.py: a diffusers UNet2DModel teacher folder
trained on digits, two students distilled back through distill.py --teacher FOLDER (from the teacher's weights and
from scratch), FD at 1 and 2 NFE for both and the teacher's Euler row (quick budget: a smoke run of the whole path)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_flag_runs_the_diffusers_round_trip(tmp_path):
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    from flowmap.io import read_config

    threads = torch.get_num_threads()
    try:
        report = benchmark.main(["--diffusers", "--quick", "--out", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    fd = report["fd"]
    assert sorted(fd) == ["from scratch", "from the teacher's weights", "teacher (Euler)"]
    assert sorted(fd["teacher (Euler)"]) == [1, 2, 8, 32]
    for name in ("from scratch", "from the teacher's weights"):
        assert sorted(fd[name]) == [1, 2] and all(math.isfinite(v["fd"]) and v["fd"] > 0 for v in fd[name].values())
    work = tmp_path / "cache" / "diffusers"
    assert (work / "digits_unet_flow" / "diffusion_pytorch_model.safetensors").is_file()
    for run in ("from_teacher", "scratch"):
        config = read_config(work / run / "student.safetensors")
        assert config["net"]["model_class"] == "UNet2DModel" and config["steps_trained"] == 4
        assert config["teacher"]["name"] == "digits_unet_flow" and config["method"] == "cd"
    assert not (tmp_path / "DIFFUSERS.md").exists()  # quick runs leave the table alone
