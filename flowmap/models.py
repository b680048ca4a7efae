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
    """Save the student's network with its config; ``method=`` (a registered objective) also records the method's
    sampler defaults as ``sampler`` (e.g. ``{"gamma": 1.0}`` for consistency models) unless ``sampler=`` is given."""
    if "sampler" not in extra and extra.get("method") is not None:
        from flowmap.objectives import sampler_defaults

        extra["sampler"] = sampler_defaults(extra["method"])
    return save_model(path, student.net, student_config(student, **extra))


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


def init_student_from_teacher(student: FlowMap, teacher: NetVelocity | nn.Module) -> tuple[list[str], list[str]]:
    """Copy what fits from the teacher's net into the student's net (Geng et al. 2024, ECT; Sabour et al. 2025).

    The student's extra inputs (interval embedding, guidance embedding) keep their zero init, so
    u(x, t, t) starts equal to the teacher's velocity when the teacher predicts velocity on the linear path."""
    net = teacher
    while isinstance(getattr(net, "teacher", None), nn.Module):  # unwrap e.g. teachers.CheckpointTeacher
        net = net.teacher
    net = getattr(net, "net", net)  # NetVelocity -> its backbone
    return load_matching(student.net, net.state_dict())
