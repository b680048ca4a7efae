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
from torch import Tensor, nn

from flowmap.jvp import FD_EPS, check_backend, compute_dtype, jvp, parse_fd_dtype, require_inner
from flowmap.objectives.base import Objective, mask_nonfinite
from flowmap.objectives.common import times_like
from flowmap.objectives.guidance import check_guidance, guided_draw, teacher_velocity
from flowmap.time_sampling import gap_pair, ordered_pair, pair_kwargs
from flowmap.types import LossOutput, expand_like

VARIANTS = ("emd", "lmd")
GAP_DIST = (
    "gap_logit_normal"  # the paper's interval sampling (Alg. 1): gap ~ sigmoid(N(mean, std)), end ~ U[0, 1 - gap]
)


class AlignYourFlow(Objective):
    """AYF map distillation on the flow-map student; per-sample loss (B,).

    Args:
        variant: ``"emd"`` (Eulerian, JVP in (x, s)) or ``"lmd"`` (Lagrangian, JVP in t, teacher at X).
        time_dist, time_mean, time_std: distribution of the two times (``uniform``, ``logit_normal``, ``lognormal``: two
            sorted draws; ``gap_logit_normal``: the paper's Alg. 1, gap s - t ~ sigmoid(N(time_mean, time_std)) and
            t ~ U[0, 1 - gap], which puts more weight on long jumps; on ring8 with a small MLP it did worse than
            ``uniform``: 1-/2-NFE ratios EMD 0.35 / 0.35 vs 0.31 / 0.29, LMD 0.26 / 0.21 vs 0.15 / 0.12);
            equal_share: share with s = t.
        tangent_c: c of the tangent normalization g = T / (||T|| + c) (paper: 0.1); None turns it off.
        warmup_steps: steps over which the (t - s) du/d. term ramps in (0: no warm-up).
        guidance, guidance_max: CFG scale (a range trains a ``guidance_input`` student at
            w ~ U[guidance, guidance_max]).
        jvp_backend, fd_eps, fd_dtype: ``"forward_ad"``, ``"func"`` or ``"fd"``, its step, and ``"float64"`` for
            differences taken in float64 (see ``flowmap.jvp``).
    """

    name = "ayf"
    needs_teacher = True
    uses_target = False
    needs_jvp = True

    def __init__(
        self,
        variant: str = "emd",
        time_dist: str = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        equal_share: float = 0.1,
        tangent_c: float | None = 0.1,
        warmup_steps: int = 0,
        guidance: float = 1.0,
        guidance_max: float | None = None,
        jvp_backend: str = "forward_ad",
        fd_eps: float | None = None,
        fd_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown AYF variant {variant!r}; choose from {list(VARIANTS)}")
        if time_dist != GAP_DIST:
            pair_kwargs(time_dist, time_mean, time_std)
        if not 0.0 <= equal_share <= 1.0:
            raise ValueError(f"equal_share must lie in [0, 1], got {equal_share}")
        if tangent_c is not None and not tangent_c > 0:
            raise ValueError(f"tangent_c must be > 0 (or None for no normalization), got {tangent_c}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        check_guidance("teacher", guidance, guidance_max)
        self._variant = variant
        self.time_dist, self.time_mean, self.time_std = time_dist, float(time_mean), float(time_std)
        self.equal_share = float(equal_share)
        self.tangent_c = None if tangent_c is None else float(tangent_c)
        self.warmup_steps = int(warmup_steps)
        self.guidance, self.guidance_max = float(guidance), guidance_max
        self.jvp_backend = check_backend(jvp_backend)
        self.fd_eps = fd_eps
        self.fd_dtype = parse_fd_dtype(fd_dtype)

    def warmup(self, step: int) -> float:
        """r = min(1, step / warmup_steps)."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)

    def sample_times(self, batch: int, x0: Tensor) -> tuple[Tensor, Tensor]:
        """(s, t) with 1 >= s >= t >= 0, a share ``equal_share`` with s = t."""
        if self.time_dist == GAP_DIST:
            s, t = gap_pair(batch, x0.device, self.time_mean, self.time_std, self.equal_share)
        else:
            s, t = ordered_pair(
                batch,
                x0.device,
                self.time_dist,
                self.equal_share,
                **pair_kwargs(self.time_dist, self.time_mean, self.time_std),
            )
        s, t = times_like(s, x0), times_like(t, x0)
        if self.jvp_backend == "fd":  # keep the perturbed time inside [0, 1] for the central difference
            h = self.fd_eps or FD_EPS.get(self.fd_dtype or compute_dtype(s.dtype), 5e-5)
            s = s.clamp(h, 1.0 - h)
            t = torch.minimum(t, s).clamp(min=h) if self._variant == "lmd" else torch.minimum(t, s)
        return s, t

    def normalize(self, T: Tensor) -> Tensor:
        """g = T / (||T|| + c) per sample."""
        if self.tangent_c is None:
            return T
        norm = T.flatten(1).norm(dim=1)
        return T / expand_like(norm + self.tangent_c, T)

    def forward(
        self, *, student: nn.Module, teacher=None, target=None, x0: Tensor, cond: Tensor | None = None, step: int = 0
    ) -> LossOutput:
        student = require_inner(student)
        if teacher is None:
            raise ValueError(f"{self.name!r} distills a teacher, but teacher is None")
        B = x0.shape[0]
        s, t = self.sample_times(B, x0)
        eps = torch.randn_like(x0)
        x_s = expand_like(1 - s, x0) * x0 + expand_like(s, x0) * eps  # linear path
        w_student, w_teacher = guided_draw(student, teacher, cond, B, x0.device, self.guidance, self.guidance_max)
        r = self.warmup(step)

        def u_fn(x: Tensor, s_: Tensor, t_: Tensor) -> Tensor:
            return student.average_velocity(x, s_, t_, cond, w_student)

        gap = expand_like(t - s, x0)
        if self._variant == "emd":
            v = teacher_velocity(teacher, x_s, s, cond, w_teacher)
            u0, du = jvp(
                u_fn,
                (x_s, s, t),
                (v, torch.ones_like(s), torch.zeros_like(t)),
                self.jvp_backend,
                self.fd_eps,
                fd_dtype=self.fd_dtype,
                modules=(student,),
            )
            T = v - u0.to(v.dtype) + r * gap * du.to(v.dtype)  # dX/ds along the teacher ODE
            sign = 1.0
        else:
            u0, du = jvp(
                u_fn,
                (x_s, s, t),
                (torch.zeros_like(x_s), torch.zeros_like(s), torch.ones_like(t)),
                self.jvp_backend,
                self.fd_eps,
                fd_dtype=self.fd_dtype,
                modules=(student,),
            )
            u0, du = u0.to(x_s.dtype), du.to(x_s.dtype)
            X = x_s + gap * u0
            T = u0 + r * gap * du - teacher_velocity(teacher, X, t, cond, w_teacher)  # dX/dt - v(X, t)
            sign = -1.0
        g, finite, n_bad = mask_nonfinite(self.normalize(T))

        u = student.average_velocity(x_s, s, t, cond, w_student)  # the one with-grad forward
        dtype = torch.promote_types(u.dtype, torch.float32)
        u_tgt = u.detach().to(dtype) + sign * g.to(dtype)
        sq = (u.to(dtype) - u_tgt).pow(2).flatten(1).sum(1) * finite  # = ||g||^2 in value
        D = x0[0].numel()
        return LossOutput(
            loss=sq,
            logs={
                "residual": (T.detach().flatten(1).pow(2).sum(1).nan_to_num(0.0) * finite / D),
                "gap": (s - t).float(),
                "warmup": torch.full_like(s, r, dtype=torch.float32),
                "nonfinite_targets": n_bad.float(),
            },
        )


class AYFEulerian(AlignYourFlow):
    """AYF-EMD: ``AlignYourFlow(variant="emd")``."""

    name = "ayf_emd"

    def __init__(
        self,
        time_dist: str = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        equal_share: float = 0.1,
        tangent_c: float | None = 0.1,
        warmup_steps: int = 0,
        guidance: float = 1.0,
        guidance_max: float | None = None,
        jvp_backend: str = "forward_ad",
        fd_eps: float | None = None,
        fd_dtype: str | None = None,
    ) -> None:
        super().__init__(
            "emd",
            time_dist,
            time_mean,
            time_std,
            equal_share,
            tangent_c,
            warmup_steps,
            guidance,
            guidance_max,
            jvp_backend,
            fd_eps,
            fd_dtype,
        )


class AYFLagrangian(AlignYourFlow):
    """AYF-LMD: ``AlignYourFlow(variant="lmd")``."""

    name = "ayf_lmd"

    def __init__(
        self,
        time_dist: str = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        equal_share: float = 0.1,
        tangent_c: float | None = 0.1,
        warmup_steps: int = 0,
        guidance: float = 1.0,
        guidance_max: float | None = None,
        jvp_backend: str = "forward_ad",
        fd_eps: float | None = None,
        fd_dtype: str | None = None,
    ) -> None:
        super().__init__(
            "lmd",
            time_dist,
            time_mean,
            time_std,
            equal_share,
            tangent_c,
            warmup_steps,
            guidance,
            guidance_max,
            jvp_backend,
            fd_eps,
            fd_dtype,
        )
