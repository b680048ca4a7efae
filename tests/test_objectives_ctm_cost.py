"""CTM's cheaper step (flowmap/objectives/ctm.py) against the paper's loss written out term by term: the teacher's
velocity at (x_s, s) shared by the DSM target and the solver's first stage changes nothing (dsm_share None: loss and
gradients equal the reference), and ``dsm_share`` rho puts L_CTM / (1 - rho) on rows [0, n) and
lambda L_DSM / rho on rows [n, B) of the same draw, from one with-grad student call instead of two."""

from __future__ import annotations

import pytest
import torch

from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.objectives.base import sq_norm
from flowmap.objectives.ctm import frozen_call
from flowmap.solvers import teacher_step
from flowmap.student import FlowMap
from teachers import preset_mixture

CONFIG = {"name": "ctm", "solver": "heun", "solver_steps": 2, "lambda_dsm": 0.3, "dsm_source": "teacher"}


def student_and_teacher() -> tuple[FlowMap, torch.nn.Module]:
    torch.manual_seed(0)
    student = FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": 32, "depth": 2, "emb_dim": 32}))
    with torch.no_grad():  # a student away from its zero-initialized interval embedding: every input matters
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return student, preset_mixture("ring8")


def reference_terms(obj, d, student, teacher, at_data: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_CTM, L_DSM) per row, Eq. 6-8 as first written: the segment by ``teacher_step``, the teacher's velocity for
    the DSM term in its own call, X_theta and u_theta(x_s, s, s) in two student calls; ``at_data`` False: L_CTM
    compares X_theta(x_s, s, t) with X(x_u, u, t) at t, without the carry to t = 0."""
    s, u, t, zero = d.s, d.extra["u"], d.t, torch.zeros_like(d.t)
    with torch.no_grad():
        x = d.x_s
        for k in range(obj.solver_steps):
            a, b = s + (u - s) * (k / obj.solver_steps), s + (u - s) * ((k + 1) / obj.solver_steps)
            x = teacher_step(teacher, x, a, b, obj.solver, d.cond, d.w_teacher)
        y_tgt = d.X(student, x, u, t)
        y_tgt = d.X(student, y_tgt, t, zero) if at_data else y_tgt
    y = d.X(student, d.x_s, s, t)
    y = d.X(lambda *a: frozen_call(student, *a), y, t, zero) if at_data else y
    ctm = sq_norm(y - y_tgt) / 2
    dsm = sq_norm(d.u(student, d.x_s, s, s) - obj.velocity(teacher, d)) / 2
    return ctm, dsm


def loss_and_draw(obj, student, teacher, x0):
    draws = []
    loss_fn = obj.loss
    obj.loss = lambda d, *a: (draws.append(d), loss_fn(d, *a))[1]  # keep the draw the loss saw
    try:
        out = obj(student=student, teacher=teacher, target=student, x0=x0, cond=None, step=0)
    finally:
        del obj.loss
    return out, draws[0]


def grads(loss: torch.Tensor, student) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(student.parameters()), allow_unused=False))


def test_shared_first_stage_leaves_the_paper_loss_and_gradients_unchanged():
    student, teacher = student_and_teacher()
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(1)).float()
    obj = build_objective(dict(CONFIG))
    torch.manual_seed(5)
    out, d = loss_and_draw(obj, student, teacher, x0)
    ctm, dsm = reference_terms(obj, d, student, teacher)
    ref = ctm + obj.lambda_dsm * dsm
    assert torch.equal(out.loss, ref)  # same operations: bit-identical
    for a, b in zip(grads(out.loss.mean(), student), grads(ref.mean(), student)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_dsm_share_splits_the_rows_with_inverse_share_weights(share):
    student, teacher = student_and_teacher()
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(2)).float()
    obj = build_objective({**CONFIG, "dsm_share": share})
    calls = []
    student.net.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    torch.manual_seed(7)
    out, d = loss_and_draw(obj, student, teacher, x0)
    with_grad = sum(calls)  # net calls with grad: the student's and the frozen carry to t = 0
    ctm, dsm = reference_terms(obj, d, student, teacher)
    n = 64 - round(64 * share)
    expected = torch.cat([ctm[:n] / (1 - share), obj.lambda_dsm / share * dsm[n:]])
    diff = float(((out.loss - expected) / expected).abs().max().detach())
    print(f"dsm_share {share}: rows {n} / {64 - n}, max rel. diff {diff:.1e}")
    assert out.loss.shape == (64,) and out.logs["ctm"].shape == (n,) and out.logs["dsm"].shape == (64 - n,)
    assert torch.allclose(out.loss, expected, rtol=1e-5, atol=0)
    assert with_grad == 2  # one with-grad student call serves both terms (the paper's sum needs two), + the carry
    calls.clear()
    torch.manual_seed(7)
    build_objective(dict(CONFIG))(student=student, teacher=teacher, target=student, x0=x0, cond=None, step=0)
    assert sum(calls) == 3
    # the gradient of the split loss is the reference's on the same rows, to float tolerance
    for a, b in zip(grads(out.loss.mean(), student), grads(expected.mean(), student)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_dsm_share_bad_value():
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="dsm_share"):
            build_objective({**CONFIG, "dsm_share": bad})
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match="dsm_extra"):
            build_objective({**CONFIG, "dsm_extra": bad})
    with pytest.raises(ValueError, match="at most one"):
        build_objective({**CONFIG, "dsm_share": 0.25, "dsm_extra": 0.25})
    with pytest.raises(ValueError, match="compare_at"):
        build_objective({**CONFIG, "compare_at": "zero"})


@pytest.mark.parametrize("extra", [0.25, 1.0])
@pytest.mark.parametrize("compare_at", ["data", "t"])
def test_dsm_extra_keeps_every_ctm_row_and_adds_weighted_diagonal_rows(extra, compare_at):
    """dsm_extra rho: L_CTM on all B rows, lambda B / m L_DSM on the first m = rho B rows, from ONE with-grad student
    call on B + m rows; compare_at 't' drops both carries to t = 0 (no frozen with-grad call, one no-grad call less)."""
    student, teacher = student_and_teacher()
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(3)).float()
    obj = build_objective({**CONFIG, "dsm_extra": extra, "compare_at": compare_at})
    calls = []
    student.net.register_forward_hook(lambda mod, args, out: calls.append((torch.is_grad_enabled(), out.shape[0])))
    torch.manual_seed(11)
    out, d = loss_and_draw(obj, student, teacher, x0)
    seen = list(calls)
    ctm, dsm = reference_terms(obj, d, student, teacher, at_data=compare_at == "data")
    m = round(64 * extra)
    expected = ctm + torch.cat([obj.lambda_dsm * 64 / m * dsm[:m], torch.zeros(64 - m)])
    diff = float(((out.loss - expected) / expected).abs().max().detach())
    print(f"dsm_extra {extra}, compare_at {compare_at}: max rel. diff {diff:.1e}, student calls {seen}")
    assert out.loss.shape == (64,) and out.logs["ctm"].shape == (64,) and out.logs["dsm"].shape == (m,)
    assert torch.allclose(out.loss, expected, rtol=1e-5, atol=0)
    assert (True, 64 + m) in seen  # the one with-grad call on B + m rows
    carries = compare_at == "data"
    assert sum(g for g, _ in seen) == 1 + carries  # + the frozen carry of X_theta to t = 0
    assert sum(not g for g, _ in seen) == 1 + carries  # the target jump (+ its carry to t = 0)
    for a, b in zip(grads(out.loss.mean(), student), grads(expected.mean(), student)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_dsm_extra_carries_labels_and_guidance_to_the_diagonal_rows():
    """A class-conditional, guidance-input student: dsm_extra 1 (one call on 2B rows, the condition and the student's
    w repeated for the diagonal rows) gives the paper's two-call loss on the same draw, to float tolerance."""
    teacher = preset_mixture("ring8")
    torch.manual_seed(0)
    net = {"name": "mlp", "data_shape": [2], "width": 32, "depth": 2, "num_classes": 2, "guidance_input": True}
    student = FlowMap(build_net(net))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0, cond = teacher.sample_labeled(32, generator=torch.Generator().manual_seed(4))
    guided = {**CONFIG, "guidance": 1.0, "guidance_max": 4.0}
    losses = []
    for extra in (None, 1.0):
        torch.manual_seed(9)
        obj = build_objective({**guided, "dsm_extra": extra})
        losses.append(obj(student=student, teacher=teacher, target=student, x0=x0, cond=cond, step=0).loss)
    print(f"guided, labelled: max |paper - dsm_extra 1| = {float((losses[0] - losses[1]).abs().max().detach()):.1e}")
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    assert float(losses[0].std().detach()) > 0  # a live loss, not a constant


def test_cheap_options_make_no_host_sync():
    """The dsm_extra / compare_at path in a guided, class-conditional DiT step (tests/test_host_syncs.py's counter)."""
    from test_host_syncs import CONDITIONAL_NET, count_syncs

    from flowmap.velocity import NetVelocity

    torch.manual_seed(0)
    student = FlowMap(build_net(dict(CONDITIONAL_NET, guidance_input=True)))
    teacher = NetVelocity(build_net(CONDITIONAL_NET), "linear", "velocity").eval().requires_grad_(False)
    obj = build_objective({**CONFIG, "guidance_max": 2.0, "dsm_extra": 0.25, "compare_at": "t"})
    x0, cond = torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,))
    obj(student=student, teacher=teacher, target=student, x0=x0, cond=cond, step=0)  # warm-up
    with count_syncs() as calls:
        out = obj(student=student, teacher=teacher, target=student, x0=x0, cond=cond, step=1)
        out.loss.mean().backward()
    assert not calls, f"{len(calls)} host sync(s): {calls[0][0]}\n{calls[0][1]}"
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
