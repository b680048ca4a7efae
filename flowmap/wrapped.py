"""``wrapped_attribute``: find an attribute of a teacher through the wrappers around it.

A wrapper (a guided, compiled or LoRA teacher, a student built on a teacher) keeps the model it wraps as
``.teacher``; what belongs to the innermost teacher (a latent codec, a prompt encoder, the empty prompt's
condition) is found by walking down that chain.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def wrapped_attribute(model: Any, name: str, kind: type[T]) -> T | None:
    """The first ``getattr(m, name)`` that is a ``kind`` for m = model, model.teacher, model.teacher.teacher, ...;
    None when no model in the chain has one."""
    inner = model
    while inner is not None:
        value = getattr(inner, name, None)
        if isinstance(value, kind):
            return value
        inner = getattr(inner, "teacher", None)
    return None
