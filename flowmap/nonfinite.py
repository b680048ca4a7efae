"""The non-finite guard every flowmap trainer shares (``flowmap.training.TrainLoop`` and the Lightning modules'
``TrainingMixin``): a step whose loss or any gradient is not finite is skipped, and training stops once
``limit`` steps in a row were skipped.

The decision stays on the device. A fused optimizer skips its own update through ``found_inf`` (as under a
GradScaler) and the EMA updates are masked with the same 0-d bool; the counters are a device tensor
(in a row, total, longest run since the last read) that the host reads once per ``every`` steps. A non-fused
optimizer has no device-side skip, so it decides on the host each step."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """Raised after ``limit`` consecutive steps with a non-finite loss or gradient."""


def all_finite(loss: Tensor | None, params: Iterable[Tensor], device: torch.device) -> Tensor:
    """0-d bool: the loss and every gradient of ``params`` are finite (no host read)."""
    checks = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    if loss is not None:
        checks.append(torch.isfinite(loss).all())
    return torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool, device=device)


def guarded_step(optimizer, finite: Tensor) -> bool:
    """``optimizer.step()`` when ``finite``; ``optimizer`` may be a LightningOptimizer around a torch one.
    Returns whether the decision was taken on the device (fused kernel: the EMAs must be masked with
    ``finite``) rather than on the host (the step ran only if finite; a skipped step's gradients are cleared)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner.defaults.get("fused"):
        inner.found_inf = (~finite).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        return True
    if bool(finite):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return False


class NonFiniteCounter:
    """Device counters of skipped steps; ``update(finite, step)`` raises ``NonFiniteLossError`` at the first host
    read (every ``every`` steps) after ``limit`` skipped steps in a row."""

    def __init__(self, limit: int, every: int | None = None) -> None:
        if limit < 1:
            raise ValueError(f"max_nonfinite must be >= 1, got {limit}")
        self.limit, self.every = int(limit), max(1, int(every or limit))
        self.counts = torch.zeros(3, dtype=torch.long)

    @property
    def in_a_row(self) -> int:
        return int(self.counts[0])

    @property
    def total(self) -> int:
        return int(self.counts[1])

    def set(self, in_a_row: int | None = None, total: int | None = None) -> None:
        """Restore the counters (from a checkpoint)."""
        counts = self.counts.clone()
        if in_a_row is not None:
            counts[0] = int(in_a_row)
        if total is not None:
            counts[1] = int(total)
        self.counts = counts

    def update(self, finite: Tensor, step: int) -> Tensor:
        """Count step ``step`` (0-based) as skipped unless ``finite``; returns the counters (3,)."""
        counts = self.counts.to(finite.device)
        bad = (~finite).long()
        run = (counts[0] + 1) * bad  # 0 after a finite step
        self.counts = counts = torch.stack([run, counts[1] + bad, torch.maximum(counts[2], run)])
        if (step + 1) % self.every == 0:  # one host read per ``every`` steps
            longest = int(counts[2])
            counts[2] = 0
            if longest >= self.limit:
                raise NonFiniteLossError(
                    f"{longest} training steps in a row had a non-finite loss or gradient "
                    f"(step {step}); lower the learning rate, enable gradient clipping, or check the data"
                )
        return counts
