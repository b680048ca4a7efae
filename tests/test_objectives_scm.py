"""sCD / sCT (flowmap/objectives/scm.py): the TrigFlow change of path, the tangent vanishing at the exact
consistency function (and not during the warm-up), gradient flow into the student and the learned
log-variance, NaN masking, and short runs on ring8."""

from __future__ import annotations

import math

import pytest
import torch
from exact_maps import ExactGMMMap, GaussianFlow, NaNRows, assert_fd64_matches_func, one_step_run

from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.objectives.scm import TrigFlowPath, t_lin_of
from flowmap.paths import CosinePath, to_linear
from flowmap.student import FlowMap
from flowmap.velocity import NetVelocity
from teachers import preset_mixture


def mlp_student(width: int = 32, depth: int = 2, **kw) -> FlowMap:
    return FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": width, "depth": depth, **kw}))


def test_trigflow_path_is_the_cosine_path_at_unit_sigma_and_maps_onto_the_linear_axis():
    tau = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    unit, cos_path = TrigFlowPath(1.0), CosinePath()
    for f in ("alpha", "sigma", "d_alpha", "d_sigma"):
        assert torch.allclose(getattr(unit, f)(tau), getattr(cos_path, f)(tau), atol=1e-15)
    path = TrigFlowPath(0.6)
    assert torch.allclose(path.t_from_ratio(path.ratio(tau)), tau, atol=1e-12)
    # x_theta = cos x0 + sin z (z = sigma_d eps) lands on the linear path (1 - t) x0 + t eps, t = sigmoid(tau_p)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(50, 2, generator=g, dtype=torch.float64), torch.randn(50, 2, generator=g, dtype=torch.float64)
    log_ratio = torch.randn(50, generator=g, dtype=torch.float64)  # the proposal's tau: tan(theta) = e^tau / sigma_d
    theta = torch.atan(torch.exp(log_ratio) / 0.6)
    x = torch.cos(theta)[:, None] * x0 + torch.sin(theta)[:, None] * 0.6 * eps
    x_lin, t_lin = to_linear(x, theta * 2 / math.pi, path)
    assert torch.allclose(t_lin, torch.sigmoid(log_ratio), atol=1e-12)  # logit-normal on the linear axis
    assert torch.allclose(t_lin_of(theta, 0.6), t_lin, atol=1e-12)
    assert torch.allclose(x_lin, (1 - t_lin)[:, None] * x0 + t_lin[:, None] * eps, atol=1e-12)


def test_F_reproduces_the_student_consistency_function():
    """f = cos(theta) x - sigma_d sin(theta) F (Lu & Song 2024, Sec. 3) equals X(x_lin, t_lin, 0) of the student."""
    obj = build_objective({"name": "sct", "sigma_data": 0.7})
    student = mlp_student().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 2, generator=g, dtype=torch.float64)
    theta = 1.5 * torch.rand(20, generator=g, dtype=torch.float64) + 0.01
    F = obj.trig_F(student, x, theta, None, None)
    f = torch.cos(theta)[:, None] * x - 0.7 * torch.sin(theta)[:, None] * F
    x_lin, t_lin = to_linear(x, theta * 2 / math.pi, obj.path)
    assert torch.allclose(f, student(x_lin, t_lin, torch.zeros_like(t_lin)), atol=1e-12)


def test_teacher_velocity_in_trigflow_time_is_the_trajectory_derivative():
    """sCD's dx/dtheta from the teacher = d/dtheta of the teacher's own trajectory x(theta) = D(theta) X_lin(theta)."""
    flow = GaussianFlow(torch.tensor([0.5, 1.0], dtype=torch.float64), 0.8)
    obj = build_objective({"name": "scd", "sigma_data": 0.7})
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    theta = 0.2 + 1.2 * torch.rand(16, generator=g, dtype=torch.float64)
    dx = obj.dx_dtheta(flow, x, theta, None, None, None, 1.0)
    x_lin, t_lin = to_linear(x, theta * 2 / math.pi, obj.path)

    def x_at(th):  # follow the teacher's exact flow from theta to th, back in TrigFlow units
        tl = t_lin_of(th, 0.7)
        D = torch.cos(th) + 0.7 * torch.sin(th)
        return D[:, None] * flow.flow(x_lin, t_lin, tl)

    h = 1e-5
    fd = (x_at(theta + h) - x_at(theta - h)) / (2 * h)
    assert torch.allclose(dx, fd, atol=1e-8)


