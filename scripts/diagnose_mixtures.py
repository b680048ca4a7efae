"""Diagnose distillation methods on Gaussian mixtures with the benchmark's mixture recipe.

    python scripts/diagnose_mixtures.py --methods shortcut,ctm --presets ring8,aniso2d,scales16 --steps 1000 \
        [--objective target_ema=0.9 ...] [--net time_scale=1 ...] [--init-net fourier_features=4 ...]

The recipe of ``scripts/benchmark.py`` for its mixture (``gmm``): a flow-matching net trained on the mixture's
samples initializes the student, the exact mixture (``teachers.gmm``) is the teacher, the student trains
``--steps`` Adam steps (batch 256, learning rate 1e-3 with a cosine decay to 5%) with the method's benchmark
hyperparameters (``method_config``: its ``configs/distill/<method>_gmm.yaml``, curricula rescaled), and the raw
weights are scored. Printed per method and preset: the flow-map RMSE against the exact map X(z, 1, 0) of 2000 fixed
noises, as a share (%) of the data's std (sqrt of the mean per-coordinate variance), at 1, 2, 4 and 8 NFE of the
deterministic sampler (uniform grid, gamma = 0).

``--objective k=v`` overrides a hyperparameter of every listed method (a value ``data_std`` is replaced by the
preset's std, for sigma_data); ``--net k=v`` sets a net option of the student, and of the init net unless
``--init-net`` is given (a student whose options differ from the init net's starts from scratch, as in the
benchmark). The init nets and the exact maps are cached in ``--cache``. Runs use one torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.metrics import flow_map_rmse  # noqa: E402
from flowmap.models import init_student_from_teacher, load_model, save_teacher  # noqa: E402
from flowmap.nets import build_net  # noqa: E402
from flowmap.sampling import sample  # noqa: E402
from flowmap.student import FlowMap  # noqa: E402
from flowmap.training import fit  # noqa: E402
from flowmap.velocity import NetVelocity  # noqa: E402
from scripts.benchmark import BUDGETS, FlowMatching, key_of, method_config, seed_of, seeded_objective  # noqa: E402
from teachers.gmm import GaussianMixtureTeacher, preset_mixture  # noqa: E402

NFES = (1, 2, 4, 8)


def data_std(mix: GaussianMixtureTeacher) -> float:
    """sqrt of the mean per-coordinate variance of the mixture, from its exact moments."""
    w, mu, S = mix.weights, mix.means, mix.covs
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (S + mu[:, :, None] * mu[:, None, :])).sum(0)
    return float((torch.diagonal(second) - mean**2).mean().sqrt())


def parse_pairs(pairs: list[str], what: str) -> dict:
    """["k=v", ...] -> {k: yaml(v)}."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"{what} takes key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


