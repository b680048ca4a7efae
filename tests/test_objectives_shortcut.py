"""Shortcut models (flowmap/objectives/shortcut.py): exactness at the true flow map (up to the finest
level's Euler anchor, which shrinks with the level), dyadic times, gradient flow, NaN masking, and a short
distillation on ring8 whose 1 to 2^k-step samples go through ``flowmap.sampling.sample``."""

from __future__ import annotations

import time

import pytest
import torch
from exact_maps import ExactGMMMap, GaussianFlow, NaNRows, one_step_error, ring8_reference, train_on_ring8

from flowmap.ema import frozen_copy
from flowmap.metrics import flow_map_rmse
from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.sampling import sample
from flowmap.student import FlowMap
from flowmap.velocity import NetVelocity
from teachers import preset_mixture


def mlp_student(width: int = 32, depth: int = 2, **kw) -> FlowMap:
    return FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": width, "depth": depth, **kw}))


def split_rows(out, k: int):
    """Masks (flow matching, finest consistency level, other consistency levels) from the logged 2d."""
    two_d = out.logs["step_size"].double()
    fm = two_d == 0
    finest = (two_d - 2.0 ** (1 - k)).abs() < 1e-6
    return fm, finest, ~fm & ~finest


@pytest.mark.parametrize("source,sigma0", [("teacher", 0.7), ("data", 0.0)])
def test_exact_map_zero_except_finest_anchor(source, sigma0):
    flow = GaussianFlow(torch.tensor([1.0, -2.0], dtype=torch.float64), sigma0)
    finest_means = []
    for k in (3, 4, 5):
        obj = build_objective({"name": "shortcut", "source": source, "max_log2_steps": k, "consistency_share": 0.75})
        torch.manual_seed(0)
        x0 = flow.sample(2048, generator=torch.Generator().manual_seed(1))
        out = obj(student=flow, teacher=flow if source == "teacher" else None, target=flow, x0=x0, cond=None, step=0)
        fm, finest, others = split_rows(out, k)
        assert fm.sum() > 0 and finest.sum() > 0 and others.sum() > 0
        assert out.loss[fm].max() < 1e-24 and out.loss[others].max() < 1e-24
        finest_means.append(float(out.loss[finest].mean()))
    print(
        f"shortcut ({source}) exact map: finest-level loss (two Euler steps of the d=0 velocity) "
        f"for k=3,4,5: {finest_means}"
    )
    if sigma0 > 0:  # the Euler anchor's error is O(d) in u: the squared loss drops ~4x or more per level
        assert finest_means[0] > 3 * finest_means[1] > 9 * finest_means[2] > 0
    else:  # a point mass has straight trajectories: Euler is exact
        assert max(finest_means) < 1e-24


class OwnDiagonal(GaussianFlow):
    """The exact map with a wrong diagonal: u(x, t, t) = 1.05 v(x, t)."""

    def velocity(self, x, t, cond=None, guidance=1.0):
        return 1.05 * super().velocity(x, t, cond, guidance)


def test_teacher_anchor_takes_the_finest_half_steps_from_the_teacher():
    """anchor 'teacher': the finest level's target is two Euler half steps of the teacher's velocity,
    (v(x, s) + v(x - d v(x, s), s - d)) / 2, whatever the student's diagonal; anchor 'student' (the paper) takes the
    target's own diagonal there. The coarser levels do not change."""
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    flow, own = GaussianFlow(mean, 0.7), OwnDiagonal(mean, 0.7)
    x0 = flow.sample(512, generator=torch.Generator().manual_seed(1))
    config = {"name": "shortcut", "max_log2_steps": 3, "consistency_share": 1.0}
    obj = build_objective({**config, "anchor": "teacher"})
    torch.manual_seed(0)
    d = obj.draw(own, flow, x0, None, 0)
    got = obj.consistency_target(own, d, flow)
    paper = build_objective(config).consistency_target(own, d, flow)
    h = d.extra["d"][:, None]
    finest = d.extra["d"] <= 2.0**-3 * (1 + 1e-6)
    v1 = flow.velocity(d.x_s, d.s)
    want = 0.5 * (v1 + flow.velocity(d.x_s - h * v1, d.s - d.extra["d"]))
    print(f"finest rows {int(finest.sum())}: |teacher anchor - by hand| {(got - want)[finest].abs().max():.1e}")
    assert finest.sum() > 0 and (~finest).sum() > 0
    torch.testing.assert_close(got[finest], want[finest])
    torch.testing.assert_close(got[~finest], paper[~finest])  # the coarser levels are the paper's
    assert (got[finest] - paper[finest]).abs().max() > 1e-3  # the student's diagonal is 5% off
    with pytest.raises(ValueError, match="needs source 'teacher'"):
        build_objective({**config, "source": "data", "anchor": "teacher"})
    with pytest.raises(ValueError, match="anchor"):
        build_objective({**config, "anchor": "exact"})