@pytest.mark.parametrize("name,sigma0", [("scd", 0.8), ("sct", 0.0)])
def test_tangent_vanishes_at_the_exact_map_and_not_during_warmup(name, sigma0):
    flow = GaussianFlow(torch.tensor([1.0, -2.0], dtype=torch.float64), sigma0)
    x0 = flow.sample(64, generator=torch.Generator().manual_seed(3))
    teacher = flow if name == "scd" else None
    obj = build_objective({"name": name, "tangent_warmup": 10, "sigma_data": 1.0})
    out = obj(student=flow, teacher=teacher, target=None, x0=x0, cond=None, step=10)  # r = 1
    print(f"{name} at the exact map: max ||g|| {out.logs['tangent_norm'].max():.1e}, max loss {out.loss.max():.1e}")
    assert out.logs["tangent_norm"].max() < 1e-12 and out.loss.abs().max() < 1e-20
    if name == "scd":  # r = 1/2 leaves half of -cos sin (x + sigma_d dF/dtheta): a clearly nonzero tangent
        warm = obj(student=flow, teacher=teacher, target=None, x0=x0, cond=None, step=5)
        assert float(warm.logs["tangent_warmup"]) == 0.5 and warm.logs["tangent_norm"].mean() > 1e-2


def test_tangent_vanishes_at_the_exact_gmm_map_fd_backend():
    teacher = preset_mixture("ring8")
    exact = ExactGMMMap(teacher, steps=40)
    obj = build_objective({"name": "scd", "tangent_warmup": 0, "jvp_backend": "fd", "sigma_data": 1.0})
    x0 = teacher.sample(16, generator=torch.Generator().manual_seed(4)).double()
    out = obj(student=exact, teacher=teacher, target=None, x0=x0, cond=None, step=0)
    print(
        f"scd at the exact ring8 map (fd): max ||g|| {out.logs['tangent_norm'].max():.1e}, "
        f"median {out.logs['tangent_norm'].median():.1e}"
    )
    assert out.logs["tangent_norm"].median() < 1e-7 and out.logs["tangent_norm"].max() < 1e-4


@pytest.mark.parametrize("name", ["scd", "sct"])
def test_float64_finite_differences_match_the_func_backend(name):
    """fd_dtype: float64 promotes the float32 student for the tangent pass: the loss equals the func backend's
    to ~1e-6 (float32 fd: ~1e-3), and the student's weights come back untouched."""
    teacher = preset_mixture("ring8")
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(4))
    assert_fd64_matches_func(
        mlp_student(width=32, depth=2), {"name": name, "tangent_warmup": 0, "sigma_data": 1.0}, teacher, x0
    )


def test_gradient_is_the_continuous_limit_of_discrete_consistency():
    """Without normalization/adaptive weight and at r = 1, the sCM gradient -2 g . dF/dparams is parallel to
    the gradient of ||f(x, theta) - sg f(x - D dx/dtheta, theta - D)||^2 for small D (Song et al. 2023, Thm. 1;
    Lu & Song 2024, Sec. 4): the sign and the change of path are right."""
    torch.manual_seed(0)
    student = mlp_student().double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = GaussianFlow(torch.tensor([1.0, -2.0], dtype=torch.float64), 0.7)
    obj = build_objective({"name": "scd", "sigma_data": 0.8, "tangent_warmup": 0, "tangent_c": None, "adaptive": False})
    params = list(student.parameters())
    for trial in range(3):
        x0 = teacher.sample(1, generator=torch.Generator().manual_seed(trial))
        torch.manual_seed(trial)
        out = obj(student=student, teacher=teacher, target=None, x0=x0, cond=None, step=0)
        g_scm = torch.cat([g.flatten() for g in torch.autograd.grad(out.loss.sum(), params)])
        torch.manual_seed(trial)  # the same theta and z as the objective drew
        theta = obj.sample_times(1, x0)[2]["theta"]
        z = 0.8 * torch.randn_like(x0)
        x = torch.cos(theta)[:, None] * x0 + torch.sin(theta)[:, None] * z
        dx = obj.dx_dtheta(teacher, x, theta, x0, z, None, 1.0)

        def f(x_, th):
            x_lin, t_lin = to_linear(x_, th * 2 / math.pi, obj.path)
            return student(x_lin, t_lin, torch.zeros_like(t_lin))

        step = 1e-5
        with torch.no_grad():
            f_prev = f(x - step * dx, theta - step)
        g_disc = torch.cat([g.flatten() for g in torch.autograd.grad((f(x, theta) - f_prev).pow(2).sum(), params)])
        cos_sim = float(g_scm @ g_disc / (g_scm.norm() * g_disc.norm()))
        assert cos_sim > 0.999, cos_sim


