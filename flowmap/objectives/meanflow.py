"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): the average velocity
trained through the MeanFlow identity, with a JVP.

Sign mapping. The paper's z_t = (1 - t) x + t eps and u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau
(Eq. 3) jump from the *current* time t to the *other* time r. Our student X(x, s, t) = x + (t - s) u(x, s, t)
jumps from the current time s to t, so the paper's (t, r) is our (s, t); time still runs 1 (noise) -> 0 (data).

The identity in our convention. Along an ODE trajectory x_tau, with t fixed,
    (t - s) u(x_s, s, t) = int_s^t v(x_tau, tau) dtau
and d/ds of both sides gives  -u + (t - s) du/ds = -v(x_s, s),  i.e.
    u(x_s, s, t) = v(x_s, s) - (s - t) du/ds                           (paper Eq. 6 with t -> s, r -> t)
    du/ds = v(x_s, s) . grad_x u + d_s u  =  JVP of u along (v, 1, 0)  (paper Eq. 8)
The loss regresses u_theta onto the stop-gradient target (paper Eq. 9-10)
    u_tgt = v - (s - t) sg(JVP)
with v = eps - x0 from data or the teacher's velocity when distilling (optionally guided, v = w v_c +
(1 - w) v_u, the student trained at w). At s = t it is flow matching. Times: ordered (s, t) pairs of
logit-normal draws with a share s = t (Sec. 4.3, Table 1a). Adaptive weighting (Sec. 4.3, after Geng
et al. 2024): L = sg(1 / (||delta||^2 + c)^p) ||delta||^2, delta = u_theta - u_tgt.

DDP: the JVP runs in a no-grad float32 pass (``flowmap.jvp``) on the student handed in, which is the inner
``FlowMap`` (Lightning's DDP wraps the whole LightningModule, so ``training_step`` already runs inside the
synchronized forward); the loss then calls the student exactly once with grad. ``require_inner`` refuses a
DDP-wrapped student. On the 2-D mixture (tests) uniform pairs with 75% s = t, p = 0.5 and a net time_scale
of 10 train much faster than the image-scale defaults below.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.jvp import FD_EPS, check_backend, compute_dtype, jvp, parse_fd_dtype, require_inner
from flowmap.objectives.base import Objective, mask_nonfinite
from flowmap.objectives.common import (
    check_source,
    drop_labels,
    equal_tail,
    instantaneous_velocity,
    moving_rows,
    times_like,
)
from flowmap.objectives.guidance import check_guidance, draw_guidance
from flowmap.time_sampling import ordered_pair, pair_kwargs
from flowmap.types import LossOutput, expand_like


