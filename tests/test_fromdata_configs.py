"""Teacher-free configs (``configs/distill/*_fromdata.yaml``): one for every method that can train from data.

* test_every_teacher_free_method_has_a_fromdata_config: each registered objective that builds with no teacher (its
  own ``source`` is data, or it takes ``source="data"``) has ``configs/distill/<method>_fromdata.yaml``; CTM, whose
  consistency target is a teacher's ODE segment, has none.
* test_fromdata_config_trains_without_a_teacher: each one, composed after the checkerboard data and the 2-D model
  config, names no teacher, starts from scratch (init_from_teacher false), builds an objective whose needs_teacher is
  False, has no per-data-set override, brings the from-scratch budget (4000 steps x batch 1024), and takes two
  ``TrainLoop`` steps with no teacher (finite losses, weights that moved).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowmap.models import build_student  # noqa: E402
from flowmap.objectives import OBJECTIVES, build_objective, objective_class  # noqa: E402
from flowmap.recipe import CONFIGS, compose, train_options  # noqa: E402
from flowmap.training import TrainLoop  # noqa: E402

FROMDATA = sorted((CONFIGS / "distill").glob("*_fromdata.yaml"))


def teacher_free(name: str) -> bool:
    """Whether objective ``name`` builds with no teacher (with ``source="data"`` when it takes a source)."""
    takes_source = "source" in objective_class(name).hyperparameters()
    return not build_objective({"name": name, **({"source": "data"} if takes_source else {})}).needs_teacher


def test_every_teacher_free_method_has_a_fromdata_config():
    free = {name for name in OBJECTIVES if teacher_free(name)}
    have = {p.stem.removesuffix("_fromdata") for p in FROMDATA}
    assert have == free, f"missing: {sorted(free - have)}, not teacher-free: {sorted(have - free)}"
    assert {"meanflow", "shortcut", "ect", "ict", "sct", "fmsd_eulerian"} <= free and "ctm" not in free


@pytest.mark.parametrize("path", FROMDATA, ids=lambda p: p.stem)
def test_fromdata_config_trains_without_a_teacher(path):
    cfg = compose([CONFIGS / "data" / "checkerboard.yaml", CONFIGS / "model" / "mlp2d.yaml", path])
    model = cfg["model"]
    assert "teacher" not in model and model["init_from_teacher"] is False
    objective = build_objective(dict(model["objective"]))
    assert objective.name == path.stem.removesuffix("_fromdata") and objective.needs_teacher is False
    assert (cfg["trainer"]["max_steps"], cfg["data"]["init_args"]["batch_size"]) == (4000, 1024)
    torch.manual_seed(0)
    student = build_student(dict(model["student"]))
    before = [p.detach().clone() for p in student.parameters()]
    loop = TrainLoop(student, objective, None, **train_options(cfg))
    x0 = torch.rand(64, 2) * 4 - 2
    losses = [float(loop.step(x0)[0]) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))