class Mixture:
    """One preset: its exact teacher, batches, init net (cached) and the exact map of the evaluation noise."""

    def __init__(self, name: str, cache: Path, init_net: dict, init_steps: int, n_eval: int) -> None:
        self.name, self.cache = name, cache
        self.mix = preset_mixture(name)
        self.dim = self.mix.data_shape[0]
        self.std = data_std(self.mix)
        self.budget = BUDGETS["full"]
        self.net_config = {**init_net, "data_shape": [self.dim]}
        g = torch.Generator().manual_seed(seed_of("eval", "gmm", name))
        self.noise = torch.randn(n_eval, self.dim, generator=g)
        exact_path = cache / f"exact_{name}_{n_eval}.pt"
        if exact_path.is_file():
            self.exact = torch.load(exact_path)
        else:
            one = torch.ones(n_eval, dtype=torch.float64)
            steps = self.budget.exact_map_steps
            self.exact = self.mix.flow_map(self.noise.double(), one, 0 * one, steps=steps).float()
            torch.save(self.exact, exact_path)
        self.init = self._init_net(init_steps)

    def batches(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        return lambda step: (self.mix.sample(self.budget.batch_2d, generator=g), None)

    def _init_net(self, steps: int) -> NetVelocity:
        b = self.budget
        key = key_of("init", self.name, self.net_config, steps, b.batch_2d, b.lr_2d, b.lr_decay)
        path = self.cache / f"init_{self.name}_{key}.safetensors"
        if path.is_file():
            return load_model(path, expect="teacher").requires_grad_(False)
        torch.manual_seed(seed_of("teacher", "gmm"))
        net = build_net(dict(self.net_config))
        init = NetVelocity(net, "linear", "velocity")
        t0 = time.time()
        lr = b.lr_2d * 2
        fit(net, FlowMatching(p_uncond=0.0), self.batches(seed_of("teacher-data", "gmm")), steps, lr=lr,
            lr_final=lr * b.lr_decay)  # fmt: skip
        print(
            f"# {self.name}: init net {self.net_config} trained {steps} steps in {time.time() - t0:.0f} s", flush=True
        )
        save_teacher(path, init, data=self.name, extra={"steps": steps})
        return init.eval().requires_grad_(False)

    def score(self, student: FlowMap) -> dict[int, float]:
        """{nfe: flow-map RMSE in % of the data's std}."""
        with torch.no_grad():
            return {n: 100 * flow_map_rmse(sample(student, self.noise, n), self.exact) / self.std for n in NFES}


def run(mixture: Mixture, method: str, steps: int, objective: dict, net: dict, seed: int) -> dict:
    """Train one student with the benchmark's recipe; returns {"rmse": {nfe: %}, "config", "seconds", "init"}."""
    b = mixture.budget
    config = method_config(method, "2d", steps, "gmm")
    config.update({k: (mixture.std if v == "data_std" else v) for k, v in objective.items()})
    parts = ("objective", "gmm", method) if seed == 0 else ("objective", "gmm", method, seed)
    obj = seeded_objective(config, *parts)
    net_config = {**mixture.net_config, **net}
    torch.manual_seed(seed_of("student", "gmm", method, seed))
    student = FlowMap(build_net(dict(net_config)))
    init = "scratch"
    if net_config == mixture.net_config:
        init_student_from_teacher(student, mixture.init)
        init = "flow-matching net"
    teacher = mixture.mix if getattr(obj, "needs_teacher", False) else None
    t0 = time.time()
    losses = fit(student, obj, mixture.batches(seed_of("student-data", "gmm", method, seed)), steps,
                 teacher=teacher, lr=b.lr_2d, lr_final=b.lr_2d * b.lr_decay)  # fmt: skip
    seconds = time.time() - t0
    finite = all(math.isfinite(v) for v in losses[-10:])
    rmse = mixture.score(student.eval()) if finite else {n: float("nan") for n in NFES}
    return {"rmse": rmse, "config": config, "net": net_config, "seconds": seconds, "init": init}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", required=True, help="comma-separated objective names")
    p.add_argument("--presets", default="ring8,aniso2d,scales16", help="comma-separated preset_mixture names")
    p.add_argument("--steps", type=int, default=1000, help="student steps (the benchmark: 1000)")
    p.add_argument("--init-steps", type=int, default=BUDGETS["full"].teacher_steps_2d, help="init net's steps")
    p.add_argument("--objective", nargs="*", default=[], metavar="K=V", help="objective hyperparameter overrides")
    p.add_argument("--net", nargs="*", default=[], metavar="K=V", help="student net options")
    p.add_argument("--init-net", nargs="*", default=None, metavar="K=V", help="init net options (default: --net)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--cache", default="/tmp/flowmap_diagnose", help="init nets and exact maps")
    p.add_argument("--json", default=None, help="append one JSON line per run to this file")
    a = p.parse_args(argv)
    if a.steps < 1 or a.init_steps < 1 or a.n_eval < 2:
        p.error("--steps, --init-steps must be >= 1 and --n-eval >= 2")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(1)
    objective, net = parse_pairs(a.objective, "--objective"), parse_pairs(a.net, "--net")
    init_net = {**BUDGETS["full"].mixture_mlp, **(net if a.init_net is None else parse_pairs(a.init_net, "--init-net"))}
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for preset in a.presets.split(","):
        try:
            mixture = Mixture(preset, cache, init_net, a.init_steps, a.n_eval)
        except ValueError as err:
            raise ValueError(f"preset {preset!r}: {err}") from None
        for method in a.methods.split(","):
            r = run(mixture, method, a.steps, objective, net, a.seed)
            shares = " ".join(f"{n}:{r['rmse'][n]:6.2f}" for n in NFES)
            print(f"{preset:9s} {method:17s} {a.steps:5d} steps  RMSE % of std  {shares}  ({r['seconds']:.0f} s, "
                  f"from {r['init']}; {' '.join(a.objective + a.net)})", flush=True)  # fmt: skip
            if a.json:
                row = {"preset": preset, "method": method, "steps": a.steps, "seed": a.seed, "overrides": objective,
                       "net_overrides": net, **r}  # fmt: skip
                with open(a.json, "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    main_guard(main)
