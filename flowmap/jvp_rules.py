"""Forward-mode rules for linear and convolution layers whose weights are constants of the JVP.

PyTorch's forward-mode formulas for ``addmm`` / ``linear`` and ``convolution`` compute the tangent as
    dy = W dx + dW x (+ db)
and, under ``torch.func.jvp``, materialize zero tangents for the weights and bias (they are not duals),
so every layer spends a second full matmul (or convolution) on dW x = 0 and adds zero tensors.
The JVP engine (``flowmap.jvp``) differentiates only along the inputs (x, s, t), never the weights,
so inside its no-grad tangent pass ``constant_weight_rules()`` routes ``F.linear`` / ``F.conv1d`` /
``F.conv2d`` / ``F.conv3d`` calls on dual inputs to autograd Functions that receive the weights as
constants and whose ``jvp`` is the one product dy = W dx. Measured in ``scripts/benchmark.py`` (cost
tables) and exact to the last bit against the built-in rules (``tests/test_jvp.py``).

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


_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


class _ConstantWeightConv(torch.autograd.Function):
    """y = conv(x, W, b) with (conv, W, b, stride, padding, dilation, groups) constant: jvp dy = conv(dx, W)."""

    @staticmethod
    def forward(x: Tensor, spec: tuple) -> Tensor:
        conv, w, b, *rest = spec
        return conv(x, w, b, *rest)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.spec = inputs[1]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        raise RuntimeError("flowmap.jvp_rules: the constant-weight convolution serves no-grad JVP passes only")

    @staticmethod
    def jvp(ctx, dx: Tensor, _spec: Any) -> Tensor:
        conv, w, _b, *rest = ctx.spec
        return conv(dx, w, None, *rest)


def _plain(*tensors: Any) -> bool:
    return all(t is None or (isinstance(t, Tensor) and not is_functorch_wrapped_tensor(t)) for t in tensors)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class constant_weight_rules(TorchFunctionMode):
    """Context manager: inside it, linear and convolution layers on dual inputs use the one-product JVP rule."""

    def __torch_function__(self, func: Callable, types, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if (func is F.linear or func in _CONV) and not torch.is_grad_enabled() and args and is_functorch_wrapped_tensor(args[0]):
            w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            if _plain(w, b):
                if func is F.linear:
                    return _ConstantWeightLinear.apply(args[0], (w, b))
                rest = (_arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0),
                        _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1))
                return _ConstantWeightConv.apply(args[0], (func, w, b, *rest))
        return func(*args, **kwargs)


__all__ = ["constant_weight_rules"]
