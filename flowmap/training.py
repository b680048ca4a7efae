"""A minimal pure-torch training loop for any objective: used by tests, the benchmark and notebooks.

The Lightning shell (``flowmap.lightning.DistillModule``) runs the same objective calls and the same
EMA-target rule; this loop exists so that a method can be checked in seconds without a Trainer."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from flowmap.ema import ema_update, frozen_copy
from flowmap.types import LossOutput, Teacher

Batch = tuple[Tensor, Tensor | None]


def fit(
    student: nn.Module,
    objective: Callable[..., LossOutput],
    batches: Callable[[int], Batch] | Iterator[Batch],
    steps: int,
    teacher: Teacher | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    callback: Callable[[int, LossOutput], None] | None = None,
    lr_final: float | None = None,
) -> list[float]:
    """Train ``student`` with ``objective`` for ``steps`` Adam steps; returns the mean loss per step.

    ``batches`` is either a function step -> (x0, cond) or an iterator of (x0, cond). ``lr_final`` turns on a
    half-cosine decay of the learning rate from ``lr`` to ``lr_final`` over the run (Loshchilov & Hutter 2017)."""
    if getattr(objective, "needs_teacher", False) and teacher is None:
        raise ValueError(f"objective {getattr(objective, 'name', objective)!r} distills a teacher, but none was given")
    target = frozen_copy(student) if getattr(objective, "uses_target", False) else None
    params = [p for p in student.parameters() if p.requires_grad]
    extra = getattr(objective, "parameters", None)
    if isinstance(objective, nn.Module):
        params += [p for p in objective.parameters() if p.requires_grad]
    elif callable(extra):
        params += list(extra())
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if lr_final is not None and not 0.0 <= lr_final <= lr:
        raise ValueError(f"lr_final must lie in [0, lr={lr}], got {lr_final}")
    history: list[float] = []
    student.train()
    for step in range(steps):
        x0, cond = batches(step) if callable(batches) else next(batches)
        out = objective(student=student, teacher=teacher, target=target, x0=x0, cond=cond, step=step)
        loss = out.loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if lr_final is not None:
            for group in opt.param_groups:
                group["lr"] = lr_final + (lr - lr_final) * 0.5 * (1 + math.cos(math.pi * step / max(steps - 1, 1)))
        opt.step()
        if target is not None:
            ema_update(target, student, objective.target_decay(step))
        history.append(float(loss.detach()))
        if callback is not None:
            callback(step, out)
    student.eval()
    return history
