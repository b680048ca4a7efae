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


class BentDiagonal(Bent):
    """The bent map with its own diagonal: d/dt X(x, s, t) at t = s is 1.05 v(x, s), not the teacher's v."""

    def velocity(self, x, t, cond=None, guidance=1.0):
        return 1.05 * super().velocity(x, t, cond, guidance)


@pytest.mark.parametrize(
    "options",
    [{}, {"sd_warmup": 4, "sd_target_ema": 0.99, "psd_space": "velocity"}],
    ids=["plain", "warmup_ema_target_velocity"],
)
@pytest.mark.parametrize("backend", ["forward_ad", "func", "fd"])
@pytest.mark.parametrize("name", VARIANTS)
def test_loss_vanishes_at_the_exact_map(name, backend, options):
    """Also with the warm-up ramp (mid-ramp step), the EMA target network (here the exact map itself) and, for PSD,
    the velocity-space residual."""
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    flow, bent = GaussianFlow(mean, 0.0), Bent(mean, 0.0)
    x0 = flow.sample(64, generator=torch.Generator().manual_seed(1))
    obj = build_objective({"name": name, "jvp_backend": backend, "fd_eps": 1e-6, **options})
    step = 2 if options else 0
    torch.manual_seed(0)
    out = obj(student=flow, teacher=None, target=flow if options else None, x0=x0, cond=None, step=step)
    torch.manual_seed(0)
    off = obj(student=bent, teacher=None, target=bent if options else None, x0=x0, cond=None, step=step)
    print(
        f"{name} ({backend}, {options}): exact max loss {out.loss.max():.2e}; "
        f"bent median sd {off.logs['sd'].median():.2e}"
    )
    assert out.loss.max() < (1e-12 if backend == "fd" else 1e-20)
    assert off.logs["sd"].median() > 1e-6
    if options:  # half-way through the ramp the bent map's loss carries half the self-distillation term
        torch.testing.assert_close(off.loss, off.logs["fm"] + 0.5 * off.logs["sd"])


@pytest.mark.parametrize("name", VARIANTS)
def test_teacher_source_vanishes_at_a_spread_flow_where_data_does_not(name):
    """With ``source="teacher"`` the diagonal regresses onto the teacher's velocity: at the exact map of a Gaussian
    of std 0.7 (whose marginal velocity is not eps - x0) the loss is ~0 with the teacher, while from data the
    flow-matching term keeps the conditional velocity's variance."""
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    flow = GaussianFlow(mean, 0.7)
    x0 = flow.sample(64, generator=torch.Generator().manual_seed(1))
    runs = {}
    for source in ("teacher", "data"):
        obj = build_objective({"name": name, "source": source, "jvp_backend": "func"})
        assert obj.needs_teacher == (source == "teacher")
        torch.manual_seed(0)
        runs[source] = obj(student=flow, teacher=flow, target=None, x0=x0, cond=None, step=0)
    teacher_max, data_fm = runs["teacher"].loss.max(), runs["data"].logs["fm"].mean()
    print(f"{name}: teacher max loss {teacher_max:.2e}, data mean fm {data_fm:.2e}")
    assert runs["teacher"].loss.max() < 1e-20
    assert runs["data"].logs["fm"].mean() > 0.1  # E||eps - x0 - v||^2 / D at std 0.7: order one
    torch.testing.assert_close(runs["teacher"].logs["sd"], runs["data"].logs["sd"])  # the same off-diagonal term
    with pytest.raises(ValueError, match="not to distillation"):
        build_objective({"name": name, "source": "teacher", "fm_target": "stf"})
    with pytest.raises(ValueError, match="teacher is None"):
        build_objective({"name": name, "source": "teacher"})(
            student=flow, teacher=None, target=None, x0=x0, cond=None, step=0
        )


