"""scripts/diagnose_mixtures.py: its mixture moments, its presets (the benchmark's mixture sets), a tiny run and its
bad input (one line on stderr, exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teachers import preset_mixture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.diagnose_mixtures import data_std, main, mixture_sets, parse  # noqa: E402
from scripts.diagnose_student import key_values  # noqa: E402


@pytest.mark.parametrize("name", ["ring8", "aniso2d", "scales16"])
def test_data_std_matches_samples(name):
    mix = preset_mixture(name)
    x = mix.sample(200_000, generator=torch.Generator().manual_seed(0)).double()
    assert abs(data_std(mix) / x.var(0).mean().sqrt().item() - 1) < 0.01


def test_bad_options_raise_value_errors():
    with pytest.raises(ValueError, match="key=value"):
        key_values(["target_ema"], "--objective")
    with pytest.raises(ValueError, match="--steps"):
        parse(["--methods", "cd", "--steps", "0"])
    assert key_values(["target_ema=0.9", "source=data"], "--objective") == {"target_ema": 0.9, "source": "data"}


@pytest.mark.slow
def test_bad_preset_is_one_line_exit_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "diagnose_mixtures.py"), "--methods", "cd", "--presets", "nosuch"]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*cmd, "--cache", str(tmp_path)], capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "arning" not in ln and "warnings.warn" not in ln]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "unknown mixture preset" in lines[0], p.stderr


def test_presets_are_the_benchmarks_mixture_sets():
    assert mixture_sets() == {"ring8": "gmm", "aniso2d": "aniso2d", "scales16": "scales16"}


@pytest.mark.slow
def test_a_tiny_run_scores_the_benchmarks_student(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    argv = ["--methods", "cd,shortcut", "--presets", "ring8", "--steps", "3", "--init-steps", "3", "--n-eval", "64"]
    main([*argv, "--objective", "target_ema=0.5", "--cache", str(tmp_path), "--json", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["preset"], r["set"], r["method"], r["steps"]) for r in rows] == [
        ("ring8", "gmm", "cd", 3),
        ("ring8", "gmm", "shortcut", 3),
    ]
    cd, shortcut = rows
    assert cd["config"]["target_ema"] == shortcut["config"]["target_ema"] == 0.5
    assert cd["init"] == shortcut["init"] == "teacher"
    # cd re-noises (gamma 1): a flow-map error at 1 NFE only; shortcut's deterministic sampler: at every NFE
    assert cd["ema"]["2"] is None and all(v is not None and v > 0 for v in shortcut["ema"].values())
    assert cd["ema"]["1"] != cd["raw"]["1"]  # the EMA and the raw weights are scored apart
    # the init net's Heun error (the floor the students start from): one per preset, the same in every row
    assert set(cd["init_net_heun"]) == {"8", "32"} and cd["init_net_heun"] == shortcut["init_net_heun"]
    assert all(v > 0 for v in cd["init_net_heun"].values())
    assert "ring8" in capsys.readouterr().out


def test_unknown_method_or_hyperparameter_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="no config file"):
        main(["--methods", "nosuch", "--presets", "ring8", "--cache", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown hyperparameter"):  # shortcut has it, cd does not
        main(["--methods", "shortcut,cd", "--objective", "consistency_share=0.5", "--cache", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing trained or cached
