"""The students' floor on the mixtures: the benchmark's student regressed onto the exact flow map.

    python scripts/diagnose_floor.py --presets ring8,aniso2d,scales16 [--steps 1000] [--net width=256 ...] \
        [--init scratch] [--zero-share 0.25] [--exact-steps 16] [--lr 3e-3] [--cache /tmp/flowmap_diagnose] \
        [--json floor.jsonl]

Each preset is a mixture set of ``scripts/benchmark.py`` (as in ``scripts/diagnose_mixtures.py``). The student is
built and trained as the benchmark's students are (``scripts/diagnose_student.train``): the set's model net as a
``FlowMap``, started from the set's flow-matching init net (``--cache``: the benchmark's cache keys), the set's batch
and ``TrainLoop`` options (lr unless ``--lr``, warm-up, cosine decay, AdamW, EMA half-life, clipping) for ``--steps``
steps (default: the data config's trainer.max_steps). Only the loss differs: ``ExactMapRegression``, a supervised
regression onto the exact flow map of the mixture (``teachers.gmm``), so what it reaches is what the net and budget
allow any method.
Scored as the benchmark scores (``Evaluator``): flow-map RMSE against X(z, 1, 0) in % of the data's std at 1, 2, 4
and 8 NFE, for the evaluation EMA and the raw weights. Each preset's line also gives the exact teacher's Heun at 4
and 8 NFE and the init net's Heun (``diagnose_mixtures.init_net_floor``). Runs use one torch thread.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.objectives import OBJECTIVES, register_objective  # noqa: E402
from flowmap.objectives.base import TIMES, Draw, Objective  # noqa: E402
from flowmap.recipe import compose, train_options  # noqa: E402
from flowmap.types import LossOutput  # noqa: E402
from scripts.benchmark import BUDGETS, Evaluator, Setting, set_files  # noqa: E402
from scripts.diagnose_mixtures import fmt, init_net_floor, mixture_sets, presets_of, run, run_arguments  # noqa: E402
from scripts.diagnose_student import key_values, set_steps  # noqa: E402

NAME = "exact_map_regression"
EXACT_HEUN_STEPS = (2, 4)  # the exact teacher's Heun at 4 and 8 NFE


class ExactMapRegression(Objective):
    """Supervised regression onto the teacher's exact flow map: per sample

        loss = mean_d (X_theta(x_s, s, t) - X(x_s, s, t))_d^2,   x_s = (1 - s) x0 + s eps,

    with (s, t), s >= t, from the shared pair law (``PairSampler``, uniform by default), and t = 0 on the last
    round(B * zero_share) rows (the 1-NFE jump ends at t = 0). X is the teacher's ``flow_map`` (float64 RK4 with
    ``exact_steps`` steps per jump, e.g. ``teachers.gmm.GaussianMixtureTeacher``): no method's equations, the
    oracle a method's loss stands in for."""

    name = NAME
    shared = TIMES

    def __init__(self, zero_share: float = 0.25, exact_steps: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= zero_share <= 1.0:
            raise ValueError(f"zero_share must lie in [0, 1], got {zero_share}")
        if exact_steps < 1:
            raise ValueError(f"exact_steps must be >= 1, got {exact_steps}")
        self.zero_share, self.exact_steps = float(zero_share), int(exact_steps)

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor]:
        s, t = super().times(batch, x0, step)
        n = batch - int(round(batch * self.zero_share))
        return s, torch.cat([t[:n], torch.zeros_like(t[n:])])

    def loss(self, draw: Draw, student: nn.Module, teacher, target: nn.Module, step: int) -> LossOutput:
        if not hasattr(teacher, "flow_map"):
            raise ValueError(f"{NAME} needs a teacher with an exact flow_map (a Gaussian mixture), got {teacher!r}")
        with torch.no_grad():
            exact = teacher.flow_map(draw.x_s, draw.s, draw.t, draw.cond, steps=self.exact_steps)
        mse = (draw.X(student, draw.x_s, draw.s, draw.t) - exact).pow(2).flatten(1).mean(1)
        return LossOutput(mse, {"mse": mse.detach()})


