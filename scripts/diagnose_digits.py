"""Diagnose one method on the class-conditional digits: train its student from the benchmark's digits teacher
and print FD, KID and the class accuracy at 1, 2, 4 and 8 NFE of its evaluation EMA and of its raw weights.

The data, teacher, feature net, metrics and the student's recipe are ``scripts/benchmark.py``'s (``Setting``,
``Evaluator``, ``recipe`` through ``scripts/diagnose_student.py``: the configs composed from
``configs/data/digits.yaml``, the set's model config and ``configs/distill/<method>.yaml`` with its override for the
data, the ``TrainLoop`` options of that run, the benchmark's seeds and cache keys: a teacher or feature net already
in ``--cache`` is reused). Changed with ``--steps`` (default: the data config's trainer.max_steps; the configs' step
fractions follow), ``--set key=value`` (objective), ``--net key=value`` (the student's net; a net that is not the
teacher's, up to its student-only inputs, starts from scratch), ``--teacher-net key=value`` (train, or reuse, a
teacher with another net option, e.g. ``time_scale=10``; the student follows it), ``--lr``, ``--batch`` and ``--ema``
(the evaluation EMA's half-life as a share of the run), ``--dataset digits_dit`` (the DiT set). ``--log-every N``
prints the loss and the objective's logs every N steps. ``--tangent-probe`` only measures the teacher's time
derivative.

    python scripts/diagnose_digits.py ctm --steps 400 --set target_ema=0.95
    python scripts/diagnose_digits.py sct --dataset digits_dit --steps 400 --set data_velocity=stf --log-every 25
    python scripts/diagnose_digits.py fmsd_eulerian --teacher-net time_scale=10 --net time_scale=10 --init teacher
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flowmap.ema import EMASchedule  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.jvp import jvp  # noqa: E402
from flowmap.objectives import OBJECTIVES  # noqa: E402
from flowmap.solvers import solve  # noqa: E402
from scripts import benchmark as B  # noqa: E402
from scripts.diagnose_student import key_values, student_recipe, train  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method", help="objective name (flowmap.objectives.OBJECTIVES)")
    p.add_argument(
        "--dataset", choices=("digits", "digits_dit"), default="digits", help="the benchmark's set: UNet or DiT"
    )
    p.add_argument("--steps", type=int, default=None, help="student steps (default: the data config's max_steps)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="objective argument (repeatable)")
    p.add_argument("--net", action="append", default=[], metavar="K=V", help="student net option (repeatable)")
    p.add_argument("--teacher-net", action="append", default=[], metavar="K=V", help="teacher net option")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the budget's)")
    p.add_argument("--init", choices=("auto", "teacher", "scratch"), default="auto", help="student init")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's)")
    p.add_argument(
        "--ema", type=float, default=None, help="evaluation EMA half-life, share of the run (default: the recipe's)"
    )
    p.add_argument("--seed", type=int, default=0, help="student seed offset (0: the benchmark's seeds)")
    p.add_argument("--cache", default="/tmp/flowmap_diagnose", help="the benchmark cache folder (teacher, feature net)")
    p.add_argument("--teacher-fd", action="store_true", help="also score the teacher at 32 NFE (Heun)")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    p.add_argument(
        "--log-every", type=int, default=0, metavar="N", help="print the loss and the objective's logs every N steps"
    )
    p.add_argument(
        "--tangent-probe",
        action="store_true",
        help="only compare the teacher's exact dv/ds along its ODE (JVP) with a finite difference over 0.01, and exit",
    )
    return p.parse_args(argv)


def summary(rows: dict) -> dict:
    """``Evaluator.student_rows``' rows, rounded: {nfe: {"fd", "kid", "class_acc"}}."""
    keys = ("fd", "kid", "class_acc")
    return {nfe: {k: round(float(m[k]), 4) for k in keys if m.get(k) is not None} for nfe, m in rows.items()}


