"""diffusers' own deterministic sampler for a diffusers-folder teacher, in our coordinates: the sampler a
user of the folder knows, including the x0 clipping / thresholding no velocity field reproduces.

A DDIM step (eta = 0; Song et al. 2021a, Eq. 12) from level a, s to level a', s' of the VP variable x:

    x0 = x_lin - t v(x_lin, t),  eps = x_lin + (1 - t) v(x_lin, t)      (x_lin = x / (a + s), flowmap.paths)
    x0 <- clip(x0)                                                     (clip_sample / thresholding)
    x' = a' x0 + s' eps

Without clipping this is Euler on our linear axis from t to t'. The plan of levels comes from diffusers'
own ``set_timesteps``: DDIM evaluates the model at timestep k_i and steps to k_i - N // K; with the
``linspace`` spacing that target is not the next timestep k_{i+1}, and diffusers then evaluates the model
at k_{i+1} on the sample it made for level k_i - N // K. The plan keeps both lists, so every spacing
(``leading``, ``trailing``, ``linspace``) reproduces ``DDIMPipeline``; for the first two the plan is one
time grid (``ddim_time_grid``). A flow-matching folder is sampled with its own scheduler's sigmas (Euler,
as ``FlowMatchEulerDiscreteScheduler`` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmap.paths import DiscreteVPPath
from teachers.diffusers_adapter import FLOW_MATCH_SCHEDULERS, DiffusersTeacher, require_diffusers


@dataclass(frozen=True)
class DDIMPlan:
    """Step i evaluates the teacher at linear time ``t_eval[i]`` and moves to level ``t_next[i]`` (K,) each,
    float64. ``vp``: x is the VP variable (a + s = 1 / sqrt((1 - t)^2 + t^2)); else the linear one."""

    t_eval: tuple[float, ...]
    t_next: tuple[float, ...]
    vp: bool

    def scale(self, t: float) -> float:
        """alpha(t) + sigma(t) of the folder's path at linear time t (x = scale x_lin)."""
        return 1.0 / math.sqrt((1.0 - t) ** 2 + t**2) if self.vp else 1.0

    def grid(self) -> Tensor:
        """The plan as one time grid (K + 1,), when every step starts where the previous one ended. A last step
        onto the level it starts from (``set_alpha_to_one=False`` from timestep 0) is the identity for a
        velocity field and is dropped (with clipping it is not: ``ddim_sample`` keeps it)."""
        if any(abs(a - b) > 1e-12 for a, b in zip(self.t_next[:-1], self.t_eval[1:])):
            raise ValueError("this DDIM plan is not one time grid (linspace spacing): sample with ddim_sample")
        grid = torch.tensor((*self.t_eval, self.t_next[-1]), dtype=torch.float64)
        return grid[:-1] if grid[-1] >= grid[-2] else grid


def _t_lin(abar: Tensor) -> Tensor:
    """Linear time of a VP level: t = sigma / (alpha + sigma)."""
    a, s = abar.sqrt(), (1.0 - abar).sqrt()
    return s / (a + s)


def ddim_plan(teacher: DiffusersTeacher, steps: int, config: dict | None = None) -> DDIMPlan:
    """The levels of diffusers' DDIM (VP folders) or flow-matching Euler (flow folders) with ``steps`` steps,
    from the folder's scheduler config (``teacher.scheduler_config``; ``config`` overrides it)."""
    teacher = getattr(teacher, "teacher", teacher)  # a CheckpointTeacher holds the adapter
    config = dict(config if config is not None else getattr(teacher, "scheduler_config", {}))
    diffusers = require_diffusers()
    if not isinstance(teacher.path, DiscreteVPPath):
        name = (
            config.get("_class_name")
            if config.get("_class_name") in FLOW_MATCH_SCHEDULERS
            else "FlowMatchEulerDiscreteScheduler"
        )
        if config.get("use_dynamic_shifting", False):
            raise ValueError(
                "a scheduler with use_dynamic_shifting needs the resolution's shift (mu): not reproduced here"
            )
        if "flow_shift" in config:  # DPMSolver / UniPC with use_flow_sigmas name the shift flow_shift
            config["shift"] = config["flow_shift"]
        sched = getattr(diffusers, name).from_config(config)
        sched.set_timesteps(steps)
        sig = [float(s) for s in sched.sigmas.double()]
        return DDIMPlan(tuple(sig[:-1]), tuple(sig[1:]), vp=False)
    config.pop("_class_name", None)
    sched = diffusers.DDIMScheduler.from_config(config)  # the folder's spacing, offset and set_alpha_to_one
    sched.set_timesteps(steps)
    abar = torch.tensor(teacher.path.alphas_cumprod, dtype=torch.float64)
    k = sched.timesteps.long()
    prev = k - sched.config.num_train_timesteps // sched.num_inference_steps
    final = torch.tensor(1.0, dtype=torch.float64) if sched.config.set_alpha_to_one else abar[0]
    target = torch.where(prev >= 0, abar[prev.clamp_min(0)], final)
    return DDIMPlan(tuple(_t_lin(abar[k]).tolist()), tuple(_t_lin(target).tolist()), vp=True)


def x0_transform(config: dict):
    """diffusers' clipping of the x0 estimate (DDIMScheduler.step): dynamic thresholding (Saharia et al.
    2022, Sec. 2.3: s = quantile of |x0| per sample, clamped to [1, max]; x0 <- clamp(x0, -s, s) / s),
    else clip_sample to [-r, r], else the identity."""
    if config.get("thresholding", False):
        ratio, top = float(config.get("dynamic_thresholding_ratio", 0.995)), float(config.get("sample_max_value", 1.0))

        def threshold(x0: Tensor) -> Tensor:
            flat = x0.reshape(x0.shape[0], -1)
            s = torch.quantile(flat.abs().float(), ratio, dim=1).clamp(1.0, top).to(x0.dtype)[:, None]
            return (flat.clamp(-s, s) / s).reshape(x0.shape)

        return threshold
    if config.get("clip_sample", False):
        r = float(config.get("clip_sample_range", 1.0))
        return lambda x0: x0.clamp(-r, r)
    return lambda x0: x0


@torch.no_grad()
def ddim_sample(
    teacher,
    noise: Tensor,
    steps: int,
    cond: Tensor | None = None,
    guidance: float | Tensor = 1.0,
    config: dict | None = None,
    callback=None,
) -> Tensor:
    """diffusers' DDIMPipeline (eta = 0) for a VP folder, or its flow-matching Euler sampler, from ``noise``
    (B, *data_shape) ~ N(0, I); x0 clipped as the folder's scheduler config says. Returns the sample in
    diffusers' variable at the last level (data when ``set_alpha_to_one``), before the pipeline's
    ``x / 2 + 0.5`` image mapping. ``steps`` NFE; callback(i, x) after each step."""
    inner = getattr(teacher, "teacher", teacher)
    config = dict(config if config is not None else getattr(inner, "scheduler_config", {}))
    plan = ddim_plan(inner, steps, config)
    clip = x0_transform(config)
    B = noise.shape[0]
    x = noise
    for i, (t, t_next) in enumerate(zip(plan.t_eval, plan.t_next)):
        x_lin = x / plan.scale(t)
        tt = torch.full((B,), t, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        v = teacher.velocity(x_lin, tt, cond, guidance)
        x0 = clip(x_lin - t * v)
        eps = x_lin + (1.0 - t) * v
        c = plan.scale(t_next)
        x = c * ((1.0 - t_next) * x0 + t_next * eps)  # x' = a' x0 + s' eps
        if callback is not None:
            callback(i, x)
    return x
