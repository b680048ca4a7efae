"""CTM (flowmap/objectives/ctm.py): the loss vanishes at the exact flow map (up to the teacher segment's
Heun error) and not at a bent one, gradients reach the student through the jump to t = 0 with frozen
weights, bad input fails clearly, and a short distillation on ring8 cuts the 1- and 2-NFE errors."""

from __future__ import annotations

import pytest
import torch
from exact_maps import GaussianFlow, NaNRows
from test_objectives_ayf import distill_on_ring8

from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.objectives.ctm import frozen_call, teacher_segment
from flowmap.student import FlowMap
from teachers import preset_mixture


def mlp_student(width: int = 32, depth: int = 2, **kw) -> FlowMap:
    return FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": width, "depth": depth, **kw}))


class Bent(GaussianFlow):
    def flow(self, x, s, t, cond=None):
        return 1.1 * super().flow(x, s, t, cond) - 0.1 * x


def test_teacher_segment_converges_to_the_exact_map():
    flow = GaussianFlow(torch.tensor([1.0, -2.0], dtype=torch.float64), 0.7)
    x = torch.randn(64, 2, dtype=torch.float64)
    s, u = torch.rand(64, dtype=torch.float64) * 0.8 + 0.2, torch.rand(64, dtype=torch.float64) * 0.2
    exact = flow.flow(x, s, u)
    errs = [float((teacher_segment(flow, x, s, u, n, "heun", None, 1.0) - exact).abs().max()) for n in (8, 32)]
    print(f"teacher segment Heun error: 8 steps {errs[0]:.2e}, 32 steps {errs[1]:.2e}")
    assert errs[1] < errs[0] / 8  # second order: 4x the steps, ~16x smaller
    assert errs[1] < 1e-3


def test_loss_vanishes_at_the_exact_map_and_not_at_a_bent_one():
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    flow = GaussianFlow(mean, 0.7)
    x0 = flow.sample(64, generator=torch.Generator().manual_seed(1))
    obj = build_objective({"name": "ctm", "solver_steps": 40, "dsm_source": "teacher"})
    torch.manual_seed(0)
    out = obj(student=flow, teacher=flow, target=flow, x0=x0, cond=None, step=0)
    torch.manual_seed(0)
    bent = Bent(mean, 0.7)
    bent = obj(student=bent, teacher=flow, target=bent, x0=x0, cond=None, step=0)
    print(
        f"ctm: exact max loss {out.loss.max():.2e} (ctm {out.logs['ctm'].max():.2e}); "
        f"10% bent median {bent.loss.median():.2e}"
    )
    assert out.logs["dsm"].max() < 1e-20  # the diagonal is the teacher's velocity
    assert out.logs["ctm"].max() < 1e-6  # Heun segment error (40 steps) only
    assert bent.loss.median() > 1e-4 and bent.loss.median() > 100 * out.loss.max()


def test_gradient_flows_through_the_frozen_jump_and_masking():
    student = mlp_student()
    x = torch.randn(8, 2, requires_grad=True)
    y = frozen_call(student, x, torch.ones(8), torch.zeros(8))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.parameters())  # weights frozen in the outer jump
    teacher = NaNRows(preset_mixture("ring8"), rows=2)
    obj = build_objective({"name": "ctm", "dsm_source": "teacher"})
    assert obj.uses_target and obj.target_decay(10) == pytest.approx(0.999)
    out = obj(student=student, teacher=teacher, target=student, x0=torch.randn(16, 2), cond=None, step=0)
    out.loss.mean().backward()
    assert int(out.logs["nonfinite_targets"]) >= 2 and torch.all(out.loss[:2] == 0) and torch.all(out.loss[2:] > 0)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bad_input():
    with pytest.raises(ValueError, match="teacher step"):
        build_objective({"name": "ctm", "solver": "rk9"})
    with pytest.raises(ValueError, match="solver_steps"):
        build_objective({"name": "ctm", "solver_steps": 0})
    with pytest.raises(ValueError, match="lambda_dsm"):
        build_objective({"name": "ctm", "lambda_dsm": -1.0})
    with pytest.raises(ValueError, match="target_ema"):
        build_objective({"name": "ctm", "target_ema": 1.0})
    with pytest.raises(ValueError, match="dsm_source='teacher'"):
        build_objective({"name": "ctm", "guidance": 2.0})
    with pytest.raises(ValueError, match="teacher is None"):
        build_objective("ctm")(
            student=mlp_student(), teacher=None, target=None, x0=torch.randn(4, 2), cond=None, step=0
        )


