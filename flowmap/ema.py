"""Exponential moving averages of parameters: EMA target networks (part of an algorithm, e.g. the
consistency target theta^- of Song et al. 2023, Eq. 8) and evaluation EMA (Karras et al. 2022).

The evaluation EMA is set by its half-life h (``EMASchedule``): after T steps of constant decay
beta = 0.5 ** (1 / h), the update of step k carries the weight (1 - beta) beta^(T - 1 - k), so the
last q T steps hold 1 - 0.5 ** (q T / h) of the average and the initialization 0.5 ** (T / h).
A half-life given as a fraction of the run scales with it (Karras et al. 2024, EDM2, Sec. 3.1, who
measure the EMA length relative to the training time), so a 50-step run and a 50k-step run both
export an average of their last steps rather than of their initialization."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with requires_grad=False, in eval mode: a target network or a frozen teacher."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone.eval()


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float, active: torch.Tensor | None = None) -> None:
    """theta^- <- decay * theta^- + (1 - decay) * theta (Song et al. 2023, Eq. 8). Buffers are copied.

    ``active``: a 0-d bool tensor; where false the parameters stay as they are (decided on the device, no host read)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    t_params = list(target.parameters())
    s_params = list(source.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("EMA target and source have different parameter lists")
    if active is not None:  # lerp weight (1 - decay) or 0; a weight of 1 (decay 0) gives the source exactly
        weight = torch.where(active, 1.0 - decay, 0.0)
        torch._foreach_lerp_(
            t_params,
            [p.detach().to(q.dtype) for p, q in zip(s_params, t_params)],
            [weight.to(q.device, q.dtype) for q in t_params],
        )
    elif decay == 0.0:
        torch._foreach_copy_(t_params, [p.detach() for p in s_params])
    else:
        torch._foreach_lerp_(t_params, [p.detach().to(q.dtype) for p, q in zip(s_params, t_params)], 1.0 - decay)
    for tb, sb in zip(target.buffers(), source.buffers()):
        tb.copy_(sb)


def halflife_decay(halflife_steps: float) -> float:
    """The per-step decay beta = 0.5 ** (1 / h) whose weights halve every h steps."""
    if not halflife_steps > 0:
        raise ValueError(f"an EMA half-life must be positive, got {halflife_steps}")
    return math.exp(-math.log(2.0) / halflife_steps)


@dataclass(frozen=True)
class EMASchedule:
    """Decay of the evaluation EMA at optimizer step k (0-based): ``schedule(k) -> beta``.

    halflife: in steps when >= 1, else a fraction of the run: of ``total_steps`` (trainer.max_steps)
        when the run's length is known, else of the steps taken so far (h = halflife (k + 1), which
        grows with the run like EDM2's power EMA).
    decay: an explicit constant decay; overrides ``halflife`` (the old ``ema_decay`` setting).
    """

    halflife: float = 0.1
    total_steps: int | None = None
    decay: float | None = None

    def __post_init__(self) -> None:
        if self.decay is not None and not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {self.decay}")
        if self.decay is None and not self.halflife > 0:
            raise ValueError(
                f"ema_halflife must be positive (steps if >= 1, a fraction of the run if < 1), got {self.halflife}"
            )

    def halflife_steps(self, step: int) -> float:
        """The half-life in steps at step k."""
        if self.halflife >= 1:
            return float(self.halflife)
        if self.total_steps is not None and self.total_steps > 0:
            return self.halflife * self.total_steps
        return self.halflife * (step + 1)

    def __call__(self, step: int) -> float:
        if self.decay is not None:
            return float(self.decay)
        return halflife_decay(self.halflife_steps(step))
