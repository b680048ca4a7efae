"""TeacherModule: trains a denoising / flow-matching network on any path and prediction target.

Wiring only: the loss is ``flowmap.objectives.denoising.DenoisingLoss``; the network comes from the
registry; the evaluation EMA and the guard against non-finite steps come from ``TrainingMixin``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from flowmap.ema import frozen_copy
from flowmap.lightning.batches import unpack_batch
from flowmap.lightning.training_mixin import TrainingMixin
from flowmap.models import save_teacher
from flowmap.nets import build_net
from flowmap.objectives.denoising import DenoisingLoss
from flowmap.solvers import solve
from flowmap.time_grids import uniform_grid
from flowmap.velocity import NetVelocity


class TeacherModule(TrainingMixin, L.LightningModule):
    """Train ``net`` (a registry config, e.g. ``{"name": "mlp", "dim": 2}``) to predict ``prediction`` on ``path``.

    Args:
        net: backbone config for ``flowmap.nets.build_net``.
        path: affine path name or config (``linear``, ``cosine``, ``vp``, ``vp_discrete``, ``ve``).
        prediction: ``velocity``, ``eps``, ``x0``, ``v`` or ``score``.
        time_sampling: ``uniform`` or ``logit_normal``.
        p_uncond: label dropout for classifier-free guidance (class-conditional nets only).
        training: lr, betas, weight_decay, warmup_steps, lr_decay, lr_final_ratio, ema_halflife, ema_decay,
            max_nonfinite, compile (``TrainingMixin``).
    """

    def __init__(
        self,
        net: dict,
        path: str | dict = "linear",
        prediction: str = "velocity",
        time_sampling: str = "uniform",
        p_uncond: float = 0.1,
        **training,
    ) -> None:
        super().__init__(**training)
        self.net = build_net(dict(net))
        self.loss_fn = DenoisingLoss(
            path, prediction, time_sampling, p_uncond=p_uncond if self.net.num_classes else 0.0
        )
        self.ema = frozen_copy(self.net)
        self.data_shape = tuple(self.net.data_shape)
        self.num_classes = int(self.net.num_classes)

    # --- the model as a Teacher ------------------------------------------------------------------
    def teacher(self, use_ema: bool = True) -> NetVelocity:
        """The trained network as a velocity field on the linear axis."""
        return NetVelocity(self.ema if use_ema else self.net, self.loss_fn.path, self.loss_fn.prediction)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        steps: int = 32,
        method: str = "heun",
        cond: Tensor | None = None,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        noise = torch.randn((n, *self.data_shape), generator=generator, device=self.device)
        return solve(self.teacher(), noise, uniform_grid(steps).to(self.device), method, cond=cond, guidance=guidance)

    def export(self, path: str | Path, **extra) -> Path:
        return save_teacher(path, self.teacher(), **extra)

    # --- training ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0, cond = unpack_batch(batch)
        self.check_batch(x0, cond)
        out = self.loss_fn(self.net, x0, cond)
        loss = out.loss.mean()
        self.log_dict({f"train/{k}": v.float().mean() for k, v in out.logs.items() if k != "loss"}, prog_bar=False)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def ema_pairs(self):
        return [(self.ema, self.net, self.ema_schedule())]

    def trainable_parameters(self):
        return self.net.parameters()
