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

Cost. The teacher's velocity at (x_s, s) is both the DSM target (``dsm_source='teacher'``) and the first stage of
the solver's segment, computed once. ``dsm_share`` rho estimates the sum L_CTM + lambda_dsm L_DSM on disjoint rows:
the last round(rho B) rows train the DSM term only (weight 1 / rho), the others L_CTM only (weight 1 / (1 - rho)),
so the expected loss is unchanged and one with-grad student call serves both terms (the diagonal rows are the
student at t = s), while the teacher segment, the target and the frozen carry to t = 0 run on the CTM rows only.
``dsm_extra`` rho keeps L_CTM on every row and appends round(rho B) diagonal rows (the first rows' (x_s, s) at t = s)
to the same single with-grad call, their DSM term weighted lambda B / round(rho B): the same expected loss, no CTM row
lost. ``compare_at='t'`` compares X_theta(x_s, s, t) with x_tgt at t, without the two carries to t = 0 (the same loss
for t = 0; a different weighting of the error for t > 0). The rows that ``end_share`` ends at t = 0 skip the two
carries (X(., 0, 0) is the identity: the same loss). ``max_gap`` h bounds the teacher's segment, u ~ U[max(t, s - h),
s], so that a few solver steps stay accurate on every row. Evaluation counts and measured ratios: docs/ctm_cost.md.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flowmap import conditions
from flowmap.objectives.base import GUIDANCE, Draw, Objective, mask_nonfinite, sq_norm
from flowmap.objectives.common import check_solver, check_source, times_like
from flowmap.objectives.guidance import teacher_velocity
from flowmap.solvers import ode_step
from flowmap.time_sampling import draw, end_head, equal_tail, moving_rows
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
    v_start: Tensor | None = None,
) -> Tensor:
    """The teacher's ODE from s to u (per-sample times (B,)) in ``steps`` equal steps, no grad: (B, *data_shape).
    v_start: the teacher's velocity at (x, s) when the caller has it (the first stage is then not recomputed)."""
    first = [] if v_start is None else [v_start]

    def f(y: Tensor, tau: Tensor) -> Tensor:
        return first.pop() if first else teacher_velocity(teacher, y, tau, cond, guidance)

    with torch.no_grad():
        for k in range(steps):
            a = s + (u - s) * (k / steps)
            b = s + (u - s) * ((k + 1) / steps)
            h = b - a
            x = ode_step(method, f, x, a, h, t_next=b, hx=expand_like(h, x))  # ``flowmap.solvers.teacher_step``
    return x


