"""Conditioning embeddings shared by every backbone: times (s, t), class label, guidance scale.

    c = emb(s) + emb_d(s - t) [+ emb_w(w)] + emb_y(y)

s is the current time (where x lives) and t the time of the jump's end, so the network is conditioned
on the current time and the interval (MeanFlow's (t, t - r), Geng et al. 2025, Sec. 4.3).

emb_d's and emb_w's last layers start at zero, so a fresh net's output does not depend on the
interval s - t or on w: a teacher (always s = t) and a student initialized from it compute the same
function, u(x, s, t) = v(x, s), i.e. the student starts as the teacher's Euler step (Geng et al.
2024, ECT; Sabour et al. 2025, Sec. 4). Embeddings compute in float32 even under autocast
(Lu & Song 2024, Sec. 4.1: float32 time embeddings keep sCM's JVP stable).
"""

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


def _embedding_mlp(dim: int, out: int, zero_last: bool, scale: float = 1000.0) -> nn.Sequential:
    mlp = nn.Sequential(FourierTime(dim, scale=scale), nn.Linear(dim, out), nn.SiLU(), nn.Linear(out, out))
    if zero_last:
        nn.init.zeros_(mlp[-1].weight)
        nn.init.zeros_(mlp[-1].bias)
    return mlp


class ConditionEmbedding(nn.Module):
    """(s, t, y, w) -> (B, dim) conditioning vector, computed in float32.

    y: (B,) long in [0, num_classes] (num_classes = null label) or None (-> null label).
    w: (B,) guidance scale, only when ``guidance_input``. ``time_scale`` multiplies s and s - t before the
    Fourier features (highest frequency ~ time_scale rad per unit time): 1000 is the DDPM convention; JVP-based
    students (MeanFlow, sCM) train faster and more stably with a small scale (e.g. 10), since the tangent
    differentiates the features in time (Lu & Song 2024, Sec. 4.1, on the time-conditioning's scale)."""

    def __init__(
        self,
        dim: int,
        num_classes: int = 0,
        guidance_input: bool = False,
        freq_dim: int = 128,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.guidance_input = bool(guidance_input)
        self.emb_t = _embedding_mlp(freq_dim, dim, zero_last=False, scale=time_scale)
        self.emb_d = _embedding_mlp(freq_dim, dim, zero_last=True, scale=time_scale)
        self.emb_w = _embedding_mlp(freq_dim, dim, zero_last=True) if guidance_input else None
        self.emb_y = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        if self.emb_y is not None:
            nn.init.normal_(self.emb_y.weight, std=0.02)

    def forward(self, s: Tensor, t: Tensor, y: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            c = self.emb_t(s) + self.emb_d(
                s - t
            )  # current time s; FourierTime casts to float32 (float64 for a float64 net)
            if self.emb_w is not None:
                if w is None:
                    w = torch.ones_like(t)
                c = c + self.emb_w(w / 10.0)  # scale so w in [0, 10] spans the Fourier range like t
            if self.emb_y is not None:
                if y is None:
                    y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
                c = c + self.emb_y(y)
        return c
