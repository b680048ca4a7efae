"""A distilled student for downstream applications: a plain ``nn.Module`` from a safetensors file.

    from flowmap import load_student
    student = load_student("student.safetensors")
    x = student.sample(16, steps=1, labels=3, generator=torch.Generator().manual_seed(0))

No Lightning import and no pickle: the file is a safetensors state dict whose metadata holds the
student's config (``flowmap.io``); anything else raises a CheckpointError.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flowmap.conditions import TextCondition
from flowmap.io import CheckpointError, load_state_strict, read_state
from flowmap.models import build_student, student_sampler
from flowmap.sampling import sample as sample_flow_map
from flowmap.student import FlowMap

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".pt2")


class Student(nn.Module):
    """The flow map X(x, s, t) = x + (t - s) u(x, s, t) of a distilled student, with a sampler.

    ``data_shape``, ``num_classes`` (labels 0..num_classes - 1; ``None`` = unconditional / null label),
    ``guidance_input`` (whether ``guidance`` may be passed), ``config`` (the saved config) and ``sampler`` (the
    method's sampler defaults saved with it, e.g. ``{"gamma": 1.0}`` for consistency models)."""

    def __init__(self, flow_map: FlowMap, config: dict | None = None) -> None:
        super().__init__()
        self.flow_map = flow_map
        self.config = dict(config or {})
        self.data_shape: tuple[int, ...] = tuple(flow_map.data_shape)
        self.num_classes: int = int(flow_map.num_classes)
        self.guidance_input: bool = bool(flow_map.guidance_input)
        self.sampler: dict = student_sampler(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.flow_map.parameters()).device

    def _labels(self, labels: int | Tensor | None, batch: int) -> Tensor | None:
        if labels is None or isinstance(labels, (Tensor, TextCondition)):  # labels or a text condition record
            return None if labels is None else labels.to(self.device)
        return torch.full((batch,), int(labels), dtype=torch.long, device=self.device)

    def _times(self, tau: float | Tensor, batch: int) -> Tensor:
        if isinstance(tau, Tensor) and tau.dim() == 1:
            return tau.to(self.device, torch.float32)
        return torch.full((batch,), float(tau), dtype=torch.float32, device=self.device)

    def forward(
        self,
        x: Tensor,
        s: float | Tensor,
        t: float | Tensor,
        labels: int | Tensor | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """X(x, s, t): x (B, *data_shape) at time s -> time t; s, t floats or (B,); labels int or (B,) long."""
        B = x.shape[0]
        w = None if guidance is None else torch.full((B,), float(guidance), device=x.device)
        if w is not None and not self.guidance_input:
            raise ValueError("guidance was given to a student that was not trained to take a guidance scale")
        return self.flow_map(x, self._times(s, B), self._times(t, B), self._labels(labels, B), w)

    @torch.no_grad()
    def sample(
        self,
        n_or_noise: int | Tensor,
        steps: int | Tensor = 1,
        labels: int | Tensor | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        gamma: float | None = None,
    ) -> Tensor:
        """Samples (B, *data_shape) from ``n`` fresh noises (drawn with ``generator``) or from given noise
        (B, *data_shape) at t = 1, in ``steps`` flow-map jumps (an int: uniform grid; or a decreasing grid).
        ``gamma``: re-noising between steps (``flowmap.sampling.sample``); None = the method's saved default."""
        if isinstance(n_or_noise, Tensor):
            noise = n_or_noise.to(self.device)
        else:
            n = int(n_or_noise)
            if n < 1:
                raise ValueError(f"the number of samples must be positive, got {n}")
            gen_device = generator.device if generator is not None else self.device
            noise = torch.randn((n, *self.data_shape), generator=generator, device=gen_device).to(self.device)
        if isinstance(steps, int) and steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        cond = self._labels(labels, noise.shape[0])
        gamma = float(self.sampler["gamma"]) if gamma is None else float(gamma)
        return sample_flow_map(
            self.flow_map, noise, steps, cond=cond, gamma=gamma, guidance=guidance, generator=generator
        )


def load_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    """A ``Student`` (eval mode) from a student safetensors file written by ``save_student`` /
    ``DistillModule.export``. Pickle-based files (.ckpt, .pt, ...) and teacher files raise a CheckpointError."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{p}: load_student reads only safetensors files "
            "(a student written by save_student or DistillModule.export); "
            f"{p.suffix} files are pickle-based and are never loaded"
        )
    state, config = read_state(p)
    kind = config.get("kind")
    if kind == "teacher":
        raise CheckpointError(
            f"{p}: a teacher checkpoint, not a student; distill it first (scripts/distill.py --teacher {p})"
        )
    if kind != "student":
        raise CheckpointError(f"{p}: unknown checkpoint kind {kind!r}; load_student needs a student")
    try:
        flow_map = build_student(config)
    except ValueError as err:
        raise CheckpointError(f"{p}: the saved config does not describe a student ({err})") from None
    load_state_strict(flow_map.net, state, what=str(p))
    return Student(flow_map, config).to(device).eval()
