"""Sinusoidal features of a scalar, shared by the networks' time embeddings (``flowmap.nets.embeddings``) and
learned loss weights over time (sCM's log-variance, ``flowmap.objectives.scm``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from flowmap.jvp_rules import tangent_mode


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
        # Features in float32 (float64 for a float64 net). The phases scale * tau * freq reach ~1e3 rad, so they
        # are formed in float64 (float32 would leave ~6e-5 rad of error, which JVPs amplify) and, for a float32
        # net, reduced modulo 2 pi before the float32 cos / sin (error ~5e-7 rad; float64 cos / sin cost ~10x).
        # A forward_ad dual tau (a JVP's tangent pass) takes the closed-form tangent below: no second cos / sin.
        tau, dtau = forward_ad.unpack_dual(tau) if forward_ad._current_level >= 0 else (tau, None)
        out_dtype = torch.promote_types(self.freqs.dtype, torch.float32)
        wide = torch.float32 if tau.device.type == "mps" else torch.float64
        freqs = self.scale * self.freqs[None].to(wide)
        args = tau.to(wide)[:, None] * freqs
        if out_dtype != wide:
            args = torch.remainder(args, 2.0 * math.pi).to(out_dtype)
        cos, sin = torch.cos(args), torch.sin(args)
        out = torch.cat([cos, sin], dim=1).to(out_dtype)
        if dtau is None:
            return out
        with tangent_mode():  # d/dtau [cos a, sin a] = scale freqs dtau [-sin a, cos a]
            da = (dtau.to(wide)[:, None] * freqs).to(out_dtype)
            dout = torch.cat([-sin * da, cos * da], dim=1).to(out_dtype)
        return forward_ad.make_dual(out, dout)
