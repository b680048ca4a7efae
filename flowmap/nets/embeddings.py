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

import torch
from torch import Tensor, nn

from flowmap.fourier import FourierTime  # noqa: F401  (its former home: kept importable from here)


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
    Fourier features (highest frequency ~ time_scale rad per unit time). The default 10 keeps the features smooth
    on the scale a sampler steps: the JVP-based students (MeanFlow, sCM, AYF, FMSD) differentiate them in time, and
    at DDPM's 1000 (a period of 0.006) the derivative follows the embedding's ripple, not the flow (Lu & Song 2024,
    Sec. 4.1, on the time-conditioning's scale; docs/method_failures.md, "Digits")."""

    def __init__(
        self,
        dim: int,
        num_classes: int = 0,
        guidance_input: bool = False,
        freq_dim: int = 128,
        time_scale: float = 10.0,
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
