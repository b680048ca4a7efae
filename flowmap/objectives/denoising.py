"""Teacher training: denoising / flow matching on any affine path with any prediction target.

    x_t = alpha(t) x0 + sigma(t) eps                                  (the path)
    target = from_x0_eps(x0, eps, prediction, x_t, t, path)          (eps, x0, v, velocity or score)
    L = || net(x_t, t, t, c) - target ||^2                            (Ho et al. 2020, Eq. 14;
                                                                      Lipman et al. 2023, Eq. 23)

Label dropout (Ho & Salimans 2022, Sec. 3.2) replaces a share ``p_uncond`` of labels by the null label.
The linear path with the velocity target (rectified flow) takes its closed form, x_t = x0 + t (eps - x0) and
target eps - x0 (two tensor ops instead of the general path's coefficient tensors; the same values).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.objectives.common import drop_labels
from flowmap.paths import AffinePath, LinearPath, build_path
from flowmap.predictions import check_prediction, from_x0_eps
from flowmap.time_sampling import PairSampler, draw
from flowmap.types import LossOutput, expand_like


def time_law(time_sampling: str | PairSampler) -> PairSampler:
    """The law of the training time: a name of ``flowmap.time_sampling.LAWS`` (``uniform``, ``logit_normal``
    (Esser et al. 2024, Eq. 19) or ``lognormal``) with mean 0 and std 1, or a ``PairSampler(kind, mean, std)``, whose
    single-time law is drawn."""
    return time_sampling if isinstance(time_sampling, PairSampler) else PairSampler(time_sampling)


def sample_training_times(batch: int, device: torch.device, law: str | PairSampler, t_min: float = 1e-4) -> Tensor:
    """Training times (B,) of the law ``law`` (``time_law``), clamped to [t_min, 1 - t_min]."""
    law = time_law(law)
    return draw(law.kind, batch, device, law.mean, law.std).clamp(t_min, 1.0 - t_min)


class DenoisingLoss(nn.Module):
    """Per-sample regression loss of ``net`` onto the chosen prediction target on ``path``; the training time t is
    drawn from ``time_sampling`` (a law's name, or a ``PairSampler`` with the law's mean and std: ``time_law``)."""

    name = "denoising"

    def __init__(
        self,
        path: AffinePath | dict | str = "linear",
        prediction: str = "velocity",
        time_sampling: str | PairSampler = "uniform",
        p_uncond: float = 0.1,
    ) -> None:
        super().__init__()
        self.path = build_path(path)
        self.prediction = check_prediction(prediction)
        self.times = time_law(time_sampling)
        self.time_sampling = self.times.kind
        self.p_uncond = p_uncond
        sample_training_times(1, torch.device("cpu"), self.times)  # validate the law now

    def forward(self, net: nn.Module, x0: Tensor, cond: Tensor | None = None) -> LossOutput:
        B = x0.shape[0]
        t = sample_training_times(B, x0.device, self.times)
        eps = torch.randn_like(x0)
        if isinstance(self.path, LinearPath) and self.prediction == "velocity":
            target = eps - x0  # d/dt [(1 - t) x0 + t eps]
            x_t = torch.addcmul(x0, expand_like(t, x0), target)  # (1 - t) x0 + t eps
        else:
            x_t = self.path.sample(x0, eps, t)
            target = from_x0_eps(x0, eps, self.prediction, x_t, t, self.path)
        c = drop_labels(cond, int(getattr(net, "num_classes", 0)), self.p_uncond)
        pred = net(x_t, t, t, c)
        loss = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return LossOutput(loss=loss, logs={"loss": loss.detach(), "t_mean": t.mean()})

    def to_config(self) -> dict:
        return {
            "path": self.path.to_config(),
            "prediction": self.prediction,
            "time_sampling": self.time_sampling,
            "p_uncond": self.p_uncond,
        }
