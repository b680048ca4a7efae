"""A diffusers denoiser (UNet2DModel, DiTTransformer2DModel, UNet2DConditionModel, SD3Transformer2DModel) as a
velocity field on our linear time axis; the math of ``teachers.diffusers_adapter`` (which reads the folders), kept
in the core so that a student built from the teacher's own network (``flowmap.nets.diffusers_net``) reuses it.

The teacher type's own part (``flowmap.teacher.Teacher`` does the checks, the guidance and the change of path):
for the discrete VP schedules of DDPM/DDIM, the time map t_lin -> VP time t solves sigma / alpha = t_lin / (1 - t_lin)
for the fractional step position in float64 (``vp_step``), and the path velocity calls the model at its timestep,
turns its prediction into (x0, eps) (``flowmap.predictions``) and returns dx/dt = alpha' x0 + sigma' eps on the VP
path; the base carries it to v_lin = eps - x0 (``flowmap.paths.velocity_to_linear``; Song et al. 2021a, Eq. 13-14;
Karras et al. 2022, Sec. 3). Flow matching (``FlowMatchEulerDiscreteScheduler``): diffusers' sigma is our t and the
model predicts noise - x0 = our velocity at timestep sigma * N (Esser et al. 2024, Sec. 2).

Timestep map: t on the VP axis is the fractional step tau = N t - 1 (t_k = (k + 1) / N <-> timestep k); a time
within ``SNAP`` of a train step is evaluated exactly at that step; between steps the model receives the fractional
timestep tau; below the first step it is called at timestep 0, above the last one at N - 1.

Conditions (``flowmap.conditions``): class labels (B,) long for UNet2DModel / DiT; for the text-conditioned classes
a ``TextCondition`` (prompt embeddings, pooled embeddings for SD3's ``pooled_projections``, attention mask), whose
empty-prompt ``null`` is the unconditional side of classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.conditions import TextCondition, as_condition, check
from flowmap.io import CheckpointError
from flowmap.paths import AffinePath, DiscreteVPPath, LinearPath
from flowmap.predictions import convert, from_x0_eps, to_x0_eps
from flowmap.types import expand_like
from flowmap.velocity import NetVelocity

SNAP = 1e-3  # in train steps: a time this close to a train step is evaluated at that step
LABEL_MODELS = ("UNet2DModel", "DiTTransformer2DModel")
TEXT_MODELS = ("UNet2DConditionModel", "SD3Transformer2DModel")


def snap(tau: Tensor) -> Tensor:
    """A fractional timestep within ``SNAP`` of a train step -> that step."""
    near = tau.round()
    return torch.where((tau - near).abs() < SNAP, near, tau)


def require_diffusers():
    """Import diffusers lazily (an optional extra) with one clear message when it is missing."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            "reading a diffusers model folder needs the optional dependency `diffusers` (pip install diffusers)"
        ) from err
    return diffusers