@pytest.mark.parametrize("share", [0.25, 1.0])
def test_end_share_ends_the_first_rows_at_the_data_and_keeps_the_exact_map_at_zero_loss(share):
    """end_share rho: the first round(rho B) rows jump to t = 0, the others keep the paper's t ~ s U[0, 1]; u lies in
    [t, s] on every row, and the loss still vanishes at the exact map."""
    obj = build_objective({"name": "ctm", "solver_steps": 40, "dsm_source": "teacher", "end_share": share})
    x0 = torch.randn(64, 2, dtype=torch.float64)
    torch.manual_seed(0)
    s, t, extra = obj.times(64, x0, step=0)
    k = round(64 * share)
    assert torch.all(t[:k] == 0) and torch.all(t[k:] > 0) and torch.all(s >= t)
    assert torch.all(extra["u"] >= t) and torch.all(extra["u"] <= s)
    flow = GaussianFlow(torch.tensor([1.0, -2.0], dtype=torch.float64), 0.7)
    out = obj(student=flow, teacher=flow, target=flow, x0=flow.sample(64), cond=None, step=0)
    assert out.logs["ctm"].max() < 1e-6
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="end_share"):
            build_objective({"name": "ctm", "end_share": bad})


class RowCounter(torch.nn.Module):
    """A student that counts the rows of every call it serves (with grad or not)."""

    def __init__(self, student: FlowMap) -> None:
        super().__init__()
        self.student, self.rows = student, []

    def forward(self, x, s, t, cond=None):
        self.rows.append(x.shape[0])
        return self.student(x, s, t, cond)

    def average_velocity(self, x, s, t, cond=None):
        self.rows.append(x.shape[0])
        return self.student.average_velocity(x, s, t, cond)


def test_the_rows_that_end_at_the_data_skip_the_carries_and_the_loss_is_unchanged():
    """X(., 0, 0) is the identity: carrying the end_share rows to t = 0 again changes nothing, so the two carries
    (the target's and the frozen student's) run on the other rows only, with the same loss and gradient."""
    torch.manual_seed(3)
    teacher = preset_mixture("ring8")
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(0))
    obj = build_objective({"name": "ctm", "dsm_source": "teacher", "end_share": 0.5, "max_gap": 0.2})
    student = RowCounter(mlp_student())
    torch.manual_seed(0)
    d = obj.draw(student, teacher, x0, None, 0)
    outs, grads, rows = [], [], []
    for skip in (True, False):
        if not skip:  # the reference: every row carried (the end rows by the identity X(., 0, 0))
            obj.end_rows = lambda batch: 0
        student.rows.clear()
        student.zero_grad()
        out = obj.loss(d, student, teacher, student, 0)
        out.loss.mean().backward()
        outs.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
        rows.append(sorted(student.rows))
    print(f"student calls' rows with the skip: {rows[0]}, without: {rows[1]}")
    assert rows[0] == [32, 32, 64, 64, 64]  # target jump, X_theta, diagonal: 64 rows; the two carries: 32
    assert rows[1] == [64] * 5
    assert torch.all(torch.isfinite(outs[0])) and float(outs[0].mean()) > 0
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_max_gap_bounds_the_teacher_segment():
    """max_gap h: u ~ U[max(t, s - h), s], so s - u <= h on every row and u >= t; the loss still vanishes at the exact
    map with a one-step teacher segment that is exact for a Gaussian's linear-in-time path up to Heun's error."""
    obj = build_objective({"name": "ctm", "solver_steps": 8, "dsm_source": "teacher", "max_gap": 0.1})
    x0 = torch.randn(256, 2, dtype=torch.float64)
    torch.manual_seed(0)
    s, t, extra = obj.times(256, x0, step=0)
    u = extra["u"]
    assert torch.all(s - u <= 0.1 + 1e-12) and torch.all(u >= t) and torch.all(u <= s)
    assert float((s - u).max()) > 0.09  # the bound is reached, not a narrower law
    flow = GaussianFlow(torch.tensor([1.0, -2.0], dtype=torch.float64), 0.7)
    out = obj(student=flow, teacher=flow, target=flow, x0=flow.sample(64), cond=None, step=0)
    assert out.logs["ctm"].max() < 1e-6
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="max_gap"):
            build_objective({"name": "ctm", "max_gap": bad})


def test_distillation_on_ring8_cuts_one_and_two_step_errors():
    """Same small student and budget as the AYF test (width 64, emb_dim 64, 1500 steps, lr 3e-3), DSM weight 0.3.
    Issue 8's acceptance: 1- and 2-NFE errors at most 1/5 of the untrained student's (the issue's bar itself);
    measurements in docs/measurements.md."""
    before, after, secs = distill_on_ring8(CTM_TRAIN, STEPS, 3e-3)
    print(
        f"ctm ring8: 1-NFE {before[0]:.3f} -> {after[0]:.3f} ({after[0] / before[0]:.3f}), "
        f"2-NFE {before[1]:.3f} -> {after[1]:.3f} ({after[1] / before[1]:.3f}) ({STEPS} steps, {secs:.0f}s)"
    )
    assert after[0] <= before[0] / 5 and after[1] <= before[1] / 5


CTM_TRAIN = {"name": "ctm", "target_ema": 0.99, "dsm_source": "teacher", "lambda_dsm": 0.3}
STEPS = 1500
