"""Rebuild teachers and students from their saved config, and load them from safetensors files."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from flowmap.io import CheckpointError, load_matching, load_state_strict, read_state, save_model
from flowmap.student import FlowMap
from flowmap.velocity import NetVelocity


def _net(config: dict) -> nn.Module:
    from flowmap.nets import build_net

    if "net" not in config:
        raise CheckpointError("checkpoint config has no 'net' entry")
    return build_net(dict(config["net"]))


def build_teacher(config: dict) -> NetVelocity:
    """NetVelocity(net, path, prediction) from a teacher config."""
    return NetVelocity(_net(config), config.get("path", "linear"), config.get("prediction", "velocity"))


def build_student(config: dict) -> FlowMap:
    """FlowMap(net, parametrization) from a student config."""
    return FlowMap(_net(config), config.get("parametrization"))


def teacher_config(teacher: NetVelocity, **extra) -> dict:
    return {
        "kind": "teacher",
        "net": dict(teacher.net.config),
        "path": teacher.path.to_config(),
        "prediction": teacher.prediction,
        "data_shape": list(teacher.data_shape),
        "num_classes": teacher.num_classes,
        **extra,
    }


def student_config(student: FlowMap, **extra) -> dict:
    return {
        "kind": "student",
        "net": dict(student.net.config),
        "parametrization": student.param.to_config(),
        "data_shape": list(student.data_shape),
        "num_classes": student.num_classes,
        **extra,
    }


def save_teacher(path: str | Path, teacher: NetVelocity, **extra) -> Path:
    """Save only the network weights (``net.*``) with the teacher config."""
    return save_model(path, teacher.net, teacher_config(teacher, **extra))


def save_student(path: str | Path, student: FlowMap, **extra) -> Path:
    """Save the student's network with its config and metadata: ``method=`` (a registered objective) also records
    the method's sampler defaults as ``sampler`` (e.g. ``{"gamma": 1.0}`` for consistency models) unless
    ``sampler=`` is given; ``data`` (range and scaling, ``data_description``) and ``flowmap_version`` are filled in
    unless given. ``DistillModule.export`` adds the teacher's description and ``steps_trained``."""
    extra.setdefault("flowmap_version", flowmap_version())
    if "sampler" not in extra and extra.get("method") is not None:
        from flowmap.objectives import sampler_defaults

        extra["sampler"] = sampler_defaults(extra["method"])
    teacher = extra.get("teacher") if isinstance(extra.get("teacher"), dict) else None
    extra.setdefault("data", data_description(student.data_shape, teacher))
    return save_model(path, student.net, student_config(student, **extra))


def flowmap_version() -> str:
    """The installed flowmap's version, or the source tree's (pyproject.toml) when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowmap")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"]) if pyproject.is_file() else "unknown"


def data_description(data_shape, teacher: dict | None = None) -> dict:
    """What a student's samples are: images (C, H, W) in [-1, 1] (pixels = 127.5 (x + 1), every image loader of
    ``flowmap.data``); a VAE's latents z = scaling_factor (E(image) - shift_factor) whose decoding is such an
    image (``flowmap.latent``); or points (vectors, no fixed range)."""
    from flowmap.latent import latent_reference

    ref = latent_reference(teacher)
    if ref is not None:
        return {
            "space": "latent",
            "shape": list(data_shape),
            "scaling_factor": ref.get("scaling_factor"),
            "shift_factor": ref.get("shift_factor"),
            "decoded_range": [-1.0, 1.0],
            "decoded_shape": ref.get("image_shape"),
        }
    if len(tuple(data_shape)) == 3:
        return {"space": "image", "shape": list(data_shape), "range": [-1.0, 1.0], "to_uint8": "127.5 * (x + 1)"}
    return {"space": "points", "shape": list(data_shape), "range": None}


def student_sampler(config: dict) -> dict:
    """The sampler defaults of a saved student: its ``sampler`` entry, or (files written before it existed) those of
    its stored ``method``, or ``{"gamma": 0.0}``."""
    from flowmap.objectives import sampler_defaults

    return {**sampler_defaults(config.get("method")), **dict(config.get("sampler") or {})}


def load_model(path: str | Path, expect: str | None = None) -> NetVelocity | FlowMap:
    """A teacher (NetVelocity) or a student (FlowMap) from a flowmap safetensors file, in eval mode."""
    state, config = read_state(path)
    kind = config.get("kind")
    if expect is not None and kind != expect:
        raise CheckpointError(f"{path}: expected a {expect} checkpoint, found kind={kind!r}")
    if kind == "teacher":
        model = build_teacher(config)
    elif kind == "student":
        model = build_student(config)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint kind {kind!r}")
    load_state_strict(model.net, state, what=str(path))
    model.config = config
    return model.eval()


def unwrap_teacher(teacher: nn.Module) -> nn.Module:
    """The velocity module inside wrappers such as ``teachers.CheckpointTeacher`` (``.teacher``)."""
    while isinstance(getattr(teacher, "teacher", None), nn.Module):
        teacher = teacher.teacher
    return teacher


def init_student_from_teacher(student: FlowMap, teacher: NetVelocity | nn.Module) -> tuple[list[str], list[str]]:
    """Copy what fits from the teacher's net into the student's net (Geng et al. 2024, ECT; Sabour et al. 2025).

    The student's extra inputs (interval embedding, guidance embedding) keep their zero init, so
    u(x, t, t) starts equal to the teacher's velocity when the teacher predicts velocity on the linear path."""
    net = unwrap_teacher(teacher)
    net = getattr(net, "net", net)  # NetVelocity -> its backbone
    if getattr(student.net, "config", {}).get("name") == "diffusers":  # the teacher's own network, wrapped
        return load_matching(student.net.model, net.model.state_dict() if hasattr(net, "model") else {})
    return load_matching(student.net, net.state_dict())


