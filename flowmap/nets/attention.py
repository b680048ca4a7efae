"""Scaled dot-product attention with its own forward-mode (JVP) rule.

PyTorch's fused attention kernels (flash, memory-efficient, the CPU flash kernel) have no
forward-mode AD formula (pytorch#128971, #117629), so ``torch.func.jvp`` through a transformer
either fails or needs plain math attention for the whole net. ``attention`` keeps the fused kernel
for the primal output and adds the tangent in closed form (Lu & Song 2024, App. F), query block by
query block so memory stays O(block x N) instead of O(N^2) per head:

    S = q k^T / sqrt(d),  P = softmax(S),  O = P v
    dS = (dq k^T + q dk^T) / sqrt(d)
    dO = P dv + (P * dS) v - rowsum(P * dS) O

Under ``torch.func.jvp`` the rule is an autograd Function with a ``jvp`` (``_FusedAttention``); on
``torch.autograd.forward_ad`` dual tensors the primals and tangents are unpacked and repacked directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.autograd import forward_ad

from flowmap.jvp_rules import tangent_mode


def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    block: int = 1024,
) -> Tensor:
    """Tangent of O = softmax(q k^T / sqrt(d)) v. Shapes (B, H, N, d); computed in at least float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    dt = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, of = q.to(dt), k.to(dt), v.to(dt), out.to(dt)
    dqf = torch.zeros_like(qf) if dq is None else dq.to(dt)
    dkf = torch.zeros_like(kf) if dk is None else dk.to(dt)
    dvf = torch.zeros_like(vf) if dv is None else dv.to(dt)
    chunks = []
    for i in range(0, q.shape[-2], block):
        sl = slice(i, i + block)
        P = torch.softmax(qf[..., sl, :] @ kf.transpose(-2, -1) * scale, dim=-1)
        dS = (dqf[..., sl, :] @ kf.transpose(-2, -1) + qf[..., sl, :] @ dkf.transpose(-2, -1)) * scale
        PdS = P * dS
        chunks.append(P @ dvf + PdS @ vf - PdS.sum(-1, keepdim=True) * of[..., sl, :])
    return torch.cat(chunks, dim=-2).to(q.dtype)


class _FusedAttention(torch.autograd.Function):
    """Fused SDPA forward, SDPA-recompute backward, closed-form JVP."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, output)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_(True) for a in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves)
        return torch.autograd.grad(out, leaves, grad_out)

    @staticmethod
    def jvp(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None) -> Tensor:
        q, k, v, out = ctx.saved_tensors
        return attention_jvp(q, k, v, out, dq, dk, dv)


def _dual_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """forward_ad dual tensors: unpack, fused kernel on the primals, closed-form tangent, pack (no Function)."""
    (qp, dq), (kp, dk), (vp, dv) = (forward_ad.unpack_dual(a) for a in (q, k, v))
    out = F.scaled_dot_product_attention(qp, kp, vp)
    with tangent_mode():  # no_grad under ``jvp(..., with_grad=True)`` (the primal is then the with-grad forward)
        dout = attention_jvp(qp, kp, vp, out, dq, dk, dv)
    return forward_ad.make_dual(out, dout)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, H, N, d) tensors, with a forward-mode rule."""
    if torch.compiler.is_compiling():  # no tangents here: flowmap.compiled runs JVP passes eager (no graph break)
        return F.scaled_dot_product_attention(q, k, v)
    if any(is_functorch_wrapped_tensor(a) for a in (q, k, v)):
        return _FusedAttention.apply(q, k, v)
    if any(forward_ad.unpack_dual(a).tangent is not None for a in (q, k, v)):
        return _dual_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The reference: explicit softmax, differentiable in both modes by PyTorch itself."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
