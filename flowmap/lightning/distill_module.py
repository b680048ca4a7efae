"""DistillModule: receives a student config, a frozen teacher and an objective; wiring only.

    out = objective(student=..., teacher=..., target=..., x0=..., cond=..., step=global_step)

The teacher is frozen here (``requires_grad_(False)``, ``eval()``) and kept out of the state dict
(it is rebuilt from the run's config on resume); an EMA *target* network that the objective
differentiates against belongs to the algorithm and lives here; so does the evaluation EMA.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from flowmap.ema import frozen_copy
from flowmap.lightning.batches import unpack_batch
from flowmap.lightning.training_mixin import TrainingMixin
from flowmap.models import build_student, init_student_from_teacher, save_student
from flowmap.objectives import build_objective
from flowmap.sampling import sample
from flowmap.student import FlowMap


class DistillModule(TrainingMixin, L.LightningModule):
    """Distill ``teacher`` into a flow-map student with ``objective``.

    Args:
        student: ``{"net": {...}, "parametrization": "identity" | {"name": "consistency", ...}}``.
        objective: ``{"name": "cd" | "ict" | "ect" | "pd" | "meanflow" | ..., **hyperparameters}``.
        teacher: any ``Teacher`` (``velocity(x, t, cond, guidance)``) or None for methods trained from data.
        init_from_teacher: copy the teacher network's weights into the student where they fit.
        ema_decay: evaluation EMA of the student (the exported weights).
    """

    def __init__(
        self,
        student: dict,
        objective: dict,
        teacher: nn.Module | None = None,
        init_from_teacher: bool = False,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_decay: str = "none",
        ema_decay: float = 0.999,
        max_nonfinite: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"])
        self.student: FlowMap = build_student(dict(student))
        self.objective = build_objective(dict(objective))
        self.data_shape = tuple(self.student.data_shape)
        self.num_classes = self.student.num_classes
        if getattr(self.objective, "needs_teacher", False) and teacher is None:
            raise ValueError(f"objective {self.objective.name!r} distills a teacher, but no teacher was given")
        self._teacher = None
        if teacher is not None:
            self.set_teacher(teacher)
            if init_from_teacher:
                copied, _ = init_student_from_teacher(self.student, teacher)
                if not copied:
                    raise ValueError("init_from_teacher: no tensor of the teacher fits the student's network")
        self.target = frozen_copy(self.student) if getattr(self.objective, "uses_target", False) else None
        self.ema = frozen_copy(self.student)

    # the teacher is frozen and unregistered: no gradients, not in the state dict, moved by hand
    def set_teacher(self, teacher: nn.Module) -> None:
        t_shape = tuple(getattr(teacher, "data_shape", ()))
        if t_shape and self.data_shape and t_shape != self.data_shape:
            raise ValueError(f"teacher data shape {t_shape} differs from the student's {self.data_shape}")
        t_classes = int(getattr(teacher, "num_classes", 0))
        if self.num_classes and t_classes != self.num_classes:
            raise ValueError(f"teacher has {t_classes} classes, the student {self.num_classes}")
        if isinstance(teacher, nn.Module):
            teacher.requires_grad_(False)
            teacher.eval()
        self._teacher = teacher

    @property
    def teacher(self):
        return self._teacher

    def configure_callbacks(self) -> list[L.Callback]:
        """The callbacks the objective names (``Objective.callbacks``, e.g. progressive distillation's rounds)."""
        callbacks = []
        for name in getattr(self.objective, "callbacks", ()):
            module, _, attr = name.partition(":")
            callbacks.append(getattr(importlib.import_module(module), attr)())
        return callbacks

    def run_identity(self) -> dict:
        return {"kind": "DistillModule", "method": str(dict(self.hparams.objective).get("name", self.objective.name))}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if isinstance(self._teacher, nn.Module):
            self._teacher.to(self.device)

    # --- training ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0, cond = unpack_batch(batch)
        self.check_batch(x0, cond)
        out = self.objective(student=self.student, teacher=self._teacher, target=self.target, x0=x0, cond=cond, step=self.global_step)
        loss = out.loss.mean()
        self.log_dict({f"train/{k}": v.float().mean() for k, v in out.logs.items() if k != "loss"})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def ema_pairs(self):
        pairs = [(self.ema, self.student, self.hparams.ema_decay)]
        if self.target is not None:
            pairs.append((self.target, self.student, self.objective.target_decay))
        return pairs

    def trainable_parameters(self):
        params = list(self.student.parameters())
        if isinstance(self.objective, nn.Module):
            params += list(self.objective.parameters())
        return params

    # --- using the result ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, n: int, steps: int = 1, cond: Tensor | None = None, gamma: float = 0.0, generator: torch.Generator | None = None, use_ema: bool = True) -> Tensor:
        noise = torch.randn((n, *self.data_shape), generator=generator, device=self.device)
        return sample(self.ema if use_ema else self.student, noise, steps, cond=cond, gamma=gamma)

    def export(self, path: str | Path, **extra) -> Path:
        return save_student(path, self.ema, method=self.objective.name, objective=dict(self.hparams.objective), **extra)