@pytest.mark.parametrize("gradient", ["full", "primal"])
@pytest.mark.parametrize("name", ["fmsd_lagrangian", "fmsd_eulerian"])
def test_teacher_velocity_in_the_self_distillation_target(name, gradient):
    """``sd_velocity="teacher"``: the LSD / ESD residual takes the teacher's velocity instead of the student's own
    diagonal. At the exact map it vanishes; at a bent map it equals the residual written out with the teacher's field,
    dX/dt - v(X, t) (LSD) or dX/ds + dX/dx v(x, s) (ESD), and differs from the student-velocity one."""
    from torch.func import jvp

    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    flow, bent = GaussianFlow(mean, 0.7), BentDiagonal(mean, 0.7)
    x0 = flow.sample(64, generator=torch.Generator().manual_seed(1))
    config = {"name": name, "source": "teacher", "jvp_backend": "func", "sd_gradient": gradient}
    obj = build_objective({**config, "sd_velocity": "teacher"})
    torch.manual_seed(0)
    exact = obj(student=flow, teacher=flow, target=None, x0=x0, cond=None, step=0)
    assert exact.loss.max() < 1e-20
    torch.manual_seed(0)
    d = obj.draw(bent, flow, x0, None, 0)
    got = obj.distillation(bent, d, bent, flow)
    own = build_objective(config).distillation(bent, d, bent, flow)
    if name == "fmsd_lagrangian":
        X, dX = jvp(lambda t_: bent.flow(d.x_s, d.s, t_), (d.t,), (torch.ones_like(d.t),))
        res = dX - flow.velocity(X, d.t)
    else:
        v = flow.velocity(d.x_s, d.s)
        _, res = jvp(lambda x_, s_: bent.flow(x_, s_, d.t), (d.x_s, d.s), (v, torch.ones_like(d.s)))
    want = res.pow(2).sum(1)
    print(
        f"{name} ({gradient}): sd {got.mean():.3e} (teacher's field), {want.mean():.3e} by hand, {own.mean():.3e} own"
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    assert (got - own).abs().max() > 1e-4 * own.abs().max()
    with pytest.raises(ValueError, match="needs source 'teacher'"):
        build_objective({"name": name, "sd_velocity": "teacher"})
    with pytest.raises(ValueError, match="sd_velocity"):
        build_objective({**config, "sd_velocity": "exact"})
    with pytest.raises(ValueError, match="PSD"):
        build_objective({"name": "fmsd_progressive", "source": "teacher", "sd_velocity": "teacher"})


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
        out = build_objective({"name": name, "jvp_backend": backend})(
            student=student, teacher=None, target=None, x0=torch.randn(32, 2), cond=None, step=0
        )
        out.loss.mean().backward()
        results[backend] = (
            out.loss.detach(),
            torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]),
        )
    (l_dual, g_dual), (l_func, g_func) = results["forward_ad"], results["func"]
    torch.testing.assert_close(l_dual, l_func, rtol=1e-5, atol=1e-7)
    assert float((g_dual - g_func).norm() / g_func.norm()) < 1e-5  # float32 round-off only
    assert float(g_dual.abs().sum()) > 0


