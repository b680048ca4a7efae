"""A flow-map student made from a diffusers model, as a diffusers ``DiffusionPipeline`` (no training code).

Folder written by ``FlowMapPipeline.save_pretrained(OUT)`` (``scripts/export.py STUDENT --format diffusers``),
every component in diffusers' own layout (config + safetensors):

    OUT/model_index.json                  {"_class_name": "FlowMapPipeline", "unet" | "transformer": [...], ...}
    OUT/unet/ or OUT/transformer/         the student's network in its original diffusers class (LoRA merged)
    OUT/injection/                        FlowMapInjection: the injected interval (and guidance) embedding; its
                                          config holds the student config (teacher, parametrization, metadata)
    OUT/scheduler/scheduler_config.json   FlowMapScheduler: 1-4 uniform flow-map jumps, the method's gamma
    OUT/vae/                              latent students only: the teacher's VAE (AutoencoderKL), unchanged;
                                          its scaling / shift are recorded in the student config (``flowmap.latent``)
    OUT/text_encoder/, OUT/tokenizer/     text-to-image students only: the teacher's text encoder(s), unchanged
    (+ _2/, _3/ where the teacher has)    (SD3: CLIP-L, CLIP-G, T5; ``pipe(prompt=[...])`` encodes as the teacher's
                                          pipeline does, ``flowmap.text``)
    OUT/pipeline_flowmap.py               names the class for diffusers' ``custom_pipeline`` (imports flowmap)
    OUT/flowmap/student.json              the student config again, to read without loading anything

    pipe = FlowMapPipeline.from_pretrained(OUT)
    pipe = DiffusionPipeline.from_pretrained(OUT, custom_pipeline="pipeline_flowmap", trust_remote_code=True)
    images = pipe(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images

Sampling is flowmap's multistep flow-map sampler x_{k+1} = X(x_k, t_k, t_{k+1}) on a uniform grid, with the
method's re-noising gamma (``flowmap.sampling.sample``), the same function ``load_student(...).sample`` runs; a
latent student's samples are then decoded by the VAE (``output_type="latent"`` returns the latents).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import Tensor

from flowmap.conditions import TextCondition, as_condition
from flowmap.conditions import to as condition_to
from flowmap.latent import LatentCodec, latent_reference
from flowmap.nets.diffusers_net import DiffusersStudentNet, IntervalInjection, merged_lora
from flowmap.sampling import sample
from flowmap.student import FlowMap
from flowmap.text import ENCODER_NAMES, TOKENIZER_NAMES, PromptEncoder

PIPELINE_MODULE = "pipeline_flowmap"  # the module file shipped in the folder for diffusers' ``custom_pipeline``
PIPELINE_MODULE_TEXT = f'''"""flowmap's FlowMapPipeline for diffusers' own loader (the classes live in ``flowmap``):

    pipe = DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline="{PIPELINE_MODULE}", trust_remote_code=True)
"""

import flowmap.pipeline as _flowmap_pipeline

FlowMapPipeline = _flowmap_pipeline.FlowMapPipeline
'''


def _subfolder(model_class: str) -> str:
    return "unet" if "UNet" in model_class else "transformer"


class FlowMapScheduler(SchedulerMixin, ConfigMixin):
    """The flow-map sampler's settings (a pipeline component, ``scheduler/scheduler_config.json``): K jumps
    x_{k+1} = X(x_k, t_k, t_{k+1}) on the uniform grid t_k = t_start + (t_end - t_start) k / K, K = 1..max_steps,
    re-noising ``gamma`` between jumps (the method's default, ``flowmap.sampling.sample``)."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self,
        default_steps: int = 1,
        max_steps: int = 4,
        gamma: float = 0.0,
        grid: str = "uniform",
        t_start: float = 1.0,
        t_end: float = 0.0,
    ) -> None:
        self.timesteps = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """``timesteps`` (K + 1,): t_0 = t_start > ... > t_K = t_end."""
        self.timesteps = torch.linspace(self.config.t_start, self.config.t_end, int(num_inference_steps) + 1)
        self.timesteps = self.timesteps.to(device) if device is not None else self.timesteps


