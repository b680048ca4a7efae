"""Forward-mode rules the JVP engine (``flowmap.jvp``) installs for its tangent pass.

The engine differentiates only along the inputs (x, s, t), never the weights, so every weight is a
constant of the JVP. Two sets of rules use that:

* ``constant_weight_rules()`` (backend ``"func"``, ``torch.func.jvp``). PyTorch's forward-mode formula
  for ``linear`` computes dy = W dx + dW x (+ db) and, under ``torch.func.jvp``, materializes zero
  tangents for the weight and bias, so every layer spends a second full matmul on dW x = 0. Inside the
  no-grad tangent pass, ``F.linear`` on a functorch-wrapped input goes to an autograd Function whose
  ``jvp`` is the one product dy = dx W^T. Bit-identical to the built-in rule (``tests/test_jvp.py``).
  Other layers keep PyTorch's rules: an autograd Function costs a fixed overhead per call under
  functorch that, for layer norms and activations on small tensors, exceeds what it saves.

* ``dual_rules()`` (backend ``"forward_ad"``, ``torch.autograd.forward_ad`` dual tensors). Here a rule
  needs no autograd Function: it unpacks the dual input into (primal, tangent), computes both with
  ordinary ops and packs the result, one call per layer and no zero tangents:

      linear      y = x W^T + b                      dy = dx W^T
      conv2d      y = conv(x, W) + b                 dy = conv(dx, W)
      layer_norm  y = xhat w + b,  xhat = (x - mu) r dy = w r (dx - mean(dx) - xhat mean(dx xhat))
      group_norm  the same per (example, group), w and b per channel
      gelu, silu  y = f(x)                           dy = f'(x) dx   (PyTorch's own backward kernels; not under
                                                                      grad, where they have no derivative)

  (r = 1 / sqrt(var + eps), means over the normalized dims; the bracket is symmetric in dx, so it is the norm's own
  backward kernel applied to dx, one fused call, except in a with-grad JVP, which needs the composite form's graph).
  Attention has its own rule in
  ``flowmap.nets.attention``. The rules equal PyTorch's formulas up to float round-off (tests/test_jvp.py).

A rule applies only where it is exact: a dual input and weights that carry no tangent. Anything else
falls through to PyTorch unchanged.

``dual_rules(detach_tangents=True)`` is the mode of ``flowmap.jvp.jvp(..., with_grad=True)``: the primal of every
rule is the ordinary forward in the ambient grad mode (autograd records it: it is the loss's with-grad forward), and
the tangent is computed under ``no_grad`` (a stop-gradient target), so one pass gives both. GELU and SiLU then use
their rules under grad as well (their tangent is never differentiated).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.autograd import forward_ad
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


# --- forward_ad dual tensors ------------------------------------------------------------------------


# The rules run several times per layer of a pass, so they unpack and pack duals with the primitives that
# ``forward_ad.unpack_dual`` / ``make_dual`` wrap, without the wrappers' per-call checks (environment look-up,
# export-mode scan, dtype checks): the engine's own ``make_dual`` of the inputs (``flowmap.jvp``) made them.


_VF_UNPACK, _VF_MAKE = torch._C._VariableFunctions._unpack_dual, torch._C._VariableFunctions._make_dual


def _unpack(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(primal, tangent or None) of ``x`` at the current forward-AD level (``forward_ad.unpack_dual``)."""
    level = forward_ad._current_level
    return (x, None) if level < 0 else _VF_UNPACK(x, level=level)


def _pack(y: Tensor, dy: Tensor) -> Tensor:
    """The dual tensor (y, dy) at the current level (``forward_ad.make_dual``; dy of y's dtype and shape)."""
    return _VF_MAKE(y, dy, level=forward_ad._current_level)


def _tangent_free(*tensors: Any) -> bool:
    """No tensor carries a tangent (a parameter never does: the dual of one is a plain tensor)."""
    return all(
        t is None or type(t) is nn.Parameter or (isinstance(t, Tensor) and _unpack(t)[1] is None) for t in tensors
    )


def _dual_input(x: Any) -> tuple[Tensor, Tensor | None]:
    if not isinstance(x, Tensor):
        return x, None
    return _unpack(x)


_DETACHED = [0]  # depth of active ``dual_rules(detach_tangents=True)`` modes


def tangents_detached() -> bool:
    """True inside ``dual_rules(detach_tangents=True)``: rules compute tangents under no_grad."""
    return _DETACHED[0] > 0


class _GradOff:
    """``torch.no_grad()`` without its per-call decorator machinery (a rule enters it once per layer)."""

    __slots__ = ("prev",)

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc) -> None:
        torch._C._set_grad_enabled(self.prev)