@pytest.mark.parametrize("backend", ["forward_ad", "func", "fd"])
@pytest.mark.parametrize("name", ["fmsd_lagrangian", "fmsd_eulerian"])
def test_primal_gradient_keeps_the_loss_and_trains_only_through_u(name, backend):
    """``sd_gradient="primal"``: the same per-sample loss as the full gradient (same draws), zero at the exact map, and
    its parameter gradient is that of ||u - sg(u - r)||^2 (ESD: sg(u + r)) with r the map-space residual of the full
    variant, i.e. the full loss with the derivative term under stop-gradient."""
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x0 = GaussianFlow(mean, 0.0).sample(64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    exact = build_objective({"name": name, "jvp_backend": backend, "fd_eps": 1e-6, "sd_gradient": "primal"})(
        student=GaussianFlow(mean, 0.0), teacher=None, target=None, x0=x0, cond=None
    )
    assert exact.loss.max() < (1e-12 if backend == "fd" else 1e-20)

    torch.manual_seed(0)
    student = mlp_student().double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))  # wake the zero-initialized layers
    params = list(student.parameters())
    tol = 1e-4 if backend == "fd" else 1e-6  # central differences at h = 1e-6 (float64) vs exact JVPs
    grads, losses = {}, {}
    for mode in ("full", "primal"):
        obj = build_objective(
            {"name": name, "jvp_backend": backend, "fd_eps": 1e-6, "sd_gradient": mode, "equal_share": 0.0}
        )
        torch.manual_seed(3)
        d = obj.draw(student, None, x0, None, 0)
        s, t, x_s = d.s, d.t, d.x_s
        sd = obj.distillation(student, d, student)
        losses[mode] = sd.detach()
        grads[mode] = torch.autograd.grad(sd.sum(), params)
        if (
            mode == "full"
        ):  # the reference: ||u - sg(u + r)||^2, r the map-space residual by an independent torch.func.jvp
            with torch.no_grad():
                if name == "fmsd_eulerian":  # r = dX/ds + dX/dx v(x_s, s)
                    v = student.average_velocity(x_s, s, s, None)
                    _, r = torch.func.jvp(lambda x_, s_: student(x_, s_, t, None), (x_s, s), (v, torch.ones_like(s)))
                else:  # r = dX/dt - v(X, t)
                    X, dX = torch.func.jvp(lambda t_: student(x_s, s, t_, None), (t,), (torch.ones_like(t),))
                    r = dX - student.average_velocity(X, t, t, None)
            u = student.average_velocity(x_s, s, t, None)
            torch.testing.assert_close(r.pow(2).sum(1), losses["full"], rtol=tol, atol=1e-9)
            sign = -1.0 if name == "fmsd_eulerian" else 1.0  # r = sign * (u - target)
            ref = torch.autograd.grad((u - (u.detach() - sign * r)).pow(2).sum(), params)
    torch.testing.assert_close(losses["primal"], losses["full"], rtol=tol, atol=1e-9)

    def flat(gs):
        return torch.cat([g.flatten() for g in gs])

    assert float((flat(grads["primal"]) - flat(ref)).norm()) < tol * float(flat(ref).norm())
    assert float((flat(grads["primal"]) - flat(grads["full"])).norm()) > 1e-3 * float(flat(grads["full"]).norm())


