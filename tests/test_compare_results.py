"""scripts/compare_results.py: two results.json side by side, per set and method, with the 1-NFE ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.compare_results import compare  # noqa: E402


def _run(rmse: dict[str, float], std: float = 2.0, seeds: list[float] | None = None) -> dict:
    students = {
        m: {
            "nfe": {"1": {"rmse": v}, "2": {"rmse": v / 2}},
            "seeds": [{"seed": i + 1, "nfe": {"1": {"rmse": s}}} for i, s in enumerate(seeds or [])],
        }
        for m, v in rmse.items()
    }
    return {"meta": {"code": "x"}, "quality": {"ring": {"data_std": std, "students": students}}}


def test_the_table_shows_both_runs_the_seeds_and_the_ratio() -> None:
    md = compare(_run({"cd": 0.2, "pd": 0.1}), _run({"cd": 0.1, "ctm": 0.3}, seeds=[0.12]))
    # rmse as % of the data's std (2.0): 0.2 -> 10, 0.1 -> 5; new / old at 1 NFE = 0.5
    assert "| cd | 10 -> 5 | 5 -> 2.5 | - -> - | 6 | 0.50 |" in md
    assert "| ctm | only in the newer run |" in md and "| pd | only in the older run |" in md


def test_a_file_that_is_not_a_results_json_exits_2_with_one_line(tmp_path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_run({"cd": 0.1})))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    for args in ([str(bad), str(good)], [str(tmp_path / "missing.json"), str(good)]):
        r = subprocess.run(
            [sys.executable, "scripts/compare_results.py", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
