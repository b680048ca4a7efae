"""Typed ``--help`` for DistillModule's dict-valued arguments: ``--model.objective`` lists every registered method
with its hyperparameters (name: type = default, from the objective class's constructor) and ``--model.student``
every net with its options, so ``scripts/distill.py --help`` says what the dicts may hold."""

from __future__ import annotations

import inspect

SKIP = ("self", "args", "kwargs")


def signature_text(name: str, fn, omit: tuple[str, ...] = ()) -> str:
    """``name(a: int = 1, b: float = 0.5)`` from ``fn``'s signature, or a signature (string annotations kept as
    written)."""
    parts = []
    for p in (fn if isinstance(fn, inspect.Signature) else inspect.signature(fn)).parameters.values():
        if p.name in SKIP + omit or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        text = p.name
        if p.annotation is not inspect.Parameter.empty:
            ann = p.annotation
            text += f": {ann if isinstance(ann, str) else getattr(ann, '__name__', ann)}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    return f"{name}({', '.join(parts)})"


def objective_help() -> str:
    from flowmap.objectives import OBJECTIVES, objective_class

    methods = "; ".join(signature_text(name, objective_class(name).signature()) for name in OBJECTIVES)
    return f"Methods and their hyperparameters: {methods}."


def student_help() -> str:
    from flowmap.nets import NETS
    from flowmap.nets.backbone import options
    from flowmap.nets.diffusers_net import student_net_from_teacher

    nets = "; ".join(signature_text(name, options(cls)) for name, cls in NETS.items() if name != "diffusers")
    own = signature_text("teacher's network", student_net_from_teacher, omit=("teacher", "copy_weights"))
    every = "activation_checkpointing: bool = False (recompute each block's activations in the backward pass)"
    return f"Nets (net: {{name: ..., **options}}): {nets}. Without a net: {own}. Every student: {every}."


def describe_dict_arguments(parser) -> None:
    """Append the typed listings to the help of ``--model.objective`` and ``--model.student`` (when present)."""
    for option, text in (("--model.objective", objective_help), ("--model.student", student_help)):
        action = parser._option_string_actions.get(option)
        if action is not None:
            action.help = f"{action.help or ''} {text()}".replace("%", "%%")
