"""Tiny random latent-diffusion folders for the latent tests (no downloads): a DiTPipeline-like folder
(DiTTransformer2DModel on 4 x 8 x 8 latents + AutoencoderKL 16 x 16 RGB <-> 4 x 8 x 8 + DDIMScheduler)."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch


def tiny_vae(shift: float | None = None, seed: int = 1) -> diffusers.AutoencoderKL:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=16, shift_factor=shift,
    ).eval()


def tiny_dit(seed: int = 0) -> diffusers.DiTTransformer2DModel:
    """DiT with learned sigma (out 2 x 4 channels) and 1000 classes + DiT's null label 1000 (as DiTPipeline expects)."""
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000,
    ).eval()


def ddim_scheduler() -> diffusers.DDIMScheduler:
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def dit_folder(root: Path, shift: float | None = None) -> Path:
    """A DiTPipeline folder (model_index.json, transformer/, vae/, scheduler/) saved with diffusers' own writer."""
    pipe = diffusers.DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(shift), scheduler=ddim_scheduler())
    pipe.save_pretrained(str(root), safe_serialization=True)
    return Path(root)