_AMBIENT = contextlib.nullcontext()


def tangent_mode() -> contextlib.AbstractContextManager:
    """The context a rule computes its tangent in: ``no_grad`` when tangents are detached, else the ambient mode.
    (``make_dual`` stays outside it: under no_grad it would cut the primal from autograd.)"""
    return _GradOff() if _DETACHED[0] > 0 else _AMBIENT


def _normalized_tangent(x: Tensor, dx: Tensor, mean: Tensor, rstd: Tensor, dims: tuple[int, ...]) -> Tensor:
    """r (dx - mean(dx) - xhat mean(dx xhat)), xhat = (x - mean) r; mean, rstd broadcastable to x. The composite
    form, differentiable (a with-grad JVP whose derivative is trained); otherwise the norms' fused kernels."""
    xhat = (x - mean) * rstd
    dxc = dx - dx.mean(dim=dims, keepdim=True)
    return torch.addcmul(dxc, xhat, (dxc * xhat).mean(dim=dims, keepdim=True), value=-1.0).mul_(rstd)


def _linear(args: tuple, kwargs: dict) -> Tensor | None:
    x, dx = _dual_input(args[0])
    w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if dx is None or not _tangent_free(w, b):
        return None
    y = F.linear(x, w, b)
    with tangent_mode():
        dy = F.linear(dx, w)
    return _pack(y, dy)


