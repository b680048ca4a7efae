"""A minimal pure-torch training loop for any objective: used by tests, the benchmark and notebooks.

The Lightning shell (``flowmap.lightning.DistillModule``) runs the same objective calls and the same
EMA-target rule; this loop exists so that a method can be checked in seconds without a Trainer.
``TrainLoop`` is one step at a time (the benchmark times it against other trainers, block by block);
``fit`` runs it for a number of steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from flowmap.ema import EMASchedule, ema_update, frozen_copy
from flowmap.nonfinite import NonFiniteCounter, all_finite, guarded_step
from flowmap.optim import adam
from flowmap.schedule import check_schedule, learning_rate
from flowmap.types import LossOutput, Teacher

Batch = tuple[Tensor, Tensor | None]


class TrainLoop:
    """Adam steps of ``objective`` on ``student``: loss, backward, gradient clipping, the learning rate of
    the step, the optimizer step (fused kernel where supported, ``flowmap.optim.adam``), the EMA target.

    The learning rate follows ``flowmap.schedule.learning_rate`` (the Lightning modules' schedule): a linear
    warm-up over ``warmup_steps``, then with ``lr_final`` (or ``lr_final_ratio`` * lr) and ``steps`` a half-cosine
    decay to ``lr_final`` at the last step; else constant. ``betas``, ``decoupled`` (AdamW), ``ema`` (the
    evaluation EMA ``self.ema``, updated after each step with ``EMASchedule``'s decay) and ``max_nonfinite`` (the
    non-finite guard: a step whose loss or gradient is not finite is skipped, decided on the device, and
    ``NonFiniteLossError`` is raised once ``max_nonfinite`` steps in a row were skipped; the host reads the
    counters every ``max_nonfinite`` steps) are the Lightning modules' options of the same names
    (``tests/test_one_training_semantics.py``)."""

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
        warmup_steps: int = 0,
        lr_final_ratio: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        decoupled: bool = False,
        ema: EMASchedule | None = None,
        max_nonfinite: int | None = None,
    ) -> None:
        if getattr(objective, "needs_teacher", False) and teacher is None:
            raise ValueError(
                f"objective {getattr(objective, 'name', objective)!r} distills a teacher, but none was given"
            )
        if lr_final_ratio is not None:
            if lr_final is not None:
                raise ValueError("give lr_final or lr_final_ratio, not both")
            lr_final = lr * lr_final_ratio
        check_schedule(lr, steps if lr_final is not None else None, warmup_steps, lr_final)
        self.student, self.objective, self.teacher = student, objective, teacher
        self.lr, self.lr_final, self.steps, self.grad_clip = lr, lr_final, steps, grad_clip
        self.warmup_steps, self.max_nonfinite = warmup_steps, max_nonfinite
        self.target = frozen_copy(student) if getattr(objective, "uses_target", False) else None
        self.ema_schedule = ema
        self.ema = frozen_copy(student) if ema is not None else None
        params = [p for p in student.parameters() if p.requires_grad]
        extra = getattr(objective, "parameters", None)
        if isinstance(objective, nn.Module):
            params += [p for p in objective.parameters() if p.requires_grad]
        elif callable(extra):
            params += list(extra())
        self.params = params
        self.opt = adam(params, lr=lr, betas=betas, weight_decay=weight_decay, decoupled=decoupled, fused=fused)
        self.guard = NonFiniteCounter(max_nonfinite) if max_nonfinite is not None else None
        self.k = 0
        student.train()

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based)."""
        return learning_rate(step, self.lr, self.steps, self.warmup_steps, self.lr_final)

    def step(self, x0: Tensor, cond: Tensor | None = None) -> tuple[Tensor, LossOutput]:
        """One step on the batch (x0, cond); returns (the mean loss, a 0-d tensor on the device: reading it is the
        caller's host sync, the objective's output)."""
        out = self.objective(
            student=self.student, teacher=self.teacher, target=self.target, x0=x0, cond=cond, step=self.k
        )
        loss = out.loss.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.lr_final is not None or self.warmup_steps:
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.k)
        active, stepped = None, True
        if self.guard is None:
            self.opt.step()
        else:  # the shells' guard (``flowmap.nonfinite``): on the device with a fused optimizer, else on the host
            finite = all_finite(loss, self.params, loss.device)
            active = finite if guarded_step(self.opt, finite) else None
            stepped = active is not None or bool(finite)
            self.guard.update(finite, self.k)
        if stepped and self.ema is not None:
            ema_update(self.ema, self.student, self.ema_schedule(self.k), active)
        if stepped and self.target is not None:
            ema_update(self.target, self.student, self.objective.target_decay(self.k), active)
        self.k += 1
        return loss.detach(), out

    @property
    def nonfinite_total(self) -> int:
        """The number of steps skipped by the non-finite guard."""
        return 0 if self.guard is None else self.guard.total


def fit(
    student: nn.Module,
    objective: Callable[..., LossOutput],
    batches: Callable[[int], Batch] | Iterator[Batch],
    steps: int,
    teacher: Teacher | None = None,
    callback: Callable[[int, LossOutput], None] | None = None,
    **options,
) -> list[float]:
    """Train ``student`` with ``objective`` for ``steps`` steps of ``TrainLoop``; returns the mean loss per step.

    ``batches`` is either a function step -> (x0, cond) or an iterator of (x0, cond); ``options`` are
    ``TrainLoop``'s (lr, lr_final or lr_final_ratio for the half-cosine decay over the run, warmup_steps,
    grad_clip, weight_decay, betas, decoupled, fused, ema, max_nonfinite)."""
    loop = TrainLoop(student, objective, teacher, steps=steps, **options)
    history: list[Tensor] = []
    for step in range(steps):
        x0, cond = batches(step) if callable(batches) else next(batches)
        loss, out = loop.step(x0, cond)
        history.append(loss)
        if callback is not None:
            callback(step, out)
    student.eval()
    return torch.stack(history).tolist() if history else []  # one host read for the whole run
