"""Sharded training (flowmap.lightning.sharding.FSDPStrategy, FSDP2 ``fully_shard``) on two CPU processes (gloo):

- test_fsdp_matches_ddp: 10 steps of MeanFlow (every pair s != t, forward-mode JVP through the sharded DiT) under
  FSDP give the loss curve of the same run under DDP on both ranks (to 1e-5 relative), the same first-step
  gradients, final student and EMA; also with activation checkpointing. The student's parameters are DTensors.
- test_fsdp_export_round_trip: the student file exported from the FSDP run (the EMA gathered from its shards)
  equals the DDP run's export and the gathered EMA, and loads back as an ordinary single-process FlowMap; the
  Lightning checkpoint written under FSDP holds the whole student (equal to the gathered parameters) and loads
  into a fresh single-process DistillModule.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ddp, pytest.mark.slow, pytest.mark.xdist_group("ddp")]
CASES = ["ddp", "fsdp", "fsdp_ckpt"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "fsdp_worker.py"),
        "--out",
        str(out),
        "--steps",
        "10",
        "--cases",
        ",".join(CASES),
    ]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _load(out: Path, case: str, rank: int) -> dict:
    return torch.load(out / case / f"rank{rank}.pt", weights_only=False)


def _worst(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in a)


@pytest.mark.parametrize("case", ["fsdp", "fsdp_ckpt"])
def test_fsdp_matches_ddp(runs, case):
    for rank in (0, 1):
        ddp, fsdp = _load(runs, "ddp", rank), _load(runs, case, rank)
        assert set(fsdp["sharded"]) == {"DTensor"} and set(ddp["sharded"]) == {"Parameter"}
        assert len(fsdp["losses"]) == len(ddp["losses"]) == 10
        curve, ref = torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"])
        assert float((curve - ref).abs().max() / ref.abs().max()) < 1e-5, (curve, ref)
        assert float((ref[1:] - ref[:-1]).abs().max()) > 1e-3  # the curve moves (training, not a constant)
        assert _worst(fsdp["init_state"], ddp["init_state"]) == 0.0
        assert _worst(fsdp["grads"], ddp["grads"]) < 1e-5
        assert _worst(fsdp["params"], ddp["params"]) < 1e-5
        assert _worst(fsdp["ema"], ddp["ema"]) < 1e-5


def test_fsdp_export_round_trip(runs):
    from safetensors.torch import load_file

    from flowmap.models import load_model

    exported, ref = load_file(runs / "fsdp" / "export.safetensors"), load_file(runs / "ddp" / "export.safetensors")
    assert _worst(exported, ref) < 1e-5
    ema = {k[len("net.") :]: v for k, v in _load(runs, "fsdp", 0)["ema"].items()}
    assert all(torch.equal(exported[k], ema[k]) for k in exported) and set(exported) == set(ema)
    student = load_model(runs / "fsdp" / "export.safetensors", expect="student")
    x, s, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.8), torch.full((3,), 0.3)
    assert torch.isfinite(student(x, s, t)).all()
    assert all(type(p) is torch.nn.Parameter for p in student.parameters())


def test_fsdp_checkpoint_is_whole(runs):
    sys.path.insert(0, str(ROOT / "tests"))
    import fsdp_worker

    ckpt = torch.load(runs / "fsdp" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    params = _load(runs, "fsdp", 0)["params"]
    assert all(torch.equal(state[f"student.{k}"], v) for k, v in params.items())
    module = fsdp_worker.build_module()
    module.load_state_dict(state)  # strict: every key, whole shapes
    assert ckpt["flowmap_run"] == {"kind": "DistillModule", "method": "meanflow"}
