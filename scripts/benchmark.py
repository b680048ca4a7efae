#!/usr/bin/env python
"""One benchmark that ranks every flow-map method: quality per NFE, training cost, sampling speed, a peer.

    python scripts/benchmark.py --jobs 2         # full run, training in 2 worker processes (budget below)
    python scripts/benchmark.py --jobs 2 --scale 0.4   # every run length x 0.4 (the recipes' fractions follow)
    python scripts/benchmark.py --quick          # tiny nets and budgets, one seed, every table; run by the tests
    python scripts/benchmark.py --methods cd,meanflow --datasets checkerboard,gmm --out /tmp/bench
    python scripts/benchmark.py --datasets fromdata --seeds 1   # the teacher-free table alone, one seed
    python scripts/benchmark.py --methods ctm --keep-others    # retrain one method; the others' rows stay (--out's)

What it does, with fixed budgets and seeds (``BUDGETS``):

1. teachers: flow matching (``DenoisingLoss``, linear path, velocity) on checkerboard and eight Gaussians
   and class-conditional digits (a UNet and a DiT: the sets digits and digits_dit), with the net of each set's
   model config (``SETS``: configs/data/<set>.yaml and configs/model/<net>.yaml), trained by ``TrainLoop`` with
   the trainer semantics of its configs/teacher/<set>.yaml (``TeacherModule``'s; the mixtures' init nets: its
   defaults), keeping the evaluation EMA a user's teacher exports, or reused from ``<out>/cache``; the analytic
   ring8 Gaussian mixture (``teachers.gmm``, configs/data/ring8.yaml) and the other mixtures are their own exact
   teachers;
2. students: every objective in ``flowmap.objectives.OBJECTIVES`` with a ``configs/distill/<method>.yaml`` (the
   others are listed with the reason), each trained with the recipe a user composes from the set's data and model
   configs and the method's config (``flowmap.recipe.compose``: objective, net, batch, init rule; the Lightning
   trainer semantics through ``TrainLoop``: lr, warm-up, cosine decay, AdamW, EMA half-life, gradient clipping,
   non-finite guard) for the data config's ``trainer.max_steps`` (times ``--scale``), and evaluated with its EMA
   weights, as users export them. The mixture's exact teacher has no weights: its students start from a
   flow-matching net trained on its samples (data-free: x0 are samples of the teacher). The teacher-free set
   ``fromdata`` (``TEACHER_FREE``) has no teacher: every method with a configs/distill/<method>_fromdata.yaml trains
   it from scratch on the checkerboard, with that file's steps and batch (4000 x 1024);
3. seeds: each student is trained ``--seeds`` times (full: 2, --quick: 1); seed 0 is evaluated at every NFE, the
   others at 1 NFE (the headline numbers, shown side by side; the 1-NFE targets read the worse seed);
4. quality at 1, 2, 4, 8 NFE (the teacher-free table: 1, 2, 4; teachers at 1 ... 64 NFE, Euler and Heun, and the
   data-vs-data floor; the teacher-free table: pure N(0, I) samples, its noise level): exact W2 and support
   precision (2-D), flow-map RMSE against the exact map (mixture), FD / KID in the features of the project's digit
   classifier or Inception and class accuracy (digits);
5. cost: seconds per training step of each objective over a plain flow-matching step on the same MLP and
   DiT, measured interleaved in one process (medians), peak memory of one step, sampling throughput;
6. peer: our flow-matching teacher training against torchcfm's loop (as documented, and with our learning-rate
   schedule) on the same net, data, batch and steps: time per step and final W2.

Budget of the full run, per seed, in one-thread CPU minutes, estimated from measured step times (the benchmarks'
tables on a 2-core x86 CPU; ``--jobs 2`` halves the wall time): the three mixtures at 4000 student steps about 65
(14 methods, 0.015-0.025 s a step, CTM 0.03 s; two seeds took 65 min wall with --jobs 2); digits 1000
steps x 14 methods at batch 128, about 0.04-0.13 s a step on the UNet (about 20) and 0.3-0.4 s on the DiT (2-3x a
flow-matching step of 0.14 s; about 70); fromdata 4000 steps x 1024, about 0.15-0.2 s a step, 10-13 per method.
The two-seed full run at ``--scale 1`` takes several hours with ``--jobs 2``; ``--scale``, ``--seeds`` and
``--datasets`` fit it to a budget.

Writes ``<out>/RESULTS.md``, ``<out>/results.json`` and PNG plots (``scripts/benchmark_report.py``).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from flowmap.data import get_dataset  # noqa: E402
from flowmap.data.digits import load_digits_tensors  # noqa: E402
from flowmap.data.toy2d import EIGHT_GAUSSIANS_STD, eight_gaussians_centers  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.io import CheckpointError  # noqa: E402
from flowmap.metrics import checkerboard_precision, flow_map_rmse, w2_exact  # noqa: E402
from flowmap.models import (  # noqa: E402
    build_student,
    init_student_from_teacher,
    load_model,
    same_architecture,
    save_student,
    save_teacher,
)
from flowmap.nets import build_net  # noqa: E402
from flowmap.objectives import OBJECTIVES, build_objective, sampler_defaults  # noqa: E402
from flowmap.objectives.denoising import DenoisingLoss  # noqa: E402
from flowmap.recipe import CONFIGS, compose, recipe_files, train_options  # noqa: E402
from flowmap.sampling import sample  # noqa: E402
from flowmap.solvers import solve  # noqa: E402
from flowmap.student import FlowMap  # noqa: E402
from flowmap.training import TrainLoop  # noqa: E402
from flowmap.types import LossOutput  # noqa: E402
from flowmap.velocity import NetVelocity  # noqa: E402

STUDENT_NFE = (1, 2, 4, 8)
FROM_DATA_NFE = (1, 2, 4)  # the teacher-free table
SEED_NFE = (1,)  # students of seeds > 0 are evaluated at the headline NFE only
TEACHER_NFE = (1, 2, 4, 8, 16, 32, 64)
QUICK_METHODS = ("cd", "meanflow")


def sampler_gamma(method: str) -> float:
    """The re-noising gamma a method's students are sampled with: the method's own (``Objective.sampler_gamma``)."""
    return sampler_defaults(method)["gamma"]


# --- budgets and recipes -----------------------------------------------------------------------------

# benchmark set -> (configs/data/<data>.yaml, configs/model/<model>.yaml). A student of method M on a set trains the
# recipe a user composes from those two files and configs/distill/M.yaml (+ its override for the data), with the same
# trainer semantics (``flowmap.recipe.train_options``), for the data config's trainer.max_steps (times --scale).
# Another mixture: a data config naming its preset (copy configs/data/ring8.yaml) and one line here.
SETS = {
    "checkerboard": ("checkerboard", "mlp2d"),
    "eight_gaussians": ("eight_gaussians", "mlp2d"),
    "digits": ("digits", "unet_digits"),
    "digits_dit": ("digits", "dit_digits"),
    "gmm": ("ring8", "mlp2d_smooth"),
    "aniso2d": ("aniso2d", "mlp2d_smooth"),
    "scales16": ("scales16", "mlp2d_smooth"),
    "fromdata": ("checkerboard", "mlp2d"),
}
DATASETS = tuple(SETS)
# Teacher-free sets: no teacher; the methods with a configs/distill/<method><suffix>.yaml train that config from
# scratch (its trainer.max_steps and batch are the budget), as a user's run without --teacher does.
TEACHER_FREE = {"fromdata": "_fromdata"}
# Sets whose teacher trains with the trainer semantics of a configs/teacher/<file>.yaml (rate, warm-up as a share of
# the run, decay, clipping, EMA; the net is the set's model config); the mixtures' init nets: TeacherModule's defaults.
TEACHER_CONFIGS = {name: name for name in ("checkerboard", "eight_gaussians", "digits", "digits_dit")}
# --quick only: smaller nets (the recipe's net with these options), so that the smoke run takes a minute
QUICK_NETS = {
    "mlp": {"width": 64, "depth": 2, "emb_dim": 32},
    "unet": {"channels": 8, "emb_dim": 32, "attn_resolutions": []},
    "dit": {"dim": 32, "depth": 1, "heads": 2},
}


@dataclass(frozen=True)
class Budget:
    """The benchmark's own sizes (teachers, evaluation, cost tables, peer); the students' steps are their recipes'
    trainer.max_steps times ``student_scale``. The defaults are the full benchmark's."""

    cost_mlp: dict = field(default_factory=lambda: {"name": "mlp", "width": 256, "depth": 4, "emb_dim": 128})
    dit: dict = field(default_factory=lambda: {"name": "dit", "patch": 2, "dim": 96, "depth": 4, "heads": 4})
    teacher_steps_2d: int = 8000
    teacher_steps_digits: int = 3000
    n_eval_2d: int = 2000
    n_eval_digits: int = 1000
    exact_map_steps: int = 200
    feature_steps: int = 1000
    kid_subsets: int = 50
    cost_batch_mlp: int = 512
    cost_batch_dit: int = 64
    cost_repeats: int = 7
    cost_steps: int = 3
    throughput_batch_mlp: int = 4096
    throughput_batch_dit: int = 256
    throughput_repeats: int = 7
    throughput_inner: int = 5
    peer_steps: int = 1000
    peer_block: int = 50
    peer_seeds: int = 8
    student_scale: float = 1.0  # students train trainer.max_steps * student_scale steps (--scale, --quick)
    lr_decay: float = 0.05  # the teachers' cosine decay to lr * lr_decay (students: their recipe's lr_final_ratio)
    stream_batch: int = 256
    stream_batches: int = 40
    quick_nets: bool = False  # shrink the recipes' nets (QUICK_NETS)
    # the teacher-free table's sample count: its W2 target (0.15) sits near the data-vs-data floor of 2000 samples
    # (0.10-0.15 with the reference draw); 4000 samples bring the floor to about 0.09
    n_eval_from_data: int = 4000


