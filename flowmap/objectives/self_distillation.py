"""Flow-map self-distillation (Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model: Learning
flow maps via self-distillation"), from data or with a teacher's velocity on the diagonal.

Our X(x, s, t) = x + (t - s) u(x, s, t) is the paper's X_{s,t}; t = 0 is data here, so jumps run s -> t <= s,
and I_s = (1 - s) x0 + s eps is the linear interpolant. The student's own diagonal is the velocity
v_theta(x, t) = u(x, t, t) (paper Eq. 2.4-2.6), trained by flow matching from data (paper Eq. 3.2):
    L_FM  = ||u(I_s, s, s) - (eps - x0)||^2
or, when a teacher is distilled (``source="teacher"``), onto the teacher's velocity v(I_s, s) (the diagonal is
then the teacher's field, as in the shortcut and MeanFlow distillations),
and the off-diagonal by one self-distillation term with the velocity under stop-gradient (paper Sec. 3):
    LSD (Lagrangian, Eq. 3.6):  ||d/dt X(I_s, s, t) - sg(u(X(I_s, s, t), t, t))||^2
    ESD (Eulerian,   Eq. 3.8):  ||d/ds X(I_s, s, t) + dX/dx(I_s, s, t) sg(u(I_s, s, s))||^2
    PSD (progressive, Eq. 3.10): ||X(I_s, s, t) - sg(X(X(I_s, s, m), m, t))||^2,  m ~ U[t, s]
The LSD/ESD derivatives are differentiated *with* respect to theta (the student's own JVP under grad):
``"forward_ad"`` (dual tensors with ``flowmap.jvp_rules.dual_rules``) or ``"func"`` (torch.func.jvp) runs
forward-mode AD with autograd on, ``"fd"`` central differences (two with-grad forwards).
Loss = L_FM + lambda_sd L_SD per sample.

Sampling (diagonal and off-diagonal samples drawn separately): the flow-matching term uses its
own time r ~ time_dist (uniform by default), not the pair's s; the pair (s, t), s >= t, feeds the
self-distillation term, which runs only on the rows with s != t (the share ``equal_share`` is flow matching only).
``fm_target="stf"`` replaces the conditional target eps - x0 by its posterior mean over the batch (Xu et al. 2023,
Stable Target Field; ``stable_target``): data samples only, far lower variance; on ring8 it is what brings the
test-sized budget near the 1/5 bar. Off by default, see the class docstring: ``sd_warmup`` (ramp of lambda_sd),
``sd_target_ema`` (EMA target network for the stop-gradient terms), ``psd_space="velocity"`` (PSD residual in
velocity space), ``sd_gradient="primal"`` with ``sd_normalize`` (LSD/ESD residual under stop-gradient, normalized).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.objectives.base import TIMES, Draw, Objective, normalized, sq_norm
from flowmap.objectives.common import check_data_velocity, check_velocity_from, ramp, stable_target, times_like
from flowmap.time_sampling import moving_rows
from flowmap.types import LossOutput, expand_like, null_label

VARIANTS = ("lagrangian", "eulerian", "progressive")


class FlowMapSelfDistillation(Objective):
    """Self-distillation, its diagonal from data or from a teacher's velocity (``source``); per-sample loss (B,).

    Args:
        source: ``"data"`` (default, the paper: flow matching onto eps - x0 or ``fm_target``) or ``"teacher"`` (the
            diagonal regresses onto the teacher's velocity; the self-distillation terms are unchanged).
        sd_velocity: LSD and ESD. ``"student"`` (default, the paper) builds the self-distillation target from the
            student's own diagonal sg(u(., tau, tau)); ``"teacher"`` (needs ``source="teacher"``) from the teacher's
            velocity v(., tau) at the same point, so the diagonal's error does not enter the off-diagonal targets
            (the field of Boffi et al.'s flow map matching, Eq. 3.6 / 3.8 with the teacher's b).
        time_dist, time_mean, time_std: distribution of the ordered pair (s, t); equal_share: share with s = t;
            end_share: share ending at the data, t = 0 (``flowmap.time_sampling.end_head``).
        lambda_sd: weight of the self-distillation term; p_uncond: label dropout.
        jvp_backend, fd_eps: ``"forward_ad"``, ``"func"`` or ``"fd"`` for the with-grad derivative (LSD, ESD).
        fm_target: ``"conditional"`` (eps - x0, paper Eq. 3.2) or ``"stf"`` (batch posterior mean, ``stable_target``).
        sd_warmup: steps over which the self-distillation weight ramps linearly from 0 to ``lambda_sd`` (0: off,
            the paper's constant weight), so the diagonal velocity that every self-distillation target is built from
            is learned first; the ramp is the "tangent warm-up" of Lu & Song 2024 (sCM) applied to lambda_sd.
            At weight 0 the term is skipped (flow matching only, one forward).
        sd_target_ema: if > 0, the stop-gradient quantities (the velocity of LSD/ESD, the two jumps of PSD) come from
            an EMA copy of the student with this decay (the EMA target network of Song et al. 2023, consistency
            models, Sec. 5; ``fit`` keeps it and passes it as ``target``); 0 (default) is the paper's sg(theta) of the
            live weights.
        psd_space: PSD only. ``"map"`` (default, paper Eq. 3.10) compares flow maps X; ``"velocity"`` compares the
            average velocity u(I_s, s, t) with sg(((s - m) u(I_s, s, m) + (m - t) u(X(I_s, s, m), m, t)) / (s - t)),
            the same residual divided by (t - s), i.e. Eq. 3.10 weighted by 1 / (s - t)^2 (the self-consistency
            target of the shortcut models of Frans et al. 2024, there at the midpoint, here at the paper's
            m ~ U[t, s]). Small gaps, which carry the diagonal velocity into the map, then weigh as much as large
            ones (in map space their squared residual is (s - t)^2 smaller). Same zero set, exact at the exact map;
            on ring8 it takes PSD's 1-NFE ratio at seed 0 from 0.237 to 0.196 (see the tests).
        sd_gradient: LSD and ESD. ``"full"`` (default, the paper) trains through the derivative term (a JVP under
            grad). ``"primal"`` writes the same residual as u(I_s, s, t) minus a stop-gradient target and trains only
            through u, the semi-gradient of MeanFlow, sCM and AYF: with X = x + (t - s) u,
                ESD: u(x, s, t) - sg(v(x, s) + (t - s) (d_s u + grad_x u v)(x, s, t))   (the MeanFlow identity
                     with the student's own diagonal velocity v as the field),
                LSD: u(x, s, t) - sg(v(X, t) - (t - s) d_t u(x, s, t)),
            each equal to the map-space residual up to its sign, so the loss value is the same; the derivative
            comes from the JVP engine's no-grad pass (``flowmap.jvp.jvp``), then one with-grad forward.
        sd_normalize: c > 0 (needs ``sd_gradient="primal"``) replaces that residual r by r / (||r|| + c) per sample,
            gradient through u only: the tangent normalization of sCM (Lu & Song 2024, Sec. 4.2) and AYF, which bounds
            each sample's pull. On ring8, ESD with c = 1 (2000 steps) meets 1/5 at 1 and 2 NFE at seeds 0-2 where the
            paper's full gradient did not at seed 0 (tests); 0 (default) is off.
    """

    name = "fmsd"
    source = "data"
    variant = "lagrangian"

    shared = ("source", *TIMES, "p_uncond", "jvp_backend", "fd_eps")
    defaults = {"source": "data", "jvp_backend": "func"}

    def __init__(
        self,
        lambda_sd: float = 1.0,
        fm_target: str = "conditional",
        sd_warmup: int = 0,
        sd_target_ema: float = 0.0,
        psd_space: str = "map",
        sd_gradient: str = "full",
        sd_normalize: float = 0.0,
        sd_velocity: str = "student",
        **kwargs,
    ) -> None:
        if not 0.0 <= sd_target_ema < 1.0:
            raise ValueError(f"sd_target_ema must lie in [0, 1), got {sd_target_ema}")
        super().__init__(**kwargs)
        self.target_ema = float(sd_target_ema)  # the base's target EMA, under this method's own name
        if not lambda_sd >= 0:
            raise ValueError(f"lambda_sd must be >= 0, got {lambda_sd}")
        check_data_velocity(fm_target, "fm_target", self.source)
        if not (isinstance(sd_warmup, int) and not isinstance(sd_warmup, bool) and sd_warmup >= 0):
            raise ValueError(f"sd_warmup must be an int >= 0 (steps), got {sd_warmup!r}")
        if psd_space not in ("map", "velocity"):
            raise ValueError(f"psd_space must be 'map' or 'velocity', got {psd_space!r}")
        if sd_gradient not in ("full", "primal"):
            raise ValueError(f"sd_gradient must be 'full' or 'primal', got {sd_gradient!r}")
        if sd_gradient == "primal" and self.variant == "progressive":
            raise ValueError(
                "sd_gradient 'primal' applies to the derivative terms of LSD and ESD; PSD's target is already "
                "under stop-gradient"
            )
        if not sd_normalize >= 0:
            raise ValueError(f"sd_normalize must be >= 0, got {sd_normalize}")
        if sd_normalize > 0 and sd_gradient != "primal":
            raise ValueError("sd_normalize normalizes the stop-gradient residual: it needs sd_gradient 'primal'")
        self.sd_velocity = check_velocity_from(sd_velocity, "sd_velocity", self.source)
        if self.sd_velocity == "teacher" and self.variant == "progressive":
            raise ValueError("sd_velocity applies to the velocity of LSD and ESD; PSD's target has none")
        self.lambda_sd, self.fm_target = float(lambda_sd), fm_target
        self.sd_warmup, self.sd_target_ema, self.psd_space = sd_warmup, float(sd_target_ema), psd_space
        self.sd_gradient, self.sd_normalize = sd_gradient, float(sd_normalize)
        self.uses_target = self.sd_target_ema > 0  # fit() then keeps an EMA copy and passes it as ``target``

    def sd_weight(self, step: int) -> float:
        """lambda_sd, ramped linearly from 0 over the first ``sd_warmup`` steps."""
        return self.lambda_sd * ramp(step, self.sd_warmup)

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """The pair (s, t) of the self-distillation term and the diagonal's own time r ~ time_dist (paper Eq. 3.2
        with t ~ U[0, 1]; not the pair's s = max of two draws, which would starve the data end); PSD adds the
        fraction of its intermediate time, m = t + (s - t) mid."""
        s, t = super().times(batch, x0, step)
        extra = {"r": times_like(self.pairs.single(batch, x0.device), x0)}
        if self.variant == "progressive":
            extra["mid"] = times_like(torch.rand(batch, device=x0.device), x0)
        return s, t, extra

    def field(self, d: Draw, sg: nn.Module, teacher, x: Tensor, tau: Tensor) -> Tensor:
        """The velocity of the LSD / ESD targets at (x, tau), no grad: sg(u(x, tau, tau)) of ``sg``, or the
        teacher's v(x, tau) (``sd_velocity="teacher"``)."""
        with torch.no_grad():
            return self.velocity(teacher, d, x, tau) if self.sd_velocity == "teacher" else d.u(sg, x, tau, tau)

    def distillation(self, student: nn.Module, d: Draw, sg: nn.Module, teacher=None) -> Tensor:
        """Per-sample squared residual of the self-distillation term (B,); ``sg`` gives the stop-gradient
        quantities (the student itself, or its EMA target network)."""
        x_s, s, t = d.x_s, d.s, d.t
        if self.sd_gradient == "primal":  # LSD / ESD only (PSD rejects it)
            res = self.primal_residual(student, d, sg, teacher)
        elif self.variant == "lagrangian":
            X, dX_dt = self.jvp(
                lambda t_: d.X(student, x_s, s, t_), (t,), (torch.ones_like(t),), student, with_grad="both"
            )
            v = self.field(d, sg, teacher, X.detach(), t)  # sg(v_theta(X, t))
            res = dX_dt - v
        elif self.variant == "eulerian":
            v = self.field(d, sg, teacher, x_s, s)  # sg(v_theta(x_s, s))
            _, res = self.jvp(
                lambda x_, s_: d.X(student, x_, s_, t), (x_s, s), (v, torch.ones_like(s)), student, with_grad="both"
            )
        else:
            m = t + (s - t) * d.extra["mid"]
            if self.psd_space == "velocity":
                with torch.no_grad():  # the two jumps' average velocities, weighted by their lengths
                    u1 = d.u(sg, x_s, s, m)
                    u2 = d.u(sg, x_s + expand_like(m - s, x_s) * u1, m, t)
                    w = expand_like((s - m) / (s - t), x_s)
                    tgt = w * u1 + (1 - w) * u2
                res = d.u(student, x_s, s, t) - tgt
            else:
                with torch.no_grad():
                    tgt = d.X(sg, d.X(sg, x_s, s, m), m, t)
                res = d.X(student, x_s, s, t) - tgt
        return res.pow(2).flatten(1).sum(1)

    def primal_residual(self, student: nn.Module, d: Draw, sg: nn.Module, teacher=None) -> Tensor:
        """u(x_s, s, t) - sg(target) (B, *D) for ``sd_gradient="primal"``: the derivative in a no-grad JVP pass, the
        gradient through the one with-grad forward of u."""
        x_s, s, t = d.x_s, d.s, d.t
        gap = expand_like(t - s, x_s)
        u = d.u(student, x_s, s, t)  # the one with-grad forward
        if self.variant == "eulerian":
            v = self.field(d, sg, teacher, x_s, s)  # sg(v_theta(x_s, s))
            _, du = self.jvp(lambda x_, s_: d.u(student, x_, s_, t), (x_s, s), (v, torch.ones_like(s)), student)
            tgt = v + gap * du.to(v.dtype)  # u = v + (t - s) du/ds along v (MeanFlow identity)
        else:
            _, du = self.jvp(lambda t_: d.u(student, x_s, s, t_), (t,), (torch.ones_like(t),), student)
            v = self.field(d, sg, teacher, x_s + gap * u.detach(), t)  # sg(v_theta(X, t))
            tgt = v - gap * du.to(v.dtype)  # dX/dt = u + (t - s) du/dt = v(X, t)
        res = u - tgt.detach()
        if self.sd_normalize > 0:  # tangent normalization (Lu & Song 2024; AYF): res / (||res|| + c), grad through u
            res = u - (u.detach() - normalized(res.detach(), self.sd_normalize))
        return res

    def loss(self, d: Draw, student: nn.Module, teacher, target: nn.Module, step: int) -> LossOutput:
        D, r = d.x0[0].numel(), d.extra["r"]
        x_r = d.at(r)  # the diagonal's own point of the path
        if self.source == "teacher":
            v = self.velocity(teacher, d, x_r, r)  # the teacher's velocity at the diagonal's point
        elif self.fm_target == "stf":
            v = stable_target(x_r, r, d.x0, d.eps, d.cond, null_label(int(getattr(student, "num_classes", 0))))
        else:
            v = d.eps - d.x0  # conditional velocity (paper Eq. 3.2)
        fm = sq_norm(d.u(student, x_r, r, r) - v) / D
        # The self-distillation term runs only on the rows [0, n) with s != t (it vanishes on the diagonal), so the
        # share ``equal_share`` of pure flow-matching rows costs one forward each, no JVP.
        weight = self.sd_weight(step)
        n = moving_rows(d.batch, self.equal_share) if weight > 0 else 0
        sd = torch.zeros_like(fm)
        if n:
            sd_m = (self.distillation(student, d.rows(slice(0, n)), target, teacher) / D).to(sd.dtype)
            sd = sd_m if n == d.batch else torch.cat([sd_m, sd[n:]])
        return LossOutput(
            loss=fm + weight * sd, logs={"fm": fm.detach(), "sd": sd.detach(), "gap": (d.s - d.t).float()}
        )


class LagrangianSelfDistillation(FlowMapSelfDistillation):
    """LSD (Boffi et al. 2025, Eq. 3.6)."""

    name = "fmsd_lagrangian"
    variant = "lagrangian"
    needs_jvp = True
    fd_margin = (2, 1, 1)  # the JVP moves t: t +- h inside [0, s]


class EulerianSelfDistillation(FlowMapSelfDistillation):
    """ESD (Boffi et al. 2025, Eq. 3.8)."""

    name = "fmsd_eulerian"
    variant = "eulerian"
    needs_jvp = True
    fd_margin = (2, 1, 1)  # the JVP moves s: s +- h inside [t, 1]


class ProgressiveSelfDistillation(FlowMapSelfDistillation):
    """PSD (Boffi et al. 2025, Eq. 3.10)."""

    name = "fmsd_progressive"
    variant = "progressive"
