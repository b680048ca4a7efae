"""Tiny random latent-diffusion folders for the latent tests (no downloads): a DiTPipeline-like folder
(DiTTransformer2DModel on 4 x 8 x 8 latents + AutoencoderKL 16 x 16 RGB <-> 4 x 8 x 8 + DDIMScheduler)."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch


def tiny_vae(shift: float | None = None, seed: int = 1) -> diffusers.AutoencoderKL:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        shift_factor=shift,
    ).eval()


def tiny_dit(seed: int = 0) -> diffusers.DiTTransformer2DModel:
    """DiT with learned sigma (out 2 x 4 channels) and 1000 classes + DiT's null label 1000 (as DiTPipeline expects)."""
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()


def ddim_scheduler() -> diffusers.DDIMScheduler:
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def tiny_autoencoder_tiny(seed: int = 1) -> diffusers.AutoencoderTiny:
    torch.manual_seed(seed)
    return diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).eval()


def dit_folder(root: Path, shift: float | None = None, vae: str = "kl") -> Path:
    """A DiTPipeline folder (model_index.json, transformer/, vae/, scheduler/) saved with diffusers' own writer;
    ``vae``: "kl" (AutoencoderKL) or "tiny" (AutoencoderTiny)."""
    autoencoder = tiny_vae(shift) if vae == "kl" else tiny_autoencoder_tiny()
    pipe = diffusers.DiTPipeline(transformer=tiny_dit(), vae=autoencoder, scheduler=ddim_scheduler())
    pipe.save_pretrained(str(root), safe_serialization=True)
    return Path(root)


def tiny_tokenizer(max_length: int = 12):
    """A CLIP tokenizer with a character vocabulary (no merges): each word is its letters, the last one with </w>."""
    import string

    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_text_encoder(vocab_size: int, max_length: int = 12, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_cond_unet(seed: int = 3) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def text_folder(root: Path) -> Path:
    """A StableDiffusionPipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/; no safety checker)."""
    tokenizer = tiny_tokenizer()
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=tiny_cond_unet(),
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(root), safe_serialization=True)
    return Path(root)


def tiny_clip_with_projection(vocab_size: int, seed: int, hidden: int = 12, projection: int = 8, max_length: int = 12):
    """CLIPTextModelWithProjection with two layers (the penultimate hidden state differs from the last)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_t5_tokenizer():
    """A word-level fast tokenizer (the letters a-z and digits as words, T5's </s> appended, <pad> to the right)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in [*string.ascii_lowercase, *string.digits, "a", "red", "cat", "two", "dogs", "blue", "sky"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5(vocab_size: int, d_model: int = 32, seed: int = 6):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def tiny_sd3(joint_dim: int = 32, pooled_dim: int = 16, seed: int = 7) -> diffusers.SD3Transformer2DModel:
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        caption_projection_dim=16,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=8,
    ).eval()


def sd3_folder(root: Path, t5: bool = True) -> Path:
    """A StableDiffusion3Pipeline folder: SD3Transformer2DModel + AutoencoderKL + CLIP-L, CLIP-G (tiny
    CLIPTextModelWithProjection, widths 12 and 12, projections 8 + 8) + T5 (d_model 32; ``t5=False``: none, the
    pipeline's zeros) + FlowMatchEulerDiscreteScheduler; the VAE has a shift_factor (SD3's pipeline decodes with it)."""
    tokenizer = tiny_tokenizer()
    tok3 = tiny_t5_tokenizer() if t5 else None
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift=0.1),
        text_encoder=tiny_clip_with_projection(len(tokenizer), seed=4),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_with_projection(len(tokenizer), seed=5),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=tiny_t5(len(tok3)) if t5 else None,
        tokenizer_3=tok3,
    )
    pipe.save_pretrained(str(root), safe_serialization=True)
    return Path(root)


def sdxl_folder(root: Path) -> Path:
    """A StableDiffusionXLPipeline folder for prompt encoding (CLIPTextModel + CLIPTextModelWithProjection, widths 16
    and 12, projection 8; force_zeros_for_empty_prompt, the pipeline's default); its UNet is the tiny SD one (not
    an SDXL UNet: the folder is for the text encoders, not a teacher)."""
    tokenizer = tiny_tokenizer()
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(len(tokenizer)),
        text_encoder_2=tiny_clip_with_projection(len(tokenizer), seed=5),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=tiny_cond_unet(),
        scheduler=ddim_scheduler(),
    )
    pipe.save_pretrained(str(root), safe_serialization=True)
    return Path(root)


def moved_student(folder: Path, out: Path):
    """(teacher, student file) of the diffusers pipeline ``folder``: the student built from the teacher's own net, its
    injected interval embedding moved off zero (so the student is not the teacher's Euler step), saved at ``out``."""
    from flowmap.models import save_student, student_from_teacher
    from teachers import CheckpointTeacher

    teacher = CheckpointTeacher(str(folder))
    student = student_from_teacher(teacher)
    with torch.no_grad():
        for p in student.net.injection.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return teacher, save_student(out, student, teacher=teacher.description)


def run_fresh(code: str, cwd: Path) -> None:
    """Run ``code`` in a fresh Python process that sees only this repository (no site customisation of the test run)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=cwd,
        timeout=120,
        env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
