"""Flow-map self-distillation (flowmap/objectives/self_distillation.py): each variant's loss vanishes at the
exact flow map of a point-mass flow (where the conditional velocity is the marginal one) and not at a bent
map, the derivative terms carry gradient, bad input fails clearly, and LSD trained from ring8 data cuts the
1- and 2-NFE flow-map errors."""

from __future__ import annotations

import pytest
import torch

from exact_maps import GaussianFlow
from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.student import FlowMap

VARIANTS = ["fmsd_lagrangian", "fmsd_eulerian", "fmsd_progressive"]


def mlp_student(width: int = 32, depth: int = 2, **kw) -> FlowMap:
    return FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": width, "depth": depth, **kw}))


class Bent(GaussianFlow):
    def flow(self, x, s, t, cond=None):
        return 1.05 * super().flow(x, s, t, cond) - 0.05 * x


@pytest.mark.parametrize("backend", ["func", "fd"])
@pytest.mark.parametrize("name", VARIANTS)
def test_loss_vanishes_at_the_exact_map(name, backend):
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    flow, bent = GaussianFlow(mean, 0.0), Bent(mean, 0.0)
    x0 = flow.sample(64, generator=torch.Generator().manual_seed(1))
    obj = build_objective({"name": name, "jvp_backend": backend, "fd_eps": 1e-6})
    torch.manual_seed(0)
    out = obj(student=flow, teacher=None, target=None, x0=x0, cond=None, step=0)
    torch.manual_seed(0)
    off = obj(student=bent, teacher=None, target=None, x0=x0, cond=None, step=0)
    print(f"{name} ({backend}): exact max loss {out.loss.max():.2e}; bent median sd {off.logs['sd'].median():.2e}")
    assert out.loss.max() < (1e-20 if backend == "func" else 1e-12)
    assert off.logs["sd"].median() > 1e-6


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_and_bad_input(name):
    student = mlp_student()
    obj = build_objective(name)
    assert not obj.needs_teacher
    out = obj(student=student, teacher=None, target=None, x0=torch.randn(16, 2), cond=None, step=0)
    assert out.logs["sd"].shape == (16,) and out.loss.shape == (16,)
    (out.loss.mean()).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    with pytest.raises(ValueError, match="lambda_sd"):
        build_objective({"name": name, "lambda_sd": -1.0})
    with pytest.raises(ValueError, match="JVP backend"):
        build_objective({"name": name, "jvp_backend": "forward"})
    with pytest.raises(ValueError, match="equal_share"):
        build_objective({"name": name, "equal_share": 2.0})


# Not yet at the acceptance bar: LSD from ring8 data (width 128, 1200 steps, lr 2e-3 -> 1e-5) reached 1-/2-NFE
# ratios 0.42/0.40 of the untrained error, short of 1/5, so no training test is claimed here yet.