BUDGETS = {
    "full": Budget(),
    "quick": Budget(
        cost_mlp={"name": "mlp", "width": 64, "depth": 2, "emb_dim": 32},
        dit={"name": "dit", "patch": 2, "dim": 32, "depth": 1, "heads": 2},
        teacher_steps_2d=150,
        teacher_steps_digits=30,
        n_eval_2d=300,
        n_eval_digits=100,
        exact_map_steps=40,
        feature_steps=150,
        kid_subsets=5,
        cost_batch_mlp=256,
        cost_batch_dit=16,
        cost_repeats=3,
        cost_steps=1,
        throughput_batch_mlp=1024,
        throughput_batch_dit=32,
        throughput_repeats=3,
        throughput_inner=2,
        peer_steps=40,
        peer_block=10,
        peer_seeds=1,
        student_scale=0.004,
        stream_batch=64,
        stream_batches=8,
        quick_nets=True,
        n_eval_from_data=300,
    ),
}


STEP_FIELDS = ("teacher_steps_2d", "teacher_steps_digits", "peer_steps")


def scaled(budget: Budget, scale: float) -> Budget:
    """``budget`` with every training step count multiplied by ``scale`` (at least one step each)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"--scale must be a positive number, got {scale}")
    steps = {f: max(1, int(round(getattr(budget, f) * scale))) for f in STEP_FIELDS}
    return replace(budget, student_scale=budget.student_scale * scale, **steps)


def set_files(name: str, method: str | None = None) -> list[Path]:
    """The config files of benchmark set ``name`` (data, model) and of ``method`` (configs/distill/<method>.yaml;
    on a teacher-free set configs/distill/<method><suffix>.yaml)."""
    data, model = SETS[name]
    if method is None:
        return [CONFIGS / "data" / f"{data}.yaml", CONFIGS / "model" / f"{model}.yaml"]
    return recipe_files(data, model, method + TEACHER_FREE.get(name, ""))


def set_methods(name: str, methods: list[str]) -> list[str]:
    """The methods of ``methods`` that run on set ``name``: all of them, or on a teacher-free set those with a
    configs/distill/<method><suffix>.yaml (found by glob: a new teacher-free config joins the table by itself)."""
    if name not in TEACHER_FREE:
        return list(methods)
    return [m for m in methods if (CONFIGS / "distill" / f"{m}{TEACHER_FREE[name]}.yaml").is_file()]


def set_kind(name: str) -> str:
    """ "digits" (class-conditional images), "mixture" (an exact analytic teacher) or "2d" (sampled points)."""
    cfg = compose(set_files(name))
    if cfg["data"]["class_path"].endswith("DigitsDataModule"):
        return "digits"
    teacher = cfg["model"].get("teacher")
    return "mixture" if isinstance(teacher, dict) and "class_path" in teacher else "2d"


def student_steps(name: str, budget: Budget, method: str | None = None) -> int:
    """The students' steps on set ``name``: trainer.max_steps of the set's configs (with ``method``'s file, which
    may set it: the teacher-free ones do) times ``budget.student_scale``."""
    max_steps = int(compose(set_files(name, method))["trainer"]["max_steps"])
    return max(1, int(round(max_steps * budget.student_scale)))


def shrink(net: dict, budget: Budget) -> dict:
    """The net config, with ``QUICK_NETS``' options under --quick."""
    return {**net, **QUICK_NETS.get(net.get("name"), {})} if budget.quick_nets else dict(net)


def recipe(name: str, method: str, budget: Budget) -> dict:
    """What a user's ``scripts/distill.py --config <data> --config <model> --config <method>`` run trains, for the
    benchmark's run length: {"cfg" (composed, trainer.max_steps = the students' steps), "objective", "student",
    "options" (``TrainLoop`` options), "files"}."""
    files = set_files(name, method)
    steps = student_steps(name, budget, method)
    cfg = compose(files, max_steps=steps)
    cfg["trainer"]["max_steps"] = steps
    student = dict(cfg["model"]["student"])
    student["net"] = shrink(student["net"], budget)
    return {
        "cfg": cfg,
        "objective": dict(cfg["model"]["objective"]),
        "student": student,
        "init_from_teacher": cfg["model"].get("init_from_teacher"),
        "options": train_options(cfg),
        "files": [str(p.relative_to(ROOT)) for p in files],
    }


def options_record(options: dict) -> dict:
    """``train_options`` as JSON-able values (cache keys, results.json)."""
    return {k: (asdict(v) if k == "ema" else v) for k, v in options.items()}


# --- small utilities -------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@functools.cache
def code_fingerprint() -> str:
    """A hash of the training code (every ``.py`` under ``flowmap/`` and ``teachers/``), stored beside each cached
    teacher and student: the cache is keyed on configs, so the report names what was trained under other code."""
    h = hashlib.sha256()
    for folder in ("flowmap", "teachers"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def other_code(code: str | None) -> str:
    """For a cache-load log line: empty when ``code`` is this code's fingerprint, else says under what it was
    trained."""
    return "" if code == code_fingerprint() else f" (trained under other code: {code})"


def load_cached(path: Path, expect: str, who: str, what: str, needs: tuple[str, ...] = ()) -> tuple | None:
    """(model, meta) of a cache entry: the model file ``path`` (a ``load_model`` file of kind ``expect``) and its
    metadata ``path`` with ``.json`` (which must hold the fields ``needs``); None when either file is missing or
    unusable, logged as ``"{who}: cached {what} unusable (why); retraining"``."""
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        model = load_model(path, expect=expect)
        meta = json.loads(meta_path.read_text())
        missing = [k for k in needs if k not in meta]
        if missing:
            raise KeyError(missing[0])
    except (CheckpointError, KeyError, json.JSONDecodeError) as err:
        log(f"{who}: cached {what} unusable ({err}); retraining")
        return None
    log(f"{who}: {what} loaded from {path.name}{other_code(meta.get('code'))}")
    return model, meta


def key_of(*parts) -> str:
    """A short stable hash of JSON-able parts (cache file names)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def seed_of(*parts) -> int:
    return int(key_of("seed", *parts), 16) % (2**31)


def seeded_objective(config: dict, *seed_parts) -> nn.Module:
    """``build_objective(config)`` under a fixed seed: some objectives own randomly initialized parts (sCM's learned
    log-variance weighting and its Fourier frequencies), and torch's global generator starts from a random seed in
    every process, so an unseeded build would differ from run to run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(*seed_parts))
        return build_objective(dict(config))


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class Memory:
    """Peak memory of a block of work. CUDA: ``torch.cuda.max_memory_allocated`` (allocator bytes). CPU on
    Linux: growth of the resident set (VmHWM after resetting it through /proc/self/clear_refs, glibc
    ``malloc_trim`` first and a 64 KiB mmap threshold so freed tensors leave the process) - the
    ``resource``-style peak RSS, made resettable. Elsewhere: unavailable (None).

    The small mmap threshold makes every tensor allocation a fresh mapping (page faults on each), which
    slows a CPU step ~2x, so it holds only inside ``measure``: outside, the thresholds are set high
    (``FAST_MALLOC``) and timed work runs at full speed."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    MEASURE_MALLOC = {M_MMAP_THRESHOLD: 64 * 1024, M_TRIM_THRESHOLD: 128 * 1024}
    FAST_MALLOC = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = None
        self.method = "unavailable"
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated (allocator peak over the step)"
        elif sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs"):
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.method = (
                    "peak resident-set growth over the step "
                    "(Linux VmHWM reset via /proc/self/clear_refs; resource-style RSS)"
                )
            except OSError:
                self.libc = None

    @staticmethod
    def _status_mib(key: str) -> float:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024.0

    def _malloc(self, options: dict[int, int]) -> None:
        for option, value in options.items():
            self.libc.mallopt(option, value)

    def measure(self, fn: Callable[[], None]) -> float | None:
        """MiB above the level before ``fn`` (None when unavailable); on CPU ``fn`` runs twice, the second is
        measured."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        if self.libc is None:
            fn()
            return None
        self._malloc(self.MEASURE_MALLOC)
        try:
            fn()  # once untracked, so that the heap settles under the measuring thresholds
            gc.collect()
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = self._status_mib("VmRSS")
            fn()
            return max(0.0, self._status_mib("VmHWM") - base)
        finally:
            self._malloc(self.FAST_MALLOC)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the settings: data, teachers, students ----------------------------------------------------------


