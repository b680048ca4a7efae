"""Continuous-time consistency models, sCD and sCT (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models"), on the flow-map student through the change of path.

TrigFlow (Sec. 3): x_theta = cos(theta) x0 + sin(theta) z, z ~ N(0, sigma_d^2 I), theta in [0, pi/2],
and the consistency model f(x, theta) = cos(theta) x - sin(theta) sigma_d F(x / sigma_d, theta) (Sec. 3).
TrigFlow is the affine path alpha = cos(theta), sigma = sigma_d sin(theta) (``TrigFlowPath``, path time
tau = 2 theta / pi), so the change of path (``flowmap.paths.to_linear``) puts it on our linear axis:
    D = cos(theta) + sigma_d sin(theta),   x_lin = x / D,   t_lin = sigma_d sin(theta) / D
and the consistency function is our student's jump to the data, f(x, theta) = X(x_lin, t_lin, 0)
= x_lin - t_lin u(x_lin, t_lin, 0). Solving that parametrization for F (using cos(theta) D - 1 = sin(theta) D'):
    F(x, theta) = (x D' / sigma_d + u(x_lin, t_lin, 0)) / D,        D' = dD/dtheta = sigma_d cos(theta) - sin(theta)
finite at theta = 0 (no division by sin). The proposal tan(theta) = e^tau / sigma_d, tau ~ N(P_mean, P_std^2)
(Sec. 4.2) is t_lin = sigmoid(tau) on the linear axis: a logit-normal time, whatever sigma_d.

Training (Algorithm 1: the continuous-time CM gradient with the tricks of Sec. 4.2):
    dx/dtheta = cos(theta) z - sin(theta) x0                         (sCT: conditional velocity; or its batch-
                                                                      posterior estimate, ``data_velocity='stf'``)
    dx/dtheta = velocity_from_linear(v_teacher) * dtau/dtheta           (sCD: teacher's PF-ODE in TrigFlow time)
    dF^-/dtheta = JVP of F_{theta^-} along (dx/dtheta, 1)              (no-grad float32 pass, theta^- = sg(theta))
    g = -cos^2(theta) (sigma_d F^- - dx/dtheta) - r cos(theta) sin(theta) (x + sigma_d dF^-/dtheta)
        (= cos(theta) df^-/dtheta at r = 1; r = min(1, step / warmup) is the tangent warm-up)
    g <- g / (||g|| + c),  c = 0.1                                       (tangent normalization)
    L = e^{w_phi(theta)} / dim ||F_theta - F^- - g||^2 - w_phi(theta)      (adaptive weighting, learned log-variance)
The log-variance w_phi is a small network over time held by the objective (an ``nn.Module``), so its
parameters are optimized and checkpointed with the student.

DDP: the JVP runs on the student handed in (the inner ``FlowMap``; Lightning's DDP wraps the whole
LightningModule, so ``training_step`` already runs inside the synchronized forward) under no_grad, and the
student is called exactly once with grad; ``flowmap.jvp.require_inner`` refuses a DDP-wrapped student.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowmap.fourier import FourierTime
from flowmap.objectives.base import GUIDANCE, JVP, Draw, Objective, mask_nonfinite, normalized, sq_norm
from flowmap.objectives.common import check_data_velocity, instantaneous_velocity, ramp, stable_target, times_like
from flowmap.paths import TrigFlowPath, to_linear, velocity_from_linear
from flowmap.time_sampling import lognormal
from flowmap.types import LossOutput, expand_like, null_label


class LogVariance(nn.Module):
    """w_phi(t_lin): (B,) -> (B,), Fourier features and a small MLP whose last layer starts at zero (w = 0)."""

    def __init__(self, dim: int = 64, scale: float = 100.0) -> None:
        super().__init__()
        self.net = nn.Sequential(FourierTime(dim, scale=scale), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.net(t)[:, 0]


def t_lin_of(theta: Tensor, sigma_data: float) -> Tensor:
    """t_lin = sigma_d sin(theta) / (cos(theta) + sigma_d sin(theta)) (the time the student sees)."""
    return sigma_data * torch.sin(theta) / (torch.cos(theta) + sigma_data * torch.sin(theta))


class _SCM(Objective):
    """sCM on the flow-map student (use ``SCD`` or ``SCT``); per-sample loss (B,).

    Args:
        sigma_data: TrigFlow's data scale sigma_d (paper: 0.5 for images in [-1, 1]).
        p_mean, p_std: proposal tan(theta) = e^tau / sigma_d, tau ~ N(p_mean, p_std^2) (paper: -1.0, 1.4).
        tangent_warmup: steps of the tangent warm-up r = min(1, step / warmup) (0 = off; paper: 10k).
        tangent_c: c of the tangent normalization g / (||g|| + c) (paper: 0.1); None = off.
        adaptive: learn the log-variance weighting w_phi (else w = 0).
        guidance, guidance_max, p_uncond: CFG folded into the teacher's velocity (sCD only); label dropout.
        jvp_backend: ``"forward_ad"``, ``"func"`` or ``"fd"``; fd_eps: its step; fd_dtype: ``"float64"`` takes the
            differences in float64 (``flowmap.jvp.promoted``), null: in the inputs' dtype.
        data_velocity: sCT's dx/dtheta, ``"conditional"`` (cos(theta) z - sin(theta) x0, paper) or ``"stf"``: the
            batch-posterior estimate of the linear path's E[eps - x0 | x_lin] (Xu et al. 2023, ``stable_target``;
            data samples only) moved onto TrigFlow time like a teacher's velocity.
    """

    name = "scm"
    needs_jvp = True
    sampler_gamma = 1.0  # trained on jumps to the data end: multistep consistency sampling (Song et al. 2023, Alg. 1)
    source = "data"

    shared = (*GUIDANCE, "p_uncond", *JVP)

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = -1.0,
        p_std: float = 1.4,
        tangent_warmup: int = 1000,
        tangent_c: float | None = 0.1,
        adaptive: bool = True,
        data_velocity: str = "conditional",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        if not p_std > 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        if not isinstance(tangent_warmup, int) or tangent_warmup < 0:
            raise ValueError(f"tangent_warmup must be a non-negative int (steps), got {tangent_warmup!r}")
        if tangent_c is not None and not tangent_c > 0:
            raise ValueError(f"tangent_c must be positive or None, got {tangent_c}")
        self.sigma_data = float(sigma_data)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.tangent_warmup = tangent_warmup
        self.tangent_c = tangent_c
        self.adaptive = bool(adaptive)
        self.data_velocity = check_data_velocity(data_velocity, source=self.source)
        self.path = TrigFlowPath(self.sigma_data)
        self.logvar = LogVariance() if self.adaptive else None

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """theta = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2) (Sec. 4.2; extra ``theta``), the student's jump
        from s = t_lin(theta) to t = 0. The proposal is t_lin = sigmoid(tau) on the linear axis."""
        theta = times_like(torch.atan(lognormal(batch, x0.device, self.p_mean, self.p_std) / self.sigma_data), x0)
        if self.jvp_backend == "fd":  # keep theta +- h inside [0, pi/2] for the central difference
            h = self.fd_step(theta.dtype)
            theta = theta.clamp(h, 0.5 * math.pi - h)
        return t_lin_of(theta, self.sigma_data), torch.zeros_like(theta), {"theta": theta}

    def trig_F(self, student: nn.Module, x: Tensor, theta: Tensor, cond=None, w: Tensor | None = None) -> Tensor:
        """F(x, theta) = (x D' / sigma_d + u(x_lin, t_lin, 0)) / D through the change of path. (B, *data_shape)"""
        tau = theta * (2.0 / math.pi)
        x_lin, t_lin = to_linear(x, tau, self.path)
        u = student.average_velocity(x_lin, t_lin.clamp(0.0, 1.0), torch.zeros_like(t_lin), cond, w)
        D = self.path.alpha(tau) + self.path.sigma(tau)
        dD = self.sigma_data * torch.cos(theta) - torch.sin(theta)
        return (x * expand_like(dD / self.sigma_data, x) + u.to(x.dtype)) / expand_like(D, x)

    def loss(self, d: Draw, student: nn.Module, teacher, target, step: int) -> LossOutput:
        sd, theta = self.sigma_data, d.extra["theta"]
        cos, sin = expand_like(torch.cos(theta), d.x0), expand_like(torch.sin(theta), d.x0)
        x = (cos + sd * sin) * d.x_s  # x_theta = cos(theta) x0 + sin(theta) z, z = sigma_d eps (change of path)
        null = null_label(int(getattr(student, "num_classes", 0)))
        dx = self.dx_dtheta(teacher, x, theta, d.x0, sd * d.eps, d.cond, d.w_teacher, null)
        F, dF = self.jvp(  # the one with-grad forward F and sg(dF/dtheta) along (dx, 1), one pass
            lambda x_, th: self.trig_F(student, x_, th, d.cond, d.w_student),
            (x, theta),
            (dx, torch.ones_like(theta)),
            student,
            with_grad=True,
        )
        F_minus = F.detach()
        r = ramp(step, self.tangent_warmup)
        g = -(cos**2) * (sd * F_minus - dx) - r * cos * sin * (x + sd * dF.to(x.dtype))  # cos df^-/dtheta at r = 1
        g, finite, n_bad = mask_nonfinite(g)
        g_norm = g.flatten(1).norm(dim=1)
        g = normalized(g, self.tangent_c)
        dtype = torch.promote_types(F.dtype, torch.float32)
        sq = sq_norm(F.to(dtype) - F_minus.to(dtype) - g.to(dtype)) / d.x0[0].numel()
        logvar = self.logvar(d.s).float() if self.logvar is not None else torch.zeros_like(sq)
        loss = (torch.exp(logvar) * sq - logvar) * finite  # adaptive weighting (w = 0 without it)
        return LossOutput(
            loss=loss,
            logs={
                "tangent_norm": g_norm.detach().float(),
                "tangent_warmup": torch.tensor(r),
                "logvar": logvar.detach(),
                "mse": sq.detach(),
                "nonfinite_targets": n_bad.float(),
            },
        )

    def dx_dtheta(
        self,
        teacher,
        x: Tensor,
        theta: Tensor,
        x0: Tensor,
        z: Tensor,
        cond: Tensor | None,
        w: float | Tensor,
        null: int = -1,
    ) -> Tensor:
        """dx/dtheta: conditional (sCT), its batch-posterior estimate (sCT, ``data_velocity='stf'``; ``null`` = the
        null label) or the teacher's PF-ODE velocity moved onto TrigFlow time (sCD)."""
        if self.source == "data" and self.data_velocity == "conditional":
            return expand_like(torch.cos(theta), x) * z - expand_like(torch.sin(theta), x) * x0
        tau = theta * (2.0 / math.pi)
        x_lin, t_lin = to_linear(x, tau, self.path)
        if self.source == "data":  # the batch-posterior estimate of E[eps - x0 | x_lin] (eps = z / sigma_d)
            v_lin = stable_target(x_lin, t_lin.clamp(0.0, 1.0), x0, z / self.sigma_data, cond, null)
        else:
            v_lin = instantaneous_velocity("teacher", teacher, x_lin, t_lin.clamp(0.0, 1.0), None, None, cond, w)
        return velocity_from_linear(v_lin, x_lin, tau, self.path) * (2.0 / math.pi)  # dx/dtau * dtau/dtheta


class SCD(_SCM):
    """sCD: continuous-time consistency distillation of a teacher (Lu & Song 2024, Alg. 1 with a teacher)."""

    name = "scd"
    source = "teacher"


class SCT(_SCM):
    """sCT: continuous-time consistency training from data (Lu & Song 2024, Alg. 1, conditional velocity)."""

    name = "sct"
    source = "data"
