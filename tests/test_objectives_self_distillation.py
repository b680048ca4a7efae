"""Flow-map self-distillation (flowmap/objectives/self_distillation.py): each variant's loss vanishes at the
exact flow map of a point-mass flow (where the conditional velocity is the marginal one) and not at a bent
map, the derivative terms carry gradient, bad input fails clearly, the batch-posterior flow-matching target
has lower variance than the conditional one, and each variant trained from ring8 data (no teacher) cuts the
1- and 2-NFE flow-map errors against the mixture's exact map."""

from __future__ import annotations

import time

import pytest
import torch

from exact_maps import GaussianFlow, ring8_reference, train_on_ring8
from flowmap.metrics import flow_map_rmse
from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.objectives.common import stable_target
from flowmap.student import FlowMap

VARIANTS = ["fmsd_lagrangian", "fmsd_eulerian", "fmsd_progressive"]


def mlp_student(width: int = 32, depth: int = 2, **kw) -> FlowMap:
    return FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": width, "depth": depth, **kw}))


class Bent(GaussianFlow):
    def flow(self, x, s, t, cond=None):
        return 1.05 * super().flow(x, s, t, cond) - 0.05 * x


@pytest.mark.parametrize("backend", ["forward_ad", "func", "fd"])
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
    assert out.loss.max() < (1e-12 if backend == "fd" else 1e-20)
    assert off.logs["sd"].median() > 1e-6


@pytest.mark.parametrize("name", ["fmsd_lagrangian", "fmsd_eulerian"])
def test_forward_ad_and_func_give_the_same_loss_and_gradient(name):
    """The derivative is trained (autograd through the JVP): forward_ad with the dual rules and torch.func.jvp
    give the same loss and the same parameter gradient, same draws."""
    results = {}
    for backend in ("forward_ad", "func"):
        torch.manual_seed(0)
        student = mlp_student()
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))  # wake the zero-initialized layers
        torch.manual_seed(1)
        out = build_objective({"name": name, "jvp_backend": backend})(student=student, teacher=None, target=None,
                                                                       x0=torch.randn(32, 2), cond=None, step=0)
        out.loss.mean().backward()
        results[backend] = (out.loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    (l_dual, g_dual), (l_func, g_func) = results["forward_ad"], results["func"]
    torch.testing.assert_close(l_dual, l_func, rtol=1e-5, atol=1e-7)
    assert float((g_dual - g_func).norm() / g_func.norm()) < 1e-5  # float32 round-off only
    assert float(g_dual.abs().sum()) > 0


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
    with pytest.raises(ValueError, match="fm_target"):
        build_objective({"name": name, "fm_target": "ideal"})


def test_stable_target_is_exact_for_one_point_and_cuts_variance():
    """The batch-posterior target (Xu et al. 2023) equals eps - x0 when every data point is the same, ignores
    points of other labels, and on ring8 lies closer to the exact marginal velocity than eps - x0 does."""
    from teachers import preset_mixture

    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[1.0, -2.0]]).expand(64, 2).contiguous()
    eps, s = torch.randn(64, 2, generator=g), torch.rand(64, generator=g) * 0.98 + 0.01
    x_s = (1 - s)[:, None] * x0 + s[:, None] * eps
    assert torch.allclose(stable_target(x_s, s, x0, eps), eps - x0, atol=1e-5)
    # two labels, each its own point: with labels the other point gets no weight, so the target is exact again
    x0 = torch.cat([torch.full((32, 2), 1.0), torch.full((32, 2), -1.0)])
    y = torch.cat([torch.zeros(32), torch.ones(32)]).long()
    x_s = (1 - s)[:, None] * x0 + s[:, None] * eps
    assert torch.allclose(stable_target(x_s, s, x0, eps, y, null=2), eps - x0, atol=1e-5)
    assert not torch.allclose(stable_target(x_s, s, x0, eps), eps - x0, atol=1e-3)
    teacher = preset_mixture("ring8")
    x0 = teacher.sample(1024, generator=g).float()
    eps, s = torch.randn(1024, 2, generator=g), torch.rand(1024, generator=g) * 0.98 + 0.01
    x_s = (1 - s)[:, None] * x0 + s[:, None] * eps
    v = teacher.velocity(x_s.double(), s.double()).float()
    err_cond = (eps - x0 - v).pow(2).sum(1).mean()
    err_stf = (stable_target(x_s, s, x0, eps) - v).pow(2).sum(1).mean()
    print(f"ring8 target MSE vs exact velocity: conditional {err_cond:.3f}, batch posterior {err_stf:.3f}")
    assert err_stf < 0.25 * err_cond


def nfe_errors(flow_map, n: int = 1000) -> tuple[float, float]:
    """RMSE vs the exact ring8 map X(z, 1, 0) of the 1-NFE map and of the 2-NFE map X(X(z, 1, 1/2), 1/2, 0)."""
    z, ref = ring8_reference(n)
    one, half, zero = torch.ones(n), torch.full((n,), 0.5), torch.zeros(n)
    with torch.no_grad():
        return flow_map_rmse(flow_map(z, one, zero), ref), flow_map_rmse(flow_map(flow_map(z, one, half), half, zero), ref)