class FlowMatching(nn.Module):
    """Teacher training (plain flow matching) in the objective calling convention of ``fit``: the
    "student" is the raw net, trained by ``DenoisingLoss`` (linear path, velocity target)."""

    name = "fm"
    needs_teacher = False
    uses_target = False

    def __init__(self, time_sampling: str = "logit_normal", p_uncond: float = 0.1) -> None:
        super().__init__()
        self.loss = DenoisingLoss("linear", "velocity", time_sampling=time_sampling, p_uncond=p_uncond)

    def forward(
        self, *, student: nn.Module, teacher=None, target=None, x0: Tensor, cond: Tensor | None = None, step: int = 0
    ) -> LossOutput:
        net = getattr(student, "net", student)
        return self.loss(net, x0, cond)


def instantiate(spec: dict):
    """An object from a config's ``{"class_path": ..., "init_args": {...}}`` (as LightningCLI builds it)."""
    import importlib

    module, _, cls = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**dict(spec.get("init_args") or {}))


class Setting:
    """One benchmark setting: data (batches and evaluation), teacher and student nets, read from its configs
    (``SETS``): the data config's set, batch, learning rate and run length, the model config's net."""

    def __init__(
        self, name: str, budget: Budget, device: torch.device, cache: Path, fresh: bool, reuse_only: bool = False
    ) -> None:
        self.name, self.budget, self.device, self.cache, self.fresh = name, budget, device, cache, fresh
        self.reuse_only = reuse_only
        cfg = compose(set_files(name))
        data = cfg["data"]
        args = dict(data.get("init_args") or {})
        self.kind = "digits" if data["class_path"].endswith("DigitsDataModule") else "2d"
        self.teacher_free = name in TEACHER_FREE
        self.student_config = dict(cfg["model"]["student"])
        self.net_config = shrink(self.student_config["net"], budget)  # the teacher's net, and the students' base
        self.data_shape = tuple(self.net_config["data_shape"])
        self.num_classes = int(self.net_config.get("num_classes", 0) or 0)
        self.batch, self.lr = int(args.get("batch_size", 256)), float(cfg["model"].get("lr", 1e-3))
        self.teacher_file = CONFIGS / "teacher" / f"{TEACHER_CONFIGS[name]}.yaml" if name in TEACHER_CONFIGS else None
        self.teacher_options = self._teacher_options()
        self.student_steps = student_steps(name, budget)
        teacher_spec = cfg["model"].get("teacher")
        self.is_mixture = isinstance(teacher_spec, dict) and "class_path" in teacher_spec
        if self.is_mixture:  # data-free: the data config's analytic teacher is the data
            self.mixture = instantiate(teacher_spec)  # on the CPU: sampling with seeded CPU generators
            self.exact_teacher = instantiate(teacher_spec).to(device)
        elif self.kind == "digits":
            self.x_train, self.y_train = (t.to(device) for t in load_digits_tensors("train"))
        else:
            self.source = get_dataset(args.get("name", name), **dict(args.get("dataset_kwargs") or {}))
        self.teacher = None
        self.teacher_seconds = 0.0
        self.teacher_losses: list[float] = []
        self.teacher_code: str | None = None

    # data -------------------------------------------------------------------------------------------
    def batches(self, seed: int, batch: int | None = None) -> Callable[[int], tuple[Tensor, Tensor | None]]:
        """step -> (x0, cond): fresh samples (2-D), the teacher's samples (mixture, data-free), or a random
        batch of the digits' train split with its labels."""
        g = torch.Generator().manual_seed(seed)
        B = batch or self.batch

        def get(step: int):
            if self.kind == "digits":
                idx = torch.randint(0, len(self.x_train), (B,), generator=g).to(self.device)
                return self.x_train[idx], self.y_train[idx]
            if self.is_mixture:
                return self.mixture.sample(B, generator=g).to(self.device), None
            return self.source.sample(B, generator=g).to(self.device), None

        return get

    # teacher ----------------------------------------------------------------------------------------
    def teacher_steps(self) -> int:
        return self.budget.teacher_steps_digits if self.kind == "digits" else self.budget.teacher_steps_2d

    def _teacher_options(self) -> dict:
        """``TrainLoop`` options of the teacher (or of the mixture's init net): ``TeacherModule``'s trainer semantics
        (``flowmap.recipe.train_options`` with its defaults, so the evaluation EMA a user's teacher exports) from the
        set's teacher config, its warm-up as a share of the run; a set without one (the mixtures) gets twice the
        students' rate with cosine decay to ``lr_decay``."""
        from flowmap.lightning.teacher_module import TeacherModule

        steps = self.teacher_steps()
        model = {"lr": 2 * self.lr, "lr_decay": "cosine", "lr_final_ratio": self.budget.lr_decay}
        trainer: dict = {"max_steps": steps}
        if self.teacher_file is not None:
            cfg = compose([self.teacher_file])
            model, share = dict(cfg["model"]), steps / int(cfg["trainer"]["max_steps"])
            model["warmup_steps"] = int(round(int(model.get("warmup_steps", 0)) * share))
            trainer["gradient_clip_val"] = (cfg.get("trainer") or {}).get("gradient_clip_val")
        return train_options({"model": model, "trainer": trainer}, TeacherModule)

    def teacher_key(self) -> str | None:
        if self.teacher_free:
            return None
        steps = self.teacher_steps()
        return key_of("teacher", self.name, self.net_config, steps, self.batch, options_record(self.teacher_options))

    def get_teacher(self):
        """The teacher (trained or loaded from the cache); the mixture's is exact; a teacher-free set has none
        (None). Also sets ``init_net``, the flow-matching net every student starts from: the teacher itself, or for
        the mixture a flow-matching net trained on the mixture's samples (data-free: samples of the teacher)."""
        if self.teacher_free:
            self.init_net = self.teacher = None
            return None
        net = self._flow_matching_net()
        self.init_net = net
        self.teacher = self.exact_teacher if self.is_mixture else net
        return self.teacher

    def _flow_matching_net(self) -> NetVelocity:
        steps = self.teacher_steps()
        what = "flow-matching init net" if self.is_mixture else "teacher"
        path = self.cache / f"teacher_{self.name}_{self.teacher_key()}.safetensors"
        cached = None if self.fresh else load_cached(path, "teacher", self.name, what, ("seconds", "losses"))
        if cached is not None:
            teacher, meta = cached
            self.teacher_seconds, self.teacher_losses = meta["seconds"], meta["losses"]
            self.teacher_code = meta.get("code")
            return teacher.to(self.device).requires_grad_(False)
        torch.manual_seed(seed_of("teacher", self.name))
        net = build_net(dict(self.net_config)).to(self.device)
        teacher = NetVelocity(net, "linear", "velocity")
        objective = FlowMatching(p_uncond=0.1 if self.num_classes else 0.0)
        log(f"{self.name}: training the {what} ({steps} steps, batch {self.batch})")
        t0 = time.time()
        loop = TrainLoop(net, objective, None, **self.teacher_options)
        batches = self.batches(seed_of("teacher-data", self.name))
        losses = torch.stack([loop.step(*batches(step))[0] for step in range(steps)]).tolist()
        net.load_state_dict(loop.ema.state_dict())  # the evaluation EMA: what a user's teacher run exports
        self.teacher_seconds, self.teacher_losses = time.time() - t0, losses
        save_teacher(path, teacher, data=self.name, extra={"steps": steps})
        self.teacher_code = code_fingerprint()
        meta = {"seconds": self.teacher_seconds, "losses": losses, "code": self.teacher_code}
        path.with_suffix(".json").write_text(json.dumps(meta))
        return teacher.eval().requires_grad_(False)

    # students ---------------------------------------------------------------------------------------
    def train_student(self, method: str, seed: int = 0) -> dict:
        """Train (or load) the student of ``method`` with its recipe (``recipe``: the objective, net, batch and
        ``TrainLoop`` options of the configs a user composes); the EMA weights are kept, as users export them.
        ``seed`` 0 is the benchmark's run; another seed draws other seeds for everything the student's training
        draws (the init of its parts not copied from the teacher, the objective's own parts, data batches, times
        and noises). Returns {"student", "config", "losses", "seconds", ...}."""
        r = recipe(self.name, method, self.budget)
        config, options = r["objective"], r["options"]
        steps = int(options["steps"])
        batch = int(r["cfg"]["data"].get("init_args", {}).get("batch_size", self.batch))
        parts = (self.name, method, *([seed] if seed else []))  # seed 0: the parts (and cache keys) of one-seed runs
        key = key_of(
            "student",
            self.name,
            method,
            config,
            r["student"],
            r["init_from_teacher"],
            steps,
            batch,
            options_record(options),
            self.teacher_key(),
            *([{"seed": seed}] if seed else []),
        )
        tag = f"{method}_seed{seed}" if seed else method
        path = self.cache / f"student_{self.name}_{tag}_{key}.safetensors"
        cached = None if self.fresh else load_cached(path, "student", f"{self.name}/{tag}", "student")
        if cached is not None:
            student, meta = cached
            return {"student": student.to(self.device), "config": config, **meta, "cached": True}
        if self.reuse_only:
            raise LookupError(f"no cached student {path.name} (--reuse-only: not trained in this run)")
        objective = seeded_objective(config, "objective", *parts).to(self.device)
        if self.teacher_free and getattr(objective, "needs_teacher", False):
            raise ValueError(f"{method}: its {self.name} config trains against a teacher; this set has none")
        torch.manual_seed(seed_of("student", *parts))
        student = build_student(dict(r["student"])).to(self.device)
        # DistillModule's rule: init_from_teacher, or (unset) whenever the student's net is the teacher's; the
        # mixture's exact teacher has no weights: its students start from the flow-matching net of its samples
        init_from = r["init_from_teacher"]
        if self.teacher_free and init_from:
            raise ValueError(f"{method}: its {self.name} config sets init_from_teacher; this set has no teacher")
        if init_from is None:
            init_from = not self.teacher_free and same_architecture(student, self.init_net)
        if init_from:
            copied, _ = init_student_from_teacher(student, self.init_net)
            if not copied:
                raise ValueError("init_from_teacher: no tensor of the teacher fits the student's network")
            init = "flow-matching net trained on the mixture's samples" if self.is_mixture else "teacher"
        else:
            init = "scratch"
        teacher = self.teacher if getattr(objective, "needs_teacher", False) else None
        loop = TrainLoop(student, objective, teacher, **options)
        batches = self.batches(seed_of("student-data", *parts), batch)
        t0 = time.time()
        losses = []
        for step in range(steps):
            losses.append(loop.step(*batches(step))[0])
        losses = torch.stack(losses).tolist()  # one host read for the run
        seconds = time.time() - t0
        student.load_state_dict(loop.ema.state_dict())  # the evaluation EMA: what a user's run exports
        student.eval()
        if not all(bool(torch.isfinite(p).all()) for p in student.parameters()):
            raise FloatingPointError(f"the student's weights are not finite after training (last loss {losses[-1]})")
        meta = {
            "losses": losses,
            "seconds": seconds,
            "steps": steps,
            "init": init,
            "config_source": "recipe " + " + ".join(r["files"]),
            "options": options_record(options),
            "batch": batch,
            "code": code_fingerprint(),
        }
        save_student(
            path,
            student,
            method=method,
            data=self.name,
            extra={"objective": config, **({"seed": seed} if seed else {})},
        )
        path.with_suffix(".json").write_text(json.dumps(meta))
        return {"student": student, "config": config, **meta, "cached": False}


