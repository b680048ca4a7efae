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

from flowmap.objectives.base import Draw, Objective, mask_nonfinite, shared, sq_norm
from flowmap.objectives.common import check_solver, check_source, times_like
from flowmap.solvers import teacher_step
from flowmap.time_sampling import uniform
from flowmap.types import LossOutput, Teacher


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
        super().__init__(**shared(locals()))
        check_solver(solver)
        if int(solver_steps) != solver_steps or solver_steps < 1:
            raise ValueError(f"solver_steps must be an integer >= 1, got {solver_steps}")
        if not (lambda_dsm >= 0 and math.isfinite(lambda_dsm)):
            raise ValueError(f"lambda_dsm must be a finite number >= 0, got {lambda_dsm}")
        if dsm_source == "data" and (guidance != 1.0 or guidance_max is not None):
            raise ValueError(
                "with guidance the denoising term must follow the guided teacher: use dsm_source='teacher'"
            )
        self.solver, self.solver_steps = solver, int(solver_steps)
        self.lambda_dsm = float(lambda_dsm)
        self.dsm_source = check_source(dsm_source)

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """s ~ U(0, 1], t ~ U[0, s], u ~ U[t, s] (paper Sec. 4.2; extra ``u``)."""
        s = times_like(1.0 - uniform(batch, x0.device), x0)
        t = s * times_like(uniform(batch, x0.device), x0)
        u = t + (s - t) * times_like(uniform(batch, x0.device), x0)
        return s, t, {"u": u}

    def loss(self, d: Draw, student: nn.Module, teacher, target: nn.Module, step: int) -> LossOutput:
        s, u, t, zero = d.s, d.extra["u"], d.t, torch.zeros_like(d.t)
        with torch.no_grad():
            x_u = teacher_segment(teacher, d.x_s, s, u, self.solver_steps, self.solver, d.cond, d.w_teacher)
            y_tgt = d.X(student, d.X(target, x_u, u, t), t, zero)  # sg(X_target(x_u, u, t)), carried to data
        y_tgt, finite, n_bad = mask_nonfinite(y_tgt)
        y = d.X(lambda *a: frozen_call(student, *a), d.X(student, d.x_s, s, t), t, zero)  # X_sg(X_theta(x_s, s, t))
        D = d.x0[0].numel()
        ctm = sq_norm(y - y_tgt) / D  # Eq. 6-7
        v = d.eps - d.x0 if self.dsm_source == "data" else self.velocity(teacher, d)
        v, finite_v, n_bad_v = mask_nonfinite(v)
        dsm = sq_norm(d.u(student, d.x_s, s, s) - v) / D  # Eq. 8 on the diagonal
        return LossOutput(
            loss=ctm * finite * finite_v + self.lambda_dsm * dsm * finite_v,
            logs={
                "ctm": ctm.detach() * finite,
                "dsm": dsm.detach() * finite_v,
                "gap": (s - t).float(),
                "nonfinite_targets": (n_bad + n_bad_v).float(),
            },
        )