class DiffusersNet(nn.Module):
    """model(x, timestep, cond).sample on x: (B, C, H, W), timestep: (B,) float; cond: labels (B,) long or None
    (``cond_kind = "labels"``), or for text-conditioned classes (``cond_kind = "text"``) a (B, L, D)
    ``encoder_hidden_states`` tensor or a dict of the model's keyword arguments.

    Models that also predict a variance (``out_channels = 2 C``, e.g. DiT with learned sigma) return
    their first C channels, as diffusers' pipelines do."""

    def __init__(self, model: nn.Module, null_class: bool = False) -> None:
        super().__init__()
        cfg = model.config
        self.model = model
        self.model_class = type(model).__name__
        size = cfg.sample_size
        H, W = (size, size) if isinstance(size, int) else tuple(size)
        C = int(cfg.in_channels)
        self.data_shape: tuple[int, ...] = (C, int(H), int(W))
        out = int(cfg.out_channels if cfg.out_channels is not None else C)
        if out not in (C, 2 * C):
            raise CheckpointError(
                f"{self.model_class}: out_channels={out} is neither in_channels={C} "
                "nor 2 x in_channels (learned variance)"
            )
        self.out_channels = out
        self.cond_kind = "text" if self.model_class in TEXT_MODELS else "labels"
        self.num_classes, self.has_null = (0, False) if self.cond_kind == "text" else self._classes(model, null_class)

    def check_cond(self, cond, batch: int) -> None:
        """Text conditions: a ``TextCondition`` (or bare (B, L, D) embeddings, or a dict of the model's keyword
        arguments) of batch B (labels are checked by the callers)."""
        check(cond, batch, text=True)

    def _classes(self, model: nn.Module, null_class: bool) -> tuple[int, bool]:
        cfg = model.config
        if self.model_class == "UNet2DModel":
            if cfg.class_embed_type is not None:
                raise CheckpointError(
                    f"UNet2DModel with class_embed_type={cfg.class_embed_type!r} is not supported "
                    "(only integer class labels)"
                )
            n = int(cfg.num_class_embeds or 0)
            if null_class and n < 2:
                raise ValueError(
                    "null_class=True needs a class-conditional UNet2DModel with at least two class embeddings"
                )
            return (n - 1, True) if null_class else (n, False)
        # DiT: labels 0..num_embeds_ada_norm - 1, plus the null label num_embeds_ada_norm when the
        # embedding table has a row for it (trained with label dropout).
        n = int(cfg.num_embeds_ada_norm or 0)
        tables = [
            m.num_embeddings
            for name, m in model.named_modules()
            if name.endswith("embedding_table") and isinstance(m, nn.Embedding)
        ]
        return n, bool(tables) and min(tables) > n

    def forward(self, x: Tensor, timestep: Tensor, cond=None) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        if self.cond_kind == "labels":
            kwargs = {"class_labels": cond}
        elif cond is None:
            kwargs = {"encoder_hidden_states": None}
        else:
            kwargs = as_condition(cond).model_kwargs(self.model_class, dtype)
        out = self.model(x.to(dtype), timestep=timestep.to(dtype), return_dict=False, **kwargs)[0]
        return out[:, : self.data_shape[0]].to(x.dtype)


