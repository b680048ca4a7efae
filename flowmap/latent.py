"""The latent space of a latent diffusion model: its VAE as a small codec between images and the teacher's data.

A pipeline folder with ``vae/`` (``AutoencoderKL``, or ``AutoencoderTiny``) gives a teacher whose data is the
scaled latent (Rombach et al. 2022, Sec. 3 and App. G; Esser et al. 2024, Sec. 5.2.1 for the shift):

    z = (E(x) - shift) * scaling,        x = D(z / scaling + shift),        x (B, 3, H, W) in [-1, 1]

with E(x) the mean of the encoder's diagonal Gaussian (or a draw from it) and D the decoder. The codec is
referenced by the teacher, the student file and the exported pipeline (by its folder), never copied into the
student: distillation runs on latents only (encoded once into shards by ``scripts/make_shards.py --encode``) and
the codec decodes samples for viewing. It may sit in bf16 (``dtype``); results are returned in float32.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowmap.io import CheckpointError
from flowmap.wrapped import wrapped_attribute

VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


class LatentCodec(nn.Module):
    """encode(x (B, C, H, W) in [-1, 1]) -> z (B, c, H / f, W / f); decode(z) -> x in [-1, 1]; f = 2^(levels - 1).

    ``scaling`` and ``shift`` are the VAE config's ``scaling_factor`` and ``shift_factor`` (0 when absent);
    ``source`` is the folder the VAE was loaded from (recorded so that students and pipelines reference it)."""

    def __init__(
        self, vae: nn.Module, scaling: float, shift: float = 0.0, source: str | None = None, subfolder: str = "vae"
    ) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.vae_class = type(vae).__name__
        self.scaling = float(scaling)
        self.shift = float(shift)
        self.source = source
        self.subfolder = subfolder
        cfg = vae.config
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def image_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(C, H, W) of the images decoded from latents of shape (c, h, w)."""
        _, h, w = latent_shape
        return (self.image_channels, h * self.factor, w * self.factor)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The scaled latent of images x in [-1, 1]: the posterior mean, or a draw from it with ``generator``
        (``AutoencoderTiny``, a deterministic encoder: its latents)."""
        out = self.vae.encode(x.to(self.device, self.dtype))
        dist = getattr(out, "latent_dist", None)
        if dist is None:
            h = out.latents
        else:
            h = dist.mean if generator is None else dist.sample(generator=generator)
        return ((h.float() - self.shift) * self.scaling).to(x.device)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images in [-1, 1] (float32, clamped) of scaled latents z."""
        h = z.float() / self.scaling + self.shift
        x = self.vae.decode(h.to(self.device, self.dtype)).sample
        return x.float().clamp(-1.0, 1.0).to(z.device)

    def describe(self, latent_shape: tuple[int, ...]) -> str:
        """'latent (4, 8, 8) via AutoencoderKL, scaling 0.18215[, shift s]'."""
        text = f"latent {tuple(latent_shape)} via {self.vae_class}, scaling {self.scaling:g}"
        return text + (f", shift {self.shift:g}" if self.shift else "")

    def reference(self, latent_shape: tuple[int, ...]) -> dict:
        """What a student file or pipeline records to find and use the codec again (no weights)."""
        return {
            "folder": self.source,
            "subfolder": self.subfolder,
            "class": self.vae_class,
            "scaling_factor": self.scaling,
            "shift_factor": self.shift,
            "latent_shape": list(latent_shape),
            "image_shape": list(self.image_shape(latent_shape)),
            "text": self.describe(latent_shape),
        }

    @classmethod
    def from_folder(cls, folder: str | Path, subfolder: str = "vae", dtype: torch.dtype | None = None) -> LatentCodec:
        """The codec of ``folder/subfolder`` (config.json + safetensors weights; never pickle)."""
        from flowmap.diffusers_velocity import require_diffusers

        vae_dir = Path(folder) / subfolder
        cfg_file = vae_dir / "config.json"
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{vae_dir}: no readable VAE config.json ({err})") from None
        name = config.get("_class_name")
        if name not in VAE_CLASSES:
            raise CheckpointError(f"{vae_dir}: unsupported VAE class {name!r}; supported: {list(VAE_CLASSES)}")
        diffusers = require_diffusers()
        try:
            extra = {} if dtype is None else {"torch_dtype": dtype}
            vae = getattr(diffusers, name).from_pretrained(
                str(vae_dir), use_safetensors=True, low_cpu_mem_usage=False, **extra
            )
        except Exception as err:  # noqa: BLE001 (diffusers raises assorted types for missing or mismatched weights)
            raise CheckpointError(
                f"{vae_dir}: diffusers could not load the {name} ({type(err).__name__}: {err})"
            ) from None
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        return cls(vae, 0.18215 if scaling is None else scaling, shift or 0.0, str(Path(folder).resolve()), subfolder)

    @classmethod
    def from_reference(cls, ref: dict, dtype: torch.dtype | None = None) -> LatentCodec:
        """The codec a ``reference`` names; its recorded scaling and shift win over the folder's config."""
        if not ref.get("folder"):
            raise CheckpointError("the latent reference names no VAE folder")
        codec = cls.from_folder(ref["folder"], ref.get("subfolder", "vae"), dtype=dtype)
        codec.scaling, codec.shift = float(ref["scaling_factor"]), float(ref.get("shift_factor") or 0.0)
        return codec


