"""Configs compose, and the benchmark trains what they say.

* test_every_method_has_a_method_config: each registered objective has ``configs/distill/<method>.yaml`` holding
  only the method (no data, trainer or net architecture).
* test_a_method_is_the_same_on_every_data_set: composed with any data config, a method's objective differs only by
  the data's sigma_data and its step fractions resolved to the run's length (no per-set settings).
* test_teacher_config_builds / test_a_student_starts_as_its_teacher: teacher configs build, and a model config's
  student takes every tensor of the matching teacher config's net.
* test_step_fractions_and_sigma_data_resolve: a fraction of trainer.max_steps becomes a step count (of a
  ``--trainer.max_steps`` given on the command line too), sigma_data comes from the data config.
* test_the_cli_builds_the_benchmark_recipe: for every benchmark set (and the digits DiT) and every method, the
  composed command line builds with the LightningCLI, and the module, trainer and data it builds equal the
  benchmark's recipe for that set and method: the objective config, the student net, init_from_teacher, the batch,
  lr / betas / weight decay / warm-up / decay / EMA / guard and the trainer's max_steps and gradient clipping.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowmap.io import load_matching  # noqa: E402
from flowmap.models import build_student  # noqa: E402
from flowmap.nets import build_net  # noqa: E402
from flowmap.objectives import OBJECTIVES, build_objective  # noqa: E402
from flowmap.recipe import CONFIGS, STEP_KEYS, compose, expand_config_flags  # noqa: E402

TEACHER = sorted((CONFIGS / "teacher").glob("*.yaml"))
METHOD_FILES = sorted((CONFIGS / "distill").glob("*.yaml"))
DATA = {p.stem for p in (CONFIGS / "data").glob("*.yaml")}
# model config -> the teacher config whose net it is (the student starts as that teacher)
TEACHER_OF = {"mlp2d": "checkerboard", "unet_digits": "digits", "dit_digits": "digits_dit"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_method_has_a_method_config():
    have = {p.stem for p in METHOD_FILES}
    assert not sorted(set(OBJECTIVES) - have), f"configs/distill lacks {sorted(set(OBJECTIVES) - have)}"
    for path in METHOD_FILES:
        cfg = load(path)
        assert set(cfg) <= {"model", "data", "trainer"}, path.name
        model = cfg["model"]
        assert model["objective"]["name"] in OBJECTIVES
        assert set(model) <= {"objective", "student", "init_from_teacher", "lr"}, path.name
        assert set((model.get("student") or {}).get("net") or {}) <= {"time_scale", "guidance_input"}, path.name
        if not path.stem.endswith("_fromdata"):  # a from-scratch config brings its budget; the others none
            assert "data" not in cfg and "trainer" not in cfg, path.name


@pytest.mark.parametrize("path", [p for p in METHOD_FILES if not p.stem.endswith("_fromdata")], ids=lambda p: p.stem)
def test_a_method_is_the_same_on_every_data_set(path):
    seen = {}
    for data in sorted(DATA - {"webdataset"}):
        objective = compose([CONFIGS / "data" / f"{data}.yaml", path])["model"]["objective"]
        seen[data] = {k: v for k, v in objective.items() if k != "sigma_data" and k not in STEP_KEYS}
    first = next(iter(seen.values()))
    assert len(seen) >= 5 and all(v == first for v in seen.values()), seen


@pytest.mark.parametrize("path", TEACHER, ids=lambda p: p.stem)
def test_teacher_config_builds(path):
    cfg = load(path)
    net = build_net(dict(cfg["model"]["net"]))
    assert sum(p.numel() for p in net.parameters()) > 0
    import_class(cfg["data"]["class_path"])


@pytest.mark.parametrize("model,data", [("mlp2d", "checkerboard"), ("unet_digits", "digits"), ("dit_digits", "digits")])
def test_a_student_starts_as_its_teacher(model, data):
    cfg = compose([CONFIGS / "data" / f"{data}.yaml", CONFIGS / "model" / f"{model}.yaml"])
    student = build_student(dict(cfg["model"]["student"]))
    teacher_net = build_net(dict(load(CONFIGS / "teacher" / f"{TEACHER_OF[model]}.yaml")["model"]["net"]))
    copied, skipped = load_matching(student.net, teacher_net.state_dict())
    assert len(copied) == len(teacher_net.state_dict()) and not skipped


def test_step_fractions_and_sigma_data_resolve(tmp_path):
    files = [CONFIGS / "data" / "ring8.yaml", CONFIGS / "model" / "mlp2d_smooth.yaml", CONFIGS / "distill" / "sct.yaml"]
    cfg = compose(files)
    assert cfg["trainer"]["max_steps"] == 4000 and "sigma_data" not in cfg
    objective = cfg["model"]["objective"]
    assert objective["sigma_data"] == load(files[0])["sigma_data"]  # from the data config
    assert (objective["tangent_warmup"], objective["p_mean"]) == (1332, -1.0)  # sct.yaml's 0.333 of 4000 steps
    ict = compose([CONFIGS / "data" / "checkerboard.yaml", CONFIGS / "distill" / "ict.yaml"])["model"]["objective"]
    assert ict["total_steps"] == 4000 and ict["sigma_data"] == 1.0  # the whole run; the checkerboard's std
    cd = compose([CONFIGS / "data" / "checkerboard.yaml", CONFIGS / "distill" / "cd.yaml"])["model"]["objective"]
    assert "sigma_data" not in cd  # cd has no sigma_data hyperparameter
    args = expand_config_flags(["--config", str(files[0]), "--config", str(files[2]), "--trainer.max_steps", "40"])
    assert args[0] == "--config" and args[2:] == ["--trainer.max_steps", "40"]
    assert yaml.safe_load(args[1])["model"]["objective"]["tangent_warmup"] == 13  # 0.333 of the command line's 40
    assert expand_config_flags(["--config", "{}"]) == ["--config", "{}"]  # a config string: left to the CLI
    with pytest.raises(ValueError, match="no such file"):
        expand_config_flags(["--config", str(tmp_path / "missing.yaml")])


def _teacher_file(tmp_path: Path, net: dict) -> str:
    from flowmap.models import save_teacher
    from flowmap.velocity import NetVelocity

    path = tmp_path / f"teacher_{net['name']}.safetensors"
    if not path.is_file():
        save_teacher(path, NetVelocity(build_net(dict(net)), "linear", "velocity"), data="test")
    return str(path)


# the benchmark's sets, the digits DiT (digits_dit: the DiT a user composes instead of the UNet) among them
COMBOS = ["checkerboard", "eight_gaussians", "gmm", "digits", "digits_dit"]


@pytest.mark.parametrize("name", COMBOS)
@pytest.mark.timeout(240)
def test_the_cli_builds_the_benchmark_recipe(tmp_path, name):
    from scripts import benchmark
    from scripts.distill import build_cli

    budget = benchmark.BUDGETS["full"]
    data_file, model_file = benchmark.set_files(name)
    for method in sorted(OBJECTIVES):
        r = benchmark.recipe(name, method, budget)
        files = [data_file, model_file, CONFIGS / "distill" / f"{method}.yaml"]
        args = [x for f in files for x in ("--config", str(f))]
        args += ["--run_dir", str(tmp_path / "run"), "--logger", "none"]
        composed = compose(files)
        if "teacher" not in composed["model"]:
            args += ["--teacher", _teacher_file(tmp_path, composed["model"]["student"]["net"])]
        cli = build_cli(args)
        module, trainer, options = cli.model, cli.trainer, r["options"]
        assert dict(module.hparams.objective) == r["objective"], method
        assert build_objective(dict(r["objective"])).name == method
        assert module.student.net.config == build_student(dict(r["student"])).net.config, method
        assert module.hparams.init_from_teacher == r["init_from_teacher"], method
        assert cli.datamodule.batch_size == int(r["cfg"]["data"]["init_args"]["batch_size"])
        hp = module.hparams
        assert (hp.lr, tuple(hp.betas), hp.weight_decay, hp.warmup_steps, hp.max_nonfinite) == (
            options["lr"],
            options["betas"],
            options["weight_decay"],
            options["warmup_steps"],
            options["max_nonfinite"],
        ), method
        assert (hp.lr_final_ratio if hp.lr_decay == "cosine" else None) == options["lr_final_ratio"]
        assert (hp.ema_halflife, hp.ema_decay) == (options["ema"].halflife, options["ema"].decay)
        assert trainer.max_steps == options["steps"] == options["ema"].total_steps
        assert trainer.gradient_clip_val == options["grad_clip"]