COMPARE_AT = ("data", "t")  # where L_CTM compares: both ends carried to t = 0 (paper Eq. 7), or at t


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
        dsm_share: None (the paper's Eq. 9: both terms on every row, the DSM term in a second with-grad student
            pass) or a share rho in (0, 1) of rows that train the DSM term only, the rest L_CTM only, each weighted
            by the inverse of its share (the same expected loss from one with-grad student pass; module docstring).
        dsm_extra: None or a share rho in (0, 1] of extra diagonal rows in the one with-grad student call that train
            the DSM term (weight 1 / rho), L_CTM on every row (module docstring). At most one of dsm_share, dsm_extra.
        compare_at: ``"data"`` (paper Eq. 7: both ends carried to t = 0 by the frozen student) or ``"t"``.
        end_share: share of rows whose jump ends at the data, t = 0 (the first round(end_share B) rows); the
            paper's law t ~ s U[0, 1] on the others (0: the paper's). L_CTM's carries to t = 0 skip these rows
            (X(., 0, 0) is the identity).
        max_gap: None (the paper's u ~ U[t, s]) or the longest teacher segment s - u: u ~ U[max(t, s - max_gap), s],
            so that ``solver_steps`` cover at most max_gap of the path; longer jumps are bootstrapped from the target.
        target_ema: EMA decay of the target network (paper: 0.999).
        guidance, guidance_max: CFG scale of the teacher (a range trains a ``guidance_input`` student).
    """

    name = "ctm"
    uses_target = True

    shared = ("target_ema", "end_share", *GUIDANCE)
    defaults = {"target_ema": 0.999}

    def __init__(
        self,
        solver: str = "heun",
        solver_steps: int = 2,
        lambda_dsm: float = 1.0,
        dsm_source: str = "data",
        dsm_share: float | None = None,
        dsm_extra: float | None = None,
        compare_at: str = "data",
        max_gap: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        guidance, guidance_max = self.guidance, self.guidance_max
        check_solver(solver)
        if int(solver_steps) != solver_steps or solver_steps < 1:
            raise ValueError(f"solver_steps must be an integer >= 1, got {solver_steps}")
        if not (lambda_dsm >= 0 and math.isfinite(lambda_dsm)):
            raise ValueError(f"lambda_dsm must be a finite number >= 0, got {lambda_dsm}")
        if dsm_source == "data" and (guidance != 1.0 or guidance_max is not None):
            raise ValueError(
                "with guidance the denoising term must follow the guided teacher: use dsm_source='teacher'"
            )
        if dsm_share is not None and not 0.0 < dsm_share < 1.0:
            raise ValueError(f"dsm_share must be None or lie in (0, 1), got {dsm_share}")
        if dsm_extra is not None and not 0.0 < dsm_extra <= 1.0:
            raise ValueError(f"dsm_extra must be None or lie in (0, 1], got {dsm_extra}")
        if dsm_share is not None and dsm_extra is not None:
            raise ValueError("dsm_share and dsm_extra are two ways to place the DSM rows: set at most one")
        if compare_at not in COMPARE_AT:
            raise ValueError(f"compare_at must be one of {list(COMPARE_AT)}, got {compare_at!r}")
        if max_gap is not None and not 0.0 < max_gap <= 1.0:
            raise ValueError(f"max_gap must be None or lie in (0, 1], got {max_gap}")
        self.solver, self.solver_steps = solver, int(solver_steps)
        self.max_gap = None if max_gap is None else float(max_gap)
        self.lambda_dsm = float(lambda_dsm)
        self.dsm_source = check_source(dsm_source)
        self.dsm_share = None if dsm_share is None else float(dsm_share)
        self.dsm_extra = None if dsm_extra is None else float(dsm_extra)
        self.compare_at = compare_at

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """s ~ U(0, 1], t ~ U[0, s] (t = 0 on the first round(end_share B) rows), u ~ U[t, s] (paper Sec. 4.2), or
        u ~ U[max(t, s - max_gap), s]; extra ``u``."""
        s = times_like(1.0 - draw("uniform", batch, x0.device), x0)
        t = s * times_like(draw("uniform", batch, x0.device), x0)
        t = end_head(t, self.end_share)
        lo = t if self.max_gap is None else torch.maximum(t, s - self.max_gap)
        u = lo + (s - lo) * times_like(draw("uniform", batch, x0.device), x0)
        return s, t, {"u": u}

    def loss(self, d: Draw, student: nn.Module, teacher, target: nn.Module, step: int) -> LossOutput:
        B, D = d.batch, d.x0[0].numel()
        n = B if self.dsm_share is None else moving_rows(B, self.dsm_share)  # rows [0, n) train L_CTM
        m = 0 if self.dsm_extra is None or self.lambda_dsm == 0 else max(1, round(self.dsm_extra * B))
        at_data = self.compare_at == "data"
        c = d if n == B else d.rows(slice(0, n))
        k = min(self.end_rows(B), n)  # rows [0, k) end at t = 0 (``times``): their carry to t = 0 is the identity
        late = c.rows(slice(k, n)) if at_data else None  # the rows the carries to t = 0 run on
        v_s = self.velocity(teacher, d) if self.dsm_source == "teacher" else None  # v(x_s, s): DSM target, stage 1
        with torch.no_grad():
            x_u = teacher_segment(
                teacher, c.x_s, c.s, c.extra["u"], self.solver_steps, self.solver, c.cond, c.w_teacher,
                None if v_s is None else v_s[:n],
            )  # fmt: skip
            y_tgt = c.X(target, x_u, c.extra["u"], c.t)  # sg(X_target(x_u, u, t))
            if at_data:  # carried to t = 0 by sg(theta)
                y_tgt = carried(late, student, y_tgt, k)
        y_tgt, finite, n_bad = mask_nonfinite(y_tgt)
        v = d.eps - d.x0 if v_s is None else v_s
        v, finite_v, n_bad_v = mask_nonfinite(v)
        if n == B and not m:  # the paper's sum on every row: X_theta(x_s, s, t), then the diagonal u_theta(x_s, s, s)
            x_st = d.X(student, d.x_s, d.s, d.t)
            u_diag = d.u(student, d.x_s, d.s, d.s) if self.lambda_dsm > 0 else None
        else:  # one with-grad call; its diagonal rows (t = s) train L_DSM, X = x + (t - s) u on the others
            if not hasattr(student, "average_velocity"):
                raise ValueError("ctm with dsm_share or dsm_extra needs a student with average_velocity (a FlowMap)")
            if m:  # every row (x_s, s, t), then the first m rows again at t = s
                e = with_diagonal_rows(d, m)
                u_all = e.u(student, e.x_s, e.s, e.t)
            else:  # rows [n, B) at t = s
                u_all = d.u(student, d.x_s, d.s, equal_tail(d.s, d.t, self.dsm_share))
            x_st = c.x_s + expand_like(c.t - c.s, c.x_s) * u_all[:n]
            u_diag = u_all[n:]
        y = carried(late, lambda *a: frozen_call(student, *a), x_st, k) if at_data else x_st  # X_sg(X_theta, t, 0)
        ctm = sq_norm(y - y_tgt) / D  # Eq. 6-7
        rows_dsm = slice(0, m) if m else slice(n, B)  # the rows of v that the diagonal rows share
        if u_diag is None:
            dsm = torch.zeros_like(ctm)
            finite_dsm = finite_v
        else:
            finite_dsm = finite_v[rows_dsm] if m or n < B else finite_v
            dsm = sq_norm(u_diag - (v[rows_dsm] if m or n < B else v)) / D  # Eq. 8 on the diagonal
        if m:  # L_CTM on every row + lambda B / m L_DSM of the m diagonal rows, added to the rows they repeat
            loss = ctm * finite * finite_v
            loss = loss + torch.cat([self.lambda_dsm * B / m * dsm * finite_dsm, torch.zeros_like(ctm[m:])])
        elif n == B:
            loss = ctm * finite * finite_v + self.lambda_dsm * dsm * finite_v
        else:
            share = self.dsm_share
            loss = torch.cat([ctm * finite * finite_v[:n] / (1.0 - share), self.lambda_dsm / share * dsm * finite_dsm])
        return LossOutput(
            loss=loss,
            logs={
                "ctm": ctm.detach() * finite,
                "dsm": dsm.detach() * finite_dsm,
                "gap": (c.s - c.t).float(),
                "nonfinite_targets": (n_bad + n_bad_v).float(),
            },
        )


def carried(late: Draw, model, y: Tensor, k: int) -> Tensor:
    """y (n rows) with rows [k, n) carried to t = 0 by ``model`` from the times ``late.t`` (the draw's rows [k, n));
    rows [0, k) end at t = 0 already and are kept."""
    if late.batch == 0:
        return y
    return torch.cat([y[:k], late.X(model, y[k:], late.t, torch.zeros_like(late.t))])


def with_diagonal_rows(d: Draw, m: int) -> Draw:
    """The draw's B rows followed by its first m rows at t = s (B + m rows): one student call evaluates X_theta(x_s,
    s, t) on every row and the diagonal u_theta(x_s, s, s) on m of them."""
    e = d.rows(slice(0, m))
    both = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
    return replace(
        d,
        x0=both(d.x0, e.x0),
        eps=both(d.eps, e.eps),
        s=both(d.s, e.s),
        t=both(d.t, e.s),
        x_s=both(d.x_s, e.x_s),
        cond=conditions.cat([d.cond, e.cond]),
        w_student=both(d.w_student, e.w_student),
        w_teacher=both(d.w_teacher, e.w_teacher)
        if isinstance(d.w_teacher, Tensor) and d.w_teacher.dim()
        else d.w_teacher,
        extra={},
    )
