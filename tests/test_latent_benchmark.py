"""scripts/benchmark.py --latent hands its other options to scripts/benchmark_latent.py: a bad one ends as one line
on stderr with exit code 2 (main_guard), naming the latent script's option, before any work is done."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_latent_flag_reaches_the_latent_script(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "--latent",
            "--budget",
            "huge",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--budget" in lines[0] and "quick" in lines[0], run.stderr
    assert not (tmp_path / "LATENT.md").exists()