@torch.no_grad()
def tangent_probe(teacher, x0: torch.Tensor, y: torch.Tensor, h: float = 1e-2) -> dict:
    """{s: (|v|, |dv/ds| by JVP, |dv/ds| by a central difference over h)} along the teacher's ODE on the linear path,
    per-sample norms averaged: a JVP far above the difference means the velocity ripples in s on scales below h
    (what a JVP loss regresses onto)."""
    out = {}
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for s0 in (0.05, 0.2, 0.5, 0.8, 0.95):
        s = torch.full((len(x0),), s0)
        xs = (1 - s0) * x0 + s0 * eps
        f = lambda x_, s_: teacher.velocity(x_, s_, y)  # noqa: E731
        v = f(xs, s)
        _, dv = jvp(f, (xs, s), (v, torch.ones_like(s)), "forward_ad", None, primal_out=False, modules=(teacher,))
        fd = (f(xs + h * v, s + h) - f(xs - h * v, s - h)) / (2 * h)
        norm = lambda a: round(float(a.flatten(1).norm(dim=1).mean()), 2)  # noqa: E731
        out[s0] = {"v": norm(v), "jvp": norm(dv), f"fd_{h:g}": norm(fd)}
    return out


def digits_recipe(a: argparse.Namespace) -> dict:
    """The benchmark's digits recipe of ``a.method`` with the command line's overrides."""
    r = student_recipe(
        a.dataset,
        a.method,
        a.steps,
        key_values(a.set, "--set"),
        key_values(a.net, "--net"),
        key_values(a.teacher_net, "--teacher-net"),
    )
    steps = r["options"]["steps"]
    if a.lr is not None:
        r["options"]["lr"] = a.lr
    if a.ema is not None:
        r["options"]["ema"] = EMASchedule(halflife=a.ema, total_steps=steps)
    return r


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    budget = B.BUDGETS["full"]
    tnet = key_values(a.teacher_net, "--teacher-net")
    if a.teacher_steps:
        budget = replace(budget, teacher_steps_digits=a.teacher_steps)
    r = digits_recipe(a)  # bad overrides fail before the teacher loads
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    setting = B.Setting(a.dataset, budget, torch.device("cpu"), cache, fresh=False)
    base_net = dict(setting.net_config)
    setting.net_config = {**setting.net_config, **tnet}  # the teacher's net (its cache key follows)
    teacher = setting.get_teacher()
    if a.tangent_probe:
        return {
            "teacher_net": tnet,
            "tangent_probe": tangent_probe(teacher, setting.x_train[:256], setting.y_train[:256]),
        }
    extractor = B._feature_extractor(None, cache, budget)
    ev = B.Evaluator(setting, budget, extractor)
    result: dict = {"method": a.method, "dataset": a.dataset, "steps": r["options"]["steps"]}
    if a.teacher_fd:
        with torch.no_grad():
            x = solve(teacher, ev.noise, 16, "heun", cond=ev.cond)
        result["teacher_fd32"] = round(ev.metrics(x)["fd"], 2)
    t = train(setting, a.method, r, a.seed, a.init, a.batch, a.log_every)
    losses = t["losses"]
    tail = losses[-max(1, len(losses) // 10) :]
    net = r["student"]["net"]
    gamma = B.sampler_gamma(a.method)
    result.update(
        config=r["objective"],
        net={k: v for k, v in net.items() if base_net.get(k) != v},
        teacher_net=tnet,
        init=t["init"],
        lr=r["options"]["lr"],
        batch=t["batch"],
        ema_schedule=B.options_record(r["options"])["ema"],
        files=r["files"],
        seconds=round(t["seconds"], 1),
        loss_first=round(sum(losses[:10]) / min(10, len(losses)), 4),
        loss_last=round(sum(tail) / len(tail), 4) if all(math.isfinite(v) for v in tail) else float("nan"),
        ema=summary(ev.student_rows(t["ema"], gamma)[0]),
        raw=summary(ev.student_rows(t["student"], gamma)[0]),
        **({"trace": t["trace"]} if t["trace"] else {}),
    )
    return result


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    for flag, items in (("--set", a.set), ("--net", a.net), ("--teacher-net", a.teacher_net)):
        key_values(items, flag)  # bad input fails here, before the teacher loads
    if a.method not in OBJECTIVES:
        raise ValueError(f"unknown method {a.method!r}; choose from {sorted(OBJECTIVES)}")
    for flag, value in (("--steps", a.steps), ("--batch", a.batch), ("--teacher-steps", a.teacher_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if a.log_every < 0:
        raise ValueError(f"--log-every must be >= 0, got {a.log_every}")
    result = run(a)
    print(json.dumps(result))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({**result, "argv": sys.argv[1:] if argv is None else argv}) + "\n")


if __name__ == "__main__":
    main_guard(main)