def test_stf_data_velocity_approaches_the_teachers():
    """sCT with ``data_velocity='stf'``: dx/dtheta from the batch-posterior velocity (Xu et al. 2023) moved onto
    TrigFlow time lies far closer to the exact PF-ODE velocity (sCD's dx/dtheta with the exact mixture as teacher)
    than the conditional cos(theta) z - sin(theta) x0 does, on the same (x0, z, theta)."""
    teacher = preset_mixture("ring8")
    g = torch.Generator().manual_seed(3)
    x0 = teacher.sample(1024, generator=g)
    config = {"sigma_data": 1.4, "p_mean": 0.0, "p_std": 1.6}
    sct, stf, scd = (
        build_objective({"name": n, **config, **kw})
        for n, kw in (("sct", {}), ("sct", {"data_velocity": "stf"}), ("scd", {}))
    )
    theta = sct.sample_times(1024, x0)[2]["theta"]
    z = 1.4 * torch.randn(1024, 2, generator=g)
    x = torch.cos(theta)[:, None] * x0 + torch.sin(theta)[:, None] * z
    exact = scd.dx_dtheta(teacher, x, theta, x0, z, None, 1.0)
    errs = {
        name: (obj.dx_dtheta(None, x, theta, x0, z, None, 1.0) - exact).pow(2).sum(1).mean().item()
        for name, obj in (("conditional", sct), ("stf", stf))
    }
    print(f"sCT dx/dtheta, mean squared distance to the exact PF-ODE's: {errs}")
    assert errs["stf"] < 0.2 * errs["conditional"]


def test_gradients_reach_student_and_log_variance_only_in_one_with_grad_call():
    teacher = NetVelocity(build_net({"name": "mlp", "data_shape": [2], "width": 16, "depth": 1}))
    student = mlp_student()
    calls = []
    student.net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    obj = build_objective({"name": "scd"})
    assert sum(p.numel() for p in obj.parameters()) > 0  # the learned log-variance lives in the objective
    out = obj(student=student, teacher=teacher, target=None, x0=torch.randn(32, 2), cond=None, step=0)
    out.loss.mean().backward()
    assert calls.count(True) == 1, f"the student must run exactly once with grad, got {calls}"
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    assert obj.logvar.net[-1].weight.grad is not None and obj.logvar.net[-1].weight.grad.abs().sum() > 0


def test_learned_log_variance_reaches_its_fixed_point():
    """With the student frozen, minimizing e^w ||.||^2 / dim - w over w_phi drives e^{w(t)} to 1 / E[||.||^2 / dim | t]:
    the weighted residual e^w mse averages to ~1 (it starts at E[mse], far from 1)."""
    torch.manual_seed(0)
    student = mlp_student(width=16, depth=1).requires_grad_(False)
    teacher = preset_mixture("ring8")
    obj = build_objective({"name": "scd", "sigma_data": 1.4, "tangent_warmup": 0})
    opt = torch.optim.Adam(obj.parameters(), lr=5e-2)
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(6))

    def weighted() -> float:
        torch.manual_seed(1)
        out = obj(student=student, teacher=teacher, target=None, x0=x0, cond=None, step=0)
        return float((torch.exp(out.logs["logvar"]) * out.logs["mse"]).mean()), float(out.logs["mse"].mean())

    before, mse = weighted()
    for k in range(80):
        torch.manual_seed(k % 4)  # a few fixed draws of (theta, z), so the fit converges in few steps
        out = obj(student=student, teacher=teacher, target=None, x0=x0, cond=None, step=0)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    after, _ = weighted()
    print(f"adaptive weight: E[e^w mse] {before:.3f} -> {after:.3f} (mse {mse:.3f})")
    assert abs(before - mse) < 1e-6 and abs(before - 1) > 0.3
    assert abs(after - 1) < 0.25


