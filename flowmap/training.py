"""A minimal pure-torch training loop for any objective: used by tests, the benchmark and notebooks.

The Lightning shell (``flowmap.lightning.DistillModule``) runs the same objective calls and the same
EMA-target rule; this loop exists so that a method can be checked in seconds without a Trainer.
``TrainLoop`` is one step at a time (the benchmark times it against other trainers, block by block);
``fit`` runs it for a number of steps."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from flowmap.ema import ema_update, frozen_copy
from flowmap.optim import adam
from flowmap.types import LossOutput, Teacher

Batch = tuple[Tensor, Tensor | None]


class TrainLoop:
    """Adam steps of ``objective`` on ``student``: loss, backward, gradient clipping, the learning rate of
    the step, the optimizer step (fused kernel where supported, ``flowmap.optim.adam``), the EMA target.

    ``lr_final`` with ``steps`` turns on a half-cosine decay of the learning rate from ``lr`` to ``lr_final``
    over ``steps`` steps (Loshchilov & Hutter 2017); without them the rate is constant."""

    def __init__(
        self,
        student: nn.Module,
        objective: Callable[..., LossOutput],
        teacher: Teacher | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        lr_final: float | None = None,
        steps: int | None = None,
        fused: bool | None = None,
    ) -> None:
        if getattr(objective, "needs_teacher", False) and teacher is None:
            raise ValueError(f"objective {getattr(objective, 'name', objective)!r} distills a teacher, but none was given")
        if lr_final is not None and not 0.0 <= lr_final <= lr:
            raise ValueError(f"lr_final must lie in [0, lr={lr}], got {lr_final}")
        if lr_final is not None and steps is None:
            raise ValueError("lr_final (a cosine decay) needs the number of steps")
        self.student, self.objective, self.teacher = student, objective, teacher
        self.lr, self.lr_final, self.steps, self.grad_clip = lr, lr_final, steps, grad_clip
        self.target = frozen_copy(student) if getattr(objective, "uses_target", False) else None
        params = [p for p in student.parameters() if p.requires_grad]
        extra = getattr(objective, "parameters", None)
        if isinstance(objective, nn.Module):
            params += [p for p in objective.parameters() if p.requires_grad]
        elif callable(extra):
            params += list(extra())
        self.params = params
        self.opt = adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
        self.k = 0
        student.train()

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based)."""
        if self.lr_final is None:
            return self.lr
        return self.lr_final + (self.lr - self.lr_final) * 0.5 * (1 + math.cos(math.pi * step / max(self.steps - 1, 1)))

    def step(self, x0: Tensor, cond: Tensor | None = None) -> tuple[float, LossOutput]:
        """One step on the batch (x0, cond); returns (the mean loss, the objective's output)."""
        out = self.objective(student=self.student, teacher=self.teacher, target=self.target, x0=x0, cond=cond, step=self.k)
        loss = out.loss.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.lr_final is not None:
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.k)
        self.opt.step()
        if self.target is not None:
            ema_update(self.target, self.student, self.objective.target_decay(self.k))
        self.k += 1
        return float(loss.detach()), out


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
    fused: bool | None = None,
) -> list[float]:
    """Train ``student`` with ``objective`` for ``steps`` Adam steps (``TrainLoop``); returns the mean loss per step.

    ``batches`` is either a function step -> (x0, cond) or an iterator of (x0, cond). ``lr_final`` turns on a
    half-cosine decay of the learning rate from ``lr`` to ``lr_final`` over the run (Loshchilov & Hutter 2017)."""
    loop = TrainLoop(student, objective, teacher, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip,
                     lr_final=lr_final, steps=steps, fused=fused)
    history: list[float] = []
    for step in range(steps):
        x0, cond = batches(step) if callable(batches) else next(batches)
        loss, out = loop.step(x0, cond)
        history.append(loss)
        if callback is not None:
            callback(step, out)
    student.eval()
    return history