# --- evaluation ------------------------------------------------------------------------------------


def eight_gaussians_precision(x: Tensor) -> float:
    """Share of samples within 4 std of one of the eight centres (outside: P = e^-8 ~ 3e-4 for true data)."""
    d = torch.cdist(x.double().cpu(), eight_gaussians_centers().double())
    return float((d.min(1).values < 4 * EIGHT_GAUSSIANS_STD).double().mean())


class Evaluator:
    """Fixed noise, references and metrics of one setting; ``rows`` maps a model to metrics per NFE."""

    def __init__(self, setting: Setting, budget: Budget, extractor=None) -> None:
        self.s, self.budget, self.extractor = setting, budget, extractor
        dev = setting.device
        g = torch.Generator().manual_seed(seed_of("eval", setting.name))
        if setting.kind == "digits":
            n = budget.n_eval_digits
            self.noise = torch.randn(n, *setting.data_shape, generator=g).to(dev)
            self.cond = (torch.arange(n) % 10).to(dev)
            x_test, _ = load_digits_tensors("test")
            self.ref_feats = extractor.extract(setting.x_train.cpu())
            self.floor = {**self.image_metrics(x_test, None), "n": len(x_test), "n_ref": len(self.ref_feats)}
        else:
            n = budget.n_eval_from_data if setting.teacher_free else budget.n_eval_2d
            self.noise = torch.randn(n, *setting.data_shape, generator=g).to(dev)
            self.cond = None
            gd = torch.Generator().manual_seed(seed_of("eval-data", setting.name))
            if setting.is_mixture:
                self.ref = setting.mixture.sample(n, generator=gd).cpu()
                other = setting.mixture.sample(n, generator=gd).cpu()
                self.data_std = float(torch.cat([self.ref, other]).double().var(0).mean().sqrt())
                t0 = time.time()
                one = torch.ones(n, device=dev, dtype=torch.float64)
                self.exact = (
                    setting.exact_teacher.flow_map(self.noise.double(), one, 0 * one, steps=budget.exact_map_steps)
                    .float()
                    .cpu()
                )
                log(f"{setting.name}: exact flow map of {n} noises in {time.time() - t0:.1f} s")
            else:
                self.ref = setting.source.sample(n, generator=gd)
                other = setting.source.sample(n, generator=gd)
            self.floor = {**self.point_metrics(other, exact=None), "n": n, "n_ref": n}
            if setting.is_mixture:
                self.floor["rmse"] = 0.0
            if setting.teacher_free:  # what the input noise scores: the level a student that learned nothing stays at
                gn = torch.Generator().manual_seed(seed_of("noise-level", setting.name))
                self.noise_level = {
                    **self.point_metrics(torch.randn(n, *setting.data_shape, generator=gn), None),
                    "n": n,
                }

    def point_metrics(self, x: Tensor, exact: Tensor | None) -> dict:
        x = x.float().cpu()
        if not torch.isfinite(x).all():
            return {"w2": float("nan"), "nonfinite": int((~torch.isfinite(x)).any(1).sum())}
        out = {"w2": w2_exact(x, self.ref)}
        data = SETS[self.s.name][0]  # the data config's name: the teacher-free checkerboard is scored as the other
        if data == "checkerboard":
            out["precision"] = checkerboard_precision(x)
        elif data == "eight_gaussians":
            out["precision"] = eight_gaussians_precision(x)
        if exact is not None:
            out["rmse"] = flow_map_rmse(x, exact)
        return out

    def image_metrics(self, x: Tensor, cond: Tensor | None) -> dict:
        from flowmap.features import fid_kid_from_features

        x = x.float().cpu()
        if not torch.isfinite(x).all():
            return {"fd": float("nan"), "kid": float("nan")}
        feats = self.extractor.extract(x)
        out = fid_kid_from_features(self.ref_feats, feats, kid_subsets=self.budget.kid_subsets, kid_subset_size=1000)
        if cond is not None and (cond >= 0).all() and hasattr(self.extractor, "classify"):
            out["class_acc"] = float((self.extractor.classify(x) == cond).double().mean())
        return out

    def metrics(self, x: Tensor) -> dict:
        if self.s.kind == "digits":
            return self.image_metrics(x, self.cond.cpu())
        return self.point_metrics(x, self.exact if self.s.is_mixture else None)

    def teacher_rows(self, teacher) -> tuple[dict, dict]:
        """{solver: {nfe: metrics}} for Euler and Heun (Heun: 2 NFE per step, so odd NFE are absent), and samples."""
        rows, samples = {"euler": {}, "heun": {}}, {}
        for nfe in TEACHER_NFE:
            for method, per_step in (("euler", 1), ("heun", 2)):
                if nfe % per_step:
                    continue
                x = solve(teacher, self.noise, nfe // per_step, method, cond=self.cond)
                rows[method][nfe] = self.metrics(x)
                samples[(method, nfe)] = x.cpu()
        return rows, samples

    def student_rows(self, student, gamma: float = 0.0, nfes: tuple[int, ...] = STUDENT_NFE) -> tuple[dict, dict]:
        rows, samples = {}, {}
        for nfe in nfes:
            g = torch.Generator(self.noise.device).manual_seed(seed_of("renoise", self.s.name, nfe))
            x = sample(student, self.noise, nfe, cond=self.cond, gamma=gamma, generator=g)
            rows[nfe] = self.metrics(x)
            if gamma > 0 and nfe > 1 and "rmse" in rows[nfe]:
                rows[nfe]["rmse"] = None  # a re-noising sampler does not follow the deterministic map: only W2 applies
            samples[nfe] = x.cpu()
        return rows, samples

    @torch.no_grad()
    def trajectory(self, model, steps: int, n: int = 256, gamma: float = 0.0) -> Tensor:
        """(steps + 1, n, 2) states of ``sample`` (students) or an Euler solve (teachers)."""
        x0 = self.noise[:n]
        states = [x0.cpu()]
        cb = lambda i, t, x: states.append(x.cpu())  # noqa: E731
        if isinstance(model, FlowMap):
            sample(model, x0, steps, gamma=gamma, generator=torch.Generator(x0.device).manual_seed(0), callback=cb)
        else:
            solve(model, x0, steps, "euler", callback=cb)
        return torch.stack(states)


# --- methods ---------------------------------------------------------------------------------------


def discover_methods(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(methods that import and build with their recipe, {method: reason} for the others: a method needs its
    ``configs/distill/<method>.yaml``)."""
    names = list(OBJECTIVES) if requested is None else requested
    ok, skipped = [], {}
    for name in names:
        if name not in OBJECTIVES:
            skipped[name] = f"not in the objective registry (known: {sorted(OBJECTIVES)})"
            continue
        try:
            build_objective(recipe("checkerboard", name, BUDGETS["full"])["objective"])
            ok.append(name)
        except Exception as err:  # a method being written elsewhere: note it, go on
            skipped[name] = f"does not build: {type(err).__name__}: {str(err)[:200]}"
    return ok, skipped


# --- cost: step time, memory, throughput -------------------------------------------------------------


class StepRunner:
    """Exactly one ``flowmap.training.TrainLoop`` step (objective, backward, clipping, Adam, EMA
    target) on ``batch()``, callable repeatedly so that several objectives can be timed interleaved."""

    def __init__(
        self, student: nn.Module, objective: nn.Module, teacher, batch: Callable[[], tuple[Tensor, Tensor | None]]
    ) -> None:
        self.loop, self.batch = TrainLoop(student, objective, teacher, lr=1e-4), batch

    def step(self) -> None:
        self.loop.step(*self.batch())


def interleaved_times(
    fns: dict[str, Callable[[], None]], repeats: int, inner: int, device: torch.device, warmup: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``repeats`` rounds, each calling
    every function ``inner`` times in a rotated order, so slow phases of a shared machine hit all of them alike."""
    names = list(fns)
    for n in names:
        for _ in range(warmup):
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            sync(device)
            times[n].append((time.perf_counter() - t0) / inner)
    return times


MEANFLOW_ALL_MOVING = "meanflow (every pair s != t)"


def cost_tables(methods: list[str], budget: Budget, device: torch.device, memory: Memory) -> dict:
    """Per net (MLP on 2-D points, DiT on 8x8 digits): step time of each objective over flow matching,
    peak memory of one step, and sampling throughput (1 NFE vs the raw forward vs the teacher at 64 NFE)."""
    out = {}
    nets = {
        "mlp": ({**budget.cost_mlp, "data_shape": [2]}, budget.cost_batch_mlp, budget.throughput_batch_mlp, 0),
        "dit": (
            {**budget.dit, "data_shape": [1, 8, 8], "num_classes": 10},
            budget.cost_batch_dit,
            budget.throughput_batch_dit,
            10,
        ),
    }
    for net_name, (cfg, batch, tp_batch, classes) in nets.items():
        log(f"cost: {net_name} ({', '.join(['fm', *methods])}), batch {batch}")
        torch.manual_seed(seed_of("cost", net_name))
        teacher = NetVelocity(build_net(dict(cfg)).to(device)).eval().requires_grad_(False)
        shape = tuple(cfg["data_shape"])
        g = torch.Generator().manual_seed(0)
        x_fixed = torch.randn(batch, *shape, generator=g).to(device)
        c_fixed = torch.randint(0, classes, (batch,), generator=g).to(device) if classes else None
        batch_fn = lambda: (x_fixed, c_fixed)  # noqa: E731
        runners, errors = {}, {}
        data = "digits" if net_name == "dit" else "checkerboard"
        # each method with its recipe on this kind of data (the full run's); MeanFlow also with every pair s != t
        # (some recipes keep the paper's share of s = t pairs, which need no JVP): the most JVP work. A method's
        # net options (a guidance input, a time scale) are applied as in its quality runs.
        base = compose(set_files(data))["model"]["student"]["net"]
        recipes = {m: recipe(data, m, BUDGETS["full"]) for m in methods}
        configs = {"fm": None, **{m: r["objective"] for m, r in recipes.items()}}
        extras = {m: {k: v for k, v in r["student"]["net"].items() if base.get(k) != v} for m, r in recipes.items()}
        if "meanflow" in methods:
            configs[MEANFLOW_ALL_MOVING] = {**configs["meanflow"], "equal_share": 0.0}
            extras[MEANFLOW_ALL_MOVING] = extras["meanflow"]
        for name, config in configs.items():
            try:
                torch.manual_seed(seed_of("cost-student", net_name))
                student = FlowMap(build_net({**cfg, **extras.get(name, {})})).to(device)
                init_student_from_teacher(student, teacher)  # a trained-like start, same for every method
                objective = FlowMatching("uniform", 0.0) if name == "fm" else build_objective(dict(config))
                runner = StepRunner(student, objective.to(device), teacher, batch_fn)
                runner.step()  # warm-up: allocations, Adam state, lazy inits
                runner.step()
                runners[name] = runner
            except Exception as err:
                errors[name] = f"{type(err).__name__}: {str(err)[:200]}"
                log(f"cost: {net_name}/{name} failed: {errors[name]}")
        times = interleaved_times(
            {n: r.step for n, r in runners.items()}, budget.cost_repeats, budget.cost_steps, device
        )
        base = median(times["fm"]) if "fm" in times else float("nan")
        rows = {}
        for name, runner in runners.items():
            step_s = median(times[name])
            rows[name] = {
                "step_s": step_s,
                "ratio": step_s / base,
                "samples": len(times[name]),
                "peak_mib": memory.measure(runner.step),
                "config": configs[name],
            }
        for name, err in errors.items():
            rows[name] = {"error": err}
        # sampling throughput: raw forward vs 1-NFE student sampling vs the teacher's 64 Euler steps
        student = FlowMap(copy.deepcopy(teacher.net)).eval()
        noise = torch.randn(tp_batch, *shape, generator=g).to(device)
        cond = torch.randint(0, classes, (tp_batch,), generator=g).to(device) if classes else None
        s1, s0 = torch.ones(tp_batch, device=device), torch.zeros(tp_batch, device=device)

        @torch.no_grad()
        def raw():
            teacher.net(noise, s1, s0, cond)

        fns = {"raw forward": raw, "student 1 NFE": lambda: sample(student, noise, 1, cond=cond)}
        tp = interleaved_times(fns, budget.throughput_repeats, budget.throughput_inner, device, warmup=1)
        t64 = interleaved_times(
            {"teacher 64 NFE": lambda: solve(teacher, noise, 64, "euler", cond=cond)},
            max(1, budget.throughput_repeats // 3),
            1,
            device,
        )
        tp.update(t64)
        throughput = {n: {"samples_per_s": tp_batch / median(v), "call_s": median(v)} for n, v in tp.items()}
        raw_tp = throughput["raw forward"]["samples_per_s"]
        for n in throughput:
            throughput[n]["vs_raw_forward"] = throughput[n]["samples_per_s"] / raw_tp
        throughput["student 1 NFE"]["vs_teacher_64"] = (
            throughput["student 1 NFE"]["samples_per_s"] / throughput["teacher 64 NFE"]["samples_per_s"]
        )
        out[net_name] = {
            "net": cfg,
            "batch": batch,
            "throughput_batch": tp_batch,
            "steps": rows,
            "throughput": throughput,
            "params": sum(p.numel() for p in teacher.net.parameters()),
        }
    return out


# --- streaming: shards against memory ----------------------------------------------------------------


def streaming_table(budget: Budget) -> dict:
    """Samples per second of the digits training set streamed from webdataset shards (``ShardStream``, 1 and 2
    loader workers) against the same samples held in memory (issue 6); shards written to a temporary folder."""
    import tempfile

    from flowmap.data import get_dataset
    from flowmap.data.shards import streaming_throughput, write_source_shards

    log(
        f"streaming: digits shards vs memory, batch {budget.stream_batch}, {budget.stream_batches} batches, "
        "1 and 2 workers"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="flowmap-bench-shards-") as tmp:
            index = write_source_shards(get_dataset("digits"), Path(tmp) / "digits", max_count=200)
            result = streaming_throughput(
                Path(tmp) / "digits", batch_size=budget.stream_batch, num_batches=budget.stream_batches, workers=(1, 2)
            )
            result.update(
                {"available": True, "data": f"digits (8x8, {index.encoding} in tar)", "encoding": index.encoding}
            )
            return result
    except Exception as err:  # noqa: BLE001 - a platform without worker processes: say why
        return {"available": False, "reason": f"{type(err).__name__}: {str(err)[:200]}"}


# --- peer: torchcfm ---------------------------------------------------------------------------------


PEER_TRAINERS = ("ours", "torchcfm", "torchcfm, our schedule")


def peer_table(setting: Setting, budget: Budget, device: torch.device, evaluator: Evaluator) -> dict:
    """Teacher flow matching: ours against torchcfm's ``ConditionalFlowMatcher(sigma=0)`` on the same MLP (same
    init), the same data batches, batch size, steps, peak learning rate, gradient clipping and uniform times.
    torchcfm's convention x_t = t x1 + (1 - t) x0, u_t = x1 - x0 with x0 = data, x1 = noise is ours exactly.

    Three trainers per seed:
      ``ours``: ``flowmap.training.TrainLoop`` with ``DenoisingLoss``, as this benchmark trains its teachers
          (Adam on the fused kernel, half-cosine decay of the rate to ``budget.lr_decay`` of it);
      ``torchcfm``: torchcfm's documented loop (``torch.optim.Adam`` at a constant rate);
      ``torchcfm, our schedule``: that loop with our rate schedule, so ours against it isolates the two
          implementations (loss arithmetic, optimizer kernel) from the recipe.
    One run's final W2 varies by tens of percent with the seed, so ``budget.peer_seeds`` seeds (init, data,
    noise) are trained and the mean W2 is compared, with the paired differences' mean and standard error; within
    a seed every trainer draws the same times and noises at every step (common random numbers). Step times are
    medians over all timed blocks of all seeds, the trainers' order rotating from block to block."""
    try:
        import torchcfm
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    except ImportError as err:
        return {"available": False, "reason": f"torchcfm is not installed ({err}); pip install torchcfm --no-deps"}
    cfm = ConditionalFlowMatcher(sigma=0.0)
    lr, lr_final, steps = setting.lr * 2, setting.lr * 2 * budget.lr_decay, budget.peer_steps
    times: dict[str, list[float]] = {n: [] for n in PEER_TRAINERS}
    per_seed: dict[str, list[dict]] = {n: [] for n in PEER_TRAINERS}
    for seed in range(budget.peer_seeds):
        torch.manual_seed(seed_of("peer-net", seed))
        nets = {"ours": build_net(dict(setting.net_config)).to(device)}
        for name in PEER_TRAINERS[1:]:
            nets[name] = copy.deepcopy(nets["ours"])
        ours = TrainLoop(nets["ours"], FlowMatching("uniform", 0.0), lr=lr, lr_final=lr_final, steps=steps)
        peer_opts = {n: torch.optim.Adam(nets[n].parameters(), lr=lr) for n in PEER_TRAINERS[1:]}
        g = torch.Generator().manual_seed(seed_of("peer-data", seed))
        data = [setting.source.sample(setting.batch, generator=g).to(device) for _ in range(min(steps, 64))]

        # common random numbers: step i of every trainer starts from the same RNG state, so all draw the same
        # times t = rand(B) and noises randn(B, 2) (ours inside DenoisingLoss, torchcfm's passed to it in that order)
        step_seeds = [seed_of("peer-step", seed, i) for i in range(steps)]

        def step_ours(x0: Tensor, i: int) -> float:
            torch.manual_seed(step_seeds[i])
            return float(ours.step(x0)[0])

        def peer_step(name: str, schedule: bool) -> Callable[[Tensor, int], float]:
            net, opt = nets[name], peer_opts[name]

            def step(x0: Tensor, i: int) -> float:
                torch.manual_seed(step_seeds[i])
                t = torch.rand(x0.shape[0], device=x0.device)
                x1 = torch.randn_like(x0)
                t, xt, ut = cfm.sample_location_and_conditional_flow(x0, x1, t=t)
                loss = (net(xt, t, t) - ut).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                if schedule:
                    for group in opt.param_groups:
                        group["lr"] = ours.lr_at(i)
                opt.step()
                return float(loss.detach())

            return step

        fns = {
            "ours": step_ours,
            "torchcfm": peer_step("torchcfm", False),
            "torchcfm, our schedule": peer_step("torchcfm, our schedule", True),
        }
        losses: dict[str, list[float]] = {n: [] for n in PEER_TRAINERS}
        done = block = 0
        while done < steps:
            k = min(budget.peer_block, steps - done)
            order = list(PEER_TRAINERS[block % 3 :] + PEER_TRAINERS[: block % 3])
            if (block // 3) % 2:
                order.reverse()
            for name in order:
                sync(device)
                t0 = time.perf_counter()
                for j in range(k):
                    losses[name].append(fns[name](data[(done + j) % len(data)], done + j))
                sync(device)
                times[name].append((time.perf_counter() - t0) / k)
            done += k
            block += 1
        for name, net in nets.items():
            x = solve(NetVelocity(net.eval()), evaluator.noise, 32, "heun")
            per_seed[name].append(
                {
                    "w2": evaluator.point_metrics(x, None)["w2"],
                    "final_loss": float(sum(losses[name][-20:]) / len(losses[name][-20:])),
                }
            )
    result = {
        "available": True,
        "version": getattr(torchcfm, "__version__", "?"),
        "steps": steps,
        "batch": setting.batch,
        "data": setting.name,
        "net": dict(setting.net_config),
        "seeds": budget.peer_seeds,
        "lr": lr,
        "lr_final": lr_final,
        "trainers": list(PEER_TRAINERS),
    }
    for name in PEER_TRAINERS:
        w2s = [r["w2"] for r in per_seed[name]]
        result[name] = {
            "step_s": median(times[name]),
            "w2": sum(w2s) / len(w2s),
            "w2_per_seed": w2s,
            "final_loss": sum(r["final_loss"] for r in per_seed[name]) / len(per_seed[name]),
        }
    # against torchcfm as documented (the targets) and against torchcfm with our schedule (the implementations alone);
    # the W2 differences are paired by seed (same init, data and noise): their mean and standard error tell a real gap
    # from the seed-to-seed spread of two runs
    for key, other in (("", "torchcfm"), ("same_schedule_", "torchcfm, our schedule")):
        result[f"{key}step_ratio"] = result["ours"]["step_s"] / result[other]["step_s"]
        result[f"{key}w2_ratio"] = result["ours"]["w2"] / result[other]["w2"]
        diffs = [a - b for a, b in zip(result["ours"]["w2_per_seed"], result[other]["w2_per_seed"])]
        result[f"{key}w2_diff"] = sum(diffs) / len(diffs)
        result[f"{key}w2_diff_se"] = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return result


# --- the run ---------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated objectives (default: every registered one; --quick: cd,meanflow)",
    )
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {','.join(DATASETS)}")
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="output folder (RESULTS.md, results.json, plots)")
    p.add_argument(
        "--cache", default=None, help="cache folder for teachers, students and the feature net (default <out>/cache)"
    )
    p.add_argument("--quick", action="store_true", help="tiny budgets and two methods: a smoke run of every table")
    p.add_argument("--fresh", action="store_true", help="ignore cached teachers and students")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="train every student with this many seeds (default 2; --quick: 1): seed 0 is evaluated at every NFE, "
        "the others at 1 NFE (the headline numbers, shown side by side)",
    )
    p.add_argument(
        "--reuse-only",
        action="store_true",
        help="evaluate only the students already in the cache (the others are listed as not run); "
        "teachers are still trained if missing",
    )
    p.add_argument(
        "--keep-others",
        action="store_true",
        help="with --methods: keep the other methods' rows (quality and cost) and the plots of the previous run in "
        "--out, marked with its date in RESULTS.md, instead of dropping them (a teacher that changed keeps nothing)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = 1 on a busy machine, else all cores)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train teachers and students in this many worker processes first (one torch thread each; on a CPU "
        "use the number of free cores); the run then evaluates them from the cache. 1: train in the main process",
    )
    p.add_argument(
        "--inception-weights", default=None, help="FID Inception weights file: use Inception features for digits"
    )
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to skip: cost, peer, streaming, plots; a skipped table keeps the one of the "
        "previous run in --out (its date printed in RESULTS.md)",
    )
    p.add_argument(
        "--realistic",
        action="store_true",
        help="also time realistic-size nets (scripts/benchmark_scale.py) and the webdataset loader at 64 and 256 px "
        "(scripts/benchmark_loader.py) on --device; tables in <out>/REALISTIC.md",
    )
    p.add_argument(
        "--scale", type=float, default=1.0, help="multiply every training step count (teachers, students, peer)"
    )
    p.add_argument("--diffusers", action="store_true", help="run scripts/benchmark_diffusers.py only (DIFFUSERS.md)")
    return p.parse_args(argv)