def test_exact_gmm_map_consistency_and_flow_matching_rows():
    teacher = preset_mixture("ring8")
    exact = ExactGMMMap(teacher, steps=40)
    obj = build_objective({"name": "shortcut", "max_log2_steps": 3, "consistency_share": 0.5})
    x0 = teacher.sample(24, generator=torch.Generator().manual_seed(0)).double()
    out = obj(student=exact, teacher=teacher, target=exact, x0=x0, cond=None, step=0)
    fm, finest, others = split_rows(out, 3)
    print(
        f"shortcut exact ring8 map: flow-matching {out.loss[fm].max():.1e}, consistency {out.loss[others].max():.1e}, "
        f"finest anchor {out.loss[finest].mean():.1e}"
    )
    assert out.loss[fm].max() < 1e-24
    assert out.loss[others].max() < 1e-10  # RK4 (40 steps per jump) round trip; u^2 ~ 4
    assert out.loss[finest].mean() > 1e-6  # the d=0 anchor is two Euler steps


def test_dyadic_times_sit_on_the_sampling_grid():
    obj = build_objective({"name": "shortcut", "max_log2_steps": 4})
    s, d = obj.consistency_times(4000, torch.zeros(1))
    two_d = 2 * d
    levels = torch.log2(two_d)
    assert torch.allclose(levels, levels.round()) and set(levels.round().int().tolist()) == {0, -1, -2, -3}
    assert torch.all(s <= 1) and torch.all(s - two_d >= 0)
    assert torch.allclose(s / two_d, (s / two_d).round())  # s is a multiple of 2d: a point of the 1/(2d)-step grid
    assert obj.target_decay(123) == obj.target_ema


def test_gradient_reaches_only_the_student_in_one_with_grad_call():
    teacher = NetVelocity(build_net({"name": "mlp", "data_shape": [2], "width": 16, "depth": 1}))
    student = mlp_student()
    target = mlp_student().requires_grad_(True)  # deliberately not frozen
    calls = []
    student.net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    obj = build_objective({"name": "shortcut"})
    out = obj(student=student, teacher=teacher, target=target, x0=torch.randn(32, 2), cond=None, step=0)
    out.loss.mean().backward()
    assert calls == [True]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in target.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0


def test_nonfinite_teacher_rows_are_masked_counted_and_logged():
    student = mlp_student()
    obj = build_objective({"name": "shortcut", "consistency_share": 0.25})
    out = obj(
        student=student,
        teacher=NaNRows(preset_mixture("ring8"), rows=3),
        target=frozen_copy(student),
        x0=torch.randn(16, 2),
        cond=None,
        step=0,
    )
    assert int(out.logs["nonfinite_targets"]) == 3
    assert torch.isfinite(out.loss).all() and torch.all(out.loss[4:7] == 0)  # rows 4..6 = first FM rows
    out.loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_bad_input():
    with pytest.raises(ValueError, match="max_log2_steps"):
        build_objective({"name": "shortcut", "max_log2_steps": 0})
    with pytest.raises(ValueError, match="consistency_share"):
        build_objective({"name": "shortcut", "consistency_share": 2.0})
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_objective({"name": "shortcut", "bootstrap_every": 4})
    obj = build_objective({"name": "shortcut"})
    assert obj.uses_target and obj.needs_teacher
    with pytest.raises(ValueError, match="EMA target"):
        obj(
            student=mlp_student(), teacher=preset_mixture("ring8"), target=None, x0=torch.randn(4, 2), cond=None, step=0
        )


@pytest.mark.slow
def test_distillation_on_ring8_cuts_one_step_error_and_samples_with_any_dyadic_steps():
    torch.manual_seed(0)
    student = mlp_student(width=128, depth=3, time_scale=10.0)
    before = one_step_error(student)
    t0 = time.time()
    ema = train_on_ring8(student, build_objective(SHORTCUT_TEST_CONFIG), STEPS, lr=2e-3, lr_final=1e-4)
    z, ref = ring8_reference()
    errs = {n: round(flow_map_rmse(sample(ema, z, n), ref), 4) for n in (1, 2, 4, 8, 16)}
    print(
        f"shortcut ring8: 1-NFE rmse untrained {before:.3f} -> trained {errs[1]:.3f} "
        f"(EMA; ratio {errs[1] / before:.3f}); "
        f"rmse by number of steps {errs}; {STEPS} steps in {time.time() - t0:.0f}s"
    )
    assert errs[1] <= before / 5
    assert max(errs.values()) <= before / 4  # 1 to 2^4 uniform steps all sample the trained pairs well


SHORTCUT_TEST_CONFIG = {"name": "shortcut", "max_log2_steps": 5, "target_ema": 0.99}
STEPS = 2500