def _conv2d(args: tuple, kwargs: dict) -> Tensor | None:
    x, dx = _dual_input(args[0])
    w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if dx is None or not _tangent_free(w, b):
        return None
    rest = [
        _arg(args, kwargs, i, name, d)
        for i, (name, d) in enumerate((("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)), 3)
    ]
    y = F.conv2d(x, w, b, *rest)
    with tangent_mode():
        dy = F.conv2d(dx, w, None, *rest)
    return _pack(y, dy)


def _layer_norm(args: tuple, kwargs: dict) -> Tensor | None:
    x, dx = _dual_input(args[0])
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    if dx is None or not _tangent_free(w, b):
        return None
    x = x.contiguous()  # the kernels' own copy of a strided input, made once for the primal, tangent and backward
    y, mean, rstd = torch.native_layer_norm(x, shape, w, b, float(_arg(args, kwargs, 4, "eps", 1e-5)))
    with tangent_mode():
        if _traced(x, dx):
            dy = _normalized_tangent(x, dx, mean, rstd, tuple(range(-len(shape), 0)))
        else:  # the Jacobian of (x - mu) r is symmetric: the backward kernel (no weight) applied to dx, one call
            mask = [True, False, False]
            dy = torch.ops.aten.native_layer_norm_backward(dx, x, shape, mean, rstd, None, None, mask)[0]
        dy = dy if w is None else dy.mul_(w)
    return _pack(y, dy)


def _group_norm(args: tuple, kwargs: dict) -> Tensor | None:
    x, dx = _dual_input(args[0])
    groups = int(_arg(args, kwargs, 1, "num_groups"))
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    if dx is None or not _tangent_free(w, b) or x.dim() < 2:
        return None
    n, c = x.shape[:2]
    y, mean, rstd = torch.native_group_norm(
        x, w, b, n, c, x[0, 0].numel(), groups, float(_arg(args, kwargs, 4, "eps", 1e-5))
    )
    with tangent_mode():
        if _traced(x, dx):
            xg, dxg = x.reshape(n, groups, -1), dx.reshape(n, groups, -1)
            dy = _normalized_tangent(xg, dxg, mean.reshape(n, groups, 1), rstd.reshape(n, groups, 1), (-1,))
            dy = dy.reshape(x.shape)
        else:  # the per-group Jacobian is symmetric: the backward kernel (no weight) applied to dx, one call
            dy = torch.ops.aten.native_group_norm_backward(
                dx, x, mean, rstd, None, n, c, x[0, 0].numel(), groups, [True, False, False]
            )[0]
        if w is not None:
            dy = dy.mul_(w.reshape(1, c, *([1] * (x.dim() - 2))))
    return _pack(y, dy)


def _traced(*tensors: Tensor) -> bool:
    """Autograd records these tangents (a with-grad JVP, whose derivative is itself trained)."""
    return not tangents_detached() and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _gelu(args: tuple, kwargs: dict) -> Tensor | None:
    x, dx = _dual_input(args[0])
    if dx is None or _traced(x, dx):  # the backward kernels' own derivatives: PyTorch's rule is the safe one
        return None
    approximate = _arg(args, kwargs, 1, "approximate", "none")
    y = F.gelu(x, approximate=approximate)
    with tangent_mode():
        dy = torch.ops.aten.gelu_backward(dx, x, approximate=approximate)
    return _pack(y, dy)


def _silu(args: tuple, kwargs: dict) -> Tensor | None:
    x, dx = _dual_input(args[0])
    if dx is None or _arg(args, kwargs, 1, "inplace", False) or _traced(x, dx):
        return None
    y = F.silu(x)
    with tangent_mode():
        dy = torch.ops.aten.silu_backward(dx, x)
    return _pack(y, dy)


def _elementwise(kind: str, swap: bool = False) -> Callable[[tuple, dict], Tensor | None]:
    """add / sub / mul / div of a dual tensor with a tensor or number, only when tangents are detached (the shared
    pass): the primal op sees primals only, so autograd saves no tangent for the backward (PyTorch's own rule would
    keep every tangent its with-grad op saves alive until the backward) and records no graph for the tangent; the
    division's tangent (da - y db) / b in plain ops (PyTorch's runs a Python decomposition, ~1 ms a call on CPU)."""

    def rule(args: tuple, kwargs: dict) -> Tensor | None:
        if not tangents_detached() or len(args) != 2 or set(kwargs) - ({"alpha"} if kind != "div" else set()):
            return None
        (a, da), (b, db) = _dual_input(args[1] if swap else args[0]), _dual_input(args[0] if swap else args[1])
        if da is None and db is None:
            return None
        alpha = kwargs.get("alpha", 1)
        if kind == "mul":
            y = a * b
        elif kind == "div":
            y = a / b
        else:
            y = (torch.add if kind == "add" else torch.sub)(a, b, alpha=alpha)
        with _GradOff():
            if kind == "mul":  # da b + a db (PyTorch's formula, the same round-off)
                dy = (a * db) if da is None else (da * b)
                if da is not None and db is not None:
                    dy = dy.add_(a * db) if dy.shape == y.shape else dy + a * db
            elif kind == "div":  # (da - y db) / b
                dy = (da / b) if db is None else ((-(y * db) if da is None else da - y * db) / b)
            else:
                sign = alpha if kind == "add" else -alpha
                if db is None:
                    dy = da
                elif da is None:
                    dy = db if sign == 1 else db * sign
                else:
                    dy = torch.add(da, db, alpha=sign)
            if dy.shape != y.shape:
                dy = torch.broadcast_to(dy, y.shape)
            if dy.dtype != y.dtype:
                dy = dy.to(y.dtype)
        return _pack(y, dy)

    return rule


_DUAL_RULES: dict[Callable, Callable[[tuple, dict], Tensor | None]] = {
    Tensor.__mul__: _elementwise("mul"),
    Tensor.__rmul__: _elementwise("mul", swap=True),
    Tensor.mul: _elementwise("mul"),
    torch.mul: _elementwise("mul"),
    Tensor.__add__: _elementwise("add"),
    Tensor.__radd__: _elementwise("add", swap=True),
    Tensor.add: _elementwise("add"),
    torch.add: _elementwise("add"),
    Tensor.__truediv__: _elementwise("div"),
    Tensor.__rtruediv__: _elementwise("div", swap=True),
    Tensor.div: _elementwise("div"),
    torch.div: _elementwise("div"),
    Tensor.__sub__: _elementwise("sub"),
    Tensor.sub: _elementwise("sub"),
    torch.sub: _elementwise("sub"),
    F.linear: _linear,
    F.conv2d: _conv2d,
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.gelu: _gelu,
    F.silu: _silu,
}


class dual_rules(TorchFunctionMode):
    """Context manager: inside it, the layers in ``_DUAL_RULES`` on forward_ad dual inputs use the rules above.

    detach_tangents: compute every rule's tangent under no_grad (primals keep the ambient grad mode)."""

    def __init__(self, detach_tangents: bool = False) -> None:
        super().__init__()
        self.detach_tangents = bool(detach_tangents)

    def __enter__(self):
        _DETACHED[0] += self.detach_tangents
        try:
            return super().__enter__()
        except BaseException:
            _DETACHED[0] -= self.detach_tangents
            raise

    def __exit__(self, *exc):
        _DETACHED[0] -= self.detach_tangents
        return super().__exit__(*exc)

    def __torch_function__(self, func: Callable, types, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        rule = _DUAL_RULES.get(func)
        if rule is not None and args:
            out = rule(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


__all__ = ["constant_weight_rules", "dual_rules", "tangent_mode", "tangents_detached"]