def floor_recipe(name: str, steps: int | None, net: dict, objective: dict) -> dict:
    """The recipe ``scripts.diagnose_student.train`` takes, for benchmark set ``name``: the set's data and model
    configs (net, batch, ``TrainLoop`` options of a ``DistillModule`` run) for ``steps`` steps, the student net with
    ``net`` set over it, started from the init net (from scratch when ``net`` makes it another net), trained with
    ``ExactMapRegression(**objective)``."""
    steps = set_steps(name) if steps is None else steps
    cfg = compose(set_files(name), max_steps=steps)
    cfg["trainer"]["max_steps"] = steps
    student = dict(cfg["model"]["student"])
    student["net"] = {**student["net"], **net}
    return {
        "cfg": cfg,
        "objective": {"name": NAME, **objective},
        "student": student,
        "init_from_teacher": None,  # the init net's weights when the student's net is the init net's
        "options": train_options(cfg),
        "files": [str(p.relative_to(ROOT)) for p in set_files(name)],
    }


def parse(argv: list[str] | None):
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    run_arguments(p)
    p.add_argument("--net", nargs="*", default=[], metavar="K=V", help="student net options (init: scratch if changed)")
    p.add_argument("--init", choices=("auto", "scratch"), default="auto",
                   help="student init: the init net's weights when the nets match (auto), or scratch")  # fmt: skip
    p.add_argument("--zero-share", type=float, default=0.25, help="share of pairs with t = 0")
    p.add_argument("--exact-steps", type=int, default=16, help="RK4 steps of the exact map per jump")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the data config's)")
    a = p.parse_args(argv)
    if (a.steps is not None and a.steps < 1) or a.n_eval < 2 or a.exact_steps < 1:
        p.error("--steps and --exact-steps must be >= 1 and --n-eval >= 2")
    if not 0.0 <= a.zero_share <= 1.0:
        p.error(f"--zero-share must lie in [0, 1], got {a.zero_share}")
    if a.lr is not None and not (a.lr > 0 and math.isfinite(a.lr)):
        p.error(f"--lr must be a positive number, got {a.lr}")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(1)
    net = key_values(a.net, "--net")
    if NAME not in OBJECTIVES:
        register_objective(NAME, ExactMapRegression)
    sets = mixture_sets()
    presets = presets_of(a, sets)
    objective = {"zero_share": a.zero_share, "exact_steps": a.exact_steps}
    budget = replace(BUDGETS["full"], n_eval_2d=a.n_eval)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for preset in presets:
        r = floor_recipe(sets[preset], a.steps, net, objective)
        if a.lr is not None:
            r["options"]["lr"] = a.lr
        setting = Setting(sets[preset], budget, torch.device("cpu"), cache, fresh=False)
        setting.get_teacher()
        ev = Evaluator(setting, budget)
        init = init_net_floor(setting, ev)
        exact = init_net_floor(setting, ev, EXACT_HEUN_STEPS, setting.exact_teacher)
        res = run(setting, ev, NAME, r, a.seed, a.init)
        steps = r["options"]["steps"]
        net_args = " ".join(f"{k}={v}" for k, v in r["student"]["net"].items() if k != "data_shape")
        print(f"{preset:9s} exact teacher Heun steps {fmt(exact)}  init net Heun steps {fmt(init)}", flush=True)
        print(f"{preset:9s} floor {steps:5d} steps  RMSE % of std  EMA {fmt(res['ema'])}  raw {fmt(res['raw'])}  "
              f"({res['seconds']:.0f} s, from {res['init']}; loss {res['loss_last']:.2e}; {net_args})",
              flush=True)  # fmt: skip
        if a.json:
            row = {"preset": preset, "set": sets[preset], "steps": steps, "seed": a.seed, "net_overrides": net,
                   "objective": objective, "data_std": ev.data_std, "exact_heun": exact, "init_net_heun": init,
                   **res}  # fmt: skip
            with open(a.json, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    main_guard(main)
