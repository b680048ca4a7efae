"""An EDM / k-diffusion denoiser D(x, sigma) (any ``nn.Module``) as a ``Teacher`` on our linear axis.

The math (EDM preconditioning, Karras et al. 2022, Eq. 7 and Table 1; the VE path carried onto the linear one)
lives in ``flowmap.edm_velocity`` so that a student built from the denoiser's own network reuses it."""

from flowmap.edm_velocity import EDMDenoiserTeacher

__all__ = ["EDMDenoiserTeacher"]
