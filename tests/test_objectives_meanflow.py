"""MeanFlow (flowmap/objectives/meanflow.py): the loss vanishes at the exact flow map, gradients reach
only the student (called once with grad), NaN targets are masked and counted, and a short distillation
on the ring8 mixture cuts the 1-NFE error."""

from __future__ import annotations

import pytest
import torch
from exact_maps import ExactGMMMap, GaussianFlow, NaNRows, one_step_run

from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.student import FlowMap
from flowmap.velocity import NetVelocity
from teachers import GaussianMixtureTeacher, preset_mixture


def mlp_student(width: int = 32, depth: int = 2, **kw) -> FlowMap:
    return FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": width, "depth": depth, **kw}))


def test_loss_vanishes_at_exact_gmm_map_fd_backend():
    """Distilled target with the exact ring8 map as student (float64 RK4; the fd backend differentiates it)."""
    teacher = preset_mixture("ring8")
    exact = ExactGMMMap(teacher, steps=40)
    x0 = teacher.sample(24, generator=torch.Generator().manual_seed(0)).double()
    obj = build_objective(
        {"name": "meanflow", "jvp_backend": "fd", "equal_share": 0.25, "time_dist": "uniform", "p": 0.0}
    )
    out = obj(student=exact, teacher=teacher, target=None, x0=x0, cond=None, step=0)
    scale = 2.0 + x0.pow(2).mean()  # E||eps - x0||^2 / dim, the size of u^2
    print(
        f"meanflow at exact GMM map: max mse {out.logs['mse'].max():.2e}, median {out.logs['mse'].median():.2e} "
        f"(u^2 ~ {scale:.1f})"
    )
    assert out.logs["mse"].max() < 1e-8 * scale  # RK4 (40 steps per jump) and fd (h = 1e-6) errors
    assert out.logs["mse"].median() < 1e-12 * scale
    # the same check fails for a map that is 1% off
    bent = ExactGMMMap(teacher, steps=40)
    bent.flow = lambda x, s, t, c: 1.01 * teacher.flow_map(x, s, t, c, steps=40) - 0.01 * x  # noqa: E731
    out_bent = obj(student=bent, teacher=teacher, target=None, x0=x0, cond=None, step=0)
    assert out_bent.logs["mse"].max() > 1e-6 * scale


@pytest.mark.parametrize("source,sigma0,end_share", [("teacher", 0.7, 0.0), ("data", 0.0, 0.0), ("teacher", 0.7, 0.25)])
def test_loss_vanishes_at_closed_form_map_func_backend(source, sigma0, end_share):
    """Closed-form Gaussian flow (differentiable, func backend); from data the data is a point mass so the
    conditional velocity is the marginal one; with ``end_share`` a quarter of the pairs jump to t = 0."""
    flow = GaussianFlow(torch.tensor([1.0, -2.0], dtype=torch.float64), sigma0)
    x0 = flow.sample(64, generator=torch.Generator().manual_seed(1))
    config = {"name": "meanflow", "source": source, "equal_share": 0.25, "time_dist": "uniform", "end_share": end_share}
    obj = build_objective(config)
    torch.manual_seed(0)
    out = obj(student=flow, teacher=flow if source == "teacher" else None, target=None, x0=x0, cond=None, step=0)
    print(f"meanflow ({source}) at closed-form map: max mse {out.logs['mse'].max():.2e}, max loss {out.loss.max():.2e}")
    assert out.logs["mse"].max() < 1e-20
    assert out.loss.max() < 1e-16
    assert int(out.logs["nonfinite_targets"]) == 0


