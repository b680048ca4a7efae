"""A flow-map student made from a diffusers model, as a diffusers ``DiffusionPipeline`` (no training code).

Folder written by ``FlowMapPipeline.save_pretrained(OUT)`` (``scripts/export.py STUDENT --format diffusers``):

    OUT/model_index.json                  {"_class_name": "FlowMapPipeline", "unet" | "transformer": [...]}
    OUT/unet/ or OUT/transformer/         the student's network in its original diffusers class
                                          (config.json + diffusion_pytorch_model.safetensors; LoRA merged)
    OUT/flowmap/student.json              the student config (teacher path/prediction, injected sizes, metadata)
    OUT/flowmap/injection.safetensors     the injected interval (and guidance) embedding
    OUT/scheduler/scheduler_config.json   the sampler: times t_0 = 1 > ... > t_K = 0 for K = 1-4 steps
    OUT/vae/                              latent students only: the teacher's VAE (AutoencoderKL), unchanged;
                                          its scaling / shift are recorded in student.json (``flowmap.latent``)
    OUT/text_encoder/, OUT/tokenizer/     text-to-image students only: the teacher's text encoder, unchanged
                                          (``pipe(prompt=[...])``; ``flowmap.text``)

    pipe = FlowMapPipeline.from_pretrained(OUT)
    images = pipe(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images

Sampling is flowmap's multistep flow-map sampler x_{k+1} = X(x_k, t_k, t_{k+1}) on a uniform grid, with the
method's re-noising gamma (``flowmap.sampling.sample``), the same function ``load_student(...).sample`` runs; a
latent student's samples are then decoded by the VAE (``output_type="latent"`` returns the latents).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from safetensors.torch import load_file, save_file
from torch import Tensor

from flowmap.latent import LatentCodec, latent_reference
from flowmap.nets.diffusers_net import DiffusersStudentNet, merged_lora
from flowmap.sampling import sample
from flowmap.student import FlowMap
from flowmap.text import PromptEncoder, find_text_encoder

SCHEDULER = {
    "_class_name": "FlowMapUniformScheduler",
    "default_steps": 1,
    "max_steps": 4,
    "grid": "uniform",
    "t_start": 1.0,
    "t_end": 0.0,
}


def _subfolder(model_class: str) -> str:
    return "unet" if "UNet" in model_class else "transformer"


class FlowMapPipeline(DiffusionPipeline):
    """Samples of a flow-map student in 1-4 network calls. ``unet`` or ``transformer``: the diffusers model
    (the student's weights); ``flow_map``: the student X(x, s, t) around it; ``config_dict``: its config."""

    def __init__(
        self,
        flow_map: FlowMap,
        student_config: dict,
        sampler: dict | None = None,
        codec: LatentCodec | None = None,
        prompt_encoder: PromptEncoder | None = None,
    ) -> None:
        super().__init__()
        net: DiffusersStudentNet = flow_map.net
        self.register_modules(**{_subfolder(net.config["model_class"]): net.model})
        if codec is not None:
            self.register_modules(vae=codec.vae)
        self.codec = codec
        if prompt_encoder is not None:
            self.register_modules(text_encoder=prompt_encoder.text_encoder, tokenizer=prompt_encoder.tokenizer)
        self.prompt_encoder = prompt_encoder
        self.flow_map = flow_map
        self.student_config = dict(student_config)
        saved = dict(self.student_config.get("sampler") or {})  # the method's defaults, e.g. gamma 1 for CD
        self.sampler = {**SCHEDULER, **saved, **dict(sampler or {})}

    @classmethod
    def from_flow_map(cls, flow_map: FlowMap, student_config: dict) -> FlowMapPipeline:
        """A pipeline around a student (LoRA adapters, if any, merged into the weights)."""
        net = flow_map.net
        if not isinstance(net, DiffusersStudentNet):
            raise ValueError("the diffusers export needs a student made from a diffusers model (net 'diffusers')")  # noqa: TRY004 (scripts report ValueErrors in one line)
        if "lora" in net.config:
            net = merged_lora(net)
            flow_map = FlowMap(net, flow_map.param)
            student_config = {**student_config, "net": net.config}
        ref = latent_reference(student_config)
        text = (
            (student_config.get("teacher") or {}).get("text")
            if isinstance(student_config.get("teacher"), dict)
            else None
        )
        return cls(
            flow_map,
            student_config,
            codec=None if ref is None else LatentCodec.from_reference(ref),
            prompt_encoder=None if not text else PromptEncoder.from_folder(text["folder"]),
        )

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        out = Path(save_directory)
        net: DiffusersStudentNet = self.flow_map.net
        sub = _subfolder(net.config["model_class"])
        net.model.save_pretrained(out / sub, safe_serialization=True)
        (out / "flowmap").mkdir(parents=True, exist_ok=True)
        (out / "flowmap" / "student.json").write_text(json.dumps(self.student_config, indent=1))
        injection = {k: v.detach().cpu().clone().contiguous() for k, v in net.injection.state_dict().items()}
        save_file(injection, str(out / "flowmap" / "injection.safetensors"))
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.sampler, indent=1))
        index = {"_class_name": type(self).__name__, sub: ["diffusers", net.config["model_class"]]}
        if self.codec is not None:
            self.codec.vae.save_pretrained(out / "vae", safe_serialization=True)
            index["vae"] = ["diffusers", self.codec.vae_class]
        if self.prompt_encoder is not None:
            self.prompt_encoder.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
            self.prompt_encoder.tokenizer.save_pretrained(out / "tokenizer")
            index["text_encoder"] = ["transformers", self.prompt_encoder.encoder_class]
            index["tokenizer"] = ["transformers", type(self.prompt_encoder.tokenizer).__name__]
        (out / "model_index.json").write_text(json.dumps(index, indent=1))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> FlowMapPipeline:
        """Load a folder written by ``save_pretrained`` (safetensors only; no pickle)."""
        import diffusers

        root = Path(pretrained_model_name_or_path)
        config = json.loads((root / "flowmap" / "student.json").read_text())
        net_config = {k: v for k, v in config["net"].items() if k != "name"}
        sub = _subfolder(net_config["model_class"])
        model_cls = getattr(diffusers, net_config["model_class"])
        model = model_cls.from_pretrained(str(root / sub), use_safetensors=True, low_cpu_mem_usage=False)
        net = DiffusersStudentNet(**net_config, model=model)
        net.injection.load_state_dict(load_file(str(root / "flowmap" / "injection.safetensors")), strict=True)
        sampler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        codec, ref = None, latent_reference(config)
        if ref is not None:  # the VAE shipped in the folder, with the scaling / shift the student was trained on
            codec = LatentCodec.from_folder(root, "vae")
            codec.scaling, codec.shift = float(ref["scaling_factor"]), float(ref.get("shift_factor") or 0.0)
        prompt_encoder = PromptEncoder.from_folder(root) if find_text_encoder(root) else None
        pipe = cls(FlowMap(net, config.get("parametrization")).eval(), config, sampler, codec, prompt_encoder)
        return pipe.to(kwargs["device"]) if "device" in kwargs else pipe

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
        guidance_scale: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images from noise ``latents`` (B, C, H, W) at t = 1 (drawn with ``generator`` when None) in
        ``num_inference_steps`` flow-map jumps. ``output_type``: "pil", "np" (in [0, 1], from data in [-1, 1]),
        "pt" (the samples in [-1, 1]; decoded by the VAE for a latent student) or "latent" (the raw samples).
        ``prompt`` (text-to-image students): encoded by the folder's text encoder, one sample per prompt."""
        fm = self.flow_map
        device = next(fm.parameters()).device
        if prompt is not None:
            if self.prompt_encoder is None:
                raise ValueError("prompt= needs a text-to-image student (a folder with text_encoder/ and tokenizer/)")
            encoder_hidden_states = self.prompt_encoder.encode(prompt).to(device)
            batch_size = encoder_hidden_states.shape[0]
        steps = int(num_inference_steps or self.sampler.get("default_steps", 1))
        if latents is None:
            latents = torch.randn((batch_size, *fm.data_shape), generator=generator, device=device)
        x0 = latents.to(device)
        cond = encoder_hidden_states
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
