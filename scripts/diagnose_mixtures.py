"""Diagnose distillation methods on Gaussian mixtures with the benchmark's recipe for its mixture sets.

    python scripts/diagnose_mixtures.py --methods shortcut,ctm --presets ring8,aniso2d,scales16 [--steps 1000] \
        [--objective target_ema=0.9 ...] [--net time_scale=1 ...] [--init-net fourier_features=4 ...]

Each preset is a mixture set of ``scripts/benchmark.py`` (``SETS``: ring8 is its ``gmm``, and aniso2d, scales16),
trained as the benchmark trains it (``scripts/diagnose_student.py``): a flow-matching net trained on the mixture's
samples (the set's model net, ``--init-steps`` steps) initializes the student, the exact mixture (``teachers.gmm``) is
the teacher, and the student trains the recipe composed from ``configs/data/<preset>.yaml``, the set's model config
and ``configs/distill/<method>.yaml`` (+ its override for the data): objective, net, batch and the ``TrainLoop``
options (lr, warm-up, cosine decay, AdamW, EMA half-life, clipping), for ``--steps`` steps (default: the data
config's trainer.max_steps; step fractions follow). Scored as the benchmark scores (``Evaluator``): the flow-map
RMSE against the exact map X(z, 1, 0) of ``--n-eval`` fixed noises as a share (%) of the data's std, at 1, 2, 4 and
8 NFE of the method's own sampler (a re-noising sampler has no flow-map error above 1 NFE: "-"), for the evaluation
EMA (the benchmark's figure) and the raw weights.

``--objective k=v`` overrides a hyperparameter of every listed method (a value ``data_std`` is replaced by the
preset's exact std, for sigma_data); ``--net k=v`` sets a net option of the student, and of the init net unless
``--init-net`` is given (the student takes the init net's options, then ``--net``; a student whose net is not the
init net's, up to its student-only inputs, starts from scratch, as in the benchmark). The init nets are cached in
``--cache`` (the benchmark's cache keys: a benchmark cache folder is reused). Runs use one torch thread.
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

from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.metrics import flow_map_rmse  # noqa: E402
from flowmap.objectives import build_objective  # noqa: E402
from flowmap.recipe import compose  # noqa: E402
from flowmap.solvers import solve  # noqa: E402
from scripts.benchmark import BUDGETS, SETS, STUDENT_NFE, Evaluator, Setting, sampler_gamma, set_files  # noqa: E402
from scripts.diagnose_student import key_values, student_recipe, train  # noqa: E402
from teachers.gmm import GaussianMixtureTeacher  # noqa: E402

INIT_HEUN_STEPS = (8, 32)  # the init net's Heun solves: near and at convergence


def data_std(mix: GaussianMixtureTeacher) -> float:
    """sqrt of the mean per-coordinate variance of the mixture, from its exact moments."""
    w, mu, S = mix.weights, mix.means, mix.covs
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (S + mu[:, :, None] * mu[:, None, :])).sum(0)
    return float((torch.diagonal(second) - mean**2).mean().sqrt())


def mixture_sets() -> dict[str, str]:
    """{preset: benchmark set} of the benchmark's mixture sets (a data config whose teacher is a PresetMixture)."""
    out = {}
    for name in SETS:
        teacher = compose(set_files(name))["model"].get("teacher")
        if isinstance(teacher, dict) and str(teacher.get("class_path", "")).endswith("PresetMixture"):
            out[(teacher.get("init_args") or {}).get("name", "ring8")] = name
    return out


def shares(rows: dict, std: float) -> dict[int, float | None]:
    """{nfe: flow-map RMSE in % of ``std``} of ``Evaluator.student_rows``' rows (None where it does not apply)."""
    out = {}
    for nfe, m in rows.items():
        rmse = m.get("rmse")
        out[nfe] = None if rmse is None else (100 * rmse / std if math.isfinite(rmse) else float("nan"))
    return out


def run(setting: Setting, ev: Evaluator, method: str, r: dict, seed: int, init: str = "auto") -> dict:
    """Train one student of recipe ``r`` and score it; returns {"ema", "raw": {nfe: % of std}, "config", "net",
    "seconds", "init"}."""
    t = train(setting, method, r, seed, init)
    gamma = sampler_gamma(method)
    out = {"config": r["objective"], "net": r["student"]["net"], "seconds": t["seconds"], "init": t["init"]}
    finite = all(math.isfinite(v) for v in t["losses"][-10:])
    for which in ("ema", "raw"):
        model = t["ema" if which == "ema" else "student"]
        out[which] = (
            shares(ev.student_rows(model, gamma)[0], ev.data_std) if finite else {n: float("nan") for n in STUDENT_NFE}
        )
    out["loss_last"] = t["losses"][-1]
    return out


