"""``torch.compile`` for flowmap networks, with forward-mode AD passes kept eager.

    compile_net(net)          # in place: net(...) runs the compiled forward; state dict and identity unchanged
    compile_calls(net)        # {"compiled": n, "eager": m}: how many calls took each path

A call made inside a forward-mode JVP (a ``torch.autograd.forward_ad`` dual level, or a ``torch.func``
transform: the ``"forward_ad"`` and ``"func"`` backends of ``flowmap.jvp``) runs the eager forward: the custom
dual rules of ``flowmap.jvp_rules`` and functorch's wrapped tensors are not what inductor compiles (dynamo would
trace them, fall back, or recompile per level), so the JVP pass stays eager and every ordinary forward (the loss's
with-grad forward, teacher and target calls, sampling) is compiled. A deep copy of a compiled net (an EMA or
target made later) compiles its own forward on first use rather than calling the original's.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn


def in_forward_jvp() -> bool:
    """True inside a forward-mode AD pass (a forward_ad dual level or a torch.func transform)."""
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def _dispatch(self: nn.Module, *args, **kwargs):
    state = self.__dict__["_flowmap_compile"]
    if in_forward_jvp():
        state["calls"]["eager"] += 1
        return type(self).forward(self, *args, **kwargs)
    cached = state.get("fn")
    if cached is None or cached[0]() is not self:  # first call, or a deep copy of a compiled net
        state["fn"] = cached = (
            weakref.ref(self),
            torch.compile(types.MethodType(type(self).forward, self), **state["options"]),
        )
    state["calls"]["compiled"] += 1
    return cached[1](*args, **kwargs)


def compile_net(net: nn.Module, **options) -> nn.Module:
    """Compile ``net``'s forward in place (``options`` go to ``torch.compile``, e.g. ``mode``); returns ``net``."""
    if "_flowmap_compile" not in net.__dict__:
        net.__dict__["_flowmap_compile"] = {"options": dict(options), "calls": {"compiled": 0, "eager": 0}}
        net.forward = types.MethodType(_dispatch, net)
    return net


def compile_calls(net: nn.Module) -> dict[str, int]:
    """The number of calls of a ``compile_net`` network that took the compiled and the eager path."""
    return dict(net.__dict__["_flowmap_compile"]["calls"])


def has_c_compiler() -> bool:
    """Inductor on CPU builds C++ kernels: a C++ compiler must be on PATH."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def is_compiled(module: nn.Module | None) -> bool:
    """Whether ``module`` (or its ``net``, for a ``FlowMap`` / ``NetVelocity``) was set up by ``compile_net``."""
    return module is not None and any(
        m is not None and "_flowmap_compile" in m.__dict__ for m in (module, getattr(module, "net", None))
    )