# name -> (objective config, steps, lr, bound on the trained / untrained ratio at 1 and 2 NFE).
# Common to all: MLP 128x3 (time_scale 10), batch 256, Adam with cosine decay to 1e-5, grad clip 1, EMA 0.98 evaluated;
# the data are ring8 samples only (the exact mixture is the reference, never called by the loss).
# Measured (seed 0, 1 thread): see the docstring of the test. The acceptance bar is 1/5 = 0.2; the bounds are the
# best honest ones reached in a <= 60 s budget, NOT the bar.
SD_TRAIN = {
    "fmsd_lagrangian": ({"name": "fmsd_lagrangian", "fm_target": "stf", "equal_share": 0.5}, 600, 1e-2, 0.30),
    "fmsd_progressive": ({"name": "fmsd_progressive", "fm_target": "stf", "equal_share": 0.5}, 1000, 1e-2, 0.35),
    "fmsd_eulerian": ({"name": "fmsd_eulerian", "fm_target": "stf", "equal_share": 0.5}, 600, 5e-3, 0.45),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SD_TRAIN))
def test_self_distillation_from_ring8_data_cuts_one_and_two_step_errors(name):
    """Short from-data training on ring8; 1-/2-NFE errors vs the exact map, as a ratio of the untrained student's.

    Measured (ratio trained/untrained, 1-NFE / 2-NFE), seed 0: LSD 0.251 / 0.228 (600 steps), PSD 0.317 / 0.252
    (1000 steps), ESD 0.351 / 0.297 (600 steps, lr 5e-3; 0.62 / 0.56 at lr 1e-2); seed 1 (untrained error 0.82
    instead of 0.59, trained absolute errors about the same): LSD 0.177 / 0.166, PSD 0.206 / 0.169, ESD 0.403 / 0.402.
    Before this change (FM term at the pair's s, conditional target, lr 2e-3) LSD reached 0.50 / 0.49 in 300 steps
    and 0.42 / 0.40 in 1200. The issue's bar (0.2) is NOT met at seed 0 by any variant: the velocity learned from
    data in this budget is itself the floor (a 64-step Euler solve of the student's own diagonal velocity has error
    ~0.1 against the exact map, ratio ~0.17, before any distillation error). Wall time 46-67 s per variant on a
    loaded 2-core machine (20-26 s CPU on one thread).

    Further measurements (seed 0, ratios 1-NFE / 2-NFE): LSD at 1200 steps 0.262 / 0.228 and PSD at 2000 steps
    0.244 / 0.227 (42 s CPU), so the budget is not the lever; the batch is: LSD at batch 512 (600 steps) 0.238 / 0.208,
    at batch 1024 (800 steps, lr 5e-3) 0.169 / 0.166, which meets the bar in 85 s CPU (a ``long`` test:
    ``test_lagrangian_self_distillation_at_batch_1024_cuts_errors_five_fold``).
    Batch 1024 does NOT bring ESD or PSD robustly to the bar (seed 0 unless said, ratios 1-NFE / 2-NFE, EMA 0.98,
    equal_share 0.5 unless said): ESD 800 steps at lr 5e-3 0.311 / 0.235, 2e-3 0.267 / 0.225, 1e-3 0.388 / 0.381;
    ESD share 0.75, lr 2e-3: 800 steps 0.249 / 0.200, 1600 steps 0.194 / 0.161 at seed 0 but 0.302 / 0.283 at seed 1
    (146 s CPU each), so not a robust pass; PSD 800 steps lr 5e-3 0.247 / 0.209, 1000 steps lr 1e-2 0.239 / 0.207
    (EMA 0.995: 0.246 / 0.205; share 0.75: 0.229 / 0.195), 1600 steps lr 5e-3 0.218 / 0.202 (share 0.75:
    0.231 / 0.194; seed 1 0.165 / 0.150), batch 2048 800 steps 0.237 / 0.208 (203 s CPU). The 1-NFE ratio of PSD
    stays at 0.22-0.24 at seed 0 whatever the budget; a larger FM share (0.75) helps both ESD and PSD a little."""
    torch.set_num_threads(1)
    config, steps, lr, bound = SD_TRAIN[name]
    torch.manual_seed(0)
    student = mlp_student(width=128, depth=3, time_scale=10.0)
    before = nfe_errors(student)
    t0 = time.time()
    ema = train_on_ring8(student, build_objective(config), steps, lr=lr, lr_final=1e-5, ema_decay=0.98, source="data")
    after = nfe_errors(ema)
    r1, r2 = after[0] / before[0], after[1] / before[1]
    print(f"{name} ring8 from data: 1-NFE {before[0]:.3f} -> {after[0]:.3f} (ratio {r1:.3f}), 2-NFE {before[1]:.3f} -> "
          f"{after[1]:.3f} (ratio {r2:.3f}); {steps} steps in {time.time() - t0:.0f}s")
    assert r1 <= bound and r2 <= bound


@pytest.mark.long
def test_lagrangian_self_distillation_at_batch_1024_cuts_errors_five_fold():
    """LSD from ring8 data as in ``test_self_distillation_from_ring8_data_cuts_one_and_two_step_errors`` but at batch 1024
    (a larger reference set for the STF target, less gradient noise), 800 steps, lr 5e-3: the issue's 1/5 at 1 and 2 NFE.
    Measured: seed 0 0.169 / 0.166 (85 s CPU on one thread, 129 s wall on a loaded 2-core machine); seed 1
    0.120 / 0.121 (83 s CPU)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = mlp_student(width=128, depth=3, time_scale=10.0)
    before = nfe_errors(student)
    objective = build_objective({"name": "fmsd_lagrangian", "fm_target": "stf", "equal_share": 0.5})
    ema = train_on_ring8(student, objective, 800, lr=5e-3, lr_final=1e-5, batch=1024, ema_decay=0.98, source="data")
    after = nfe_errors(ema)
    r1, r2 = after[0] / before[0], after[1] / before[1]
    print(f"fmsd_lagrangian ring8 from data, batch 1024: 1-NFE ratio {r1:.3f}, 2-NFE ratio {r2:.3f}")
    assert r1 <= 0.2 and r2 <= 0.2