# heaviest first (measured ms per step on the 2-D MLP), so the pool's last tasks are short ones
PRETRAIN_ORDER = (
    "fmsd_eulerian",
    "ctm",
    "fmsd_progressive",
    "meanflow",
    "sct",
    "fmsd_lagrangian",
    "ayf_emd",
    "shortcut",
    "ayf_lmd",
    "scd",
    "pd",
    "ict",
    "cd",
    "ect",
)


def _pretrain_task(task: tuple) -> tuple[str, str | None, int, str | None, float]:
    """Worker: train (or find cached) the teacher of ``task``'s data set and, when a method is named, its student
    of the task's seed, leaving both in the cache. Returns (data set, method, seed, error or None, seconds)."""
    name, method, seed, budget, device, cache, fresh = task
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        # --fresh retrains the teacher in its own task only; a student's task loads that teacher from the cache
        setting = Setting(name, budget, torch.device(device), Path(cache), fresh and method is None)
        setting.get_teacher()
        if method is not None:
            setting.fresh = fresh
            setting.train_student(method, seed)
        return name, method, seed, None, time.time() - t0
    except Exception as err:  # noqa: BLE001 - reported; the main pass retries and records the failure
        return name, method, seed, f"{type(err).__name__}: {str(err)[:300]}", time.time() - t0