def find_vae(folder: str | Path) -> Path | None:
    """``folder/vae`` of a pipeline folder (``model_index.json`` naming a ``vae``), else None."""
    root = Path(folder)
    index = root / "model_index.json"
    if not index.is_file():
        return None
    try:
        entries = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return root / "vae" if "vae" in entries and (root / "vae" / "config.json").is_file() else None


def latent_reference(config: dict | None) -> dict | None:
    """The latent reference recorded in a student config (``config["teacher"]["latent"]``) or a teacher
    description (``["latent"]``); None for a pixel-space model."""
    if not config:
        return None
    if "latent" in config and isinstance(config["latent"], dict):
        return config["latent"]
    teacher = config.get("teacher")
    if isinstance(teacher, str):
        try:
            teacher = json.loads(teacher)
        except json.JSONDecodeError:
            return None
    return teacher.get("latent") if isinstance(teacher, dict) else None


def codec_of(model, dtype: torch.dtype | None = None) -> LatentCodec | None:
    """The codec of a latent teacher (also inside wrappers), a student (``load_student`` / ``load_model``: loaded
    from the folder its config references) or a config dict; None for pixel-space models."""
    codec = wrapped_attribute(model, "codec", LatentCodec)
    if codec is not None:
        return codec
    config = model if isinstance(model, dict) else getattr(model, "config", None)
    ref = latent_reference(config if isinstance(config, dict) else None)
    return None if ref is None else LatentCodec.from_reference(ref, dtype=dtype)


def decode_in_chunks(codec: LatentCodec, z: Tensor, batch_size: int = 64) -> Tensor:
    """codec.decode over chunks of ``batch_size`` latents (memory holds one chunk's activations)."""
    return torch.cat([codec.decode(z[i : i + batch_size]) for i in range(0, z.shape[0], batch_size)])


def encode_items(
    codec: LatentCodec, items: Iterable[tuple[Tensor, Any]], batch_size: int = 64, device: str | torch.device = "cpu"
) -> Iterator[tuple[Tensor, Any]]:
    """(z (c, h, w) float32 on the CPU, y) per (x (C, H, W) in [-1, 1], y) item, encoded ``batch_size`` at a time
    on ``device`` (memory holds one chunk): the one encode pass of ``scripts/make_shards.py --encode``."""
    if batch_size < 1:
        raise ValueError(f"the encode batch size must be at least 1, got {batch_size}")
    codec.to(device)
    xs: list[Tensor] = []
    ys: list[Any] = []

    def flush():
        z = codec.encode(torch.stack(xs).to(device)).cpu()
        rows = list(zip(z, ys))
        xs.clear()
        ys.clear()
        return rows

    for x, y in items:
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(y)
        if len(xs) == batch_size:
            yield from flush()
    if xs:
        yield from flush()