def test_nonfinite_teacher_rows_are_masked_counted_and_logged():
    student = mlp_student()
    obj = build_objective({"name": "scd"})
    out = obj(
        student=student,
        teacher=NaNRows(preset_mixture("ring8"), rows=3),
        target=None,
        x0=torch.randn(16, 2),
        cond=None,
        step=0,
    )
    assert int(out.logs["nonfinite_targets"]) == 3
    assert torch.isfinite(out.loss).all() and torch.all(out.loss[:3] == 0)
    out.loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_schedule_and_bad_input():
    obj = build_objective({"name": "sct", "tangent_warmup": 100})
    logged = [
        float(obj(student=mlp_student(), x0=torch.randn(4, 2), step=k).logs["tangent_warmup"])
        for k in (0, 50, 100, 1000)
    ]
    assert logged == [0.0, 0.5, 1.0, 1.0]
    assert not obj.needs_teacher and build_objective({"name": "scd"}).needs_teacher
    with pytest.raises(ValueError, match="sigma_data"):
        build_objective({"name": "scd", "sigma_data": 0.0})
    with pytest.raises(ValueError, match="tangent_warmup"):
        build_objective({"name": "scd", "tangent_warmup": -1})
    with pytest.raises(ValueError, match="only when distilling"):
        build_objective({"name": "sct", "guidance": 3.0})
    with pytest.raises(ValueError, match="unknown data_velocity"):
        build_objective({"name": "sct", "data_velocity": "oracle"})
    with pytest.raises(ValueError, match="not to distillation"):
        build_objective({"name": "scd", "data_velocity": "stf"})
    with pytest.raises(ValueError, match="teacher is None"):
        build_objective({"name": "scd"})(
            student=mlp_student(), teacher=None, target=None, x0=torch.randn(4, 2), cond=None, step=0
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scd", "sct"])
def test_training_on_ring8_cuts_one_step_error(name):
    """Test-sized budget (MLP 128x3, batch 256, time_scale=10 since the JVP differentiates the time embedding);
    the proposal is widened (P_mean 0, P_std 1.6) so that t_lin = sigmoid(tau) reaches the 1-NFE time t = 1.
    sCT uses ``data_velocity='stf'`` (the batch-posterior velocity, Xu et al. 2023; data samples only)."""
    torch.manual_seed(0)
    before, after, euler2, secs = one_step_run(
        mlp_student(width=128, depth=3, time_scale=10.0),
        build_objective({"name": name, **SCM_TEST_CONFIG, **EXTRA[name]}),
        STEPS[name],
        lr=2e-3,
        lr_final=1e-4,
        source="teacher" if name == "scd" else "data",
    )
    print(
        f"{name} ring8: 1-NFE rmse untrained {before:.3f} -> trained {after:.3f} (EMA; ratio {after / before:.3f}); "
        f"teacher 2-step Euler {euler2:.3f}; {STEPS[name]} steps in {secs:.0f}s"
    )
    assert after <= before * RATIO[name]
    if name == "scd":
        assert after < euler2


SCM_TEST_CONFIG = {"sigma_data": 1.4, "tangent_warmup": 300, "p_mean": 0.0, "p_std": 1.6, "adaptive": False}
STEPS = {"scd": 1800, "sct": 2000}
EXTRA = {"scd": {}, "sct": {"data_velocity": "stf"}}
# sCT (teacher-free) with the STF velocity meets the 1/5 at one seed but not at another in this budget, so
# its bound is 1/4 (3000 steps reach 1/5: ``test_sct_longer_run_cuts_one_step_error_five_fold``); measurements in
# docs/measurements.md.
RATIO = {"scd": 1 / 5, "sct": 1 / 4}


@pytest.mark.long
def test_sct_longer_run_cuts_one_step_error_five_fold():
    """sCT from data with the STF velocity, as ``test_training_on_ring8_cuts_one_step_error[sct]`` but 3000 steps:
    the issue's 1/5 at 1 NFE, and the 1-NFE error below the teacher's own 2-step Euler error (issue 4);
    measurements in docs/measurements.md."""
    torch.manual_seed(0)
    before, after, euler2, secs = one_step_run(
        mlp_student(width=128, depth=3, time_scale=10.0),
        build_objective({"name": "sct", **SCM_TEST_CONFIG, **EXTRA["sct"]}),
        3000,
        lr=2e-3,
        lr_final=1e-4,
        source="data",
    )
    print(
        f"sct ring8, 3000 steps: 1-NFE rmse untrained {before:.3f} -> trained {after:.3f} "
        f"(EMA; ratio {after / before:.3f}); "
        f"teacher 2-step Euler {euler2:.3f}; {secs:.0f}s"
    )
    assert after <= before / 5
    assert after < euler2  # issue 4: sCM's 1-NFE error below the teacher's own 2-step Euler error
