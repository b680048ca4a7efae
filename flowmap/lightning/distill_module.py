"""DistillModule: receives a student config, a frozen teacher and an objective; wiring only.

    out = objective(student=..., teacher=..., target=..., x0=..., cond=..., step=global_step)

The teacher is frozen here (``requires_grad_(False)``, ``eval()``) and kept out of the state dict
(it is rebuilt from the run's config on resume); the checkpoint records its identity instead (source
and a content fingerprint), and a resume with another teacher is refused unless ``allow_teacher_swap``
(``--teacher_swap``) is set. An EMA *target* network that the objective
differentiates against belongs to the algorithm and lives here; so does the evaluation EMA.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from flowmap.conditions import null_of
from flowmap.ema import frozen_copy
from flowmap.io import fingerprint
from flowmap.lightning.batches import unpack_batch
from flowmap.lightning.training_mixin import TrainingMixin
from flowmap.models import (
    build_student,
    save_student,
    start_from_teacher,
    student_from_teacher,
)
from flowmap.objectives import build_objective
from flowmap.sampling import sample
from flowmap.student import FlowMap, activation_checkpointing


class DistillModule(TrainingMixin, L.LightningModule):
    """Distill ``teacher`` into a flow-map student with ``objective``.

    Args:
        student: ``{"net": {...}, "parametrization": "identity" | {"name": "consistency", ...}}``; without a
            ``net`` (or None), the teacher's own network (diffusers / EDM teachers,
            ``flowmap.models.student_from_teacher``) with ``{"guidance_input", "freq_dim", "time_scale", "lora"}``
            from this dict. Either way ``activation_checkpointing: true`` checkpoints the net's blocks
            (``flowmap.student.activation_checkpointing``).
        objective: ``{"name": "cd" | "ict" | "ect" | "pd" | "meanflow" | ..., **hyperparameters}``.
        teacher: any ``Teacher`` (``velocity(x, t, cond, guidance)``) or None for methods trained from data.
        init_from_teacher: copy the teacher network's weights into the student where they fit; None (default):
            whenever the student's architecture is the teacher's.
        training: lr, betas, weight_decay, warmup_steps, lr_decay, lr_final_ratio, ema_halflife, ema_decay,
            max_nonfinite, compile (``TrainingMixin``).
    """

    hparams_ignore = ("teacher",)

    def __init__(
        self,
        objective: dict,
        student: dict | None = None,
        teacher: nn.Module | None = None,
        init_from_teacher: bool | None = None,
        **training,
    ) -> None:
        super().__init__(**training)
        self.student: FlowMap = self._build_student(dict(student or {}), teacher, init_from_teacher)
        if dict(student or {}).get("activation_checkpointing"):  # recompute block activations in the backward
            activation_checkpointing(self.student)
        self.objective = build_objective(dict(objective))
        self.data_shape = tuple(self.student.data_shape)
        self.num_classes = self.student.num_classes
        if getattr(self.objective, "needs_teacher", False) and teacher is None:
            raise ValueError(f"objective {self.objective.name!r} distills a teacher, but no teacher was given")
        self._teacher = None
        if teacher is not None:
            self.set_teacher(teacher)
            if "net" in dict(student or {}):  # a teacher-built student (no net) is the teacher's copy already
                start_from_teacher(self.student, teacher, init_from_teacher)
        self.target = frozen_copy(self.student) if getattr(self.objective, "uses_target", False) else None
        self.ema = frozen_copy(self.student)

    @staticmethod
    def _build_student(student: dict, teacher: nn.Module | None, init: bool | None) -> FlowMap:
        if "net" in student:
            return build_student(student)
        if teacher is None:
            raise ValueError("no student network given (model.student.net) and no teacher to build one from")
        options = {k: student[k] for k in ("guidance_input", "freq_dim", "time_scale", "lora") if k in student}
        built = student_from_teacher(
            teacher, init=init is not False, parametrization=student.get("parametrization"), **options
        )
        if built is None:
            raise ValueError(
                "no student network given (model.student.net), and the teacher's network is not one that "
                "can be wrapped (diffusers folders and EDM denoisers can): name a student net"
            )
        return built

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
        object.__setattr__(self, "_teacher", teacher)  # not nn.Module.__setattr__: that would register it

    @property
    def teacher(self):
        return self._teacher

    # --- checkpoints: the teacher's identity, not its weights ---------------------------------------------
    allow_teacher_swap: bool = False  # set by the CLI's --teacher_swap

    def teacher_identity(self) -> dict | None:
        """{"source": where the teacher came from, "fingerprint": hash of its tensors}, or None without teacher."""
        teacher = self._teacher
        if teacher is None:
            return None
        cached = self.__dict__.get("_teacher_identity")
        if cached is not None and cached[0] is teacher:
            return cached[1]
        state = teacher.state_dict() if isinstance(teacher, nn.Module) else {}
        source = str(getattr(teacher, "source", None) or type(teacher).__name__)
        content = fingerprint(state) if state else fingerprint({"repr": _text(repr(teacher))})
        identity = {"source": source, "fingerprint": content}
        self.__dict__["_teacher_identity"] = (teacher, identity)
        return identity

    def check_resume(self, checkpoint: dict) -> str | None:
        """Also refuse a checkpoint trained with another teacher (naming both) unless ``allow_teacher_swap``."""
        super().check_resume(checkpoint)
        stored = checkpoint.get("flowmap_teacher")
        if stored is None:  # checkpoints of older versions held the teacher's tensors under ``_teacher.``
            state = checkpoint.get("state_dict", {})
            legacy = {k[len("_teacher.") :]: v for k, v in state.items() if k.startswith("_teacher.")}
            if legacy:
                stored = {"source": "the teacher stored in the checkpoint", "fingerprint": fingerprint(legacy)}
        mine = self.teacher_identity()
        if stored is None or mine is None or stored["fingerprint"] == mine["fingerprint"]:
            return None
        old = f"{stored['source']} (fingerprint {stored['fingerprint']})"
        new = f"{mine['source']} (fingerprint {mine['fingerprint']})"
        if not self.allow_teacher_swap:
            raise ValueError(
                f"--resume: the checkpoint was trained with teacher {old}, this run was given teacher {new}; "
                "resume with the same teacher, or pass --teacher_swap to continue with the new one"
            )
        return f"--teacher_swap: continuing the run with teacher {new} instead of {old}"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        identity = self.teacher_identity()
        if identity is not None:
            checkpoint["flowmap_teacher"] = identity

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("_teacher.")]:  # older checkpoints: the teacher is not loaded
            del state[key]

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
        x0, cond = unpack_batch(batch, null_of(self._teacher))
        self.check_batch(x0, cond)
        out = self.objective(
            student=self.student, teacher=self._teacher, target=self.target, x0=x0, cond=cond, step=self.global_step
        )
        loss = out.loss.mean()
        self.log_dict({f"train/{k}": v.float().mean() for k, v in out.logs.items() if k != "loss"})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def ema_pairs(self):
        pairs = [(self.ema, self.student, self.ema_schedule())]
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
    def generate(
        self,
        n: int,
        steps: int = 1,
        cond: Tensor | None = None,
        gamma: float | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """n samples (n, *data_shape) in ``steps`` jumps; ``gamma`` None: the method's own re-noising
        (``Objective.sampler_defaults``), as the exported student samples."""
        noise = torch.randn((n, *self.data_shape), generator=generator, device=self.device)
        if gamma is None:
            gamma = self.objective.sampler_defaults()["gamma"]
        return sample(self.ema if use_ema else self.student, noise, steps, cond=cond, gamma=gamma)

    def export(self, path: str | Path, **extra) -> Path:
        teacher = getattr(self._teacher, "description", None)  # kind, folder, scheduler, prediction (teachers/)
        extra = {**({"teacher": teacher} if teacher else {}), "steps_trained": int(self.global_step), **extra}
        return save_student(path, self.ema, method=self.objective.name, objective=dict(self.hparams.objective), **extra)


def _text(text: str):
    """A string as a uint8 tensor (for ``fingerprint`` of a teacher without tensors)."""
    return torch.tensor(list(text.encode()), dtype=torch.uint8)
