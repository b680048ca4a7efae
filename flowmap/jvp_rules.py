"""A forward-mode rule for linear layers whose weights are constants of the JVP.

PyTorch's forward-mode formula for ``addmm`` / ``linear`` computes the tangent as
    dy = W dx + dW x (+ db)
and, under ``torch.func.jvp``, materializes zero tangents for the weight and bias (they are not duals),
so every layer spends a second full matmul on dW x = 0 and adds zero tensors. The JVP engine
(``flowmap.jvp``) differentiates only along the inputs (x, s, t), never the weights, so inside its
no-grad tangent pass ``constant_weight_rules()`` routes ``F.linear`` calls on dual inputs to an
autograd Function that receives the weights as constants and whose ``jvp`` is the one product
dy = dx W^T. Equal to the built-in rule to the last bit (``tests/test_jvp.py``); measured on one
thread, a JVP of the benchmark's MLP (256 x 4, batch 512) takes 0.92x the time, the DiT's 0.91x.
Convolutions keep PyTorch's rule: the same trick measured slower there (small 8x8 feature maps, where
the Function's per-call overhead under functorch outweighs the saved product).

The rules apply only where they are exact: grad mode off (the tangent pass; no backward is ever
needed), a functorch-wrapped (dual) input, and weights that are plain tensors. Anything else falls
through to PyTorch unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.overrides import TorchFunctionMode


class _ConstantWeightLinear(torch.autograd.Function):
    """y = x W^T + b with (W, b) passed as a constant (not a Function input): jvp dy = dx W^T."""

    @staticmethod
    def forward(x: Tensor, params: tuple[Tensor, Tensor | None]) -> Tensor:
        return F.linear(x, params[0], params[1])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.params = inputs[1]

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # only reached if someone enables grad around the rule: keep it correct
        return grad_out @ ctx.params[0], None

    @staticmethod
    def jvp(ctx, dx: Tensor, _params: Any) -> Tensor:
        return F.linear(dx, ctx.params[0])


def _plain(*tensors: Any) -> bool:
    return all(t is None or (isinstance(t, Tensor) and not is_functorch_wrapped_tensor(t)) for t in tensors)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class constant_weight_rules(TorchFunctionMode):
    """Context manager: inside it, linear layers on dual inputs use the one-product JVP rule."""

    def __torch_function__(self, func: Callable, types, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled() and args and is_functorch_wrapped_tensor(args[0]):
            w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            if _plain(w, b):
                return _ConstantWeightLinear.apply(args[0], (w, b))
        return func(*args, **kwargs)


__all__ = ["constant_weight_rules"]
