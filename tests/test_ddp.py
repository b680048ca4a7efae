"""Two-process DDP on CPU (gloo): gradients after one step are identical on both ranks and equal to
the single-process gradient on the joined batch; both ranks see disjoint data and the same number of
batches; one export is written. JVP-based objectives (MeanFlow, sCD) are the cases where peer
frameworks lose the gradient all-reduce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import ddp_worker  # noqa: E402

pytestmark = [pytest.mark.ddp, pytest.mark.xdist_group("ddp")]


CASES = ["teacher", "meanflow", "meanflow_func", "scd"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """One two-process launch that runs every case (a launch costs ~10 s of start-up)."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "ddp_worker.py"),
        "--case",
        ",".join(CASES),
        "--out",
        str(out),
        "--devices",
        "2",
        "--steps",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _ranks(out: Path, devices: int = 2) -> list[dict]:
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(devices)]


def _replayed_single_process_grads(case: str, ranks: list[dict]) -> dict[str, torch.Tensor]:
    """The same module and initial weights in one process: each rank's half batch with that rank's RNG
    state (so noise and times match), losses averaged = the mean over the joined batch."""
    module = ddp_worker.build_module(case)
    module.load_state_dict(ranks[0]["init_state"])
    module.train()
    losses = []
    for r in ranks:
        torch.set_rng_state(r["rng"])
        batch = (r["batches"][0], torch.full((len(r["batches"][0]),), -1, dtype=torch.long))
        module._trainer = None
        losses.append(_loss(module, batch))
    torch.stack(losses).mean().backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _loss(module, batch) -> torch.Tensor:
    from flowmap.lightning.batches import unpack_batch

    x0, cond = unpack_batch(batch)
    if hasattr(module, "loss_fn"):
        return module.loss_fn(module.net, x0, cond).loss.mean()
    out = module.objective(
        student=module.student, teacher=module.teacher, target=module.target, x0=x0, cond=cond, step=0
    )
    return out.loss.mean()


@pytest.mark.parametrize("case", CASES)
def test_two_rank_gradients_equal_and_match_single_process(case, ddp_runs):
    tmp_path = ddp_runs / case
    ranks = _ranks(tmp_path)
    g0, g1 = ranks[0]["grads"], ranks[1]["grads"]
    assert g0 is not None and set(g0) == set(g1) and len(g0) > 0
    for name in g0:
        assert torch.equal(g0[name], g1[name]), f"{case}: gradient of {name} differs across ranks"
    # the two ranks saw disjoint halves of the data, the same number of batches
    b0, b1 = ranks[0]["batches"][0], ranks[1]["batches"][0]
    assert ranks[0]["num_batches"] == ranks[1]["num_batches"] == 1
    assert not any(torch.equal(a, b) for a in b0 for b in b1)
    # equal to the single-process gradient on the joined batch
    ref = _replayed_single_process_grads(case, ranks)
    assert set(ref) == set(g0)
    worst = max(float((g0[n] - ref[n]).abs().max() / (ref[n].abs().max() + 1e-12)) for n in ref)
    assert worst < 1e-4, f"{case}: DDP gradient differs from the single-process one by {worst:.2e} (relative)"
    # rank 0 alone wrote the export; parameters and EMA identical after the step
    assert (tmp_path / "export.safetensors").is_file()
    for n, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][n])
    for n, p in ranks[0]["ema"].items():
        assert torch.equal(p, ranks[1]["ema"][n])
