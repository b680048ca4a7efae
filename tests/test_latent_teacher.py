"""A pipeline folder with vae/ is a latent teacher (flowmap/latent.py, teachers/diffusers_adapter.attach_codec).

- test_latent_teacher_describes_itself_and_codec_is_the_scaled_vae: the description line names the latent space;
  encode = (posterior mean - shift) * scaling and decode = D(z / scaling + shift) exactly (bit-equal to the VAE).
- test_latent_ddim_then_decode_equals_dit_pipeline: the teacher's DDIM (eta 0) on latents, then the codec's
  decode, equals diffusers' DiTPipeline images to 1e-4 relative at guidance 1 and 3 (AutoencoderKL), and at 3
  with an AutoencoderTiny.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from flowmap.latent import LatentCodec, codec_of
from teachers import CheckpointTeacher, describe_teacher
from teachers.diffusers_sampler import ddim_sample
from tests.latent_parts import dit_folder


def test_latent_teacher_describes_itself_and_codec_is_the_scaled_vae(tmp_path):
    folder = dit_folder(tmp_path / "dit", shift=0.25)
    teacher = CheckpointTeacher(str(folder))
    line = describe_teacher(teacher.description)
    assert "latent (4, 8, 8) via AutoencoderKL, scaling 0.18215, shift 0.25" in line, line
    assert teacher.data_shape == (4, 8, 8) and teacher.num_classes == 1000
    codec = codec_of(teacher)
    assert isinstance(codec, LatentCodec) and codec.image_shape((4, 8, 8)) == (3, 16, 16)
    assert not any(k.startswith("codec") for k in teacher.state_dict())  # referenced, not part of the teacher
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"))
    with torch.no_grad():
        z = codec.encode(x)
        assert torch.equal(z, (vae.encode(x).latent_dist.mean - 0.25) * 0.18215)
        assert torch.equal(codec.decode(z), vae.decode(z / 0.18215 + 0.25).sample.clamp(-1, 1))
    assert tuple(z.shape) == (2, 4, 8, 8)


@pytest.mark.parametrize(("vae", "guidance"), [("kl", 1.0), ("kl", 3.0), ("tiny", 3.0)])
def test_latent_ddim_then_decode_equals_dit_pipeline(tmp_path, vae, guidance):
    folder = dit_folder(tmp_path / "dit", vae=vae)
    pipe = diffusers.DiTPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 997]
    ref = pipe(
        class_labels=labels,
        guidance_scale=guidance,
        num_inference_steps=6,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    teacher = CheckpointTeacher(str(folder))
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    z = ddim_sample(teacher, noise, 6, cond=torch.tensor(labels), guidance=guidance)
    ours = (codec_of(teacher).decode(z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    assert np.abs(ref - ref[::-1]).max() > 1e-3  # the two labels give different images
