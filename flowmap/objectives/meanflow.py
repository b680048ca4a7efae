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
with v = eps - x0 from data, or the teacher's velocity when distilling (optionally guided, v = w v_c + (1 - w) v_u,
the student trained at w). From data, ``data_velocity='stf'`` uses the batch-posterior estimate of E[eps - x0 | x_s]
(Xu et al. 2023) instead: u_tgt is affine in v (the JVP is linear in its tangent), so its expectation given x_s is
the same (up to the batch estimate's bias) with far less variance. At s = t it is flow matching. Times: ordered (s, t)
pairs of logit-normal draws with a share s = t (Sec. 4.3, Table 1a). Adaptive weighting (Sec. 4.3, after Geng
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

from flowmap.objectives.base import GUIDANCE, JVP, TIMES, Draw, Objective, mask_nonfinite, sq_norm
from flowmap.objectives.common import check_data_velocity, stable_target
from flowmap.time_sampling import moving_rows
from flowmap.types import LossOutput, expand_like, null_label


class MeanFlow(Objective):
    """MeanFlow on the flow-map student; per-sample loss (B,).

    Args:
        source: ``"teacher"`` (distill the teacher's velocity) or ``"data"`` (train from data).
        data_velocity: from data, ``"conditional"`` (eps - x0, paper) or ``"stf"`` (its batch-posterior estimate,
            ``flowmap.objectives.common.stable_target``).
        time_dist, time_mean, time_std: distribution of the two times (paper: logit-normal(-0.4, 1.0)).
        equal_share: share of pairs with s = t (paper, Table 1a: 75%, i.e. 25% with r != t); end_share: share of
            pairs ending at the data, t = 0 (``flowmap.time_sampling.end_head``; 0: the paper's law).
        p, c: adaptive weight 1 / (||delta||^2 + c)^p (paper: p = 1, c = 1e-3); p = 0 is plain L2.
        guidance, guidance_max: CFG scale folded into a distilled target (a range needs a student with
            ``guidance_input``); p_uncond: label dropout so the student also learns the null label.
        jvp_backend: ``"forward_ad"`` (dual tensors, the fastest), ``"func"`` (torch.func.jvp) or ``"fd"``
            (finite differences); fd_eps: its step;
        fd_dtype: ``"float64"`` takes the differences in float64 (``flowmap.jvp.promoted``), null: as the inputs.
    """

    name = "meanflow"
    needs_jvp = True
    fd_margin = (1, 0, 0)  # the JVP moves s: s +- h inside [0, 1]

    shared = ("source", *TIMES, *GUIDANCE, "p_uncond", *JVP)
    defaults = {"source": "teacher", "time_dist": "logit_normal", "time_mean": -0.4, "equal_share": 0.75}

    def __init__(self, p: float = 1.0, c: float = 1e-3, data_velocity: str = "conditional", **kwargs) -> None:
        super().__init__(**kwargs)
        if p < 0 or c <= 0:
            raise ValueError(f"adaptive weighting needs p >= 0 and c > 0, got p={p}, c={c}")
        self.p, self.c = float(p), float(c)
        self.data_velocity = check_data_velocity(data_velocity, source=self.source)

    def loss(self, d: Draw, student: nn.Module, teacher, target, step: int) -> LossOutput:
        if self.data_velocity == "stf":  # E[eps - x0 | x_s] over the batch
            v = stable_target(d.x_s, d.s, d.x0, d.eps, d.cond, null_label(int(getattr(student, "num_classes", 0))))
        else:
            v = self.velocity(teacher, d)  # v(x_s, s)
        u, du_ds = self.u_and_du_ds(d, student, v)
        u_tgt, finite, n_bad = mask_nonfinite(v - expand_like(d.s - d.t, v) * du_ds.to(v.dtype))  # Eq. 10
        sq = sq_norm(u.to(torch.promote_types(u_tgt.dtype, torch.float32)) - u_tgt)  # ||delta||^2
        weight = (sq.detach() + self.c).pow(-self.p)  # adaptive weight, Sec. 4.3
        return LossOutput(
            loss=weight * sq * finite,
            logs={
                "mse": sq.detach() * finite / d.x0[0].numel(),
                "weight": weight.detach(),
                "gap": (d.s - d.t).float(),
                "nonfinite_targets": n_bad.float(),
            },
        )

    def u_and_du_ds(self, d: Draw, student: nn.Module, v: Tensor) -> tuple[Tensor, Tensor]:
        """u(x_s, s, t) with grad (the one with-grad forward) and du/ds along the trajectory (Eq. 8: the JVP of u
        along (v, 1, 0) on (x, s, t), detached), from one pass (``Objective.jvp(..., with_grad=True)``) over rows
        [0, m). The rows [n, B) have s = t, where the target is v itself and du/ds is unused: m = B when they are at
        most half the batch (one pass), else m = n and those rows take a plain forward (no tangent pass)."""
        n, B = moving_rows(d.batch, self.equal_share), d.batch
        if n == 0:
            u = d.u(student, d.x_s, d.s, d.t)
            return u, torch.zeros_like(u.detach(), dtype=torch.promote_types(u.dtype, torch.float32))
        m = d if 2 * n >= B else d.rows(slice(0, n))
        u, du = self.jvp(
            lambda x, s, t: m.u(student, x, s, t),
            (m.x_s, m.s, m.t),
            (v[: m.batch], torch.ones_like(m.s), torch.zeros_like(m.s)),
            student,
            with_grad=True,
        )
        if m.batch == B:
            return u, du
        rest = d.rows(slice(n, B))
        return torch.cat([u, rest.u(student, rest.x_s, rest.s, rest.t)]), torch.cat(
            [du, du.new_zeros((B - n, *du.shape[1:]))]
        )
