"""An EDM / k-diffusion denoiser D(x, sigma) (any ``nn.Module``) as a velocity field on our linear axis (the math
of ``teachers.EDMDenoiserTeacher``, kept in the core so a student built from the denoiser reuses it).

Convention of the wrapped module (Karras et al. 2022, "Elucidating the Design Space...", Eq. 2-3;
k-diffusion's ``Denoiser``): data x0 is noised on the VE path x = x0 + sigma eps and D(x, sigma)
returns the denoised estimate of x0. With ``sigma_data`` given, the module is instead the raw
network F and the EDM preconditioning (Karras et al. 2022, Eq. 7 and Table 1) is applied here:

    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2),  c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
    c_in = 1 / sqrt(sigma^2 + sigma_d^2),        c_noise = log(sigma) / 4

The teacher type's own part (``flowmap.teacher.Teacher`` does the rest): the velocity on VEPath(sigma_max), whose
time is t = sigma / sigma_max,

    dx/dt = sigma_max dx/dsigma = sigma_max (x - D(x, sigma)) / sigma       (Karras et al. 2022, Alg. 1, line 4)

which the base carries onto the linear path (``flowmap.paths``): t_lin = sigma / (1 + sigma), x_lin = x / (1 + sigma),
v_lin = (1 + sigma) dx/dsigma - x = (x_lin - x0) / t_lin = eps - x0.

diffusers' EDM schedulers (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``) define the same
preconditioning; with their ``prediction_type="v_prediction"`` c_out changes sign (``prediction="v_prediction"``).

D is only trained on [sigma_min, sigma_max]: the time map (``from_linear``) clamps sigma to it, with x scaled to that
level (x = (1 + sigma_c) x_lin), so the field stays finite at t_lin = 0 and t_lin = 1. Below sigma_min the field is the
velocity at sigma_min; above sigma_max (t_lin > sigma_max / (1 + sigma_max)) ``to_linear`` holds the denoiser's
x0 = D(x, sigma_max) and gives v_lin = (x_lin - x0) / t_lin, the velocity consistent with x_lin = (1 - t_lin) x0 +
t_lin eps (eps - x0 with eps = x_lin at t_lin = 1). Together: v_lin = (x_lin - D(x, sigma_c)) / max(t_lin, t_min),
t_min = sigma_min / (1 + sigma_min).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.paths import VEPath
from flowmap.types import expand_like
from flowmap.velocity import NetVelocity


class EDMDenoiserTeacher(NetVelocity):
    """Teacher from ``denoiser(x, sigma)`` (or ``denoiser(x, sigma, labels)`` when ``num_classes > 0``).

    Shapes: x (B, *data_shape), sigma (B,) float, labels (B,) long with the null label ``num_classes``.
    ``data_shape`` defaults to ``denoiser.data_shape`` when the module has one."""

    def __init__(
        self,
        denoiser: nn.Module,
        sigma_data: float | None = None,
        data_shape: tuple[int, ...] | None = None,
        num_classes: int = 0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        prediction: str = "epsilon",
    ) -> None:
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"EDM prediction must be 'epsilon' or 'v_prediction' (c_out's sign), got {prediction!r}")
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if sigma_data is not None and sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        super().__init__(denoiser, VEPath(sigma_max), "x0")
        self.sigma_data = None if sigma_data is None else float(sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.edm_prediction = prediction
        shape = data_shape if data_shape is not None else getattr(denoiser, "data_shape", ())
        self.data_shape = tuple(int(d) for d in shape)
        self.num_classes = int(num_classes)
        self.cond_kind = "labels"  # the denoiser takes class labels (or none)

    def denoise(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """x0 estimate D(x, sigma): x (B, ...), sigma (B,)."""
        args = (labels,) if self.num_classes > 0 else ()
        if self.sigma_data is None:
            return self.net(x, sigma, *args)
        sd2 = self.sigma_data**2
        sig = expand_like(sigma, x)
        c_skip = sd2 / (sig**2 + sd2)
        c_out = sig * self.sigma_data / torch.sqrt(sig**2 + sd2)
        c_out = -c_out if self.edm_prediction == "v_prediction" else c_out
        c_in = 1.0 / torch.sqrt(sig**2 + sd2)
        c_noise = torch.log(sigma) / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise, *args)

    def from_linear(self, x_lin: Tensor, t_lin: Tensor) -> tuple[Tensor, Tensor]:
        """(x_lin, t_lin) -> (x, t) on VEPath(sigma_max): sigma = t_lin / (1 - t_lin) clamped to [sigma_min, sigma_max]
        in float64, x = (1 + sigma) x_lin, t = sigma / sigma_max (the denoiser is only trained inside the range)."""
        t64 = t_lin.double()
        sigma = (t64 / (1.0 - t64).clamp_min(1e-300)).clamp(self.sigma_min, self.sigma_max)
        return x_lin * expand_like(1.0 + sigma, x_lin), sigma / self.sigma_max

    def to_linear(self, v: Tensor, x: Tensor, t: Tensor, t_lin: Tensor) -> Tensor:
        """The base's conversion, (x_lin - x0) / t_c at the clamped linear time t_c = sigma_c / (1 + sigma_c), rescaled
        by t_c / t_lin where t_lin > t_c (above sigma_max): x0 is held and v_lin = (x_lin - x0) / t_lin.
        v (B, *data_shape), t (B,) the VE time of sigma_c, t_lin (B,) the unclamped linear time."""
        v_lin = super().to_linear(v, x, t, t_lin)
        sigma = self.path.sigma(t.double())
        t_c, t64 = sigma / (1.0 + sigma), t_lin.double()
        return v_lin * expand_like(torch.where(t64 > t_c, t_c / t64, torch.ones_like(t64)), v_lin)

    def path_velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """dx/dt on x = x0 + sigma eps, sigma = sigma_max t: sigma_max (x - D(x, sigma)) / sigma (Karras et al. 2022,
        Alg. 1's slope times d sigma / dt). x: (B, *data_shape), t: (B,); cond None is the null label."""
        if self.num_classes > 0 and cond is None:
            cond = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        sigma = self.path.sigma(t)
        x0 = self.denoise(x, sigma.to(x.dtype), cond)
        return expand_like(self.path.d_sigma(t), x) * (x - x0) / expand_like(sigma, x)
