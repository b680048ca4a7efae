"""scripts/benchmark_scale.py on a tiny DiT: every requested step kind is timed against fm (fm's ratio is exactly 1,
a MeanFlow step with a JVP on every pair costs more than an fm step), the table lists each row, sampling is timed;
an unknown net is one ValueError (one line on stderr through main_guard)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_scale_benchmark_tiny(capsys):
    import benchmark_scale

    result = benchmark_scale.main(
        ["--nets", "dit_tiny", "--methods", "meanflow,cd", "--steps", "2", "--no-compile", "--threads", "1"]
    )
    rows = result["nets"]["dit_tiny"]["steps"]
    assert set(rows) == {"fm", "meanflow", benchmark_scale.MEANFLOW_FUNC, "cd"}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["fm"]["ratio"] == 1.0
    assert rows["meanflow"]["ratio"] > 1.0 and rows[benchmark_scale.MEANFLOW_FUNC]["ratio"] > 1.0
    assert result["nets"]["dit_tiny"]["samples_per_s"]["student 1 NFE"] > 0
    out = capsys.readouterr().out
    for name in rows:
        assert f"| {name} |" in out
    per_param = result["nets"]["dit_tiny"]["state_bytes_per_param"]
    assert per_param["fm"] == pytest.approx(16.0, abs=0.1)  # weights, grads, Adam's two moments
    assert per_param["cd"] == pytest.approx(20.0, abs=0.1)  # and the EMA target network


def test_scale_benchmark_refuses_unknown_net():
    import benchmark_scale

    with pytest.raises(ValueError, match="unknown"):
        benchmark_scale.main(["--nets", "resnet"])


def test_paper_memory_formula():
    """The on-paper table: with no activations DDP holds 16 + 4 + 2 = 22 bytes per parameter; FSDP over 8 GPUs
    20 / 8 + 2 plus two gathered units; activation checkpointing lowers the per-GPU total once activations count."""
    import benchmark_scale

    xl = benchmark_scale.PAPER_NETS["DiT-XL/2, 256x256 (4x32x32 latents)"]
    p, gib = xl["params"], 2.0**30
    none = benchmark_scale.paper_memory({"dit": {"bytes_per_unit": 0.0}}, world=8, batch=32)[0]
    assert none["ddp"] == pytest.approx(22 * p / gib)
    assert none["fsdp"] == pytest.approx((20 * p / 8 + 2 * p + 8 * p / 28) / gib)
    some = benchmark_scale.paper_memory({"dit": {"bytes_per_unit": 40.0}}, world=8, batch=32)[0]
    assert some["act_gib_per_sample"] == pytest.approx(40.0 * 256 * 1152 * 28 / gib)
    assert some["ddp"] > some["fsdp"] > some["fsdp_ac"]
