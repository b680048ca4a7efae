"""One benchmark student, trained with its recipe and overrides: the training part of the diagnosis scripts
(``scripts/diagnose_mixtures.py``, ``scripts/diagnose_digits.py``).

``scripts/benchmark.py`` trains the student of a method on a set with ``recipe(set, method, budget)``: the
objective, net, batch and init rule of the configs a user composes (``flowmap.recipe.compose``) and the Lightning
run's trainer semantics as ``TrainLoop`` options (``flowmap.recipe.train_options``), and scores its evaluation EMA.
``student_recipe`` is that recipe for a chosen number of steps with objective, net and option overrides; ``train``
trains it as ``Setting.train_student`` does (same seeds: with no override and seed 0 the same weights) and keeps the
raw weights beside the EMA.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from flowmap.models import build_student, start_from_teacher  # noqa: E402
from flowmap.recipe import compose, resolve  # noqa: E402
from flowmap.training import TrainLoop  # noqa: E402
from scripts.benchmark import BUDGETS, Budget, Setting, recipe, seed_of, seeded_objective, set_files, shrink  # noqa: E402


def set_steps(name: str) -> int:
    """The students' run length on benchmark set ``name``: its data config's trainer.max_steps."""
    return int(compose(set_files(name))["trainer"]["max_steps"])


def student_recipe(
    name: str,
    method: str,
    steps: int | None = None,
    objective: dict | None = None,
    net: dict | None = None,
    base_net: dict | None = None,
    budget: Budget = BUDGETS["full"],
) -> dict:
    """``scripts.benchmark.recipe(name, method, budget)`` for a run of ``steps`` student steps (default: the set's
    trainer.max_steps; the configs' step fractions resolved against it), with overrides:

    objective: hyperparameters set over the composed objective (a float in (0, 1] for a step-counted key is a
        fraction of the run, as in a config);
    base_net: net options set over the set's model net, under the method's own net options (a teacher or init net
        with another option: the student follows it);
    net: net options set over everything.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    full = set_steps(name)
    r = recipe(name, method, budget if steps is None else replace(budget, student_scale=steps / full))
    steps = int(r["cfg"]["trainer"]["max_steps"])
    if objective:
        cfg = copy.deepcopy(r["cfg"])
        cfg["model"]["objective"] = {**cfg["model"]["objective"], **objective}
        r["cfg"] = resolve(cfg, steps)
        r["objective"] = dict(r["cfg"]["model"]["objective"])
    if net or base_net:
        base = shrink(compose(set_files(name))["model"]["student"]["net"], budget)
        extras = {k: v for k, v in r["student"]["net"].items() if base.get(k) != v}  # the method's net options
        r["student"]["net"] = {**base, **(base_net or {}), **extras, **(net or {})}
    return r


def key_values(items: list[str], flag: str) -> dict:
    """``["a=1", "b=x"]`` -> {"a": 1, "b": "x"} (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def train(
    setting: Setting,
    method: str,
    r: dict,
    seed: int = 0,
    init: str = "auto",
    batch: int | None = None,
    log_every: int = 0,
) -> dict:
    """Train the student of recipe ``r`` (``student_recipe``) on ``setting`` (its teacher loaded: ``get_teacher``),
    as ``Setting.train_student`` does; ``seed`` 0 draws the benchmark's seeds, another seed other ones.

    init: "auto" (the recipe's ``init_from_teacher``, else whether the student's net is the teacher's), "teacher"
    or "scratch". batch: the recipe's (its data config's batch_size) when None. log_every: when > 0, the mean of the
    loss and of each of the objective's logs over every ``log_every`` steps (a host read each step), returned as
    "trace" and printed to stderr.
    Returns {"student" (raw weights), "ema" (the evaluation EMA, what the benchmark scores), "losses", "seconds",
    "init", "steps", "batch", "trace"}, both models in eval mode.
    """
    parts = (setting.name, method, *([seed] if seed else []))
    device = setting.device
    objective = seeded_objective(r["objective"], "objective", *parts).to(device)
    torch.manual_seed(seed_of("student", *parts))
    student = build_student(dict(r["student"])).to(device)
    init_from = start_from_teacher(
        student, setting.init_net, {"teacher": True, "scratch": False}.get(init, r["init_from_teacher"])
    )
    options = r["options"]
    steps = int(options["steps"])
    batch = batch or int(r["cfg"]["data"].get("init_args", {}).get("batch_size", setting.batch))
    teacher = setting.teacher if getattr(objective, "needs_teacher", False) else None
    loop = TrainLoop(student, objective, teacher, **options)
    batches = setting.batches(seed_of("student-data", *parts), batch)
    t0 = time.time()
    losses, trace, window = [], [], {}
    for step in range(steps):
        loss, out = loop.step(*batches(step))
        losses.append(loss)
        if log_every <= 0:
            continue
        for k, v in {"loss": loss, **out.logs}.items():
            window.setdefault(k, []).append(float(v.float().mean()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            trace.append({"step": step + 1, **{k: round(sum(v) / len(v), 4) for k, v in window.items()}})
            print(" ".join(f"{k} {v}" for k, v in trace[-1].items()), file=sys.stderr, flush=True)
            window = {}
    losses = torch.stack(losses).tolist()
    seconds = time.time() - t0
    ema = copy.deepcopy(student)
    ema.load_state_dict(loop.ema.state_dict())  # as the benchmark: the student with the evaluation EMA's weights
    return {
        "student": student.eval(),
        "ema": ema.eval(),
        "losses": losses,
        "seconds": seconds,
        "init": "teacher" if init_from else "scratch",
        "steps": steps,
        "batch": batch,
        "trace": trace,
    }
