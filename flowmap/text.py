"""The text encoder(s) of a text-to-image pipeline folder: prompts -> the condition its denoiser takes.

A prompt's ``TextCondition`` is what the folder's own pipeline (``encode_prompt``) gives, for the three layouts:

    clip  (Stable Diffusion 1/2: tokenizer/, text_encoder/)     prompt_embeds = last hidden state (B, 77, D)
          on the prompt padded to ``model_max_length`` (Rombach et al. 2022, Sec. 3.3); the attention mask when the
          encoder's config uses one; pooled = the projection of a ``CLIPTextModelWithProjection``, else None
    sdxl  (two CLIPs: + tokenizer_2/, text_encoder_2/)          prompt_embeds = the two penultimate hidden states
          concatenated on D (B, 77, D1 + D2); pooled = the first 2-D output (the projection of text_encoder_2)
          (Podell et al. 2023, Sec. 2.1); the empty prompt is all zeros with ``force_zeros_for_empty_prompt``
    sd3   (CLIP-L, CLIP-G, T5: + tokenizer_3/, text_encoder_3/) clip = the two penultimate hidden states on D, zero
          padded to T5's width; prompt_embeds = [clip ; T5 last hidden state] on L (B, 77 + 256, D_T5) (without a
          T5: zeros (B, 256, joint_attention_dim) in its place, as the pipeline does); pooled = the two projections
          concatenated (B, P1 + P2) (Esser et al. 2024, Sec. 5.2)

Classifier-free guidance is against the empty prompt's condition (Ho & Salimans 2022, Eq. 6), as diffusers'
pipelines do. The encoders are referenced by the teacher, the student file and the sampler by their folder, never
copied into the student; prompts are encoded once (``scripts/make_shards.py --prompts``, ``scripts/sample.py
--prompt``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from flowmap.conditions import TextCondition
from flowmap.io import CheckpointError
from flowmap.wrapped import wrapped_attribute

LAYOUTS = ("clip", "sdxl", "sd3")
ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2", "tokenizer_3")


class PromptEncoder(nn.Module):
    """condition(prompts: list[str]) -> ``TextCondition`` (B rows; its null the empty prompt's, ``null()``);
    encode(prompts) -> its (B, L, D) float32 prompt embeddings. ``layout`` (module docstring): "clip", "sdxl" or
    "sd3"; ``max_sequence_length``: T5 tokens of "sd3"; ``t5_dim``: the width of the zeros standing in for a missing
    T5 ("sd3", the transformer's ``joint_attention_dim``); ``zero_null``: the empty prompt is all zeros."""

    def __init__(
        self,
        tokenizer,
        text_encoder: nn.Module,
        source: str | None = None,
        *,
        tokenizer_2=None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_3=None,
        text_encoder_3: nn.Module | None = None,
        layout: str = "clip",
        max_sequence_length: int = 256,
        t5_dim: int | None = None,
        zero_null: bool = False,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown prompt layout {layout!r}; choose from {list(LAYOUTS)}")
        if layout != "clip" and text_encoder_2 is None:
            raise ValueError(f"the {layout} layout needs a second text encoder (text_encoder_2, tokenizer_2)")
        if layout == "sd3" and text_encoder_3 is None and t5_dim is None:
            raise ValueError(
                "an sd3 layout without text_encoder_3 needs t5_dim (the transformer's joint_attention_dim)"
            )
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.requires_grad_(False).eval()
        self.text_encoder_3 = None if text_encoder_3 is None else text_encoder_3.requires_grad_(False).eval()
        self.layout, self.source = layout, source
        self.max_sequence_length, self.zero_null = int(max_sequence_length), bool(zero_null)
        self.t5_dim = int(text_encoder_3.config.d_model) if text_encoder_3 is not None else t5_dim
        self.encoder_class = type(text_encoder).__name__
        self.encoder_classes = [type(e).__name__ for e in self.encoders()]
        self.max_length = int(tokenizer.model_max_length)  # CLIP tokens (sd3: both CLIPs use the first's length)
        hidden = [int(e.config.hidden_size) for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        self.dim = sum(hidden) if layout != "sd3" else max(sum(hidden), int(self.t5_dim))
        self.length = self.max_length + (self.max_sequence_length if layout == "sd3" else 0)
        self._null: TextCondition | None = None

    def encoders(self) -> list[nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    def components(self) -> dict:
        """The pipeline components (``tokenizer``, ``text_encoder``, ``tokenizer_2``, ...; None where absent)."""
        return {name: getattr(self, name) for pair in zip(TOKENIZER_NAMES, ENCODER_NAMES) for name in pair}

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> Tensor:
        """The prompt embeddings (B, L, D) float32 (``condition(prompts).prompt_embeds``)."""
        return self._encode(prompts)[0]

    @torch.no_grad()
    def condition(self, prompts: list[str] | str) -> TextCondition:
        """The prompts' ``TextCondition`` (embeddings, pooled embeddings, the attention mask when the encoder uses
        one) with the empty prompt's condition as its null."""
        return self._record(prompts).with_null(self.null())

    def null(self) -> TextCondition:
        """The empty prompt's condition (batch 1): the unconditional side of classifier-free guidance; encoded
        once and kept on the encoder's device."""
        if self._null is None or self._null.device != self.device:
            null = self._record([""])
            if self.zero_null:  # SDXL's force_zeros_for_empty_prompt
                null = TextCondition(
                    torch.zeros_like(null.prompt_embeds),
                    None if null.pooled_embeds is None else torch.zeros_like(null.pooled_embeds),
                    null.attention_mask,
                )
            self._null = null
        return self._null

    def _record(self, prompts: list[str] | str) -> TextCondition:
        embeds, pooled, mask = self._encode(prompts)
        return TextCondition(embeds, pooled, mask)

    def _tokens(self, tokenizer, prompts: list[str], length: int) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")

    @torch.no_grad()
    def _encode(self, prompts: list[str] | str) -> tuple[Tensor, Tensor | None, Tensor | None]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.layout == "clip":
            tokens = self._tokens(self.tokenizer, prompts, self.max_length)
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = tokens.attention_mask.to(self.device)
            out = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)
            pooled = getattr(out, "text_embeds", None)  # CLIPTextModelWithProjection: the projected pooled output
            return out[0].float(), None if pooled is None else pooled.float(), mask
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            length = self.max_length if self.layout == "sd3" else int(tokenizer.model_max_length)
            ids = self._tokens(tokenizer, prompts, length).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())  # the penultimate layer (clip_skip None)
            pooled.append(out[0].float() if out[0].dim() == 2 else None)
        clip = torch.cat(hidden, dim=-1)
        if self.layout == "sdxl":
            return clip, next((p for p in pooled if p is not None), None), None
        if self.text_encoder_3 is not None:
            ids = self._tokens(self.tokenizer_3, prompts, self.max_sequence_length).input_ids.to(self.device)
            t5 = self.text_encoder_3(ids)[0].float()
        else:
            t5 = torch.zeros((len(prompts), self.max_sequence_length, self.t5_dim), device=clip.device)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1), None

    def describe(self) -> str:
        names = " + ".join(self.encoder_classes)
        return f"text-conditioned ({names}, {self.length} tokens x {self.dim}), CFG against the empty prompt"

    def reference(self) -> dict:
        return {
            "folder": self.source,
            "class": self.encoder_class,
            "classes": self.encoder_classes,
            "layout": self.layout,
            "max_length": self.length,
            "dim": self.dim,
            "max_sequence_length": self.max_sequence_length,
            "t5_dim": self.t5_dim,
            "zero_null": self.zero_null,
            "text": self.describe(),
        }

    @classmethod
    def from_components(cls, components: dict, reference: dict | None = None, source: str | None = None):
        """The encoder of pipeline components (``tokenizer``, ``text_encoder``, ``tokenizer_2``, ...) with the
        layout options a ``reference`` recorded (an exported pipeline's)."""
        ref = dict(reference or {})
        options = {
            k: ref[k] for k in ("layout", "max_sequence_length", "t5_dim", "zero_null") if ref.get(k) is not None
        }
        extra = {k: components.get(k) for k in ("tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")}
        return cls(components["tokenizer"], components["text_encoder"], source, **extra, **options)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype | None = None) -> PromptEncoder:
        """Every tokenizer / text encoder the folder's model_index.json names (classes as named there, safetensors
        weights only), in the layout of its pipeline."""
        import transformers

        root = Path(folder)
        try:
            index = _model_index(root)
            components = {}
            for name in (*TOKENIZER_NAMES, *ENCODER_NAMES):
                entry = index.get(name)
                if not isinstance(entry, list) or entry[-1] is None or not (root / name).is_dir():
                    continue
                if name.startswith("tokenizer"):
                    kind = getattr(transformers, entry[-1], transformers.AutoTokenizer)
                    components[name] = kind.from_pretrained(str(root / name))
                else:
                    config = json.loads((root / name / "config.json").read_text())
                    kind = entry[-1] if hasattr(transformers, entry[-1]) else (config.get("architectures") or [""])[0]
                    extra = {} if dtype is None else {"dtype": dtype}
                    components[name] = getattr(transformers, kind).from_pretrained(
                        str(root / name), use_safetensors=True, **extra
                    )
            model_cfg = _model_config(root)
            layout = (
                "sd3"
                if model_cfg.get("_class_name") == "SD3Transformer2DModel"
                else "sdxl"
                if "text_encoder_2" in components
                else "clip"
            )
            options = {
                "layout": layout,
                "zero_null": layout == "sdxl" and bool(index.get("force_zeros_for_empty_prompt")),
            }
            if layout == "sd3":
                options["t5_dim"] = int(model_cfg["joint_attention_dim"])
            return cls.from_components(components, options, str(root.resolve()))
        except Exception as err:  # noqa: BLE001 (transformers raises assorted types for missing or mismatched files)
            raise CheckpointError(
                f"{root}: could not load its tokenizers / text encoders ({type(err).__name__}: {err})"
            ) from None


def _model_index(root: Path) -> dict:
    try:
        return json.loads((root / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):  # a bare folder of tokenizer/ + text_encoder/
        return {"tokenizer": ["transformers", "AutoTokenizer"], "text_encoder": ["transformers", ""]}


def _model_config(root: Path) -> dict:
    """The denoiser's config.json (transformer/ or unet/) of a pipeline folder; {} when there is none."""
    for sub in ("transformer", "unet"):
        try:
            return json.loads((root / sub / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return {}


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
    enc = wrapped_attribute(model, "prompt_encoder", PromptEncoder)
    if enc is not None:
        return enc
    config = model if isinstance(model, dict) else getattr(model, "config", None)
    teacher = config.get("teacher") if isinstance(config, dict) else None
    if isinstance(teacher, str):
        teacher = json.loads(teacher)
    ref = teacher.get("text") if isinstance(teacher, dict) else None
    return None if not ref or not ref.get("folder") else PromptEncoder.from_folder(ref["folder"], dtype=dtype)
