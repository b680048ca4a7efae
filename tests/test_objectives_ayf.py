"""Align Your Flow (flowmap/objectives/ayf.py): both losses vanish at the exact flow map and not at a
bent one, the student runs once with grad, bad input fails clearly, and a short distillation on the
ring8 mixture cuts the 1- and 2-NFE flow-map errors (2-NFE no worse than 1-NFE)."""

from __future__ import annotations

import time

import pytest
import torch
from exact_maps import ExactGMMMap, GaussianFlow, NaNRows, assert_fd64_matches_func, ring8_reference

from flowmap.metrics import flow_map_rmse
from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.student import FlowMap
from flowmap.training import fit
from teachers import preset_mixture

VARIANTS = ["ayf_emd", "ayf_lmd"]


def mlp_student(width: int = 32, depth: int = 2, **kw) -> FlowMap:
    return FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": width, "depth": depth, **kw}))


def nfe_errors(flow_map, n: int = 1000) -> tuple[float, float]:
    """RMSE vs the exact ring8 map X(z, 1, 0) of the 1-NFE map and of the 2-NFE map X(X(z, 1, 1/2), 1/2, 0)."""
    z, ref = ring8_reference(n)
    one, half, zero = torch.ones(n), torch.full((n,), 0.5), torch.zeros(n)
    with torch.no_grad():
        e1 = flow_map_rmse(flow_map(z, one, zero), ref)
        e2 = flow_map_rmse(flow_map(flow_map(z, one, half), half, zero), ref)
    return e1, e2


class Bent(GaussianFlow):
    def flow(self, x, s, t, cond=None):
        return 1.02 * super().flow(x, s, t, cond) - 0.02 * x


@pytest.mark.parametrize("name", VARIANTS)
def test_float64_finite_differences_match_the_func_backend(name):
    """fd_dtype: float64 (the student promoted for the tangent pass only) gives the func backend's loss to ~1e-6."""
    teacher = preset_mixture("ring8")
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(4))
    assert_fd64_matches_func(mlp_student(), {"name": name}, teacher, x0)


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_vanishes_at_closed_form_map_func_backend(name):
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    flow = GaussianFlow(mean, 0.7)
    x0 = flow.sample(64, generator=torch.Generator().manual_seed(1))
    obj = build_objective({"name": name, "equal_share": 0.25})
    torch.manual_seed(0)
    out = obj(student=flow, teacher=flow, target=None, x0=x0, cond=None, step=0)
    torch.manual_seed(0)
    bent = obj(student=Bent(mean, 0.7), teacher=flow, target=None, x0=x0, cond=None, step=0)
    print(f"{name} closed form: max loss {out.loss.max():.2e} (exact) vs median {bent.loss.median():.2e} (2% bent)")
    assert out.loss.max() < 1e-20 and out.logs["residual"].max() < 1e-20
    assert bent.loss.median() > 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_vanishes_at_exact_gmm_map_fd_backend(name):
    teacher = preset_mixture("ring8")
    x0 = teacher.sample(32, generator=torch.Generator().manual_seed(0)).double()
    obj = build_objective({"name": name, "jvp_backend": "fd", "equal_share": 0.25})
    torch.manual_seed(0)
    out = obj(student=ExactGMMMap(teacher, steps=60), teacher=teacher, target=None, x0=x0, cond=None, step=0)
    print(f"{name} exact GMM map: max residual {out.logs['residual'].max():.2e}, max loss {out.loss.max():.2e}")
    assert out.logs["residual"].max() < 1e-8  # RK4 (60 steps) and fd (h = 1e-6) errors
    assert int(out.logs["nonfinite_targets"]) == 0


