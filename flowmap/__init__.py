"""flowmap: distill diffusion / flow teachers into flow-map students X(x, s, t) = x + (t - s) u(x, s, t).

``flowmap.load_student(path)`` (``flowmap.app``) is imported lazily, so ``import flowmap`` stays light
and never imports Lightning."""

from __future__ import annotations

__all__ = ["load_student"]


def __getattr__(name: str):
    if name == "load_student":
        from flowmap.app import load_student

        return load_student
    raise AttributeError(f"module 'flowmap' has no attribute {name!r}")