def pretrain(
    datasets: list[str],
    methods: list[str],
    budget: Budget,
    device: torch.device,
    cache: Path,
    fresh: bool,
    jobs: int,
    seeds: int = 1,
) -> set[tuple[str, str, int]]:
    """Train every teacher and every (data set, method, seed) student in ``jobs`` spawned worker processes (one torch
    thread each), into ``cache``; returns the triples trained here. A data set's students are queued (heaviest
    first) as soon as its teacher is done: they start from it."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    rank = {m: i for i, m in enumerate(PRETRAIN_ORDER)}
    done: set[tuple[str, str, int]] = set()
    n = sum(len(set_methods(d, methods)) for d in datasets) * seeds
    log(f"pretrain: {len(datasets)} teachers, then {n} students, in {jobs} worker processes")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        submit = lambda d, m, k: pool.submit(  # noqa: E731
            _pretrain_task, (d, m, k, budget, str(device), str(cache), fresh)
        )
        pending = {submit(d, None, 0) for d in datasets}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                name, method, seed, err, seconds = f.result()
                what = f"{name}/{method}" + (f" seed {seed}" if seed else "") if method else f"{name} teacher"
                log(f"pretrain: {what} {'FAILED ' + err if err else 'done'} ({seconds:.0f} s)")
                if method is None and not err:
                    order = sorted(
                        ((m, k) for m in set_methods(name, methods) for k in range(seeds)),
                        key=lambda mk: (rank.get(mk[0], -1), mk[1]),
                    )
                    pending |= {submit(name, m, k) for m, k in order}
                elif method is not None and not err:
                    done.add((name, method, seed))
    return done


def main(argv: list[str] | None = None) -> dict:
    if "--latent" in (args := sys.argv[1:] if argv is None else list(argv)):  # the latent row, benchmarks/LATENT.md
        from benchmark_latent import main as latent  # its own options (scripts/benchmark_latent.py --help)

        return latent([v for v in args if v != "--latent"])
    a = parse(argv)
    if a.diffusers:  # the diffusers round trip (teacher folder -> students), its own script and table
        from benchmark_diffusers import main as diffusers_main

        return diffusers_main(["--out", a.out, "--threads", str(a.threads or 1)] + (["--quick"] if a.quick else []))
    start = time.time()
    budget_name = "quick" if a.quick else "full"
    budget = scaled(BUDGETS[budget_name], a.scale)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: CUDA is not available on this machine")
    datasets = [d.strip() for d in a.datasets.split(",") if d.strip()]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown or not datasets:
        raise ValueError(f"--datasets: unknown {unknown}; choose from {list(DATASETS)}")
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    parts = {"cost", "peer", "streaming", "plots"}
    if skip - parts:
        raise ValueError(f"--skip: unknown parts {sorted(skip - parts)} ({', '.join(sorted(parts))})")
    if a.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {a.jobs}")
    seeds = a.seeds if a.seeds is not None else (1 if a.quick else 2)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if a.inception_weights and not Path(a.inception_weights).is_file():
        raise ValueError(f"--inception-weights: no such file {a.inception_weights!r}")
    from flowmap.runtime import pick_threads

    threads = pick_threads(a.threads)
    torch.set_num_threads(threads)
    requested = (
        [m.strip() for m in a.methods.split(",") if m.strip()]
        if a.methods
        else (list(QUICK_METHODS) if a.quick else None)
    )
    methods, skipped = discover_methods(requested)
    out = Path(a.out)
    cache = Path(a.cache) if a.cache else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    memory = Memory(device)
    log(
        f"benchmark ({budget_name}): methods {methods}, skipped {sorted(skipped)}, datasets {datasets}, "
        f"{threads} thread(s), device {device}"
    )

    results: dict = {
        "meta": {
            "budget": budget_name,
            "scale": a.scale,
            "code": code_fingerprint(),
            "budget_values": asdict(budget),
            "methods": methods,
            "skipped_methods": skipped,
            "datasets": datasets,
            "device": str(device),
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count(),
            "load_average_start": _loadavg(),
            "memory_method": memory.method,
            "seeds": seeds,
            "sets": {d: [str(p.relative_to(ROOT)) for p in set_files(d)] for d in datasets},
            "teacher_free": {d: TEACHER_FREE[d] for d in datasets if d in TEACHER_FREE},
            "teacher_configs": {
                d: str((CONFIGS / "teacher" / f"{TEACHER_CONFIGS[d]}.yaml").relative_to(ROOT))
                for d in datasets
                if d in TEACHER_CONFIGS
            },
            "method_configs": {
                d: {m: recipe(d, m, budget)["objective"] for m in set_methods(d, methods)} for d in datasets
            },
        },
        "quality": {},
        "cost": {},
        "peer": {},
    }
    samples: dict = {}
    extractor = None
    if any(set_kind(d) == "digits" for d in datasets):
        extractor = _feature_extractor(a.inception_weights, cache, budget)
        results["meta"]["features"] = extractor.describe()

    pretrained: set[tuple[str, str, int]] = set()
    if a.jobs > 1 and not a.reuse_only:
        pretrained = pretrain(datasets, methods, budget, device, cache, a.fresh, a.jobs, seeds)
    results["meta"]["jobs"] = a.jobs
    fresh = a.fresh and a.jobs == 1  # the workers already trained afresh what --fresh asked for

    for name in datasets:
        setting = Setting(name, budget, device, cache, fresh, a.reuse_only)
        teacher = setting.get_teacher()
        ev = Evaluator(setting, budget, extractor)
        q = {
            "kind": set_kind(name),
            "floor": ev.floor,
            "n_eval": len(ev.noise),
            "teacher": {},
            "students": {},
            "failed": {},
            "student_steps": setting.student_steps,
            "seeds": seeds,
        }
        teacher_samples = {}
        if teacher is not None:
            log(f"{name}: evaluating the teacher at {list(TEACHER_NFE)} NFE")
            q["teacher"], teacher_samples = ev.teacher_rows(teacher)
            q.update(
                teacher_seconds=setting.teacher_seconds,
                teacher_losses=setting.teacher_losses,
                teacher_code=setting.teacher_code,
            )
        if setting.teacher_free:
            q.update(teacher_free=True, noise=ev.noise_level)
        if setting.is_mixture:
            q["data_std"] = ev.data_std
        sm = {
            "data": ev.ref if setting.kind != "digits" else _by_class(setting.x_train.cpu(), setting.y_train.cpu()),
            "teacher": teacher_samples,
            "noise": ev.noise.cpu(),
            "students": {},
            "trajectories": {},
        }
        if setting.kind != "digits" and teacher is not None:
            sm["trajectories"]["teacher (Euler 64)"] = ev.trajectory(teacher, 64)
        nfes = FROM_DATA_NFE if setting.teacher_free else STUDENT_NFE
        for method in set_methods(name, methods):
            try:
                log(f"{name}/{method}: training {student_steps(name, budget, method)} steps")
                trained = setting.train_student(method)
                if (name, method, 0) in pretrained:  # trained in this run, by a worker process
                    trained.update(cached=False, worker=True)
                gamma = sampler_gamma(method)
                rows, student_samples = ev.student_rows(trained["student"], gamma, nfes)
            except Exception as err:
                q["failed"][method] = f"{type(err).__name__}: {str(err)[:300]}"
                log(f"{name}/{method}: FAILED {q['failed'][method]}")
                continue
            q["students"][method] = {
                "nfe": rows,
                "config": trained["config"],
                "losses": trained["losses"],
                "seconds": trained["seconds"],
                "steps": trained["steps"],
                "init": trained["init"],
                "config_source": trained.get("config_source", ""),
                "cached": trained["cached"],
                "worker": trained.get("worker", False),
                "sampler_gamma": gamma,
                "code": trained.get("code"),
                "seeds": [
                    other_seed(setting, ev, method, k, gamma, (name, method, k) in pretrained) for k in range(1, seeds)
                ],
            }
            sm["students"][method] = student_samples
            if setting.kind != "digits":
                sm["trajectories"][f"{method} (4 NFE)"] = ev.trajectory(trained["student"], 4, gamma=gamma)
            log(f"{name}/{method}: " + ", ".join(f"{k} NFE {_fmt_row(v)}" for k, v in rows.items()))
        results["quality"][name] = q
        samples[name] = sm
        if name == "checkerboard" and "peer" not in skip:
            log("peer: our flow matching vs torchcfm")
            results["peer"] = peer_table(setting, budget, device, ev)
    if "peer" not in skip and "checkerboard" not in datasets:
        setting = Setting("checkerboard", budget, device, cache, fresh)
        results["peer"] = peer_table(setting, budget, device, Evaluator(setting, budget, None))
    if "peer" in skip:
        results["peer"] = {"available": False, "reason": "skipped (--skip peer)"}
    if "cost" not in skip:
        results["cost"] = cost_tables(methods, budget, device, memory)
    results["streaming"] = (
        {"available": False, "reason": "skipped (--skip streaming)"} if "streaming" in skip else streaming_table(budget)
    )
    results["meta"]["seconds"] = time.time() - start
    results["meta"]["load_average_end"] = _loadavg()
    carry_skipped(results, skip, out / "results.json")
    if a.keep_others:
        keep_others(results, out / "results.json")

    from scripts.benchmark_report import write_report

    log("writing RESULTS.md, results.json and plots")
    write_report(results, samples, out, plots="plots" not in skip and not a.keep_others)
    if a.realistic:
        realistic(out, a.device, threads)
    log(f"done in {time.time() - start:.0f} s: {out / 'RESULTS.md'}, {out / 'results.json'}")
    return results


CARRIED_PARTS = ("cost", "peer", "streaming")  # tables a run may skip and keep from the previous run in --out


def carry_skipped(results: dict, skip: set[str], previous: Path) -> dict[str, str]:
    """Each part of ``CARRIED_PARTS`` in ``skip`` keeps the table of the previous run's ``results.json`` (the one
    this run is about to replace), when that run has it; ``meta.carried`` maps the part to the date of the run that
    measured it, which the report prints. A missing or unreadable file carries nothing (read as JSON: data only)."""
    try:
        old = json.loads(previous.read_text())
        old_meta = old.get("meta") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    carried = {}
    for part in CARRIED_PARTS:
        table = old.get(part)
        if part in skip and isinstance(table, dict) and table.get("available") is not False and table:
            results[part] = table
            carried[part] = (old_meta.get("carried") or {}).get(part) or old_meta.get("written", "an earlier run")
    if carried:
        results["meta"]["carried"] = carried
        log("kept from the previous run in --out: " + ", ".join(f"{k} ({v})" for k, v in carried.items()))
    return carried


def keep_others(results: dict, previous: Path) -> dict[str, list[str]]:
    """Fill in, from the previous run's ``results.json`` (the one this run is about to replace), the rows of the
    methods this run did not train: each data set's students whose teacher evaluates as it did then (a changed
    teacher keeps none), the data sets this run did not evaluate (whole), the cost tables' step rows, and the plots'
    list (the plots are not redrawn). Each kept row is marked ``kept`` with the date of the run that measured it;
    ``meta.kept`` lists them for the report. Returns {part: [rows]}."""
    try:
        old = json.loads(previous.read_text())
        old_meta, old_quality = old.get("meta") or {}, old.get("quality") or {}
        when = old_meta.get("written", "an earlier run")
    except (OSError, ValueError, AttributeError):
        log(f"--keep-others: no readable previous run in {previous}: nothing kept")
        return {}
    mark = lambda row: {**row, "kept": row.get("kept") or when}  # noqa: E731 - the run that measured the row
    ran = set(results["meta"]["methods"])
    kept: dict[str, list[str]] = {}
    for name, old_q in old_quality.items():  # a data set this run did not evaluate: kept whole
        if name not in results["quality"] and isinstance(old_q, dict):
            students = {m: mark(row) for m, row in (old_q.get("students") or {}).items()}
            results["quality"][name] = {**old_q, "students": students}
            kept.setdefault("quality", []).extend(f"{name}/{m}" for m in students)
            for part in ("sets", "teacher_configs", "method_configs", "teacher_free"):  # the set's files, as run then
                if name in (old_meta.get(part) or {}):
                    results["meta"].setdefault(part, {})[name] = old_meta[part][name]
    order = [*old_quality, *results["quality"]]  # the previous run's order of the sets
    results["quality"] = {k: results["quality"][k] for k in dict.fromkeys(order) if k in results["quality"]}
    for name, q in results["quality"].items():
        if name not in results["meta"]["datasets"]:  # kept whole above
            continue
        old_q = old_quality.get(name) or {}
        if not _same_numbers(_fixed(q.get("teacher")), _fixed(old_q.get("teacher"))):
            log(f"--keep-others: {name}: the teacher evaluates differently from {when}'s: no row kept")
            continue
        for method, row in (old_q.get("students") or {}).items():
            if method not in ran and method not in q["students"]:
                q["students"][method] = mark(row)
                kept.setdefault("quality", []).append(f"{name}/{method}")
    for net, table in (results.get("cost") or {}).items():
        if not isinstance(table, dict) or "steps" not in table:
            continue
        for method, row in (((old.get("cost") or {}).get(net) or {}).get("steps") or {}).items():
            if method not in table["steps"]:
                table["steps"][method] = mark(row)
                kept.setdefault("cost", []).append(f"{net}/{method}")
    results["plots"] = list(old.get("plots") or [])
    dates = {r.get("kept") for q in results["quality"].values() for r in q["students"].values()}
    dates |= {r.get("kept") for t in (results.get("cost") or {}).values() for r in (t.get("steps") or {}).values()}
    results["meta"]["kept"] = {"from": ", ".join(sorted(d for d in dates if d)) or when, **kept}
    log(f"--keep-others: kept from {when}: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in kept.items()))
    return kept


def _fixed(rows):
    """A teacher's evaluation rows as JSON writes them (NFE keys as strings), without the KID entries, whose random
    subsets are not seeded: what a retrained teacher of the same code and seed reproduces."""
    if isinstance(rows, dict):
        return {str(k): _fixed(v) for k, v in rows.items() if not str(k).startswith("kid")}
    return rows


def _same_numbers(a, b, rtol: float = 1e-4) -> bool:
    """Whether two JSON trees are equal, numbers to ``rtol`` (a retrained teacher of the same code and seed)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_numbers(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_numbers(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12) or (a != a and b != b)
    return a == b


def other_seed(setting: Setting, ev: Evaluator, method: str, seed: int, gamma: float, worker: bool) -> dict:
    """The student of ``method`` with ``seed`` (> 0) trained (or loaded) and evaluated at ``SEED_NFE``:
    {"seed", "nfe", "seconds", "cached", "worker", "code"}, {"seed", "error"} when it failed, or {"seed", "missing"}
    when --reuse-only found it not in the cache."""
    try:
        trained = setting.train_student(method, seed)
        rows, _ = ev.student_rows(trained["student"], gamma, SEED_NFE)
    except LookupError as err:  # --reuse-only and not in the cache: not run, which is no failure of the method
        log(f"{setting.name}/{method} seed {seed}: not run ({err})")
        return {"seed": seed, "missing": str(err)[:300]}
    except Exception as err:
        log(f"{setting.name}/{method} seed {seed}: FAILED {type(err).__name__}: {err}")
        return {"seed": seed, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    log(f"{setting.name}/{method} seed {seed}: " + ", ".join(f"{k} NFE {_fmt_row(v)}" for k, v in rows.items()))
    return {
        "seed": seed,
        "nfe": rows,
        "seconds": trained["seconds"],
        "cached": trained["cached"] and not worker,
        "worker": worker,
        "code": trained.get("code"),
    }


def realistic(out: Path, device: str, threads: int) -> None:
    """Realistic sizes, one run: each method's step over a flow-matching step, peak memory, forward-mode rule vs
    torch.func, compiled vs eager, 1-NFE sampling vs a raw forward (``benchmark_scale``), and the webdataset
    loader's samples/s at 0-4 workers beside a DiT-S step (``benchmark_loader``); written to REALISTIC.md."""
    import benchmark_loader
    import benchmark_scale

    where = f"--device {device}, {threads} thread(s)"
    log(f"realistic sizes: nets and loader ({where})")
    scale = benchmark_scale.main(["--device", device, "--threads", str(threads)])
    loader = benchmark_loader.main(["--threads", str(threads)])
    text = [
        "# Realistic sizes",
        "",
        f"Measured by `scripts/benchmark.py --realistic` ({scale['where']}); absolute times are this machine's.",
        "",
        benchmark_scale.table(scale),
        "",
        benchmark_scale.paper_table(scale["paper"], 8, 32) if scale.get("paper") else "",
        "",
        "## Data throughput (samples/s)",
        "",
        benchmark_loader.table(loader),
        "",
    ]
    (out / "REALISTIC.md").write_text("\n".join(text))


def _feature_extractor(inception_weights: str | None, cache: Path, budget: Budget):
    from flowmap.features import build_feature_extractor, digit_classifier

    if inception_weights:
        return build_feature_extractor(inception_weights)
    path = cache / f"digit_features_{budget.feature_steps}.safetensors"
    existed = path.is_file()
    log(f"digits: {'loading' if existed else 'training'} the feature classifier ({budget.feature_steps} steps)")
    net = digit_classifier(path, steps=budget.feature_steps)
    from flowmap.features import load_feature_net

    net = load_feature_net(path)  # carries its test accuracy
    return build_feature_extractor(
        None, net, source=f"{budget.feature_steps} steps, {'cached' if existed else 'trained in this run'}"
    )


def _by_class(x: Tensor, y: Tensor, per_class: int = 4) -> Tensor:
    """(per_class * 10, ...) images ordered like the evaluation labels (arange(n) % 10): row r holds the r-th of
    each class."""
    return torch.stack([x[(y == c).nonzero()[r, 0]] for r in range(per_class) for c in range(10)])


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _fmt_row(m: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float))


if __name__ == "__main__":
    main_guard(main)
