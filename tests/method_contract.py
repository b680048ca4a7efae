"""What every registered method must do, as checks any test can run on a method's name (the registry is the only
input): tests/test_method_template.py runs them over every entry of ``flowmap.objectives.OBJECTIVES``, and over a toy
method it registers itself.

* ``exact_map_losses``: the loss at an exact flow map (``PointMass``: straight trajectories, where every method's
  loss vanishes, distilled or from data) and at a 2% bent one;
* ``sample_after_reload``: a student saved with the method's name and reloaded by ``flowmap.load_student`` samples
  with the method's own sampler defaults, bit for bit as ``flowmap.sampling.sample`` does with them;
* ``ddp_results`` / ``assert_ddp_gradients``: a two-process DDP step (tests/ddp_worker.py) whose gradients agree
  across ranks and with one process on the joined batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from exact_maps import PointMass
from torch import Tensor
from weights import trained_like

import flowmap
from flowmap.models import save_student
from flowmap.nets import build_net
from flowmap.objectives import build_objective, objective_class
from flowmap.sampling import sample
from flowmap.student import FlowMap

ROOT = Path(__file__).resolve().parents[1]
MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
MLP = {"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 8}


class BentPointMass(PointMass):
    """The point mass's map bent by 2%: X' = 1.02 X - 0.02 x (still X'(x, s, s) = x)."""

    def flow(self, x, s, t, cond=None):
        return 1.02 * super().flow(x, s, t, cond) - 0.02 * x


def exact_map_losses(name: str, batch: int = 64, seed: int = 0) -> tuple[dict, dict]:
    """(logs of the exact map, logs of the bent map) with ``loss`` and ``nonfinite_targets`` (-1 when not logged),
    the same draws for both; the exact map is student, teacher and EMA target at once (float64)."""
    exact, bent = PointMass(MEAN), BentPointMass(MEAN)
    x0 = exact.sample(batch)
    outs = []
    for student in (exact, bent):
        torch.manual_seed(seed)
        out = build_objective(name)(student=student, teacher=exact, target=student, x0=x0, cond=None, step=0)
        outs.append({"loss": out.loss.detach(), "nonfinite_targets": int(out.logs.get("nonfinite_targets", -1))})
    return outs[0], outs[1]


def sample_after_reload(name: str, path: Path, steps: int, seed: int = 7) -> tuple[Tensor, Tensor, float]:
    """(samples of ``load_student(path).sample(noise, steps)``, of ``flowmap.sampling.sample`` with the method's
    gamma, that gamma) for a random-weight MLP student saved with ``method=name``; same noise and generator seed."""
    student = FlowMap(trained_like(build_net(MLP))).eval()
    save_student(path, student, method=name)
    gamma = objective_class(name).sampler_defaults()["gamma"]
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(seed))
    app = flowmap.load_student(path)
    x_app = app.sample(noise, steps=steps, generator=torch.Generator().manual_seed(seed))
    x_ref = sample(student, noise, steps, gamma=gamma, generator=torch.Generator().manual_seed(seed))
    return x_app, x_ref, gamma


def ddp_results(cases: list[str], out: Path, register: dict[str, str] | None = None) -> Path:
    """One two-process launch of tests/ddp_worker.py over ``cases`` (``register``: name -> "module:Class" of
    methods the worker registers first); each case writes rank{0,1}.pt into ``out/<case>``."""
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_worker.py"), "--case", ",".join(cases), "--out", str(out)]
    for name, target in (register or {}).items():
        cmd += ["--register", f"{name}={target}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def assert_ddp_gradients(case: str, out: Path) -> float:
    """Rank gradients identical, the ranks' batches disjoint, and equal to the single-process gradient on the joined
    batch (same weights, same draws); returns the worst relative difference to the single-process gradient."""
    import test_ddp

    ranks = test_ddp._ranks(out / case)
    g0, g1 = ranks[0]["grads"], ranks[1]["grads"]
    assert g0 and set(g0) == set(g1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0), f"{case}: gradients differ across ranks"
    assert not any(torch.equal(a, b) for a in ranks[0]["batches"][0] for b in ranks[1]["batches"][0])
    ref = test_ddp._replayed_single_process_grads(case, ranks)
    assert set(ref) == set(g0)
    return max(float((g0[n] - ref[n]).abs().max() / (ref[n].abs().max() + 1e-12)) for n in ref)