def student_from_teacher(teacher: nn.Module, init: bool = True, parametrization=None, **net_options) -> FlowMap | None:
    """A student whose net is the teacher's own network (a diffusers model or the network of an EDM denoiser,
    ``flowmap.nets.diffusers_net``): a copy of its weights when ``init``, else a fresh network of the same class
    and config. None when the teacher's network cannot be wrapped (flowmap's own teachers: name a student net)."""
    from flowmap.nets.diffusers_net import student_net_from_teacher

    net = student_net_from_teacher(unwrap_teacher(teacher), copy_weights=init, **net_options)
    return None if net is None else FlowMap(net, parametrization)


def same_architecture(student: FlowMap, teacher: nn.Module) -> bool:
    """Whether the student's net is the teacher's network (same config up to the student-only inputs)."""
    inner = unwrap_teacher(teacher)
    net = getattr(inner, "net", None)
    if not hasattr(net, "config") or not hasattr(student.net, "config"):
        return False
    student_only = ("guidance_input", "time_scale")
    a = {k: v for k, v in dict(student.net.config).items() if k not in student_only}
    b = {k: v for k, v in dict(net.config).items() if k not in student_only}
    return a == b


def start_from_teacher(student: FlowMap, teacher: nn.Module, init: bool | None = None) -> bool:
    """The init rule of a distillation run: copy what fits from ``teacher`` into ``student``
    (``init_student_from_teacher``) when ``init``, or, with ``init`` None, whenever the student's net is the
    teacher's (``same_architecture``). Returns whether it copied; ValueError when nothing fits."""
    if init is None:
        init = same_architecture(student, teacher)
    if init:
        copied, _ = init_student_from_teacher(student, teacher)
        if not copied:
            raise ValueError("init_from_teacher: no tensor of the teacher fits the student's network")
    return bool(init)


def save_lora_adapter(path: str | Path, student: FlowMap, **extra) -> Path:
    """The LoRA adapter alone (LoRA matrices + injected embeddings) with the student config; the base weights
    are the teacher's (``load_lora_adapter`` applies it to ``student_from_teacher(teacher, lora=...)``)."""
    from flowmap.nets.diffusers_net import lora_state

    if "lora" not in getattr(student.net, "config", {}):
        raise ValueError("save_lora_adapter needs a student trained with LoRA adapters (student.lora)")
    return save_model(
        path, _TensorCarrier(lora_state(student.net)), student_config(student, kind="lora_adapter", **extra)
    )


def load_lora_adapter(student: FlowMap, path: str | Path) -> FlowMap:
    """Apply an adapter file of ``save_lora_adapter`` to a LoRA student built from the same teacher."""
    state, config = read_state(path)
    if config.get("kind") != "lora_adapter":
        raise CheckpointError(f"{path}: not a LoRA adapter file (kind={config.get('kind')!r})")
    if config["net"] != student.net.config:
        raise CheckpointError(f"{path}: the adapter was trained on a different network or LoRA config")
    _, unexpected = student.net.load_state_dict(state, strict=False)
    expected = {k for k in student.net.state_dict() if "lora_" in k or k.startswith("injection.")}
    if unexpected or expected - set(state):
        raise CheckpointError(f"{path}: adapter tensors do not fit the student ({sorted(expected - set(state))[:4]})")
    return student


class _TensorCarrier(nn.Module):
    """A module whose state dict is a given dict of tensors (to save a partial state with ``save_model``)."""

    def __init__(self, state: dict) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs) -> dict:
        return dict(self._state)
