"""Composed configs: one recipe from a data, a model and a method YAML, for ``scripts/distill.py`` and the benchmark.

    cfg = compose(["configs/data/checkerboard.yaml", "configs/model/mlp2d.yaml", "configs/distill/cd.yaml"])

The files are deep-merged in order (a mapping merges key by key, anything else is replaced; a mapping that names
another ``class_path`` replaces the old one). Then:

* the data config's top-level ``sigma_data`` (the data's per-coordinate RMS std) goes to the objective when the
  objective has a ``sigma_data`` hyperparameter and the method does not set one;
* an objective hyperparameter counted in optimizer steps (``STEP_KEYS``) given as a float in (0, 1] is that fraction
  of ``trainer.max_steps`` (as ``ema_halflife``), so one method config fits every run length.

``train_options(cfg)`` are the ``flowmap.training.TrainLoop`` options of the same run (the Lightning modules' lr,
warm-up, cosine decay, optimizer, EMA half-life, gradient clipping and non-finite guard), so the benchmark trains
what a user's config trains (``tests/test_configs.py``).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEP_KEYS = (
    "total_steps",
    "stage_steps",
    "steps_per_round",
    "first_round_steps",
    "tangent_warmup",
    "warmup_steps",
    "sd_warmup",
)


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping (an empty file: {}); one ValueError naming the file otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--config {path}: cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: a config file holds a mapping, got {type(data).__name__}")
    return data


def merge(base: dict, over: dict) -> dict:
    """``over`` deep-merged onto ``base`` (new dict): mappings merge key by key, other values are replaced; a mapping
    with another ``class_path`` than ``base``'s replaces it."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        same_class = not (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("class_path", old.get("class_path")) != old.get("class_path")
        )
        if isinstance(value, dict) and isinstance(old, dict) and same_class:
            out[key] = merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def objective_accepts(name: str, key: str) -> bool:
    """Whether the objective ``name`` has the hyperparameter ``key`` (False for an unknown name: the CLI says why)."""
    from flowmap.objectives import objective_class

    try:
        return key in objective_class(name).hyperparameters()
    except Exception:  # noqa: BLE001 - an unknown or broken objective is reported when it is built
        return False


def resolve(cfg: dict, max_steps: int | None = None) -> dict:
    """The top-level ``sigma_data`` moved into the objective where it applies, and step fractions made step counts
    (of ``max_steps``, default ``trainer.max_steps``)."""
    cfg = copy.deepcopy(cfg)
    sigma_data = cfg.pop("sigma_data", None)
    objective = (cfg.get("model") or {}).get("objective")
    if not isinstance(objective, dict):
        return cfg
    name = objective.get("name")
    if sigma_data is not None and "sigma_data" not in objective and objective_accepts(str(name), "sigma_data"):
        objective["sigma_data"] = float(sigma_data)
    steps = max_steps if max_steps is not None else (cfg.get("trainer") or {}).get("max_steps")
    for key in STEP_KEYS:
        value = objective.get(key)
        if isinstance(value, float) and 0 < value <= 1:
            if not steps or int(steps) <= 0:
                raise ValueError(f"objective {key}: {value} is a fraction of trainer.max_steps, which is not set")
            objective[key] = max(1, round(value * int(steps)))
    return cfg


def compose(paths: list[str | Path], max_steps: int | None = None) -> dict:
    """The config of ``paths`` merged in order and resolved (``resolve``)."""
    cfg: dict = {}
    for path in paths:
        cfg = merge(cfg, load_yaml(path))
    return resolve(cfg, max_steps)


def recipe_files(data: str, model: str, method: str) -> list[Path]:
    """The files of one recipe by name: configs/data/<data>.yaml, configs/model/<model>.yaml,
    configs/distill/<method>.yaml."""
    paths = [
        CONFIGS / "data" / f"{data}.yaml",
        CONFIGS / "model" / f"{model}.yaml",
        CONFIGS / "distill" / f"{method}.yaml",
    ]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"no config file {p.relative_to(CONFIGS.parent)}")
    return paths


def module_defaults(module: type | None = None) -> dict[str, Any]:
    """The keyword defaults of a Lightning module's constructor, its training options' (``TrainingMixin``) included
    (what a config that does not set an option gets); ``DistillModule`` by default."""
    from flowmap.lightning.training_mixin import TrainingMixin

    if module is None:
        from flowmap.lightning.distill_module import DistillModule as module

    params = {
        **inspect.signature(TrainingMixin.__init__).parameters,
        **inspect.signature(module.__init__).parameters,
    }
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def train_options(cfg: dict, module: type | None = None) -> dict:
    """``flowmap.training.TrainLoop`` keyword options equal to the Lightning run of the composed ``cfg``: lr, betas,
    weight decay (AdamW, decoupled), warm-up, cosine decay to ``lr_final_ratio`` (``lr_decay: cosine``), the run
    length, the evaluation EMA (``ema_halflife`` / ``ema_decay``), gradient clipping and the non-finite guard.
    ``module``: the Lightning module whose defaults fill what ``cfg`` leaves unset (``DistillModule``;
    ``TeacherModule`` for a teacher config)."""
    from flowmap.ema import EMASchedule

    model = {**module_defaults(module), **(cfg.get("model") or {})}
    trainer = cfg.get("trainer") or {}
    steps = int(trainer.get("max_steps") or 0)
    if steps <= 0:
        raise ValueError("the recipe needs trainer.max_steps")
    if model["lr_decay"] not in ("none", "cosine"):
        raise ValueError(f"lr_decay must be 'none' or 'cosine', got {model['lr_decay']!r}")
    clip = trainer.get("gradient_clip_val")
    return {
        "lr": float(model["lr"]),
        "betas": tuple(model["betas"]),
        "weight_decay": float(model["weight_decay"]),
        "decoupled": True,
        "warmup_steps": max(int(model["warmup_steps"]), 0),
        "lr_final_ratio": float(model["lr_final_ratio"]) if model["lr_decay"] == "cosine" else None,
        "steps": steps,
        "ema": EMASchedule(
            halflife=float(model["ema_halflife"]),
            total_steps=steps,
            decay=None if model["ema_decay"] is None else float(model["ema_decay"]),
        ),
        "grad_clip": None if clip is None else float(clip),
        "max_nonfinite": int(model["max_nonfinite"]),
    }


def expand_config_flags(args: list[str]) -> list[str]:
    """Command-line ``--config FILE`` flags (YAML files) replaced by one ``--config`` with
    their composed content (``compose``, with a ``--trainer.max_steps`` of the command line for step fractions).
    Flags that are not YAML files (a config given as a string) are left to LightningCLI."""
    found, rest, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            found.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            found.append(a.split("=", 1)[1])
            i += 1
            continue
        rest.append(a)
        i += 1
    if not found or not all(Path(f).suffix in (".yaml", ".yml") for f in found):
        return args
    for f in found:
        if not Path(f).is_file():
            raise ValueError(f"--config {f}: no such file")
    max_steps = None
    for j, a in enumerate(rest):
        if a == "--trainer.max_steps" and j + 1 < len(rest):
            max_steps = int(rest[j + 1])
        elif a.startswith("--trainer.max_steps="):
            max_steps = int(a.split("=", 1)[1])
    cfg = compose(found, max_steps)
    return ["--config", yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None), *rest]