@pytest.mark.parametrize("name", ["fmsd_lagrangian", "fmsd_eulerian"])
def test_normalized_residual_is_bounded_and_vanishes_at_the_exact_map(name):
    """``sd_normalize: c`` (with ``sd_gradient: primal``): the self-distillation term is ||r||^2 / (||r|| + c)^2 of the
    plain primal residual r (so below 1 per sample, before the 1/D), zero at the exact map, and its gradient is that of
    ||u - sg(u - r / (||r|| + c))||^2."""
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x0 = GaussianFlow(mean, 0.0).sample(64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    exact = build_objective({"name": name, "sd_gradient": "primal", "sd_normalize": 1.0})(
        student=GaussianFlow(mean, 0.0), teacher=None, target=None, x0=x0, cond=None
    )
    assert exact.loss.max() < 1e-20
    torch.manual_seed(0)
    student = mlp_student().double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = list(student.parameters())
    c = 0.5
    plain = build_objective({"name": name, "sd_gradient": "primal", "equal_share": 0.0, "jvp_backend": "func"})
    normed = build_objective(
        {"name": name, "sd_gradient": "primal", "sd_normalize": c, "equal_share": 0.0, "jvp_backend": "func"}
    )
    torch.manual_seed(3)
    d = plain.draw(student, None, x0, None, 0)
    s, t, x_s = d.s, d.t, d.x_s
    r = plain.primal_residual(student, d, student).detach()
    sd = normed.distillation(student, d, student)
    n = r.norm(dim=1)
    torch.testing.assert_close(sd.detach(), n.pow(2) / (n + c).pow(2))
    assert float(sd.max()) < 1.0 and float(n.max()) > 1.0  # bounded where the raw residual is not
    grad = torch.autograd.grad(sd.sum(), params)
    u = student.average_velocity(x_s, s, t, None)
    ref = torch.autograd.grad((u - (u.detach() - r / (n + c)[:, None])).pow(2).sum(), params)
    for g, g_ref in zip(grad, ref):
        torch.testing.assert_close(g, g_ref)


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
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="sd_warmup"):
            build_objective({"name": name, "sd_warmup": bad})
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="sd_target_ema"):
            build_objective({"name": name, "sd_target_ema": bad})
    with pytest.raises(ValueError, match="psd_space"):
        build_objective({"name": name, "psd_space": "u"})
    with pytest.raises(ValueError, match="sd_gradient"):
        build_objective({"name": name, "sd_gradient": "semi"})
    with pytest.raises(ValueError, match="sd_normalize"):
        build_objective({"name": name, "sd_normalize": -1.0})
    if name == "fmsd_progressive":
        with pytest.raises(ValueError, match="stop-gradient"):
            build_objective({"name": name, "sd_gradient": "primal"})
    else:
        with pytest.raises(ValueError, match="needs sd_gradient 'primal'"):
            build_objective({"name": name, "sd_normalize": 1.0})
    with pytest.raises(ValueError, match="target network"):
        build_objective({"name": name, "sd_target_ema": 0.9})(
            student=student, teacher=None, target=None, x0=torch.randn(4, 2), cond=None, step=0
        )
    # during the warm-up the self-distillation term is off at step 0 (and skipped: sd is logged as 0)
    out = build_objective({"name": name, "sd_warmup": 10})(
        student=student, teacher=None, target=None, x0=torch.randn(16, 2), cond=None, step=0
    )
    assert float(out.logs["sd"].abs().max()) == 0.0 and torch.equal(out.loss, out.logs["fm"])


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
        return flow_map_rmse(flow_map(z, one, zero), ref), flow_map_rmse(
            flow_map(flow_map(z, one, half), half, zero), ref
        )


# name -> (objective config, steps, lr, batch, bound on the trained / untrained ratio at 1 and 2 NFE).
# Common to all: MLP 128x3 (time_scale 10), Adam with cosine decay to 1e-5, grad clip 1, EMA 0.98 evaluated, the
# self-distillation weight ramped from 0 over the first 200 steps (``sd_warmup``); the data are ring8 samples only (the
# exact mixture is the reference, never called by the loss). JVP backend: the objective's default, ``func``.
# Measured ratios: docs/measurements.md. The acceptance bar is 1/5 = 0.2; the bounds are the
# measured ratios plus a margin, NOT the bar (the bar is met by the ``long`` test below).
SD_TRAIN = {
    "fmsd_lagrangian": (
        {"name": "fmsd_lagrangian", "fm_target": "stf", "equal_share": 0.5, "sd_warmup": 200},
        600,
        5e-3,
        512,
        0.28,
    ),
    "fmsd_progressive": (
        {"name": "fmsd_progressive", "fm_target": "stf", "equal_share": 0.5, "sd_warmup": 200, "psd_space": "velocity"},
        600,
        5e-3,
        512,
        0.30,
    ),
    "fmsd_eulerian": (
        {"name": "fmsd_eulerian", "fm_target": "stf", "equal_share": 0.75, "sd_warmup": 200},
        800,
        3e-3,
        512,
        0.32,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SD_TRAIN))
