"""Distillation and training objectives for flow-map students: one file per family.

Every objective is a callable holding only hyperparameters (see ``base.Objective``):

    out = objective(student=..., teacher=..., target=..., x0=..., cond=..., step=...)  # LossOutput

``build_objective({"name": "cd", **hyperparameters})`` builds one by name; unknown names or
hyperparameters raise one clear error. The registry maps names to "module:Class" so that a method's
file is imported only when used."""

from __future__ import annotations

import importlib

from flowmap.objectives.base import Objective

OBJECTIVES: dict[str, str] = {
    # Flow-map students I
    "cd": "flowmap.objectives.consistency:ConsistencyDistillation",
    "ict": "flowmap.objectives.consistency:ImprovedConsistencyTraining",
    "ect": "flowmap.objectives.consistency:EasyConsistencyTuning",
    "pd": "flowmap.objectives.progressive:ProgressiveDistillation",
    # Flow-map students II
    "meanflow": "flowmap.objectives.meanflow:MeanFlow",
    "shortcut": "flowmap.objectives.shortcut:Shortcut",
    "scd": "flowmap.objectives.scm:SCD",
    "sct": "flowmap.objectives.scm:SCT",
    # Flow-map students III
    "ayf_emd": "flowmap.objectives.ayf:AYFEulerian",
    "ayf_lmd": "flowmap.objectives.ayf:AYFLagrangian",
    "ctm": "flowmap.objectives.ctm:CTM",
    "fmsd_lagrangian": "flowmap.objectives.self_distillation:LagrangianSelfDistillation",
    "fmsd_eulerian": "flowmap.objectives.self_distillation:EulerianSelfDistillation",
    "fmsd_progressive": "flowmap.objectives.self_distillation:ProgressiveSelfDistillation",
}


def register_objective(name: str, target: str | type, overwrite: bool = False) -> None:
    """Add an objective: ``target`` is a class or ``"module:Class"``."""
    if name in OBJECTIVES and not overwrite:
        raise ValueError(f"objective {name!r} is already registered")
    OBJECTIVES[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def objective_class(name: str) -> type:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    module, _, attr = OBJECTIVES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def sampler_defaults(name: str | None) -> dict:
    """The sampler keywords (``{"gamma": ...}``) of method ``name``'s students; ``{"gamma": 0.0}`` for an unknown
    or missing name (deterministic flow-map jumps)."""
    if name is None or name not in OBJECTIVES:
        return {"gamma": 0.0}
    return objective_class(name).sampler_defaults()


def build_objective(config: dict | str) -> Objective:
    """An objective from ``{"name": ..., **hyperparameters}`` (or just its name)."""
    config = {"name": config} if isinstance(config, str) else dict(config)
    if "name" not in config:
        raise ValueError(f"an objective config needs a 'name' (one of {sorted(OBJECTIVES)}), got {config!r}")
    name = config.pop("name")
    cls = objective_class(name)
    allowed = set(cls.hyperparameters())
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for objective {name!r}; allowed: {sorted(allowed)}")
    return cls(**config)


__all__ = ["OBJECTIVES", "Objective", "build_objective", "objective_class", "register_objective", "sampler_defaults"]
