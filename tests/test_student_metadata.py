"""A student file records where it came from (issue 20): the teacher (kind, folder name, scheduler class and its key
fields, prediction type), the data range and scaling, the method and its sampler defaults, the steps trained and the
flowmap version; all read back from the safetensors metadata."""

from __future__ import annotations

import pytest

diffusers = pytest.importorskip("diffusers")

from flowmap.io import read_config
from flowmap.models import flowmap_version, save_student
from flowmap.nets import build_net
from flowmap.student import FlowMap
from tests.test_teacher_init_student import unet


def test_distilled_student_records_teacher_data_method_steps_and_version(tmp_path):
    from flowmap.lightning.distill_module import DistillModule
    from teachers import CheckpointTeacher

    folder = tmp_path / "my_ddim"
    unet().save_pretrained(folder)
    diffusers.DDIMScheduler(
        num_train_timesteps=50,
        beta_schedule="scaled_linear",
        beta_start=1e-3,
        beta_end=0.02,
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",
    ).save_pretrained(folder)
    module = DistillModule(objective={"name": "cd", "steps": 4, "solver": "euler"}, teacher=CheckpointTeacher(folder))
    path = module.export(tmp_path / "student.safetensors")
    config = read_config(path)

    teacher = config["teacher"]
    assert (teacher["kind"], teacher["name"], teacher["model"]) == ("diffusers", "my_ddim", "UNet2DModel")
    assert (teacher["prediction"], teacher["diffusers_prediction"]) == ("v", "v_prediction")
    sched = teacher["scheduler_config"]
    assert sched["class"] == teacher["scheduler"] == "DDIMScheduler"
    assert (sched["num_train_timesteps"], sched["beta_schedule"], sched["timestep_spacing"]) == (
        50,
        "scaled_linear",
        "trailing",
    )
    assert sched["beta_start"] == pytest.approx(1e-3) and sched["clip_sample"] is False
    assert config["data"] == {"space": "image", "shape": [1, 8, 8], "range": [-1.0, 1.0], "to_uint8": "127.5 * (x + 1)"}
    assert (config["method"], config["objective"]["steps"], config["sampler"]) == ("cd", 4, {"gamma": 1.0})
    assert config["steps_trained"] == 0
    assert config["flowmap_version"] == flowmap_version() != "unknown"


def test_point_and_flow_students_record_their_data(tmp_path):
    net = build_net({"name": "mlp", "data_shape": [2], "width": 16, "depth": 2})
    config = read_config(save_student(tmp_path / "p.safetensors", FlowMap(net), method="meanflow"))
    assert config["data"] == {"space": "points", "shape": [2], "range": None}
    assert config["sampler"] == {"gamma": 0.0} and "teacher" not in config
    assert config["flowmap_version"] == flowmap_version()
