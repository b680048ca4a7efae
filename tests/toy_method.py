"""A whole flow-map method in one file, for tests/test_method_template.py: the template (``Objective``) draws
(s, t), the noise, x_s and the guidance; the method names its time law and writes its loss.

    L = ||u(x_s, s, s) - v(x_s, s)||^2 + ||X(x_s, s, t) - sg X(X(x_s, s, m), m, t)||^2,    m = (s + t) / 2

flow matching of the diagonal onto the teacher's velocity, and the semigroup property of the flow map.
Its students sample with re-noising gamma 0.5 (a non-default, so the tests see it travel with the student)."""

from __future__ import annotations

import torch
from torch import nn

from flowmap.objectives.base import Draw, Objective, shared, sq_norm
from flowmap.types import LossOutput


class ToySemigroup(Objective):
    """Diagonal flow matching + semigroup consistency; per-sample loss (B,)."""

    name = "toy_semigroup"
    sampler_gamma = 0.5

    def __init__(self, time_dist: str = "uniform", equal_share: float = 0.25, guidance: float = 1.0) -> None:
        super().__init__(**shared(locals()))

    def loss(self, d: Draw, student: nn.Module, teacher, target: nn.Module, step: int) -> LossOutput:
        m = 0.5 * (d.s + d.t)
        fm = sq_norm(d.u(student, d.x_s, d.s, d.s) - self.velocity(teacher, d))
        with torch.no_grad():
            X_tgt = d.X(target, d.X(target, d.x_s, d.s, m), m, d.t)
        semigroup = sq_norm(d.X(student, d.x_s, d.s, d.t) - X_tgt)
        return LossOutput(loss=fm + semigroup, logs={"fm": fm.detach(), "semigroup": semigroup.detach()})
