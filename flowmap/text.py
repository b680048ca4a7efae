"""The text encoder of a text-to-image pipeline folder: prompts -> the embeddings its denoiser is conditioned on.

For a folder with ``tokenizer/`` and ``text_encoder/`` (Stable Diffusion 1/2 layout: one CLIP text encoder),
a prompt's condition is the last hidden state of the text encoder on the prompt padded to the tokenizer's
``model_max_length`` (Rombach et al. 2022, Sec. 3.3): ``encoder_hidden_states`` (B, L, D) of a
``UNet2DConditionModel``. Classifier-free guidance is against the empty prompt's embedding (Ho & Salimans 2022,
Eq. 6), as diffusers' pipelines do. The encoder is referenced by the teacher, the student file and the sampler
by its folder, never copied into the student; prompts are encoded once (``scripts/make_shards.py --prompts``,
``scripts/sample.py --prompt``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from flowmap.conditions import TextCondition
from flowmap.io import CheckpointError


class PromptEncoder(nn.Module):
    """condition(prompts: list[str]) -> ``TextCondition`` (B rows; its null the empty prompt's, ``null()``);
    encode(prompts) -> its (B, L, D) float32 prompt embeddings."""

    def __init__(self, tokenizer, text_encoder: nn.Module, source: str | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.encoder_class = type(text_encoder).__name__
        self.source = source
        self.max_length = int(tokenizer.model_max_length)
        self.dim = int(text_encoder.config.hidden_size)
        self._null: TextCondition | None = None

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> Tensor:
        """The prompt embeddings (B, L, D) float32 (``condition(prompts).prompt_embeds``)."""
        return self._encode(prompts)[0]

    @torch.no_grad()
    def condition(self, prompts: list[str] | str) -> TextCondition:
        """The prompts' ``TextCondition`` (embeddings, pooled embeddings for a text encoder with a projection,
        the attention mask when the encoder uses one) with the empty prompt's condition as its null."""
        return self._record(prompts).with_null(self.null())

    def null(self) -> TextCondition:
        """The empty prompt's condition (batch 1): the unconditional side of classifier-free guidance; encoded
        once and kept on the encoder's device."""
        if self._null is None or self._null.device != self.device:
            self._null = self._record([""])
        return self._null

    def _record(self, prompts: list[str] | str) -> TextCondition:
        embeds, pooled, mask = self._encode(prompts)
        return TextCondition(embeds, pooled, mask)

    @torch.no_grad()
    def _encode(self, prompts: list[str] | str) -> tuple[Tensor, Tensor | None, Tensor | None]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        out = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)
        pooled = getattr(out, "text_embeds", None)  # CLIPTextModelWithProjection: the projected pooled output
        return out[0].float(), None if pooled is None else pooled.float(), mask

    def describe(self) -> str:
        return (
            f"text-conditioned ({self.encoder_class}, {self.max_length} tokens x {self.dim}), "
            "CFG against the empty prompt"
        )

    def reference(self) -> dict:
        return {
            "folder": self.source,
            "class": self.encoder_class,
            "max_length": self.max_length,
            "dim": self.dim,
            "text": self.describe(),
        }

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype | None = None) -> PromptEncoder:
        import transformers

        root = Path(folder)
        try:
            config = json.loads((root / "text_encoder" / "config.json").read_text())
            name = (config.get("architectures") or ["CLIPTextModel"])[0]
            extra = {} if dtype is None else {"dtype": dtype}
            encoder = getattr(transformers, name).from_pretrained(
                str(root / "text_encoder"), use_safetensors=True, **extra
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        except Exception as err:  # noqa: BLE001 (transformers raises assorted types for missing or mismatched files)
            raise CheckpointError(
                f"{root}: could not load its tokenizer / text encoder ({type(err).__name__}: {err})"
            ) from None
        return cls(tokenizer, encoder, str(root.resolve()))


def find_text_encoder(folder: str | Path) -> bool:
    """Whether ``folder`` is a pipeline folder whose model_index.json names a ``tokenizer`` and a ``text_encoder``."""
    root = Path(folder)
    try:
        entries = json.loads((root / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(k in entries and (root / k).is_dir() for k in ("tokenizer", "text_encoder"))


def prompt_encoder_of(model, dtype: torch.dtype | None = None) -> PromptEncoder | None:
    """The prompt encoder of a text teacher (also inside wrappers) or of a student / config recording one."""
    inner = model
    while inner is not None:
        enc = getattr(inner, "prompt_encoder", None)
        if isinstance(enc, PromptEncoder):
            return enc
        inner = getattr(inner, "teacher", None)
    config = model if isinstance(model, dict) else getattr(model, "config", None)
    teacher = config.get("teacher") if isinstance(config, dict) else None
    if isinstance(teacher, str):
        teacher = json.loads(teacher)
    ref = teacher.get("text") if isinstance(teacher, dict) else None
    return None if not ref or not ref.get("folder") else PromptEncoder.from_folder(ref["folder"], dtype=dtype)
