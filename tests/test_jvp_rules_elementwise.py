"""The shared pass's elementwise rules (flowmap/jvp_rules.py: add, sub, mul, div with tensors, numbers and
broadcasting): the tangent equals torch.func.jvp's in float64, the primal and its gradients equal a plain forward's."""

from __future__ import annotations

import torch

from flowmap.jvp import jvp


def fn(x: torch.Tensor, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d = (1 + s[:, None]) * 2.0 - s[:, None] / 3.0  # number on either side, a (B, 1) tensor
    y = (x * d + w) / d - x.sub(w, alpha=0.5)  # broadcasting to (B, D), tensor / tensor, alpha
    return torch.div(y, 1.5 + x * x) + 2.0 / (1.0 + s[:, None]) * x  # torch.div, number / tensor


def _count(fired: list, func, out):
    if out is not None:
        fired.append(func)
    return out


def test_elementwise_rules_match_pytorch_and_keep_the_gradients(monkeypatch):
    from flowmap import jvp_rules

    fired = []
    for func, rule in list(jvp_rules._DUAL_RULES.items()):
        monkeypatch.setitem(
            jvp_rules._DUAL_RULES,
            func,
            lambda args, kwargs, rule=rule, func=func: _count(fired, func, rule(args, kwargs)),
        )
    g = torch.Generator().manual_seed(0)
    x, dx = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    s, ds = torch.rand(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)  # a weight: gradient, no tangent
    _, d_ref = torch.func.jvp(lambda a, b: fn(a, b, w.detach()), (x, s), (dx, ds))
    out, dout = jvp(lambda a, b: fn(a, b, w), (x, s), (dx, ds), with_grad=True)
    assert out.requires_grad and not dout.requires_grad
    names = {getattr(f, "__name__", str(f)) for f in fired}
    assert {"div", "__rdiv__", "mul", "add", "sub"} <= names, names  # each rule fired
    assert torch.allclose(dout, d_ref, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), w)
    (grad_ref,) = torch.autograd.grad(fn(x, s, w).pow(2).sum(), w)
    assert torch.allclose(grad, grad_ref, rtol=1e-12, atol=0)