class FlowMapInjection(ModelMixin, ConfigMixin):
    """The student's injected interval (and guidance) embedding (``flowmap.nets.diffusers_net.IntervalInjection``)
    as a pipeline component (``injection/``, config.json + safetensors); its config also holds the student config
    (teacher entry, parametrization and the file's metadata), without the diffusers model's own config."""

    @register_to_config
    def __init__(
        self,
        width: int,
        freq_dim: int = 128,
        time_scale: float = 1000.0,
        guidance_input: bool = False,
        student: dict | None = None,
    ) -> None:
        super().__init__()
        self.embedding = IntervalInjection(width, freq_dim, time_scale, guidance_input)


class FlowMapPipeline(DiffusionPipeline):
    """Samples of a flow-map student in 1-4 network calls. Components (diffusers' layout, loadable by
    ``DiffusionPipeline.from_pretrained``): ``unet`` or ``transformer`` (the student's network in its diffusers
    class), ``injection`` (``FlowMapInjection``), ``scheduler`` (``FlowMapScheduler``), and ``vae`` /
    ``text_encoder`` / ``tokenizer`` (and ``_2`` / ``_3``: SDXL, SD3) for latent / text-to-image students.
    ``flow_map`` is the student X(x, s, t) built around them; ``student_config`` its config."""

    _optional_components = ["unet", "transformer", "vae", *TOKENIZER_NAMES, *ENCODER_NAMES]

    def __init__(
        self,
        injection: FlowMapInjection,
        scheduler: FlowMapScheduler,
        unet=None,
        transformer=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    ) -> None:
        super().__init__()
        model = unet if unet is not None else transformer
        if model is None:
            raise ValueError("FlowMapPipeline needs the student's network (unet or transformer)")
        config = json.loads(json.dumps(dict(injection.config.student or {})))
        net_config = {k: v for k, v in config["net"].items() if k not in ("name", "model_class", "model_config")}
        net = DiffusersStudentNet(
            type(model).__name__, dict(model.config), model=model, injection=injection.embedding, **net_config
        )
        config["net"] = net.config
        self.register_modules(
            unet=unet,
            transformer=transformer,
            injection=injection,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self.codec = None
        ref = latent_reference(config)
        if vae is not None and ref is not None:  # with the scaling / shift the student was trained on
            self.codec = LatentCodec(vae, float(ref["scaling_factor"]), float(ref.get("shift_factor") or 0.0))
        self.prompt_encoder = None
        if text_encoder is not None and tokenizer is not None:  # in the layout the teacher's pipeline encodes with
            teacher = config.get("teacher") if isinstance(config.get("teacher"), dict) else {}
            parts = {"text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2}
            parts.update(text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
            self.prompt_encoder = PromptEncoder.from_components(
                {"tokenizer": tokenizer, "text_encoder": text_encoder, **parts}, teacher.get("text")
            )
        self.flow_map = FlowMap(net, config.get("parametrization")).eval()
        self.student_config = config

    @property
    def sampler(self) -> dict:
        return dict(self.scheduler.config)

    @classmethod
    def from_flow_map(cls, flow_map: FlowMap, student_config: dict) -> FlowMapPipeline:
        """A pipeline around a student (LoRA adapters, if any, merged into the weights)."""
        net = flow_map.net
        if not isinstance(net, DiffusersStudentNet):
            raise ValueError("the diffusers export needs a student made from a diffusers model (net 'diffusers')")  # noqa: TRY004 (scripts report ValueErrors in one line)
        if "lora" in net.config:
            net = merged_lora(net)
            flow_map = FlowMap(net, flow_map.param)
        config = {**json.loads(json.dumps(student_config, default=str)), "net": net.config}
        config["parametrization"] = flow_map.param.to_config()
        saved = dict(config.get("sampler") or {})  # the method's defaults, e.g. gamma 1 for CD
        scheduler = FlowMapScheduler(**{k: v for k, v in saved.items() if k in ("gamma", "default_steps")})
        c = net.config
        stored = {**config, "net": {k: v for k, v in c.items() if k != "model_config"}}
        injection = FlowMapInjection(net.injection.width, c["freq_dim"], c["time_scale"], c["guidance_input"], stored)
        injection.embedding.load_state_dict(net.injection.state_dict())
        ref = latent_reference(config)
        text = config["teacher"].get("text") if isinstance(config.get("teacher"), dict) else None
        codec = None if ref is None else LatentCodec.from_reference(ref)
        encoder = PromptEncoder.from_folder(text["folder"]) if text else None
        return cls(
            injection,
            scheduler,
            **{_subfolder(c["model_class"]): net.model},
            vae=None if codec is None else codec.vae,
            **({} if encoder is None else encoder.components()),
        )

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' folder of every component (safetensors), plus ``pipeline_flowmap.py`` for ``custom_pipeline``
        and ``flowmap/student.json`` (the student config, readable without loading anything)."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        out = Path(save_directory)
        (out / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_MODULE_TEXT)
        (out / "flowmap").mkdir(exist_ok=True)
        (out / "flowmap" / "student.json").write_text(json.dumps(self.student_config, indent=1))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> FlowMapPipeline:
        """Load a folder written by ``save_pretrained`` with diffusers' loader (safetensors only; no pickle)."""
        device = kwargs.pop("device", None)
        kwargs.setdefault("use_safetensors", True)
        pipe = super().from_pretrained(str(pretrained_model_name_or_path), **kwargs)
        return pipe.to(device) if device is not None else pipe

    def to(self, *args, **kwargs) -> FlowMapPipeline:
        self.flow_map.to(*args, **kwargs)  # the model and the injected embedding
        if self.codec is not None:
            self.codec.to(*args, **kwargs)
        if self.prompt_encoder is not None:
            self.prompt_encoder.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        class_labels: Tensor | int | None = None,
        encoder_hidden_states=None,
        prompt: str | list[str] | None = None,
        condition: TextCondition | None = None,
        guidance_scale: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images from noise ``latents`` (B, C, H, W) at t = 1 (drawn with ``generator`` when None) in
        ``num_inference_steps`` flow-map jumps. ``output_type``: "pil", "np" (in [0, 1], from data in [-1, 1]),
        "pt" (the samples in [-1, 1]; decoded by the VAE for a latent student) or "latent" (the raw samples).
        ``prompt`` (text-to-image students): encoded by the folder's text encoder(s) into the full
        ``TextCondition`` (prompt and pooled embeddings, mask, the empty prompt's null), one sample per prompt;
        or give that record as ``condition`` (``encoder_hidden_states``: prompt embeddings (B, L, D) or a dict of
        the denoiser's keyword arguments, ``flowmap.conditions.as_condition``)."""
        fm = self.flow_map
        device = next(fm.parameters()).device
        if prompt is not None:
            if self.prompt_encoder is None:
                raise ValueError("prompt= needs a text-to-image student (a folder with text_encoder/ and tokenizer/)")
            condition = self.prompt_encoder.condition(prompt)
        if condition is None and encoder_hidden_states is not None:
            condition = as_condition(encoder_hidden_states)
        if condition is not None:
            if self.prompt_encoder is not None:
                condition = condition.with_null(self.prompt_encoder.null())
            condition = condition_to(condition, device)
            batch_size = len(condition)
        steps = int(num_inference_steps or self.sampler.get("default_steps", 1))
        if latents is None:
            latents = torch.randn((batch_size, *fm.data_shape), generator=generator, device=device)
        x0 = latents.to(device)
        cond = condition
        if class_labels is not None:
            cond = class_labels if isinstance(class_labels, Tensor) else torch.full((x0.shape[0],), int(class_labels))
            cond = cond.to(device)
        gamma = float(self.sampler.get("gamma", 0.0))  # re-noising between steps (``flowmap.sampling.sample``)
        images = sample(fm, x0, steps, cond=cond, guidance=guidance_scale, gamma=gamma, generator=generator)
        if self.codec is not None and output_type != "latent":
            images = self.codec.decode(images)
        if output_type not in ("pt", "latent"):
            images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
