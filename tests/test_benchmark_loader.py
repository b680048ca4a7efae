"""scripts/benchmark_loader.py: JPEG shards written, every worker count timed, the table and dict agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_loader_benchmark_reports_every_worker_count(tmp_path, capsys):
    import benchmark_loader

    result = benchmark_loader.main(
        [
            "--sizes",
            "32",
            "--workers",
            "0,2",
            "--count",
            "24",
            "--shards",
            "2",
            "--batch-size",
            "4",
            "--batches",
            "2",
            "--seconds",
            "0",
            "--steps",
            "1",
            "--dim",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--out",
            str(tmp_path),
            "--threads",
            "1",
        ]
    )
    assert [r["size"] for r in result["rows"]] == [32]
    assert len(list((tmp_path / "jpeg32").glob("train-*.tar"))) == 2
    for row in result["rows"]:
        assert set(row["loader"]) == {0, 2} and min(row["loader"].values()) > 0
        assert row["keeps_up_ratio"] == pytest.approx(row["loader"][2] / row["train"]["samples_per_s"])
        assert row["jpeg_bytes"] > 100  # real JPEG payloads, not empty members
    table = capsys.readouterr().out
    assert "| 32x32 |" in table and "loader, 2 workers" in table
    with pytest.raises(ValueError, match="--shards"):
        benchmark_loader.main(["--workers", "4", "--shards", "2"])
