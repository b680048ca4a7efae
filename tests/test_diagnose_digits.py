"""scripts/diagnose_digits.py: the tangent probe separates a smooth velocity from one that ripples in time; the
recipe is the benchmark's with the command line's overrides; bad input is one line, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from diagnose_digits import digits_recipe, parse, tangent_probe  # noqa: E402


class Field(nn.Module):
    """v(x, s) = x (s + a sin(k s)): smooth for a = 0, a ripple of period 2 pi / k otherwise."""

    def __init__(self, a: float, k: float) -> None:
        super().__init__()
        self.a, self.k = a, k

    def velocity(self, x, s, cond=None):
        return x * (s + self.a * torch.sin(self.k * s)).view(-1, *([1] * (x.dim() - 1)))


def test_tangent_probe_jvp_matches_the_difference_for_a_smooth_field_and_exceeds_it_for_a_ripple():
    x0 = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(32, dtype=torch.long)
    smooth = tangent_probe(Field(0.0, 0.0), x0, y)
    for row in smooth.values():  # x (s^2 + 1) exactly: the central difference of a quadratic in h is exact
        assert abs(row["jvp"] - row["fd_0.01"]) <= 1e-3 * row["jvp"]
    rippled = tangent_probe(Field(0.01, 1000.0), x0, y)  # period 0.006, as a time_scale of 1000
    ratios = [row["jvp"] / row["fd_0.01"] for row in rippled.values()]
    assert max(ratios) > 3.0


def test_the_recipe_is_the_benchmarks_with_the_command_lines_overrides():
    from scripts.benchmark import BUDGETS, recipe

    plain = digits_recipe(parse(["meanflow"]))
    assert plain == recipe("digits", "meanflow", BUDGETS["full"])  # the data config's 1000 steps, EMA and all
    r = digits_recipe(
        parse(["sct", "--steps", "300", "--set", "tangent_warmup=0.5", "--net", "time_scale=10", "--lr", "2e-4"])
    )
    assert r["options"]["steps"] == 300 and r["options"]["lr"] == 2e-4
    assert r["objective"]["tangent_warmup"] == 150 and r["student"]["net"]["time_scale"] == 10
    assert r["options"]["ema"].halflife_steps(0) == 30  # the recipe's 10% of the run
    assert digits_recipe(parse(["sct", "--steps", "300", "--ema", "0.5"]))["options"]["ema"].halflife_steps(0) == 150
    dit = digits_recipe(parse(["scd", "--dataset", "digits_dit"]))
    assert dit == recipe("digits_dit", "scd", BUDGETS["full"]) and dit["student"]["net"]["name"] == "dit"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message", [(["nosuch", "--set", "p=1"], "unknown method"), (["cd", "--steps", "0"], "--steps must be >= 1")]
)
def test_bad_input_is_one_line_exit_2_before_the_teacher(tmp_path, args, message):
    cmd = [sys.executable, str(ROOT / "scripts" / "diagnose_digits.py"), *args, "--cache", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "arning" not in ln and "warnings.warn" not in ln]
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr
    assert not any(tmp_path.iterdir())  # no teacher trained or cached
