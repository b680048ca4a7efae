"""The contract every objective keeps (see docs/architecture.md).

An objective is an ``nn.Module`` only so that learned loss parameters (sCM's adaptive-weight
log-variance) are optimized and checkpointed with the student; most hold no parameters."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.types import LossOutput, hot_path


class Objective(nn.Module):
    """Subclasses set ``name``, ``needs_teacher``, ``uses_target`` and implement ``forward``; what a method
    knows about itself beyond its loss is a class attribute too:

    * ``sampler_gamma``: the re-noising ``gamma`` of ``flowmap.sampling.sample`` its students sample with
      (0: deterministic flow-map jumps; 1: multistep consistency sampling, Song et al. 2023, Alg. 1), written
      into the exported student file so ``load_student(...).sample`` uses it;
    * ``needs_jvp``: whether the loss takes a Jacobian-vector product (``flowmap.jvp``);
    * ``callbacks``: ``"module:Class"`` names of the Lightning callbacks its training needs (imported by the
      Lightning shell only, so this core stays free of Lightning).

    forward(*, student, teacher, target, x0, cond, step) -> LossOutput with a per-sample loss (B,).
    ``student``/``target`` are ``flowmap.types.FlowMapStudent``s (target = EMA copy, no grad), ``teacher`` a
    ``Teacher`` (velocity on the linear axis) or None, ``x0`` (B, *data_shape), ``cond`` (B,) or None, ``step``
    the global step (curricula are pure functions of it). Noise and times come from torch's global RNG."""

    name: str = "objective"
    needs_teacher: bool = False
    uses_target: bool = False
    needs_jvp: bool = False
    sampler_gamma: float = 0.0
    callbacks: tuple[str, ...] = ()

    @classmethod
    def sampler_defaults(cls) -> dict:
        """Keyword defaults of ``flowmap.sampling.sample`` for this method's students (JSON-able)."""
        return {"gamma": float(cls.sampler_gamma)}

    def __call__(self, *args, **kwargs) -> LossOutput:
        """``forward`` inside ``flowmap.types.hot_path()``: the student's and teacher's time and label checks test
        shapes only, so a training step does not wait for the device (FLOWMAP_DEBUG=1 restores the value checks)."""
        with hot_path():
            return super().__call__(*args, **kwargs)

    def target_decay(self, step: int) -> float:
        """EMA decay of the target network at ``step`` (only when ``uses_target``)."""
        return 0.0

    def to_config(self) -> dict:
        """JSON-able hyperparameters (recorded in exported checkpoints)."""
        return {
            "name": self.name,
            **{
                k: v
                for k, v in vars(self).items()
                if not k.startswith("_")
                and k != "training"
                and isinstance(v, (int, float, str, bool, type(None), list, tuple))
            },
        }


def mask_nonfinite(target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mask samples whose regression target is not finite: returns (target with non-finite rows
    zeroed, finite mask (B,), count of masked samples). Objectives multiply their per-sample loss by
    the mask and log ``nonfinite_targets`` so bad targets are counted, never trained on."""
    finite = torch.isfinite(target.flatten(1)).all(dim=1)
    clean = torch.where(finite.view(-1, *([1] * (target.dim() - 1))), target, torch.zeros_like(target))
    return clean, finite, (~finite).sum()
