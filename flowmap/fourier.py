"""Sinusoidal features of a scalar, shared by the networks' time embeddings (``flowmap.nets.embeddings``) and
learned loss weights over time (sCM's log-variance, ``flowmap.objectives.scm``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FourierTime(nn.Module):
    """Sinusoidal features of a scalar (Vaswani et al. 2017; Ho et al. 2020): (B,) -> (B, dim)."""

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale

    def forward(self, tau: Tensor) -> Tensor:
        # Features in float32 (float64 for a float64 net); the phases scale * tau * freq reach ~1e3 rad,
        # so they are formed in float64 (float32 would leave ~6e-5 rad of error, which JVPs amplify).
        out_dtype = torch.promote_types(self.freqs.dtype, torch.float32)
        wide = torch.float32 if tau.device.type == "mps" else torch.float64
        args = (self.scale * tau.to(wide))[:, None] * self.freqs[None].to(wide)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(out_dtype)