class DiffusersTeacher(NetVelocity):
    """A diffusers denoiser on ``path`` predicting ``prediction`` (ours: eps, v, x0, velocity), as a ``Teacher``:
    its own part is the model call on its path at its timestep (``path_velocity``) and the time map onto its
    train steps (``from_linear``); checks, guidance and the change of path are the base's. Labels (B,) long;
    the null label is ``num_classes`` (DiT's label-dropout row, or the last UNet class embedding with
    ``null_class=True``). Text: a ``TextCondition``, whose unconditional side is the teacher's ``null_condition``
    (the empty prompt of the folder's text encoder) unless the record carries its own ``null``."""

    def __init__(self, net: DiffusersNet, path: AffinePath, prediction: str, num_train_timesteps: int) -> None:
        super().__init__(net, path, prediction)
        self.num_train_timesteps = int(num_train_timesteps)
        if isinstance(path, DiscreteVPPath):
            if path.num_steps != self.num_train_timesteps:
                raise ValueError(
                    f"alphas_cumprod has {path.num_steps} steps, num_train_timesteps is {self.num_train_timesteps}"
                )
            table = torch.log(torch.tensor((1.0, *path.alphas_cumprod), dtype=torch.float64))
            self.register_buffer("log_abar", table, persistent=False)  # log abar at t = j / N, j = 0..N
        elif not isinstance(path, LinearPath):
            raise ValueError(f"a diffusers teacher is on a discrete VP or the linear path, got {path.name!r}")

    def model_condition(self, cond, batch: int, device: torch.device):
        """Our condition (None = unconditional) -> the model's: class_labels (the null label for None), or a text
        record (the teacher's empty prompt for None, when it has one)."""
        net: DiffusersNet = self.net
        if net.cond_kind == "text":
            null = getattr(self, "null_condition", None)
            if cond is None and null is None:
                raise ValueError(
                    f"this text-conditioned {net.model_class} needs a condition: give a TextCondition (prompt "
                    "embeddings), or load it from a pipeline folder with tokenizer/ and text_encoder/ (empty prompt)"
                )
            return TextCondition.cat([null.to(device)] * batch) if cond is None else cond  # None: the empty prompt
        if net.num_classes == 0:
            return None
        if cond is None:
            cond = torch.full((batch,), net.num_classes, dtype=torch.long, device=device)
        if not net.has_null and bool(torch.any(cond == net.num_classes)):
            raise ValueError(
                f"this {net.model_class} has no null (unconditional) class: give labels in [0, {net.num_classes - 1}]; "
                "classifier-free guidance is unavailable "
                "(for a UNet2DModel whose last class embedding is the null class, pass null_class=True)"
            )
        return cond

    def timestep(self, t: Tensor) -> Tensor:
        """VP time t (B,) -> the model's fractional timestep tau = N t - 1 (float64), exactly the train step when
        within ``SNAP`` of one."""
        return snap(t.double() * self.num_train_timesteps - 1.0)

    def vp_step(self, t_lin: Tensor) -> tuple[Tensor, Tensor]:
        """t_lin (B,) -> (fractional DDPM step tau (B,), VP time t = (tau + 1) / N (B,)), in float64.

        Solves log abar(t) = -log(1 + r^2), r = t_lin / (1 - t_lin), on the piecewise-linear table of
        DiscreteVPPath (exact inverse, no bisection), then snaps to a train step within SNAP."""
        table = self.log_abar.to(t_lin.device)
        N = self.num_train_timesteps
        t64 = t_lin.double()
        r = t64 / (1.0 - t64).clamp_min(1e-300)
        target = -torch.log1p(r * r)  # log abar, decreasing in t
        target = target.clamp(min=float(table[-1]), max=0.0)
        j = torch.searchsorted(-table, -target).clamp(1, N)  # table[j - 1] >= target >= table[j]
        lo, hi = table[j - 1], table[j]
        frac = torch.where(lo > hi, (lo - target) / (lo - hi), torch.zeros_like(target))
        pos = (j - 1).double() + frac  # position on the grid j / N, i.e. t = pos / N
        tau = snap(pos - 1.0)
        return tau, (tau + 1.0) / N

    def from_linear(self, x_lin: Tensor, t_lin: Tensor) -> tuple[Tensor, Tensor]:
        """(x_lin, t_lin) -> (x, t) on the VP path at the matching (snapped) step: x = (alpha + sigma) x_lin."""
        _, t = self.vp_step(t_lin)
        return x_lin * expand_like(self.path.alpha(t) + self.path.sigma(t), x_lin), t

    def path_velocity(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        """dx/dt on the teacher's path at its time t: the model at timestep t N (flow matching: diffusers' sigma is
        our t) or N t - 1 (DDPM steps, clamped to [0, N - 1]), its prediction turned into the path's velocity."""
        cond = self.model_condition(cond, x.shape[0], x.device)
        N = self.num_train_timesteps
        if isinstance(self.path, LinearPath):
            pred = self.net(x, t * N, cond)  # diffusers flow matching: timestep = sigma * N
            return convert(pred, self.prediction, "velocity", x, t, self.path)
        pred = self.net(x, self.timestep(t).clamp(0, N - 1).to(x.dtype), cond)
        x0, eps = to_x0_eps(pred, self.prediction, x, t, self.path)
        if self.prediction == "x0":  # eps = (x - alpha x0) / sigma is 0 / 0 at t = 0, where E[eps | x0] = 0
            eps = torch.where(expand_like(self.path.sigma(t), x) > 0, eps, torch.zeros_like(eps))
        return from_x0_eps(x0, eps, "velocity", x, t, self.path)
