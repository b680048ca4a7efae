"""Align Your Flow (Sabour, Fidler & Kreis 2025, "Align Your Flow: Scaling Continuous-Time Flow Map
Distillation"): Eulerian and Lagrangian map distillation (AYF-EMD, AYF-LMD) of the general flow map.

Sign mapping. The paper's f_theta(x_t, t, s) = x_t + (s - t) F_theta(x_t, t, s) jumps from the current
time t to s; ours X(x, s, t) = x + (t - s) u(x, s, t) jumps from s to t (t = 0 data, 1 noise, t <= s),
so the paper's (t, s) is our (s, t) and its F is our u.

EMD (paper Sec. 3, Eulerian condition, Eq. 7-8 with Thm. 3.1): along a teacher trajectory x_s the
endpoint does not move, d/ds X(x_s, s, t) = 0. The discrete loss ||X(x_s, s, t) - sg(X(x_{s-d}, s-d, t))||^2
with x_{s-d} = x_s - d v has, as d -> 0, the gradient of  <X, sg(dX/ds)>,  where
    T = dX/ds = dX/dx v + dX/ds  =  v - u + (t - s) du/ds,   du/ds = JVP of u along (v, 1, 0)
LMD (paper Sec. 3, Lagrangian condition, Eq. 9-10): the endpoint rides the teacher's ODE in t,
d/dt X(x, s, t) = v(X(x, s, t), t). The loss ||X(x, s, t) - sg(X(x, s, t+d) - d v(X, t+d))||^2 has the
gradient of  -<X, sg(T)>  with
    T = dX/dt - v(X, t)  =  u + (t - s) du/dt - v(X, t),   du/dt = JVP of u along (0, 0, 1)
Written on u (X = x + (t - s) u, t - s < 0) both become a regression onto a stop-gradient target,
    EMD: u_tgt = sg(u + g),   LMD: u_tgt = sg(u - g),   g = T / (||T|| + c)          (tangent normalization,
paper Sec. 4 after Lu & Song 2024, sCM Eq. 9), so the per-sample loss equals ||g||^2 and vanishes at the
exact map. At s = t both are flow matching (T = +-(v - u)). Warm-up (paper Sec. 4, as sCM): the network's
own time derivative term (t - s) du/d. is scaled by r = min(1, step / warmup_steps).

Times: (s, t) ordered pairs, a share with s = t (the diagonal, flow matching). The JVP runs in a no-grad
float32 pass (``flowmap.jvp``); the loss then calls the student once with grad.
"""

from __future__ import annotations

import torch
from torch import nn

from flowmap.objectives.base import GUIDANCE, JVP, TIMES, Draw, Objective, mask_nonfinite, normalized, sq_norm
from flowmap.objectives.common import ramp
from flowmap.types import LossOutput, expand_like


class AlignYourFlow(Objective):
    """AYF map distillation on the flow-map student (use ``AYFEulerian`` or ``AYFLagrangian``); per-sample loss (B,).

    Args:
        time_dist, time_mean, time_std: distribution of the two times (``uniform``, ``logit_normal``, ``lognormal``: two
            sorted draws; ``gap_logit_normal``: the paper's Alg. 1, gap s - t ~ sigmoid(N(time_mean, time_std)) and
            t ~ U[0, 1 - gap], which puts more weight on long jumps); equal_share: share with s = t;
            end_share: share ending at the data, t = 0 (``flowmap.time_sampling.end_head``).
        tangent_c: c of the tangent normalization g = T / (||T|| + c) (paper: 0.1); None turns it off.
        warmup_steps: steps over which the (t - s) du/d. term ramps in (0: no warm-up).
        guidance, guidance_max: CFG scale (a range trains a ``guidance_input`` student at
            w ~ U[guidance, guidance_max]).
        jvp_backend, fd_eps, fd_dtype: ``"forward_ad"``, ``"func"`` or ``"fd"``, its step, and ``"float64"`` for
            differences taken in float64 (see ``flowmap.jvp``).
    """

    name = "ayf"
    needs_jvp = True
    variant = "emd"

    shared = (*TIMES, *GUIDANCE, *JVP)
    defaults = {"equal_share": 0.1}

    def __init__(self, tangent_c: float | None = 0.1, warmup_steps: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if tangent_c is not None and not tangent_c > 0:
            raise ValueError(f"tangent_c must be > 0 (or None for no normalization), got {tangent_c}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.tangent_c = None if tangent_c is None else float(tangent_c)
        self.warmup_steps = int(warmup_steps)

    def loss(self, d: Draw, student: nn.Module, teacher, target, step: int) -> LossOutput:
        r = ramp(step, self.warmup_steps)  # warm-up of the (t - s) du/d. term
        T = self.tangent(d, student, teacher, r)
        g, finite, n_bad = mask_nonfinite(normalized(T, self.tangent_c))  # g = T / (||T|| + c)
        u = d.u(student, d.x_s, d.s, d.t)  # the one with-grad forward
        u = u.to(torch.promote_types(u.dtype, torch.float32))
        u_tgt = u.detach() + self.sign * g.to(u.dtype)  # EMD: sg(u + g), LMD: sg(u - g)
        return LossOutput(
            loss=sq_norm(u - u_tgt) * finite,  # = ||g||^2 in value
            logs={
                "residual": sq_norm(T.detach()).nan_to_num(0.0) * finite / d.x0[0].numel(),
                "gap": (d.s - d.t).float(),
                "warmup": torch.full_like(d.s, r, dtype=torch.float32),
                "nonfinite_targets": n_bad.float(),
            },
        )


class AYFEulerian(AlignYourFlow):
    """AYF-EMD (Eq. 7-8): T = dX/ds along the teacher ODE = v - u + r (t - s) du/ds, du/ds = JVP along (v, 1, 0)."""

    name = "ayf_emd"
    variant = "emd"
    sign = 1.0
    fd_margin = (1, 0, 0)  # the JVP moves s

    def tangent(self, d: Draw, student: nn.Module, teacher, r: float):
        v = self.velocity(teacher, d)  # v(x_s, s)
        u, du_ds = self.jvp(
            lambda x, s, t: d.u(student, x, s, t),
            (d.x_s, d.s, d.t),
            (v, torch.ones_like(d.s), torch.zeros_like(d.t)),
            student,
            primal_out=True,
        )
        return v - u.to(v.dtype) + r * expand_like(d.t - d.s, v) * du_ds.to(v.dtype)


class AYFLagrangian(AlignYourFlow):
    """AYF-LMD (Eq. 9-10): T = dX/dt - v(X, t) = u + r (t - s) du/dt - v(X, t), du/dt = JVP along (0, 0, 1)."""

    name = "ayf_lmd"
    variant = "lmd"
    sign = -1.0
    fd_margin = (1, 1, 0)  # the JVP moves t: t - h >= 0

    def tangent(self, d: Draw, student: nn.Module, teacher, r: float):
        u, du_dt = self.jvp(
            lambda x, s, t: d.u(student, x, s, t),
            (d.x_s, d.s, d.t),
            (torch.zeros_like(d.x_s), torch.zeros_like(d.s), torch.ones_like(d.t)),
            student,
            primal_out=True,
        )
        u, du_dt, gap = u.to(d.x_s.dtype), du_dt.to(d.x_s.dtype), expand_like(d.t - d.s, d.x_s)
        X = d.x_s + gap * u
        return u + r * gap * du_dt - self.velocity(teacher, d, X, d.t)  # dX/dt - v(X, t)
