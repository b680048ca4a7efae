"""Export a student's one-step generator (noise, labels -> sample) with ``torch.export`` to a ``.pt2`` file.

    sample = X(noise, 1, 0, labels) = noise - u(noise, 1, 0, labels)      (one network call)

The batch dimension is dynamic (``torch.export.Dim``, 1 <= B <= ``max_batch``); the exported
program is checked against eager PyTorch on the traced batch size and on another one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flowmap.io import atomic_write
from flowmap.student import FlowMap


class OneStepGenerator(nn.Module):
    """noise (B, *data_shape) [, labels (B,) long] -> X(noise, 1, 0, labels) (B, *data_shape).

    A class-conditional student takes ``labels`` (its null label ``num_classes`` = unconditional); an
    unconditional one takes noise only. A student trained with a guidance input has the scale
    ``guidance`` baked in (default 1.0)."""

    def __init__(self, student: nn.Module, guidance: float | None = None) -> None:
        super().__init__()
        flow_map = getattr(student, "flow_map", student)
        if not isinstance(flow_map, FlowMap):
            raise ValueError(
                f"OneStepGenerator needs a FlowMap student (or flowmap.app.Student), got {type(student).__name__}"
            )
        self.flow_map = flow_map
        self.data_shape: tuple[int, ...] = tuple(flow_map.data_shape)
        self.num_classes: int = int(flow_map.num_classes)
        if flow_map.guidance_input:
            self.register_buffer("w", torch.tensor(1.0 if guidance is None else float(guidance)))
        elif guidance is not None and float(guidance) != 1.0:
            raise ValueError("guidance was given for a student that was not trained to take a guidance scale")
        else:
            self.w = None

    def forward(self, noise: Tensor, labels: Tensor | None = None) -> Tensor:
        B = noise.shape[0]
        s = noise.new_ones(B)
        t = noise.new_zeros(B)
        w = None if self.w is None else self.w.expand(B)
        return self.flow_map(noise, s, t, labels, w)

    def example_inputs(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """(noise,) or (noise, labels) of batch size ``batch``."""
        device = next(self.flow_map.parameters()).device
        noise = torch.randn((batch, *self.data_shape), generator=generator).to(device)
        if self.num_classes == 0:
            return (noise,)
        labels = torch.arange(batch, device=device) % (self.num_classes + 1)  # includes the null label
        return (noise, labels)


def export_generator(
    student: nn.Module,
    path: str | Path,
    batch: int = 4,
    guidance: float | None = None,
    dynamic: bool = True,
    max_batch: int = 4096,
    check_batch: int | None = None,
    seed: int = 0,
) -> dict:
    """Export ``OneStepGenerator(student)`` to ``path`` (.pt2), reload it, and compare with eager.

    Returns {"path", "dynamic_batch", "max_abs_diff", "checked_batches"}; max_abs_diff is the largest
    |exported - eager| over the traced batch and ``check_batch`` (default batch + 3 when dynamic)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"the exported file must end in .pt2, got {path.name}")
    gen = OneStepGenerator(student, guidance).eval()
    g = torch.Generator().manual_seed(seed)
    args = gen.example_inputs(batch, g)
    dynamic_shapes = None
    if dynamic:
        B = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = ({0: B},) if len(args) == 1 else ({0: B}, {0: B})
    with torch.no_grad():
        program = torch.export.export(gen, args, dynamic_shapes=dynamic_shapes)
    atomic_write(path, lambda tmp: torch.export.save(program, tmp), suffix=".pt2")  # torch warns without .pt2
    loaded = torch.export.load(str(path)).module()
    batches = [batch] + ([check_batch or batch + 3] if dynamic else [])
    diff = 0.0
    with torch.no_grad():
        for b in batches:
            inputs = args if b == batch else gen.example_inputs(b, g)
            diff = max(diff, float((loaded(*inputs) - gen(*inputs)).abs().max()))
    return {"path": str(path), "dynamic_batch": dynamic, "max_abs_diff": diff, "checked_batches": batches}