def init_net_floor(
    setting: Setting, ev: Evaluator, steps: tuple[int, ...] = INIT_HEUN_STEPS, velocity=None
) -> dict[int, float]:
    """{Heun steps: flow-map RMSE in % of the data's std} of the flow-matching init net solved with Heun: the error
    every student starts from, and the floor of the students that learn the net's own map (``velocity``: another
    velocity model solved instead, e.g. the exact teacher)."""
    x = {n: solve(setting.init_net if velocity is None else velocity, ev.noise, n, "heun") for n in steps}
    return {n: 100 * flow_map_rmse(x[n], ev.exact) / ev.data_std for n in steps}


def fmt(values: dict) -> str:
    return " ".join(f"{n}:{'     -' if v is None else f'{v:6.2f}'}" for n, v in values.items())


def run_arguments(p: argparse.ArgumentParser) -> None:
    """The options every mixture diagnosis takes: presets, student steps and seed, evaluation noises, cache, JSON."""
    p.add_argument("--presets", default="ring8,aniso2d,scales16", help="comma-separated mixture presets with a set")
    p.add_argument("--steps", type=int, default=None, help="student steps (default: the data config's max_steps)")
    p.add_argument("--seed", type=int, default=0, help="student seed (0: the benchmark's seeds)")
    p.add_argument("--n-eval", type=int, default=BUDGETS["full"].n_eval_2d, help="evaluation noises")
    p.add_argument("--cache", default="/tmp/flowmap_diagnose", help="init nets (benchmark cache keys)")
    p.add_argument("--json", default=None, help="append one JSON line per run to this file")


def presets_of(a: argparse.Namespace, sets: dict[str, str]) -> list[str]:
    """``--presets`` as a list, each a key of ``sets`` (``mixture_sets()``: the benchmark's mixture sets; else one
    clear error)."""
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    for preset in presets:
        if preset not in sets:
            raise ValueError(f"unknown mixture preset {preset!r}: the benchmark's mixture sets are {sorted(sets)}")
    return presets


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="", help="comma-separated objective names (none: the init net's figures only)")
    run_arguments(p)
    p.add_argument("--init-steps", type=int, default=BUDGETS["full"].teacher_steps_2d, help="init net's steps")
    p.add_argument("--objective", nargs="*", default=[], metavar="K=V", help="objective hyperparameter overrides")
    p.add_argument("--net", nargs="*", default=[], metavar="K=V", help="student net options")
    p.add_argument("--init-net", nargs="*", default=None, metavar="K=V", help="init net options (default: --net)")
    p.add_argument("--init", choices=("auto", "teacher", "scratch"), default="auto",
                   help="student init: the recipe's rule (auto), the init net's weights, or scratch")  # fmt: skip
    a = p.parse_args(argv)
    if (a.steps is not None and a.steps < 1) or a.init_steps < 1 or a.n_eval < 2:
        p.error("--steps, --init-steps must be >= 1 and --n-eval >= 2")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(1)
    objective, net = key_values(a.objective, "--objective"), key_values(a.net, "--net")
    init_net = net if a.init_net is None else key_values(a.init_net, "--init-net")
    sets = mixture_sets()
    presets = presets_of(a, sets)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for preset in presets:  # every objective builds before anything trains (an unknown method or key fails here)
        for method in methods:
            build_objective(student_recipe(sets[preset], method, a.steps, objective, net, init_net)["objective"])
    budget = replace(BUDGETS["full"], teacher_steps_2d=a.init_steps, n_eval_2d=a.n_eval)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for preset in presets:
        setting = Setting(sets[preset], budget, torch.device("cpu"), cache, fresh=False)
        setting.net_config = {**setting.net_config, **init_net}  # the init net (its cache key follows)
        setting.get_teacher()
        ev = Evaluator(setting, budget)
        std = data_std(setting.mixture)
        floor = init_net_floor(setting, ev)
        net_args = " ".join(f"{k}={v}" for k, v in setting.net_config.items())
        print(f"{preset:9s} init net ({a.init_steps} steps, {setting.teacher_seconds:.0f} s)  RMSE % of std  Heun "
              f"steps {fmt(floor)}  ({net_args})", flush=True)  # fmt: skip
        for method in methods:
            over = {k: (std if v == "data_std" else v) for k, v in objective.items()}
            r = student_recipe(sets[preset], method, a.steps, over, net, init_net)
            res = run(setting, ev, method, r, a.seed, a.init)
            steps = r["options"]["steps"]
            print(f"{preset:9s} {method:17s} {steps:5d} steps  RMSE % of std  EMA {fmt(res['ema'])}  raw "
                  f"{fmt(res['raw'])}  ({res['seconds']:.0f} s, from {res['init']}; "
                  f"{' '.join(a.objective + a.net)})", flush=True)  # fmt: skip
            if a.json:
                row = {"preset": preset, "set": sets[preset], "method": method, "steps": steps, "seed": a.seed,
                       "overrides": objective, "net_overrides": net, "init_net": init_net, "data_std": ev.data_std,
                       "init_net_heun": floor, "init": a.init,
                       "files": r["files"], **res}  # fmt: skip
                with open(a.json, "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    main_guard(main)
