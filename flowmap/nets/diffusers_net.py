"""The teacher's own network as the flow-map student's net (a copy of a diffusers model, or of the network inside
an EDM denoiser), with an interval embedding injected into the model's own timestep embedding.

    u(x, s, t) = v(x, s; emb_model(s) + emb_d(s - t) [+ emb_w(w)])

v is the teacher's velocity on our linear axis, computed by the teacher's own math (change of path and prediction
conversion: ``flowmap.diffusers_velocity.DiffusersTeacher``, ``flowmap.edm_velocity.EDMDenoiserTeacher``) from
the copied network. emb_d (and emb_w for guidance-conditioned students) is a Fourier-feature MLP whose output is
added to the output of the model's timestep-embedding module(s) by a forward hook; its last layer starts at zero,
so at step 0 u(x, s, t) = v_teacher(x, s) and the student is the teacher's Euler step
X(x, s, t) = x + (t - s) v_teacher(x, s) (the teacher initialization of ECT, Geng et al. 2024, and of AYF,
Sabour et al. 2025, Sec. 4; MeanFlow's (t, t - r) conditioning, Geng et al. 2025, Sec. 4.3).

Injection points (the hooks leave the model's state dict in diffusers' own layout):

    UNet2DModel, UNet2DConditionModel   time_embedding              (B, time_embed_dim)
    DiTTransformer2DModel               transformer_blocks.*.norm1.emb  (B, inner_dim), one per block
    SD3Transformer2DModel               time_text_embed             (B, inner_dim)

The config (``.config``, JSON) holds the diffusers class and config, the teacher's path/prediction (or EDM
preconditioning) and the injected sizes, so ``build_net(config)`` rebuilds the student from a safetensors file
alone. diffusers is imported only when a net is built.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import Tensor, nn

from flowmap.diffusers_velocity import DiffusersNet, DiffusersTeacher, require_diffusers
from flowmap.edm_velocity import EDMDenoiserTeacher
from flowmap.nets.embeddings import _embedding_mlp
from flowmap.paths import build_path
from flowmap.types import check_labels

INJECT = {
    "UNet2DModel": "time_embedding",
    "UNet2DConditionModel": "time_embedding",
    "SD3Transformer2DModel": "time_text_embed",
    "DiTTransformer2DModel": "norm1.emb",  # every transformer block's AdaLayerNormZero embedding
}


def injection_points(model: nn.Module) -> list[nn.Module]:
    """The timestep-embedding modules of ``model`` whose outputs receive the interval embedding."""
    name = type(model).__name__
    if name not in INJECT:
        raise ValueError(f"no interval-embedding injection point known for {name}; supported: {sorted(INJECT)}")
    suffix = INJECT[name]
    points = [m for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)]
    if not points:
        raise ValueError(f"{name} has no module named {suffix!r} to inject the interval embedding into")
    return points


def embedding_width(module: nn.Module) -> int:
    """Output width of a diffusers timestep embedding (TimestepEmbedding or a Combined* embedding)."""
    inner = getattr(module, "timestep_embedder", module)
    return int(inner.linear_2.out_features)


class IntervalInjection(nn.Module):
    """emb_d(s - t) [+ emb_w(w / 10)] (B, width), zero at init, added to the hooked modules' outputs during
    one forward of the student (``offset`` is set by the net and cleared after)."""

    def __init__(
        self, width: int, freq_dim: int = 128, time_scale: float = 1000.0, guidance_input: bool = False
    ) -> None:
        super().__init__()
        self.width = int(width)
        self.emb_d = _embedding_mlp(freq_dim, width, zero_last=True, scale=time_scale)
        self.emb_w = _embedding_mlp(freq_dim, width, zero_last=True) if guidance_input else None
        self.offset: Tensor | None = None

    def embed(self, s: Tensor, t: Tensor, w: Tensor | None) -> Tensor:
        with torch.autocast(device_type=s.device.type, enabled=False):
            out = self.emb_d(s - t)
            if self.emb_w is not None:
                out = out + self.emb_w((torch.ones_like(s) if w is None else w) / 10.0)
        return out

    def hook(self, module: nn.Module, args, output: Tensor) -> Tensor:
        if self.offset is None:
            return output
        return output + self.offset.to(output.dtype)


class DiffusersStudentNet(nn.Module):
    """net(x, s, t, cond=None, w=None) -> u(x, s, t): (B, C, H, W), the teacher's velocity at s from the copied
    network whose timestep embedding carries emb_d(s - t) [+ emb_w(w)].

    Args:
        model_class, model_config: the diffusers class name and its config (``model.config``).
        teacher: how the network's output becomes a velocity on our axis:
            ``{"kind": "diffusers", "path": path.to_config(), "prediction": ..., "num_train_timesteps": N,
            "null_class": bool}`` or ``{"kind": "edm", "sigma_data": ..., "sigma_min": ..., "sigma_max": ...,
            "num_classes": n}``.
        freq_dim, time_scale: Fourier features of the interval s - t; guidance_input: add emb_w(w).
        lora: ``{"rank": r, "alpha": a, "target_modules": [...]}`` trains low-rank adapters (Hu et al. 2022) on
            the frozen copy instead of all its weights (LCM-LoRA, Luo et al. 2023); ``target_modules`` defaults
            to every Linear and Conv2d of the model. Needs ``peft``. None: full fine-tuning.
        model: an existing model instance (a copy of the teacher's); built from the config when None.
        injection: an existing ``IntervalInjection`` of this width (a pipeline's component); a new one when None.
    """

    def __init__(
        self,
        model_class: str,
        model_config: dict,
        teacher: dict,
        freq_dim: int = 128,
        time_scale: float = 1000.0,
        guidance_input: bool = False,
        lora: dict | None = None,
        model: nn.Module | None = None,
        injection: IntervalInjection | None = None,
    ) -> None:
        super().__init__()
        if model is None:
            model = getattr(require_diffusers(), model_class).from_config(dict(model_config))
        teacher = dict(teacher)
        kind = teacher.get("kind")
        self.config = json.loads(
            json.dumps(
                {  # plain JSON types, as the config reads back from a file
                    "name": "diffusers",
                    "model_class": model_class,
                    "model_config": _json_config(model_config),
                    "teacher": teacher,
                    "freq_dim": int(freq_dim),
                    "time_scale": float(time_scale),
                    "guidance_input": bool(guidance_input),
                    **({"lora": dict(lora)} if lora else {}),
                }
            )
        )
        net = DiffusersNet(model, null_class=bool(teacher.get("null_class", False)))
        if kind == "diffusers":
            self.velocity = DiffusersTeacher(
                net, build_path(teacher["path"]), teacher["prediction"], int(teacher["num_train_timesteps"])
            )
        elif kind == "edm":
            self.velocity = EDMDenoiserTeacher(
                net,
                sigma_data=teacher.get("sigma_data"),
                data_shape=net.data_shape,
                num_classes=int(teacher.get("num_classes", 0)),
                sigma_min=float(teacher.get("sigma_min", 0.002)),
                sigma_max=float(teacher.get("sigma_max", 80.0)),
                prediction=teacher.get("prediction", "epsilon"),
            )
        else:
            raise ValueError(f"unknown teacher kind {kind!r} for a diffusers student net (diffusers, edm)")
        for module in model.modules():  # label dropout (DiT's LabelEmbedding) is the objective's job, not the net's
            if hasattr(module, "dropout_prob") and isinstance(module.dropout_prob, float):
                module.dropout_prob = 0.0
        points = injection_points(model)
        widths = {embedding_width(m) for m in points}
        if len(widths) != 1:
            raise ValueError(f"{model_class}: timestep embeddings of different widths {sorted(widths)}")
        width = widths.pop()
        self.injection = (
            IntervalInjection(width, freq_dim, time_scale, guidance_input) if injection is None else injection
        )
        if self.injection.width != width:
            raise ValueError(
                f"{model_class}: the injected embedding is {self.injection.width} wide, the model's {width}"
            )
        for m in points:
            m.register_forward_hook(self.injection.hook)
        if lora:
            add_lora(model, **lora)
        self.data_shape: tuple[int, ...] = tuple(net.data_shape)
        self.num_classes: int = int(self.velocity.num_classes)
        self.guidance_input = bool(guidance_input)
        self.cond_kind = net.cond_kind

    @property
    def model(self) -> nn.Module:
        """The diffusers model (its state dict is in diffusers' layout)."""
        return self.velocity.net.model

    def check_cond(self, cond, batch: int) -> None:
        if self.cond_kind == "labels":
            check_labels(cond, self.num_classes, batch)
        else:
            self.velocity.net.check_cond(cond, batch)

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond=None, w: Tensor | None = None) -> Tensor:
        self.injection.offset = self.injection.embed(s, t, w)
        swapped = _math_attention(self.model) if _has_tangent(x, s, t) else []
        try:
            return self.velocity.linear_velocity(x, s, cond)
        finally:
            self.injection.offset = None
            for module, processor in swapped:
                module.processor = processor


def _has_tangent(*tensors: Tensor) -> bool:
    """Whether a forward-mode JVP runs through this call (dual tensors or torch.func wrappers)."""
    from torch._C._functorch import is_functorch_wrapped_tensor
    from torch.autograd import forward_ad

    return any(is_functorch_wrapped_tensor(a) or forward_ad.unpack_dual(a).tangent is not None for a in tensors)


def _math_attention(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Swap diffusers' fused-SDPA attention processors (no forward-mode AD rule in PyTorch's fused kernels) for
    its explicit-softmax ``AttnProcessor`` during a JVP; returns what to restore. Other processors (e.g. SD3's
    joint attention) are left as they are: use ``jvp_backend: fd`` there."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    swapped = []
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is AttnProcessor2_0:
            swapped.append((module, processor))
            module.processor = AttnProcessor()
    return swapped


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    dropout: float = 0.0,
) -> None:
    """Inject LoRA adapters W + (alpha / r) B A (B = 0 at init) into ``model`` with peft; only they train."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("LoRA students need the optional dependency `peft` (pip install peft)") from err
    if target_modules is None:
        target_modules = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        target_modules=list(target_modules),
        lora_dropout=float(dropout),
    )
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def merged_lora(net: DiffusersStudentNet) -> DiffusersStudentNet:
    """The same student with its LoRA adapters merged into the weights (W <- W + (alpha / r) B A): a plain
    copy of the teacher's architecture, whose state dict is in diffusers' layout again."""
    if "lora" not in net.config:
        raise ValueError("this student has no LoRA adapters to merge")
    from peft.tuners.lora import LoraLayer

    work = copy.deepcopy(net)
    for module in work.model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {}
    for key, value in work.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    config = {k: v for k, v in net.config.items() if k not in ("name", "lora")}
    merged = DiffusersStudentNet(**config)
    merged.load_state_dict(state, strict=True)
    return merged.to(next(net.parameters()).device)


def lora_state(net: DiffusersStudentNet) -> dict[str, Tensor]:
    """The adapter alone: the LoRA matrices and the injected embeddings (what training changed)."""
    return {k: v for k, v in net.state_dict().items() if "lora_" in k or k.startswith("injection.")}


def _json_config(config) -> dict:
    """A diffusers config without diffusers' private keys (``_class_name``, ``_use_default_values``, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def teacher_spec(teacher: nn.Module) -> tuple[nn.Module, dict] | None:
    """(network, teacher entry of the config) of a diffusers or EDM teacher whose network can be wrapped, else None."""
    if isinstance(teacher, DiffusersTeacher):
        spec = {
            "kind": "diffusers",
            "path": teacher.path.to_config(),
            "prediction": teacher.prediction,
            "num_train_timesteps": teacher.num_train_timesteps,
            "null_class": bool(teacher.net.has_null),
        }
        return teacher.net.model, spec
    if isinstance(teacher, EDMDenoiserTeacher) and isinstance(teacher.net, DiffusersNet):
        spec = {
            "kind": "edm",
            "sigma_data": teacher.sigma_data,
            "sigma_min": teacher.sigma_min,
            "sigma_max": teacher.sigma_max,
            "prediction": teacher.edm_prediction,
            "num_classes": teacher.num_classes,
        }
        return teacher.net.model, spec
    return None


def student_net_from_teacher(
    teacher: nn.Module,
    copy_weights: bool = True,
    guidance_input: bool = False,
    freq_dim: int = 128,
    time_scale: float = 1000.0,
    lora: dict | None = None,
) -> DiffusersStudentNet | None:
    """The student net around a deep copy of the teacher's network (``copy_weights``), or around a freshly
    initialized network of the same class and config (training from scratch); None for other teachers."""
    found = teacher_spec(teacher)
    if found is None:
        return None
    model, spec = found
    own = copy.deepcopy(model).requires_grad_(True).train() if copy_weights else None
    return DiffusersStudentNet(
        type(model).__name__,
        dict(model.config),
        spec,
        freq_dim=freq_dim,
        time_scale=time_scale,
        guidance_input=guidance_input,
        lora=lora,
        model=own,
    )
