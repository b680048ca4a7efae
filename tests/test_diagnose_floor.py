"""scripts/diagnose_floor.py: the exact-map regression vanishes at the exact map and not at a map 1% off."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from exact_maps import ExactGMMMap

from teachers import preset_mixture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.diagnose_floor import ExactMapRegression  # noqa: E402


def test_exact_map_regression_vanishes_at_the_exact_map_only():
    """ring8's exact map (RK4, 64 steps) as the student, the objective's target at 40 steps: the loss is the two
    solves' difference; a map 1% off, X' = 1.01 X - 0.01 x, leaves 1e-4 |X - x|^2."""
    teacher = preset_mixture("ring8")
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(0)).double()
    obj = ExactMapRegression(zero_share=0.25, exact_steps=40)
    torch.manual_seed(0)
    out = obj(student=ExactGMMMap(teacher, steps=64), teacher=teacher, target=None, x0=x0, cond=None, step=0)
    bent = ExactGMMMap(teacher, steps=64)
    bent.flow = lambda x, s, t, c: 1.01 * teacher.flow_map(x, s, t, c, steps=64) - 0.01 * x  # noqa: E731
    torch.manual_seed(0)
    out_bent = obj(student=bent, teacher=teacher, target=None, x0=x0, cond=None, step=0)
    print(
        f"exact-map regression: max loss at the exact map {out.loss.max():.2e}, "
        f"median 1% off {out_bent.loss.median():.2e}"
    )
    assert out.loss.shape == (64,)
    assert out.loss.max() < 1e-10  # RK4 at 40 against 64 steps
    assert out_bent.loss.median() > 1e-6 and out_bent.loss.median() > 1e4 * out.loss.max()
    s, t, _ = obj.sample_times(64, x0)
    assert int((t == 0).sum()) == 16 and bool((s >= t).all())  # the share of 1-NFE-like jumps to t = 0


def test_bad_options_are_one_clear_error():
    """``ScriptParser`` raises one ValueError, which ``main_guard`` prints as one line with exit code 2."""
    import pytest

    from scripts.diagnose_floor import parse

    for argv, words in ((["--lr", "-1"], "--lr must be a positive number"), (["--zero-share", "2"], "--zero-share")):
        with pytest.raises(ValueError, match=words):
            parse(argv)
    assert parse(["--lr", "0.003"]).lr == 0.003 and parse([]).lr is None