def test_gradient_reaches_only_the_student_in_one_with_grad_call():
    teacher = NetVelocity(build_net({"name": "mlp", "data_shape": [2], "width": 16, "depth": 1}))  # params require grad
    student = mlp_student()
    calls = []
    student.net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    obj = build_objective({"name": "meanflow", "equal_share": 0.25})
    x0 = torch.randn(32, 2)
    out = obj(student=student, teacher=teacher, target=None, x0=x0, cond=None, step=0)
    out.loss.mean().backward()
    assert calls.count(True) == 1, f"the student must run exactly once with grad, got {calls}"
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert out.loss.shape == (32,)


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_image_students_run_the_func_jvp_through_attention(name):
    """The DiT / UNet attention has its own forward-mode rule, so the func backend serves the whole net; the
    loss matches the fd backend's (same draws) to the fd accuracy."""
    cfg = {
        "dit": {"name": "dit", "data_shape": [1, 8, 8], "dim": 32, "depth": 1, "heads": 2, "num_classes": 3},
        "unet": {
            "name": "unet",
            "data_shape": [1, 8, 8],
            "channels": 16,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [4],
            "heads": 2,
            "emb_dim": 32,
            "num_classes": 3,
        },
    }[name]
    student = FlowMap(build_net(cfg))
    with torch.no_grad():  # wake up the zero-initialized heads so the loss depends on every layer
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x0, cond = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    losses = {}
    for key, backend, fd_dtype in (
        ("forward_ad", "forward_ad", None),
        ("func", "func", None),
        ("fd", "fd", None),
        ("fd64", "fd", "float64"),
    ):
        torch.manual_seed(3)
        obj = build_objective(
            {
                "name": "meanflow",
                "source": "data",
                "jvp_backend": backend,
                "fd_dtype": fd_dtype,
                "equal_share": 0.0,
                "p": 0.0,
            }
        )
        out = obj(student=student, teacher=None, target=None, x0=x0, cond=cond, step=0)
        losses[key] = out.loss.detach()
    out.loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert all(p.dtype == torch.float32 for p in student.parameters())  # the float64 pass left the weights as they were
    assert torch.allclose(losses["forward_ad"], losses["func"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(losses["func"], losses["fd"], rtol=1e-2)
    assert torch.allclose(losses["func"], losses["fd64"], rtol=1e-4)  # float64 differences: ~1e-7 JVP error


def test_bf16_autocast_keeps_the_tangent_in_float32():
    student = mlp_student()
    x0 = torch.randn(64, 2)
    teacher = preset_mixture("ring8")
    losses = {}
    for amp in (False, True):
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = build_objective({"name": "meanflow", "p": 0.0})(
                student=student, teacher=teacher, target=None, x0=x0, cond=None, step=0
            )
        losses[amp] = out.logs["mse"]
    assert torch.isfinite(losses[True]).all()
    rel = float((losses[True] - losses[False]).abs().mean() / losses[False].mean())
    assert rel < 5e-2  # only the with-grad forward runs in bf16 (~3 significant digits)


def test_nonfinite_teacher_rows_are_masked_counted_and_logged():
    teacher = NaNRows(preset_mixture("ring8"), rows=3)
    student = mlp_student()
    obj = build_objective({"name": "meanflow"})
    out = obj(student=student, teacher=teacher, target=None, x0=torch.randn(16, 2), cond=None, step=0)
    assert int(out.logs["nonfinite_targets"]) == 3
    assert torch.isfinite(out.loss).all() and torch.all(out.loss[:3] == 0) and torch.all(out.loss[3:] > 0)
    out.loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_guidance_is_folded_into_the_teacher_velocity():
    """With CFG the target at s = t is v_u + w (v_c - v_u); a student with a guidance input gets w."""
    teacher = preset_mixture("ring8")  # 2 classes
    student = FlowMap(
        build_net({"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "num_classes": 2, "guidance_input": True})
    )
    seen = {}
    student.net.register_forward_pre_hook(lambda m, i: seen.update(w=i[4] if len(i) > 4 else None))
    obj = build_objective({"name": "meanflow", "equal_share": 1.0, "guidance": 2.0, "guidance_max": 4.0, "p": 0.0})
    cond = torch.randint(0, 2, (64,))
    out = obj(student=student, teacher=teacher, target=None, x0=torch.randn(64, 2), cond=cond, step=0)
    assert seen["w"] is not None and seen["w"].min() >= 2.0 and seen["w"].max() <= 4.0
    assert torch.isfinite(out.loss).all()
    with pytest.raises(ValueError, match="only when distilling"):
        build_objective({"name": "meanflow", "source": "data", "guidance": 2.0})
    with pytest.raises(ValueError, match="guidance_input"):
        build_objective({"name": "meanflow", "guidance_max": 3.0})(
            student=mlp_student(), teacher=teacher, target=None, x0=torch.randn(4, 2), cond=None, step=0
        )


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_objective({"name": "meanflow", "power": 1.0})
    with pytest.raises(ValueError, match="unknown JVP backend"):
        build_objective({"name": "meanflow", "jvp_backend": "forward"})
    with pytest.raises(ValueError, match="velocity source"):
        build_objective({"name": "meanflow", "source": "both"})
    with pytest.raises(ValueError, match="time distribution"):
        build_objective({"name": "meanflow", "time_dist": "beta"})
    with pytest.raises(ValueError, match="equal_share"):
        build_objective({"name": "meanflow", "equal_share": 1.5})
    obj = build_objective({"name": "meanflow"})
    assert obj.needs_teacher and not obj.uses_target
    with pytest.raises(ValueError, match="teacher is None"):
        obj(student=mlp_student(), teacher=None, target=None, x0=torch.randn(4, 2), cond=None, step=0)
    assert not build_objective({"name": "meanflow", "source": "data"}).needs_teacher


@pytest.mark.slow
def test_distillation_on_ring8_cuts_one_step_error():
    """Test-sized budget (MLP 128x3, batch 256): settings found on this mixture; the time embedding uses a small
    scale (time_scale=10) because the JVP differentiates it in time (see flowmap/nets/embeddings.py)."""
    torch.manual_seed(0)
    before, after, euler2, secs = one_step_run(
        mlp_student(width=128, depth=3, time_scale=10.0),
        build_objective(MEANFLOW_TEST_CONFIG),
        STEPS,
        lr=2e-3,
        lr_final=1e-4,
    )
    print(
        f"meanflow ring8: 1-NFE rmse untrained {before:.3f} -> trained {after:.3f} (EMA; ratio {after / before:.3f}); "
        f"teacher 2-step Euler {euler2:.3f}; {STEPS} steps in {secs:.0f}s"
    )
    assert after <= before / 5
    assert after < euler2


MEANFLOW_TEST_CONFIG = {"name": "meanflow", "time_dist": "uniform", "equal_share": 0.75, "p": 0.5}
STEPS = 2000


def test_stf_data_velocity_vanishes_at_the_exact_map_where_the_conditional_one_does_not():
    """From data with ``data_velocity='stf'``: on a batch that holds each point of a two-point data set equally
    often, the batch posterior is the exact one, so the target is the exact map's and the loss vanishes at it
    (float64 RK4 map, fd JVP); the conditional eps - x0 leaves its variance in the loss at the same map."""
    means = torch.tensor([[1.5, 0.5], [-1.0, -0.5]], dtype=torch.float64)
    points = GaussianMixtureTeacher(means, torch.full((2,), 1e-6, dtype=torch.float64))
    exact = ExactGMMMap(points, steps=40)
    x0 = means.repeat(12, 1)  # 24 rows, each point 12 times
    config = {"name": "meanflow", "source": "data", "jvp_backend": "fd", "time_dist": "uniform", "p": 0.0}
    mse = {}
    for velocity in ("stf", "conditional"):
        torch.manual_seed(0)
        obj = build_objective({**config, "data_velocity": velocity})
        mse[velocity] = obj(student=exact, teacher=None, target=None, x0=x0, cond=None, step=0).logs["mse"]
    print(f"meanflow from data at the exact map: max mse stf {mse['stf'].max():.2e}, "
          f"conditional {mse['conditional'].max():.2e}")  # fmt: skip
    assert mse["stf"].max() < 1e-8
    assert mse["conditional"].max() > 1e-2
    with pytest.raises(ValueError, match="not to distillation"):
        build_objective({"name": "meanflow", "data_velocity": "stf"})
    with pytest.raises(ValueError, match="unknown data_velocity"):
        build_objective({"name": "meanflow", "source": "data", "data_velocity": "batch"})
