"""Every shipped YAML builds: each ``configs/distill/*.yaml`` names a registered objective with valid
hyperparameters and a student net that builds, and a student that starts from its teacher
(``init_from_teacher: true``) takes every tensor of the matching ``configs/teacher/<data>.yaml`` net, so
``u(x, t, t)`` starts as the teacher's velocity. Each teacher config builds its net too."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from flowmap.io import load_matching
from flowmap.models import build_student
from flowmap.nets import build_net
from flowmap.objectives import OBJECTIVES, build_objective

ROOT = Path(__file__).resolve().parents[1]
DISTILL = sorted((ROOT / "configs" / "distill").glob("*.yaml"))
TEACHER = sorted((ROOT / "configs" / "teacher").glob("*.yaml"))
DATA_SETS = ("checkerboard", "digits", "gmm")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_method_has_a_config_per_data_set():
    have = {p.stem for p in DISTILL}
    missing = [f"{m}_{d}" for m in OBJECTIVES for d in DATA_SETS if f"{m}_{d}" not in have]
    assert not missing, f"configs/distill lacks {missing}"


@pytest.mark.parametrize("path", TEACHER, ids=lambda p: p.stem)
def test_teacher_config_builds(path):
    cfg = load(path)
    net = build_net(dict(cfg["model"]["net"]))
    assert sum(p.numel() for p in net.parameters()) > 0
    import_class(cfg["data"]["class_path"])


@pytest.mark.parametrize("path", DISTILL, ids=lambda p: p.stem)
def test_distill_config_builds_and_fits_its_teacher(path):
    cfg = load(path)
    model = cfg["model"]
    objective = build_objective(dict(model["objective"]))
    assert model["objective"]["name"] in OBJECTIVES and objective is not None
    student = build_student(dict(model["student"]))
    import_class(cfg["data"]["class_path"])
    if "teacher" in model:
        import_class(model["teacher"]["class_path"])
    if model.get("init_from_teacher"):
        data = next(d for d in DATA_SETS if f"_{d}" in path.stem)
        net_name = model["student"]["net"]["name"]
        teacher_path = ROOT / "configs" / "teacher" / (f"{data}_dit.yaml" if net_name == "dit" else f"{data}.yaml")
        assert teacher_path.is_file(), f"{path.name}: init_from_teacher but no {teacher_path.name}"
        teacher_net = build_net(dict(load(teacher_path)["model"]["net"]))
        copied, skipped = load_matching(student.net, teacher_net.state_dict())
        assert copied and not skipped, f"{path.name}: the teacher's {skipped[:4]} do not fit the student"
