"""Diagnose one method on the class-conditional digits: train its student from the benchmark's digits teacher
and print FD at 1 and 2 NFE and the class accuracy at 1 NFE.

The data, teacher, feature net and metrics are ``scripts/benchmark.py``'s (``Setting``, ``Evaluator``, its cache
keys: a teacher or feature net already in ``--cache`` is reused). The student's hyperparameters start from what
the benchmark would use (``method_config``: the method's ``configs/distill/<method>_digits.yaml``, curricula
rescaled to ``--steps``) and are changed with ``--set key=value`` (objective), ``--net key=value`` (the student's
net; a net that differs from the teacher's starts from scratch), ``--teacher-net key=value`` (train, or reuse, a
teacher with another net option, e.g. ``time_scale=10``), ``--lr`` and ``--ema`` (also score an evaluation EMA with
that half-life as a fraction of the run). ``--tangent-probe`` only measures the teacher's time derivative.

    python scripts/diagnose_digits.py ctm --steps 400 --set target_ema=0.95
    python scripts/diagnose_digits.py fmsd_eulerian --teacher-net time_scale=10 --net time_scale=10 --init teacher
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark as B  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from flowmap.ema import EMASchedule  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.jvp import jvp  # noqa: E402
from flowmap.models import init_student_from_teacher  # noqa: E402
from flowmap.nets import build_net  # noqa: E402
from flowmap.sampling import sample  # noqa: E402
from flowmap.solvers import solve  # noqa: E402
from flowmap.student import FlowMap  # noqa: E402
from flowmap.training import TrainLoop  # noqa: E402


def key_values(items: list[str], flag: str) -> dict:
    """``["a=1", "b=x"]`` -> {"a": 1, "b": "x"} (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method", help="objective name (flowmap.objectives.OBJECTIVES)")
    p.add_argument("--steps", type=int, default=400, help="student steps (default 400, the benchmark's)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="objective argument (repeatable)")
    p.add_argument("--net", action="append", default=[], metavar="K=V", help="student net option (repeatable)")
    p.add_argument("--teacher-net", action="append", default=[], metavar="K=V", help="teacher net option")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the budget's)")
    p.add_argument("--init", choices=("auto", "teacher", "scratch"), default="auto", help="student init")
    p.add_argument("--no-config", action="store_true", help="ignore configs/distill/<method>_digits.yaml")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the budget's)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the budget's)")
    p.add_argument("--ema", type=float, default=None, help="also score an EMA of this half-life (share of run)")
    p.add_argument("--seed", type=int, default=0, help="student seed offset (0: the benchmark's seeds)")
    p.add_argument("--cache", default="/tmp/h7cache", help="the benchmark cache folder (teacher, feature net)")
    p.add_argument("--teacher-fd", action="store_true", help="also score the teacher at 32 NFE (Heun)")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    p.add_argument(
        "--tangent-probe",
        action="store_true",
        help="only compare the teacher's exact dv/ds along its ODE (JVP) with a finite difference over 0.01, and exit",
    )
    return p.parse_args(argv)


def score(ev: B.Evaluator, model, nfes=(1, 2)) -> dict:
    """{nfe: {"fd", "class_acc"}} of the student ``model`` on the evaluator's fixed noise and labels."""
    out = {}
    gamma = B.sampler_gamma(ev.s.current_method)
    for nfe in nfes:
        g = torch.Generator(ev.noise.device).manual_seed(B.seed_of("renoise", "digits", nfe))
        with torch.no_grad():
            x = sample(model, ev.noise, nfe, cond=ev.cond, gamma=gamma, generator=g)
        m = ev.metrics(x)
        out[nfe] = {"fd": round(m["fd"], 2), "class_acc": round(m.get("class_acc", float("nan")), 3)}
    return out


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


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    budget = B.BUDGETS["full"]
    tnet = key_values(a.teacher_net, "--teacher-net")
    budget = replace(budget, digits_net={**budget.digits_net, **tnet})
    if a.teacher_steps:
        budget = replace(budget, teacher_steps_digits=a.teacher_steps)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu")
    setting = B.Setting("digits", budget, dev, cache, fresh=False)
    setting.current_method = a.method
    teacher = setting.get_teacher()
    if a.tangent_probe:
        return {
            "teacher_net": tnet,
            "tangent_probe": tangent_probe(teacher, setting.x_train[:256], setting.y_train[:256]),
        }
    extractor = B._feature_extractor(None, cache, budget)
    ev = B.Evaluator(setting, budget, extractor)
    result: dict = {"method": a.method, "steps": a.steps}
    if a.teacher_fd:
        with torch.no_grad():
            x = solve(teacher, ev.noise, 16, "heun", cond=ev.cond)
        result["teacher_fd32"] = round(ev.metrics(x)["fd"], 2)

    config = B.method_config(a.method, "digits", a.steps, None if a.no_config else "digits")
    config.update(key_values(a.set, "--set"))
    tuned = None if a.no_config else B.distill_yaml(a.method, "digits")
    net_config = {**setting.net_config, **(tuned or {}).get("net_extras", {}), **key_values(a.net, "--net")}
    objective = B.seeded_objective(config, "objective", "digits", a.method, *([a.seed] if a.seed else []))
    torch.manual_seed(B.seed_of("student", "digits", a.method, *([a.seed] if a.seed else [])))
    student = FlowMap(build_net(dict(net_config)))
    # the built nets' configs (defaults filled in): an option set to its default still starts from the teacher
    same = lambda c: {k: v for k, v in c.items() if k not in B.INIT_COMPATIBLE}  # noqa: E731
    same_net = same(student.net.config) == same(setting.init_net.net.config)
    init = a.init if a.init != "auto" else ("teacher" if same_net else "scratch")
    if init == "teacher":
        init_student_from_teacher(student, setting.init_net)
    lr = a.lr if a.lr is not None else setting.lr * B.lr_scale(a.method, "digits")
    if a.batch:
        setting.batch = a.batch
    loop = TrainLoop(
        student,
        objective,
        setting.teacher if getattr(objective, "needs_teacher", False) else None,
        lr=lr,
        lr_final=lr * budget.lr_decay,
        steps=a.steps,
        ema=EMASchedule(a.ema, total_steps=a.steps) if a.ema else None,
    )
    batches = setting.batches(B.seed_of("student-data", "digits", a.method, *([a.seed] if a.seed else [])))
    t0 = time.time()
    losses = []
    for step in range(a.steps):
        x0, cond = batches(step)
        losses.append(loop.step(x0, cond)[0])
    seconds = time.time() - t0
    student.eval()
    tail = losses[-max(1, a.steps // 10) :]
    result.update(
        config=config,
        net={k: v for k, v in net_config.items() if k not in setting.net_config or setting.net_config[k] != v},
        teacher_net=tnet,
        init=init,
        lr=lr,
        seconds=round(seconds, 1),
        loss_first=round(sum(losses[:10]) / min(10, len(losses)), 4),
        loss_last=round(sum(tail) / len(tail), 4) if all(math.isfinite(v) for v in tail) else float("nan"),
        raw=score(ev, student),
    )
    if loop.ema is not None:
        result["ema"] = score(ev, loop.ema.eval())
    return result


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    for flag, items in (("--set", a.set), ("--net", a.net), ("--teacher-net", a.teacher_net)):
        key_values(items, flag)  # bad input fails here, before the teacher loads
    if a.method not in B.OBJECTIVES:
        raise ValueError(f"unknown method {a.method!r}; choose from {sorted(B.OBJECTIVES)}")
    if a.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {a.steps}")
    result = run(a)
    print(json.dumps(result))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({**result, "argv": sys.argv[1:] if argv is None else argv}) + "\n")


if __name__ == "__main__":
    main_guard(main)