def test_self_distillation_from_ring8_data_cuts_one_and_two_step_errors(name):
    """Short from-data training on ring8; 1-/2-NFE errors vs the exact map, as a ratio of the untrained student's.

    The bounds (SD_TRAIN) are measured ratios plus a margin, not the issue's 1/5, which
    ``test_self_distillation_from_ring8_data_cuts_errors_five_fold`` meets; measurements in docs/measurements.md."""
    torch.set_num_threads(1)
    config, steps, lr, batch, bound = SD_TRAIN[name]
    torch.manual_seed(0)
    student = mlp_student(width=128, depth=3, time_scale=10.0)
    before = nfe_errors(student)
    t0 = time.process_time()
    ema = train_on_ring8(
        student, build_objective(config), steps, lr=lr, lr_final=1e-5, batch=batch, ema_decay=0.98, source="data"
    )
    after = nfe_errors(ema)
    r1, r2 = after[0] / before[0], after[1] / before[1]
    print(
        f"{name} ring8 from data: 1-NFE {before[0]:.3f} -> {after[0]:.3f} (ratio {r1:.3f}), 2-NFE {before[1]:.3f} -> "
        f"{after[1]:.3f} (ratio {r2:.3f}); {steps} steps in {time.process_time() - t0:.0f}s CPU"
    )
    assert r1 <= bound and r2 <= bound


# name -> (objective config, steps, lr) for the bar (1/5 at 1 and 2 NFE) at batch 1024; the rest as SD_TRAIN.
# ESD meets it with its residual under stop-gradient and normalized (``sd_gradient: primal``, ``sd_normalize: 1``).
FIVE_FOLD = {
    "fmsd_eulerian": (
        {
            "name": "fmsd_eulerian",
            "fm_target": "stf",
            "equal_share": 0.75,
            "sd_warmup": 600,
            "sd_gradient": "primal",
            "sd_normalize": 1.0,
        },
        2000,
        2e-3,
    ),
    "fmsd_lagrangian": (
        {"name": "fmsd_lagrangian", "fm_target": "stf", "equal_share": 0.5, "sd_warmup": 300},
        1000,
        5e-3,
    ),
    "fmsd_progressive": (
        {"name": "fmsd_progressive", "fm_target": "stf", "equal_share": 0.5, "sd_warmup": 300, "psd_space": "velocity"},
        1000,
        5e-3,
    ),
}


@pytest.mark.long
@pytest.mark.parametrize("name", list(FIVE_FOLD))
def test_self_distillation_from_ring8_data_cuts_errors_five_fold(name):
    """LSD, PSD and ESD from ring8 data (no teacher) at batch 1024: the issue's 1/5 at 1 and 2 NFE, and 2 NFE no worse
    than 1 NFE + 0.02. LSD and PSD: 1000 steps, lr 5e-3, the self-distillation weight ramped from 0 over the first 300
    steps (``sd_warmup``), PSD's residual in velocity space (``psd_space``). ESD: 2000 steps, lr 2e-3, warm-up 600,
    its residual under stop-gradient and normalized, r / (||r|| + 1) (``sd_gradient: primal``, ``sd_normalize: 1``,
    the tangent normalization of Lu & Song 2024 applied to the Eulerian residual).

    The bound is the issue's 1/5 itself; measurements, and the ESD settings that did not meet it, in
    docs/measurements.md."""
    torch.set_num_threads(1)
    config, steps, lr = FIVE_FOLD[name]
    torch.manual_seed(0)
    student = mlp_student(width=128, depth=3, time_scale=10.0)
    before = nfe_errors(student)
    t0 = time.process_time()
    ema = train_on_ring8(
        student, build_objective(config), steps, lr=lr, lr_final=1e-5, batch=1024, ema_decay=0.98, source="data"
    )
    after = nfe_errors(ema)
    r1, r2 = after[0] / before[0], after[1] / before[1]
    print(
        f"{name} ring8 from data, batch 1024: 1-NFE ratio {r1:.3f}, 2-NFE ratio {r2:.3f}; "
        f"{time.process_time() - t0:.0f}s CPU"
    )
    assert r1 <= 0.2 and r2 <= 0.2
    assert r2 <= r1 + 0.02