class MeanFlow(Objective):
    """MeanFlow on the flow-map student; per-sample loss (B,).

    Args:
        source: ``"teacher"`` (distill the teacher's velocity) or ``"data"`` (conditional velocity eps - x0).
        time_dist, time_mean, time_std: distribution of the two times (paper: logit-normal(-0.4, 1.0)).
        equal_share: share of pairs with s = t (paper, Table 1a: 75%, i.e. 25% with r != t).
        p, c: adaptive weight 1 / (||delta||^2 + c)^p (paper: p = 1, c = 1e-3); p = 0 is plain L2.
        guidance, guidance_max: CFG scale folded into a distilled target (a range needs a student with
            ``guidance_input``); p_uncond: label dropout so the student also learns the null label.
        jvp_backend: ``"forward_ad"`` (dual tensors, the fastest), ``"func"`` (torch.func.jvp) or ``"fd"``
            (finite differences); fd_eps: its step;
        fd_dtype: ``"float64"`` takes the differences in float64 (``flowmap.jvp.promoted``), null: as the inputs.
    """

    name = "meanflow"
    uses_target = False
    needs_jvp = True

    def __init__(
        self,
        source: str = "teacher",
        time_dist: str = "logit_normal",
        time_mean: float = -0.4,
        time_std: float = 1.0,
        equal_share: float = 0.75,
        p: float = 1.0,
        c: float = 1e-3,
        guidance: float = 1.0,
        guidance_max: float | None = None,
        p_uncond: float = 0.0,
        jvp_backend: str = "forward_ad",
        fd_eps: float | None = None,
        fd_dtype: str | None = None,
    ) -> None:
        super().__init__()
        self.source = check_source(source)
        pair_kwargs(time_dist, time_mean, time_std)
        if not 0.0 <= equal_share <= 1.0:
            raise ValueError(f"equal_share must lie in [0, 1], got {equal_share}")
        if p < 0 or c <= 0:
            raise ValueError(f"adaptive weighting needs p >= 0 and c > 0, got p={p}, c={c}")
        check_guidance(source, guidance, guidance_max)
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}")
        self.time_dist, self.time_mean, self.time_std = time_dist, float(time_mean), float(time_std)
        self.equal_share = float(equal_share)
        self.p, self.c = float(p), float(c)
        self.guidance, self.guidance_max = float(guidance), guidance_max
        self.p_uncond = float(p_uncond)
        self.jvp_backend = check_backend(jvp_backend)
        self.fd_eps = fd_eps
        self.fd_dtype = parse_fd_dtype(fd_dtype)

    @property
    def needs_teacher(self) -> bool:
        return self.source == "teacher"

    def sample_times(self, batch: int, x0: Tensor) -> tuple[Tensor, Tensor]:
        """(s, t) with 1 >= s >= t >= 0; the last round(B * equal_share) rows with s = t (``equal_tail``)."""
        kwargs = pair_kwargs(self.time_dist, self.time_mean, self.time_std)
        s, t = ordered_pair(batch, x0.device, self.time_dist, 0.0, **kwargs)  # s = t on the tail: ``equal_tail``
        s, t = times_like(s, x0), times_like(t, x0)
        if self.jvp_backend == "fd":  # keep s +- h * 1 inside [0, 1] for the central difference
            h = self.fd_eps or FD_EPS.get(self.fd_dtype or compute_dtype(s.dtype), 5e-5)
            s = s.clamp(h, 1.0 - h)
            t = torch.minimum(t, s)
        return s, equal_tail(s, t, self.equal_share)

    def forward(
        self, *, student: nn.Module, teacher=None, target=None, x0: Tensor, cond: Tensor | None = None, step: int = 0
    ) -> LossOutput:
        student = require_inner(student)
        B = x0.shape[0]
        s, t = self.sample_times(B, x0)
        eps = torch.randn_like(x0)
        x_s = expand_like(1 - s, x0) * x0 + expand_like(s, x0) * eps  # linear path
        cond = drop_labels(cond, int(getattr(student, "num_classes", 0)), self.p_uncond)
        w_student, w_teacher = draw_guidance(student, B, x0.device, self.guidance, self.guidance_max)
        v = instantaneous_velocity(self.source, teacher, x_s, s, x0, eps, cond, w_teacher)

        # du/ds along the trajectory: tangent (v, 1, 0) on (x, s, t); a no-grad float32 pass, only on the rows
        # [0, n) with s != t (where s = t the target is v itself, so the share ``equal_share`` costs no JVP).
        du_ds = torch.zeros_like(x_s, dtype=torch.promote_types(x_s.dtype, torch.float32))
        n = moving_rows(B, self.equal_share)
        if n:
            pick = (lambda a: a) if n == B else (lambda a: None if a is None else a[:n])
            c_m, w_m = pick(cond), pick(w_student)

            def u_fn(x: Tensor, s_: Tensor, t_: Tensor) -> Tensor:
                return student.average_velocity(x, s_, t_, c_m, w_m)

            s_m = pick(s)
            _, du_m = jvp(
                u_fn,
                (pick(x_s), s_m, pick(t)),
                (pick(v), torch.ones_like(s_m), torch.zeros_like(s_m)),
                self.jvp_backend,
                self.fd_eps,
                primal_out=False,
                fd_dtype=self.fd_dtype,
                modules=(student,),
            )
            du_ds = du_m if n == B else torch.cat([du_m.to(du_ds.dtype), du_ds[n:]])
        u_tgt = v - expand_like(s - t, v) * du_ds.to(v.dtype)  # u = v - (s - t) du/ds
        u_tgt, finite, n_bad = mask_nonfinite(u_tgt)

        u = student.average_velocity(x_s, s, t, cond, w_student)  # the one with-grad forward
        dtype = torch.promote_types(u_tgt.dtype, torch.float32)
        delta = u.to(dtype) - u_tgt.to(dtype)
        sq = delta.pow(2).flatten(1).sum(1)  # ||delta||^2
        weight = (sq.detach() + self.c).pow(-self.p)
        loss = weight * sq * finite
        D = delta[0].numel()
        return LossOutput(
            loss=loss,
            logs={
                "mse": (sq.detach() * finite / D),
                "weight": weight.detach(),
                "gap": (s - t).float(),
                "nonfinite_targets": n_bad.float(),
            },
        )
