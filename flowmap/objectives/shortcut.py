"""Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models") on the flow-map student.

The paper's step-size-conditioned s(x_t, t, d) is our average velocity with d = s - t (time runs
1 = noise -> 0 = data, so a step of size d goes from s to s - d):
    X(x, s, s - d) = x - d u(x, s, s - d)                     (the paper's x_{t+d} = x_t + s(x_t, t, d) d, Sec. 3)

Two losses share one with-grad forward over the batch:
    flow matching at d = 0:   u(x_s, s, s)      ~ v(x_s, s)              (empirical target, Sec. 3)
    self-consistency:         u(x, s, s - 2d)   ~ sg[(u1 + u2) / 2]        (self-consistency target, Sec. 3)
        u1 = u_target(x, s, s - d),  x' = x - d u1,  u2 = u_target(x', s - d, s - 2d)
v is the teacher's velocity when distilling (optionally guided) or eps - x0 from data; the targets u1,
u2 come from the EMA target network (``uses_target``). Step sizes are dyadic, 2d = 2^-m for
m = 0..max_log2_steps - 1, and s sits on the grid of multiples of 2d, so 1 to 2^max_log2_steps uniform
steps of ``flowmap.sampling.sample`` query exactly the trained (s, s - 2d) pairs. At the finest level
(d = 2^-max_log2_steps) the two half steps use the instantaneous velocity u(., ., d = 0), anchoring the
recursion in flow matching. A share ``consistency_share`` of the batch (paper: 1/4) gets consistency
targets, the rest flow matching. The target network and the teacher run under no_grad; the student is
called exactly once with grad (on the whole batch), so DDP around the LightningModule syncs its gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.objectives.base import GUIDANCE, Draw, Objective, mask_nonfinite, sq_norm
from flowmap.objectives.common import check_velocity_from, times_like
from flowmap.types import LossOutput, expand_like


class Shortcut(Objective):
    """Shortcut-model loss; per-sample loss (B,).

    Args:
        source: ``"teacher"`` (flow matching onto the teacher's velocity) or ``"data"`` (eps - x0).
        max_log2_steps: k; step sizes 2d in {1, 1/2, ..., 2^-(k-1)}, finest half step d = 2^-k (paper: k = 7).
        consistency_share: share of the batch with self-consistency targets (paper: 1/4).
        anchor: ``"student"`` (the paper: the finest level's two half steps use the target's instantaneous velocity
            u(., ., d = 0)) or ``"teacher"`` (needs ``source="teacher"``: they use the teacher's velocity, so the
            diagonal's error does not enter the recursion's anchor; two teacher calls on the consistency rows).
        target_ema: EMA decay of the target network that makes the consistency targets.
        guidance, guidance_max, p_uncond: as in MeanFlow (CFG folded into a distilled velocity; label dropout).
    """

    name = "shortcut"
    uses_target = True

    shared = ("source", "target_ema", *GUIDANCE, "p_uncond")
    defaults = {"source": "teacher", "target_ema": 0.999}

    def __init__(
        self, max_log2_steps: int = 7, consistency_share: float = 0.25, anchor: str = "student", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.anchor = check_velocity_from(anchor, "anchor", self.source)
        if not isinstance(max_log2_steps, int) or not 1 <= max_log2_steps <= 16:
            raise ValueError(f"max_log2_steps must be an int in [1, 16], got {max_log2_steps!r}")
        if not 0.0 <= consistency_share <= 1.0:
            raise ValueError(f"consistency_share must lie in [0, 1], got {consistency_share}")
        self.max_log2_steps = max_log2_steps
        self.consistency_share = float(consistency_share)

    def consistency_rows(self, batch: int) -> int:
        """n_c: rows [0, n_c) get self-consistency targets, rows [n_c, B) flow matching."""
        return int(round(batch * self.consistency_share))

    def consistency_times(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(s, d) for n consistency samples: 2d = 2^-m, m ~ U{0..k-1}; s = 2d i, i ~ U{1..2^m}."""
        m = torch.randint(0, self.max_log2_steps, (n,), device=like.device)
        two_d = torch.pow(2.0, -m.float())  # dyadic: exact in float32, as is 2d * i
        i = (
            torch.floor(torch.rand(n, device=like.device) * torch.pow(2.0, m.float())).clamp_max(
                torch.pow(2.0, m.float()) - 1
            )
            + 1
        )
        return times_like(two_d * i, like), times_like(two_d / 2, like)

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor, dict]:
        """Consistency rows: (s, s - 2d) on the dyadic grid; flow-matching rows: s = t ~ U[0, 1]; extra d (0 there)."""
        n_c = self.consistency_rows(batch)
        s_c, d = self.consistency_times(n_c, x0)
        s_fm = times_like(torch.rand(batch - n_c, device=x0.device), x0)
        s, t = torch.cat([s_c, s_fm]), torch.cat([(s_c - 2 * d).clamp_min(0), s_fm])
        return s, t, {"d": torch.cat([d, torch.zeros_like(s_fm)])}

    def loss(self, d: Draw, student: nn.Module, teacher, target: nn.Module, step: int) -> LossOutput:
        n_c = self.consistency_rows(d.batch)
        c, fm = d.rows(slice(0, n_c)), d.rows(slice(n_c, None))
        with torch.no_grad():
            v = self.velocity(teacher, fm)  # flow matching at d = 0
            u_c = self.consistency_target(target, c, teacher).to(v.dtype)
            u_tgt, finite, n_bad = mask_nonfinite(torch.cat([u_c, v]))
        u = d.u(student, d.x_s, d.s, d.t)  # the one with-grad forward, over the whole batch
        loss = sq_norm(u - u_tgt) / d.x0[0].numel() * finite
        return LossOutput(
            loss=loss,
            logs={
                "flow_matching": loss.detach()[n_c:].mean() if n_c < d.batch else loss.new_zeros(()),  # rows [n_c, B)
                "consistency": loss.detach()[:n_c].mean() if n_c > 0 else loss.new_zeros(()),
                "step_size": (d.s - d.t).float(),  # 2d per sample (0 for flow matching)
                "nonfinite_targets": n_bad.float(),
            },
        )

    @torch.no_grad()
    def consistency_target(self, target: nn.Module, c: Draw, teacher=None) -> Tensor:
        """sg[(u1 + u2) / 2] with two d-steps of the target; d = 0 queries at the finest level (the teacher's
        velocity there with ``anchor="teacher"``). (n, *data_shape)."""
        x, s, d = c.x_s, c.s, c.extra["d"]
        if x.shape[0] == 0:
            return x.new_zeros(x.shape)
        finest = d <= 2.0**-self.max_log2_steps * (1 + 1e-6)
        d_query = torch.where(finest, torch.zeros_like(d), d)  # step size the target is asked for
        anchored = self.anchor == "teacher"
        fine = expand_like(finest, x).bool() if anchored else None
        u1 = c.u(target, x, s, s - d_query)
        if anchored:
            u1 = torch.where(fine, self.velocity(teacher, c, x, s).to(u1.dtype), u1)
        x_mid = x - expand_like(d, x) * u1  # X(x, s, s - d)
        s_mid = (s - d).clamp_min(0)
        u2 = c.u(target, x_mid, s_mid, (s_mid - d_query).clamp_min(0))
        if anchored:
            u2 = torch.where(fine, self.velocity(teacher, c, x_mid, s_mid).to(u2.dtype), u2)
        return 0.5 * (u1 + u2)
