"""The learning rate of every flowmap trainer (``flowmap.training.TrainLoop`` and the Lightning modules).

    rate(k) = warm(k) * (lr_final + (lr - lr_final) * (1 + cos(pi p_k)) / 2),
    warm(k) = min(1, (k + 1) / warmup_steps),  p_k = min(max(k - warmup_steps, 0) / max(K - warmup_steps - 1, 1), 1)

for optimizer step k = 0 .. K - 1 (K = ``total_steps``): a linear warm-up, then a half-cosine decay from ``lr``
that reaches ``lr_final`` at the last step (Loshchilov & Hutter 2017, Eq. 5); without ``lr_final`` the rate is
``lr`` after the warm-up."""

from __future__ import annotations

import math

import torch


def check_schedule(
    lr: float, total_steps: int | None = None, warmup_steps: int = 0, lr_final: float | None = None
) -> None:
    """Raise one ValueError for a schedule ``learning_rate`` cannot follow."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if lr_final is not None and not 0.0 <= lr_final <= lr:
        raise ValueError(f"lr_final must lie in [0, lr={lr}], got {lr_final}")
    if lr_final is not None and (total_steps is None or total_steps <= 0):
        raise ValueError("lr_final (a cosine decay) needs the number of steps")


def learning_rate(
    step: int, lr: float, total_steps: int | None = None, warmup_steps: int = 0, lr_final: float | None = None
) -> float:
    """The learning rate of optimizer step ``step`` (0-based); see the module docstring."""
    rate = lr
    if lr_final is not None:
        progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps - 1, 1), 1.0)
        rate = lr_final + (lr - lr_final) * 0.5 * (1 + math.cos(math.pi * progress))
    if warmup_steps and step < warmup_steps:
        rate *= (step + 1) / warmup_steps
    return rate


class LearningRate(torch.optim.lr_scheduler.LRScheduler):
    """``learning_rate`` as a torch scheduler: every parameter group's rate at step k is ``learning_rate(k, ...)``
    (the same floats ``TrainLoop`` sets; call ``step()`` once after each optimizer step)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        lr_final: float | None = None,
    ) -> None:
        check_schedule(lr, total_steps, warmup_steps, lr_final)
        self.rate = {"lr": lr, "total_steps": total_steps, "warmup_steps": warmup_steps, "lr_final": lr_final}
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [learning_rate(self.last_epoch, **self.rate) for _ in self.optimizer.param_groups]
