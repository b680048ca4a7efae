"""Two-process DDP on CPU (gloo) streaming from tar shards: the teacher and one method of each student family
(cd, pd, meanflow, shortcut, scd: those that import) train 2 steps each in ONE launch of tests/ddp_worker.py.
For every case: both ranks see disjoint samples (exactly the by_rank split: rank r gets sample keys r, r + 2,
...), the same number of batches, identical gradients after the first step, identical weights, EMA and
target after two, and rank 0 alone writes one export that loads back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import ddp_worker  # noqa: E402

from flowmap.data.shards import write_shards  # noqa: E402

pytestmark = pytest.mark.ddp
STEPS = 2
FAMILIES = ["cd", "pd", "meanflow", "shortcut", "scd", "ayf_lmd", "ctm"]  # Students I, II and III


def _available(case: str) -> bool:
    from flowmap.objectives import build_objective

    try:
        build_objective(ddp_worker.objective_config(case))
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_stream_disjoint_shards_with_equal_batches_and_gradients(tmp_path):
    cases = ["teacher"] + [c for c in FAMILIES if _available(c)]
    assert len(cases) >= 2, "no student objective imports"
    x = ddp_worker.make_data()
    write_shards(((xi, -1) for xi in x), tmp_path / "shards", shape=(2,), max_count=16)  # 4 shards of 16
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "ddp_worker.py"),
        "--case",
        ",".join(cases),
        "--out",
        str(tmp_path / "out"),
        "--shards",
        str(tmp_path / "shards"),
        "--steps",
        str(STEPS),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    B = ddp_worker.B
    for case in cases:
        out = tmp_path / "out" / case
        ranks = [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)]
        # the same number of batches on both ranks; disjoint samples: rank r streams keys r, r + 2, r + 4, ...
        assert ranks[0]["num_batches"] == ranks[1]["num_batches"] == STEPS, case
        for rank, rec in enumerate(ranks):
            seen = torch.cat(rec["batches"])
            assert torch.equal(seen, x[rank::2][: STEPS * B]), f"{case}: rank {rank} did not get its by_rank share"
        seen0, seen1 = torch.cat(ranks[0]["batches"]), torch.cat(ranks[1]["batches"])
        assert not (seen0[:, None, :] == seen1[None, :, :]).all(-1).any(), f"{case}: a sample reached both ranks"
        # gradients after the first step identical across ranks (all-reduced), weights / EMA / target after two
        g0, g1 = ranks[0]["grads"], ranks[1]["grads"]
        assert g0 and set(g0) == set(g1), case
        assert any(float(g.abs().max()) > 0 for g in g0.values()), f"{case}: all gradients are zero"
        for name in g0:
            assert torch.equal(g0[name], g1[name]), f"{case}: gradient of {name} differs across ranks"
        for key in ("params", "ema", "target"):
            if ranks[0][key] is not None:
                for name, p in ranks[0][key].items():
                    assert torch.equal(p, ranks[1][key][name]), f"{case}: {key} {name} differs across ranks"
        assert not all(
            torch.equal(p, ranks[0]["init_state"][n])
            for n, p in ranks[0]["params"].items()
            if n in ranks[0]["init_state"]
        )
        # one export, written by rank 0, that loads back
        assert sorted(p.name for p in out.glob("*.safetensors")) == ["export.safetensors"], case
        from flowmap.models import load_model

        model = load_model(out / "export.safetensors", expect="teacher" if case == "teacher" else "student")
        exported = dict((model.net if case == "teacher" else model).named_parameters())
        assert set(exported) == set(ranks[0]["ema"]), case
        assert all(torch.equal(exported[n], p) for n, p in ranks[0]["ema"].items()), f"{case}: export is not the EMA"