@pytest.mark.parametrize("name", VARIANTS)
def test_one_with_grad_call_masking_and_warmup(name):
    teacher = NaNRows(preset_mixture("ring8"), rows=2)
    student = mlp_student()
    calls = []
    student.net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    obj = build_objective({"name": name, "warmup_steps": 100})
    out = obj(student=student, teacher=teacher, target=None, x0=torch.randn(16, 2), cond=None, step=25)
    out.loss.mean().backward()
    assert calls.count(True) == 1, f"the student must run exactly once with grad, got {calls}"
    assert int(out.logs["nonfinite_targets"]) == 2 and torch.all(out.loss[:2] == 0) and torch.all(out.loss[2:] > 0)
    assert float(out.logs["warmup"][0]) == pytest.approx(0.25)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    # tangent normalization bounds each sample's loss ||g||^2 = ||T||^2 / (||T|| + c)^2 < 1
    assert out.loss.max() < 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_objective({"name": "ayf_emd", "variant": "lmd"})
    with pytest.raises(ValueError, match="tangent_c"):
        build_objective({"name": "ayf_lmd", "tangent_c": 0.0})
    with pytest.raises(ValueError, match="warmup_steps"):
        build_objective({"name": "ayf_emd", "warmup_steps": -1})
    with pytest.raises(ValueError, match="time distribution"):
        build_objective({"name": "ayf_emd", "time_dist": "beta"})
    with pytest.raises(ValueError, match="teacher is None"):
        build_objective("ayf_lmd")(
            student=mlp_student(), teacher=None, target=None, x0=torch.randn(4, 2), cond=None, step=0
        )
    gap = build_objective({"name": "ayf_emd", "time_dist": "gap_logit_normal", "equal_share": 0.25})
    s, t, _ = gap.sample_times(4000, torch.zeros(4000, 2))
    assert torch.all((0 <= t) & (t <= s) & (s <= 1)) and abs(float((s == t).float().mean()) - 0.25) < 0.03
    assert abs(float((s - t)[s > t].median()) - 0.5) < 0.05  # gap ~ sigmoid(N(0, 1)): median 1/2
    assert build_objective("ayf_emd").to_config()["name"] == "ayf_emd"
    assert build_objective(build_objective("ayf_lmd").to_config()).name == "ayf_lmd"  # round trip


# Training budget on ring8 (one thread): a small MLP (width 64, emb_dim 64, depth 3) at lr 3e-3 (cosine to 1e-5)
# trains ~3x faster per step than width 128 and reaches the same absolute 1-NFE error (~0.11 for LMD), so the
# ratio is set by the map's fit, not by the baseline. Measured ratios, and why
# tangent_c is 1 for EMD and the raw weights are evaluated: docs/measurements.md.
SMALL = {"width": 64, "depth": 3, "emb_dim": 64, "time_scale": 10.0}
AYF_TRAIN = {
    "ayf_lmd": ({"name": "ayf_lmd", "equal_share": 0.25}, 1500, 3e-3),
    "ayf_emd": ({"name": "ayf_emd", "equal_share": 0.25, "tangent_c": 1.0}, 2000, 3e-3),
}


def distill_on_ring8(
    config: dict, steps: int, lr: float, seed: int = 0
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Train a fresh SMALL student on ring8 with ``config``; returns (errors before, errors after, seconds)."""
    torch.set_num_threads(1)
    teacher = preset_mixture("ring8")
    torch.manual_seed(seed)
    student = mlp_student(**SMALL)
    before = nfe_errors(student)
    pool = teacher.sample(100_000, generator=torch.Generator().manual_seed(5 + seed))
    t0 = time.time()
    fit(
        student,
        build_objective(config),
        lambda k: (pool[torch.randint(0, len(pool), (256,))], None),
        steps,
        teacher=teacher,
        lr=lr,
        lr_final=1e-5,
    )
    return before, nfe_errors(student), time.time() - t0


@pytest.mark.parametrize("name", ["ayf_lmd", "ayf_emd"])
def test_distillation_on_ring8_cuts_one_and_two_step_errors(name):
    """Issue 8's acceptance: 1- and 2-NFE errors at most 1/5 of the untrained student's, 2-NFE no worse than 1-NFE
    (budgets in AYF_TRAIN; measured ratios in docs/measurements.md)."""
    config, steps, lr = AYF_TRAIN[name]
    before, after, secs = distill_on_ring8(config, steps, lr)
    print(
        f"{name} ring8: 1-NFE {before[0]:.3f} -> {after[0]:.3f} ({after[0] / before[0]:.3f}), "
        f"2-NFE {before[1]:.3f} -> {after[1]:.3f} ({after[1] / before[1]:.3f}) ({steps} steps, {secs:.0f}s)"
    )
    assert after[0] <= before[0] / 5 and after[1] <= before[1] / 5
    assert after[1] <= after[0] * 1.02  # the map stays consistent as steps are added
