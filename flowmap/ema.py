"""Exponential moving averages of parameters: EMA target networks (part of an algorithm, e.g. the
consistency target theta^- of Song et al. 2023, Eq. 8) and evaluation EMA (Karras et al. 2022)."""

from __future__ import annotations

import copy

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
        torch._foreach_lerp_(t_params, [p.detach().to(q.dtype) for p, q in zip(s_params, t_params)],
                             [weight.to(q.device, q.dtype) for q in t_params])
    elif decay == 0.0:
        torch._foreach_copy_(t_params, [p.detach() for p in s_params])
    else:
        torch._foreach_lerp_(t_params, [p.detach().to(q.dtype) for p, q in zip(s_params, t_params)], 1.0 - decay)
    for tb, sb in zip(target.buffers(), source.buffers()):
        tb.copy_(sb)
