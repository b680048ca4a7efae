"""scripts/diagnose_mixtures.py: its mixture moments and its bad input (one line on stderr, exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teachers import preset_mixture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.diagnose_mixtures import data_std, parse, parse_pairs  # noqa: E402


@pytest.mark.parametrize("name", ["ring8", "aniso2d", "scales16"])
def test_data_std_matches_samples(name):
    mix = preset_mixture(name)
    x = mix.sample(200_000, generator=torch.Generator().manual_seed(0)).double()
    assert abs(data_std(mix) / x.var(0).mean().sqrt().item() - 1) < 0.01


def test_bad_options_raise_value_errors():
    with pytest.raises(ValueError, match="key=value"):
        parse_pairs(["target_ema"], "--objective")
    with pytest.raises(ValueError, match="--steps"):
        parse(["--methods", "cd", "--steps", "0"])
    assert parse_pairs(["target_ema=0.9", "source=data"], "--objective") == {"target_ema": 0.9, "source": "data"}


@pytest.mark.slow
def test_bad_preset_is_one_line_exit_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "diagnose_mixtures.py"), "--methods", "cd", "--presets", "nosuch"]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*cmd, "--cache", str(tmp_path)], capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "arning" not in ln and "warnings.warn" not in ln]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "unknown mixture preset" in lines[0], p.stderr
