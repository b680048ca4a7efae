"""Consistency trajectory models (Kim et al. 2023, "Consistency Trajectory Model: Learning Probability
Flow ODE Trajectory of Diffusion"), on the flow-map student.

Sign mapping. The paper's G_theta(x_t, t, s) jumps from t to s <= t on the EDM axis; ours is
X_theta(x, s, t) from s to t <= s on the linear axis (t = 0 data), so the paper's (t, u, s) is our (s, u, t).

Soft consistency matching (paper Eq. 6-7): for t <= u <= s,
    x_u      = Solver(x_s, s -> u; teacher)                        (teacher ODE segment, Heun steps)
    x_tgt    = sg(X_target(x_u, u, t))                             (EMA target network, paper theta^-)
    L_CTM    = d( X_sg(X_theta(x_s, s, t), t, 0),  X_sg(x_tgt, t, 0) )
both endpoints carried to t = 0 by the student with stop-gradient *parameters* (paper's sg(theta)) before
comparing; the paper's feature space is data space here and d is the squared L2 distance. u = t recovers
the teacher-only (global) target, u -> s the local consistency one.
Denoising term (paper Eq. 8, DSM): the diagonal u_theta(x_s, s, s) is the instantaneous velocity, trained by
flow matching onto eps - x0 (data) or the teacher's velocity:
    L = L_CTM + lambda_dsm ||u_theta(x_s, s, s) - v||^2
Sampling: ``flowmap.sampling`` with gamma (the paper's gamma-sampling, Alg. 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flowmap.objectives.base import Objective, mask_nonfinite
from flowmap.objectives.common import SOLVERS, check_source, times_like
from flowmap.objectives.guidance import check_guidance, guided_draw, teacher_velocity
from flowmap.solvers import teacher_step
from flowmap.types import LossOutput, Teacher, expand_like


def teacher_segment(
    teacher: Teacher,
    x: Tensor,
    s: Tensor,
    u: Tensor,
    steps: int,
    method: str,
    cond: Tensor | None,
    guidance: float | Tensor,
) -> Tensor:
    """The teacher's ODE from s to u (per-sample times (B,)) in ``steps`` equal steps, no grad: (B, *data_shape)."""
    with torch.no_grad():
        for k in range(steps):
            a = s + (u - s) * (k / steps)
            b = s + (u - s) * ((k + 1) / steps)
            x = teacher_step(teacher, x, a, b, method, cond, guidance)
    return x


def frozen_call(module: nn.Module, *args) -> Tensor:
    """module(*args) with its parameters detached: gradients reach the inputs only (the paper's sg(theta))."""
    params = {k: p.detach() for k, p in module.named_parameters()}
    return functional_call(module, params, args)


class CTM(Objective):
    """CTM on the flow-map student; per-sample loss (B,).

    Args:
        solver, solver_steps: teacher step (``"heun"``/``"euler"``) and the number of steps per segment s -> u.
        lambda_dsm: weight of the denoising (flow-matching) term on the diagonal.
        dsm_source: ``"data"`` (eps - x0, the paper's DSM) or ``"teacher"`` (the teacher's velocity).
        target_ema: EMA decay of the target network (paper: 0.999).
        guidance, guidance_max: CFG scale of the teacher (a range trains a ``guidance_input`` student).
    """

    name = "ctm"
    needs_teacher = True
    uses_target = True

    def __init__(
        self,
        solver: str = "heun",
        solver_steps: int = 2,
        lambda_dsm: float = 1.0,
        dsm_source: str = "data",
        target_ema: float = 0.999,
        guidance: float = 1.0,
        guidance_max: float | None = None,
    ) -> None:
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"unknown teacher step {solver!r}; choose from {list(SOLVERS)}")
        if int(solver_steps) != solver_steps or solver_steps < 1:
            raise ValueError(f"solver_steps must be an integer >= 1, got {solver_steps}")
        if not (lambda_dsm >= 0 and math.isfinite(lambda_dsm)):
            raise ValueError(f"lambda_dsm must be a finite number >= 0, got {lambda_dsm}")
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"target_ema must lie in [0, 1), got {target_ema}")
        check_guidance("teacher", guidance, guidance_max)
        if dsm_source == "data" and (guidance != 1.0 or guidance_max is not None):
            raise ValueError(
                "with guidance the denoising term must follow the guided teacher: use dsm_source='teacher'"
            )
        self.solver, self.solver_steps = solver, int(solver_steps)
        self.lambda_dsm = float(lambda_dsm)
        self.dsm_source = check_source(dsm_source)
        self.target_ema = float(target_ema)
        self.guidance, self.guidance_max = float(guidance), guidance_max

    def target_decay(self, step: int) -> float:
        return self.target_ema

    def sample_times(self, batch: int, x0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """s ~ U(0, 1], t ~ U[0, s], u ~ U[t, s] (paper Sec. 4.2)."""
        s = times_like(1.0 - torch.rand(batch, device=x0.device), x0)
        t = s * times_like(torch.rand(batch, device=x0.device), x0)
        u = t + (s - t) * times_like(torch.rand(batch, device=x0.device), x0)
        return s, u, t

    def forward(
        self,
        *,
        student: nn.Module,
        teacher: Teacher | None = None,
        target: nn.Module | None = None,
        x0: Tensor,
        cond: Tensor | None = None,
        step: int = 0,
    ) -> LossOutput:
        if teacher is None:
            raise ValueError("'ctm' distills a teacher's ODE segments, but teacher is None")
        target = student if target is None else target
        B = x0.shape[0]
        s, u, t = self.sample_times(B, x0)
        eps = torch.randn_like(x0)
        x_s = expand_like(1 - s, x0) * x0 + expand_like(s, x0) * eps
        w_student, w_teacher = guided_draw(student, teacher, cond, B, x0.device, self.guidance, self.guidance_max)
        zero = torch.zeros_like(t)
        with torch.no_grad():
            x_u = teacher_segment(teacher, x_s, s, u, self.solver_steps, self.solver, cond, w_teacher)
            x_tgt = target(x_u, u, t, cond, w_student)
            y_tgt = student(x_tgt, t, zero, cond, w_student)  # carried to data with sg(theta)
        y_tgt, finite, n_bad = mask_nonfinite(y_tgt)
        y = frozen_call(student, student(x_s, s, t, cond, w_student), t, zero, cond, w_student)
        D = x0[0].numel()
        ctm = (y - y_tgt).pow(2).flatten(1).sum(1) / D

        if self.dsm_source == "data":
            v = eps - x0
        else:
            v = teacher_velocity(teacher, x_s, s, cond, w_teacher)
        v, finite_v, n_bad_v = mask_nonfinite(v)
        dsm = (student.average_velocity(x_s, s, s, cond, w_student) - v).pow(2).flatten(1).sum(1) / D
        loss = ctm * finite * finite_v + self.lambda_dsm * dsm * finite_v
        return LossOutput(
            loss=loss,
            logs={
                "ctm": ctm.detach() * finite,
                "dsm": dsm.detach() * finite_v,
                "gap": (s - t).float(),
                "nonfinite_targets": (n_bad + n_bad_v).float(),
            },
        )
