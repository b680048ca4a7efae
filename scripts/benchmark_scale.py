#!/usr/bin/env python
"""Training and sampling cost at realistic network sizes, as ratios to a flow-matching step on the same net.

    python scripts/benchmark_scale.py                                  # every net, batch 8, 2 timed steps
    python scripts/benchmark_scale.py --nets dit_s2 --steps 2 --no-compile   # a few minutes on one CPU thread
    python scripts/benchmark_scale.py --device cuda --batch 32         # the same tables on a GPU

Nets (``SIZES``): ``unet`` a DDPM++-size U-Net for 3x32x32 (128 channels, mult 2-2-2, 4 blocks per level,
attention at 16x16: 58M parameters); ``dit_s2`` / ``dit_b2`` DiT-S/2 and DiT-B/2 on 4x32x32 latents (256 tokens;
33M / 130M). For each net, from one seed, with a teacher of the same architecture:

- the training step (``scripts/benchmark.StepRunner``: objective, backward, clipping, Adam, EMA target) of fm,
  meanflow (every pair s != t; forward-mode rule and ``torch.func``), scd, ctm and cd, each with its method config
  (``configs/distill/<method>.yaml`` for a 1000-step run; unconditional, no data override), timed interleaved (median of
  ``--steps`` rounds after one warm-up step) as a ratio to the fm step; its peak memory (``scripts/benchmark.Memory``:
  CUDA allocator peak, CPU resident-set growth);
- with ``--compile``: the fm and meanflow steps with the student compiled (``flowmap.compiled``; the JVP pass
  eager), as a speed-up over eager;
- sampling: 1-NFE ``flowmap.sampling.sample`` against a raw forward of the same net (samples/s).

Absolute times are this machine's. Prints markdown tables and returns the numbers as a dict.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch

from flowmap.runtime import THREADS_HELP, set_cpu_threads

SIZES = {
    "unet": {
        "name": "unet",
        "data_shape": [3, 32, 32],
        "channels": 128,
        "channel_mult": [2, 2, 2],
        "num_res_blocks": 4,
        "attn_resolutions": [16],
        "heads": 4,
        "emb_dim": 512,
    },
    "dit_s2": {"name": "dit", "data_shape": [4, 32, 32], "patch": 2, "dim": 384, "depth": 12, "heads": 6},
    "dit_b2": {"name": "dit", "data_shape": [4, 32, 32], "patch": 2, "dim": 768, "depth": 12, "heads": 12},
    "dit_tiny": {"name": "dit", "data_shape": [4, 8, 8], "patch": 2, "dim": 32, "depth": 2, "heads": 2},  # for tests
}
REALISTIC = ("unet", "dit_s2", "dit_b2")
METHODS = ("meanflow", "scd", "ctm", "cd")
MEANFLOW_FUNC = "meanflow (torch.func)"


def parse(argv: list[str] | None) -> argparse.Namespace:
    from flowmap.guard import ScriptParser

    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", default=",".join(REALISTIC), help=f"comma-separated, from {list(SIZES)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated objectives besides fm")
    p.add_argument(
        "--batch",
        type=int,
        default=8,
        help="per-step batch; 8 is the smallest at which the methods' row shares apply (CTM: half the rows end at "
        "the data, a quarter train the DSM term)",
    )
    p.add_argument("--steps", type=int, default=2, help="timed rounds per step kind (after one warm-up)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compiled vs eager rows")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="peak memory per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--world", type=int, default=8, help="GPUs of the on-paper memory table")
    p.add_argument("--paper_batch", type=int, default=32, help="per-GPU batch of the on-paper memory table")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    a = p.parse_args(argv)
    a.nets = [n for n in a.nets.split(",") if n]
    a.methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(a.nets) - set(SIZES))
    if unknown or not a.nets:
        raise ValueError(f"--nets: unknown {unknown}; choose from {list(SIZES)}")
    if a.batch < 1 or a.steps < 1:
        raise ValueError(f"--batch and --steps must be >= 1, got {a.batch} and {a.steps}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return a


def _runner(name: str, config: dict | None, cfg: dict, teacher, batch_fn, device, compiled: bool = False):
    import benchmark as bench

    from flowmap.compiled import compile_net
    from flowmap.models import init_student_from_teacher
    from flowmap.nets import build_net
    from flowmap.objectives import build_objective
    from flowmap.student import FlowMap

    torch.manual_seed(0)
    student = FlowMap(build_net(dict(cfg))).to(device)
    init_student_from_teacher(student, teacher)
    if compiled:
        compile_net(student.net)
    objective = bench.FlowMatching("uniform", 0.0) if config is None else build_objective(dict(config))
    return bench.StepRunner(student, objective.to(device), teacher, batch_fn)


def _state_bytes(loop) -> int:
    """Bytes of a training loop's persistent state: the student's weights and gradients, the optimizer's state,
    an EMA target network (not the activations, not the frozen teacher)."""
    tensors = [p for p in loop.student.parameters()] + [p.grad for p in loop.student.parameters() if p.grad is not None]
    tensors += [v for st in loop.opt.state.values() for v in st.values() if torch.is_tensor(v)]
    tensors += list(loop.target.parameters()) if loop.target is not None else []
    return sum(t.numel() * t.element_size() for t in tensors)


def run_net(net_name: str, a: argparse.Namespace, device: torch.device) -> dict:
    import benchmark as bench

    from flowmap.nets import build_net
    from flowmap.sampling import sample
    from flowmap.student import FlowMap
    from flowmap.velocity import NetVelocity

    cfg = SIZES[net_name]
    torch.manual_seed(0)
    teacher = NetVelocity(build_net(dict(cfg)).to(device)).eval().requires_grad_(False)
    params = sum(p.numel() for p in teacher.net.parameters())
    shape = tuple(cfg["data_shape"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, *shape, generator=g).to(device)

    def batch_fn():
        return x, None

    configs: dict[str, dict | None] = {"fm": None}
    for m in a.methods:
        configs[m] = bench.compose([bench.CONFIGS / "distill" / f"{m}.yaml"], max_steps=1000)["model"]["objective"]
        if m == "meanflow":
            configs[m] = {**configs[m], "equal_share": 0.0}  # every pair s != t: a JVP for the whole batch
            configs[MEANFLOW_FUNC] = {**configs[m], "jvp_backend": "func"}
    kinds = {n: (c, False) for n, c in configs.items()}
    if a.compile:
        kinds.update({f"{n}, compiled": (configs[n], True) for n in ("fm", "meanflow") if n in configs})
    memory = bench.Memory(device)
    runners, rows, state_bytes = {}, {}, {}
    for name, (config, compiled) in kinds.items():
        bench.log(f"{net_name}: {name}")
        try:
            runner = _runner(name, config, cfg, teacher, batch_fn, device, compiled)
            peak = memory.measure(runner.step) if a.memory else (runner.step(), None)[1]  # also the warm-up
            runners[name] = runner
            rows[name] = {"peak_mib": peak}
            state_bytes[name] = _state_bytes(runner.loop) / params
        except Exception as err:  # noqa: BLE001 - a method that cannot run at this size is reported, not fatal
            rows[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    times = bench.interleaved_times({n: r.step for n, r in runners.items()}, a.steps, 1, device)
    base = bench.median(times["fm"])
    for name in runners:
        step_s = bench.median(times[name])
        rows[name].update(step_s=step_s, ratio=step_s / base)
        eager = name.removesuffix(", compiled")
        if eager != name and eager in runners:
            rows[name]["speedup_vs_eager"] = bench.median(times[eager]) / step_s
    # sampling: 1-NFE student sampling vs a raw forward of the same net
    student = FlowMap(copy.deepcopy(teacher.net)).eval()
    noise = torch.randn(a.batch, *shape, generator=g).to(device)
    s1, s0 = torch.ones(a.batch, device=device), torch.zeros(a.batch, device=device)

    @torch.no_grad()
    def raw() -> None:
        teacher.net(noise, s1, s0)

    fns = {"raw forward": raw, "student 1 NFE": lambda: sample(student, noise, 1)}
    tp = bench.interleaved_times(fns, max(a.steps, 2), 1, device, warmup=1)
    throughput = {n: a.batch / bench.median(v) for n, v in tp.items()}
    return {
        "net": cfg,
        "params": params,
        "batch": a.batch,
        "steps": rows,
        "samples_per_s": throughput,
        "state_bytes_per_param": state_bytes,
        "sampling_vs_raw": throughput["student 1 NFE"] / throughput["raw forward"],
        "memory": memory.method,
    }


def table(result: dict) -> str:
    lines = []
    for net_name, r in result["nets"].items():
        lines += [
            f"\n{net_name}: {r['params'] / 1e6:.1f}M parameters, batch {r['batch']} ({result['where']})\n",
            "| step | s/step (this CPU) | x fm step | peak MiB | compiled speed-up |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, row in r["steps"].items():
            if "error" in row:
                lines.append(f"| {name} | failed: {row['error']} | | | |")
                continue
            peak = "n/a" if row.get("peak_mib") is None else f"{row['peak_mib']:.0f}"
            speed = f"{row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else ""
            lines.append(f"| {name} | {row['step_s']:.2f} | {row['ratio']:.2f}x | {peak} | {speed} |")
        tp = r["samples_per_s"]
        lines.append(
            f"\nsampling: raw forward {tp['raw forward']:.2f} samples/s, student 1 NFE "
            f"{tp['student 1 NFE']:.2f} samples/s ({r['sampling_vs_raw']:.2f}x)"
        )
    return "\n".join(lines)


# --- memory per GPU on paper, from the measured costs -----------------------------------------------------

PAPER_NETS = {  # student = teacher architecture; DiT: tokens x width x depth; UNet: base channels, mults, blocks, side
    "DiT-XL/2, 256x256 (4x32x32 latents)": {"params": 675e6, "tokens": 256, "dim": 1152, "depth": 28},
    "SD-size UNet (SD 1.5, 4x64x64 latents)": {
        "params": 860e6,
        "channels": 320,
        "mult": [1, 2, 4, 4],
        "blocks": 2,
        "side": 64,
    },
}


def feature_volume(channels: int, mult: list[int], blocks: int, side: int) -> float:
    """sum over levels l of c_l H_l W_l (2 n + 1): the feature map a U-Net's blocks store per sample, up to a constant
    (n blocks down, n + 1 up per level)."""
    return float(sum(channels * m * (side // 2**lv) ** 2 * (2 * blocks + 1) for lv, m in enumerate(mult)))


def activation_units(net: dict) -> tuple[float, float, int]:
    """(size measure X, stored-input bytes per sample under activation checkpointing, FSDP units) of a net:
    DiT: X = T D L, inputs 4 T D L, L units; UNet: X = feature_volume, inputs 4 X, levels (2n + 1) units."""
    if "tokens" in net:
        x = float(net["tokens"] * net["dim"] * net["depth"])
        return x, 4.0 * x, int(net["depth"])
    x = feature_volume(net["channels"], net["mult"], net["blocks"], net["side"])
    return x, 4.0 * x, len(net["mult"]) * (2 * net["blocks"] + 1)


def measured_costs(result: dict) -> dict:
    """Bytes of stored activations per sample per unit of the size measure (``activation_units``), from the fm step's
    peak memory: a = peak / (B X) (the peak is measured on a second step, whose gradients and Adam state already
    exist: what grows is the activations); and the MeanFlow step's peak over fm's."""
    costs = {}
    for name, r in result["nets"].items():
        rows, net = r["steps"], dict(SIZES[name])
        fm_peak = rows.get("fm", {}).get("peak_mib")
        if fm_peak is None:
            continue
        if net["name"] == "dit":
            side = net["data_shape"][1] // net["patch"]
            size = {"tokens": side * side, "dim": net["dim"], "depth": net["depth"]}
        else:
            size = {
                "channels": net["channels"],
                "mult": net["channel_mult"],
                "blocks": net["num_res_blocks"],
                "side": net["data_shape"][1],
            }
        x, _, _ = activation_units(size)
        act = fm_peak * 2**20
        mf = rows.get("meanflow", {}).get("peak_mib")
        costs[net["name"]] = {
            "bytes_per_unit": act / (r["batch"] * x),
            "meanflow_over_fm": (mf / fm_peak) if mf else None,
            "from": name,
        }
    return costs


def paper_memory(
    costs: dict,
    world: int = 8,
    batch: int = 32,
    state_bytes: float = 16.0,
    ema_bytes: float = 4.0,
    teacher_bytes: float = 2.0,
) -> list[dict]:
    """GiB per GPU for each ``PAPER_NETS`` entry under DDP, FSDP and FSDP + activation checkpointing:

        DDP          (s + e) P       + t P + B A
        FSDP         (s + e) P / N   + t P + 2 * 4 P / U + B A
        FSDP + AC    (s + e) P / N   + t P + 2 * 4 P / U + B (I + A / U)

    P parameters, s = 16 B (fp32 weights, gradients, Adam's two moments), e = 4 B (the evaluation EMA), t = 2 B
    (the frozen teacher in bf16, whole on each rank), N GPUs, U FSDP units (two gathered at a time), B per-GPU batch,
    A = a X activation bytes per sample (a measured, X the net's size measure), I the units' stored inputs."""
    rows = []
    for name, net in PAPER_NETS.items():
        kind = "dit" if "tokens" in net else "unet"
        if kind not in costs:
            continue
        x, inputs, units = activation_units(net)
        act = costs[kind]["bytes_per_unit"] * x
        p = net["params"]
        fixed = teacher_bytes * p
        gib = 2.0**30
        rows.append(
            {
                "net": name,
                "params": p,
                "act_gib_per_sample": act / gib,
                "ddp": ((state_bytes + ema_bytes) * p + fixed + batch * act) / gib,
                "fsdp": ((state_bytes + ema_bytes) * p / world + fixed + 8 * p / units + batch * act) / gib,
                "fsdp_ac": (
                    (state_bytes + ema_bytes) * p / world + fixed + 8 * p / units + batch * (inputs + act / units)
                )
                / gib,
            }
        )
    return rows


def paper_table(rows: list[dict], world: int, batch: int) -> str:
    lines = [
        f"\nmemory per GPU on paper (GiB; {world} GPUs, per-GPU batch {batch}, fp32 activations, flow-matching step)\n",
        "| net | params | activations / sample | DDP | FSDP | FSDP + act. ckpt |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['params'] / 1e6:.0f}M | {r['act_gib_per_sample']:.2f} | {r['ddp']:.0f} | "
            f"{r['fsdp']:.0f} | {r['fsdp_ac']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    threads = set_cpu_threads(a.threads)
    device = torch.device(a.device)
    where = f"this CPU, {threads} thread(s)" if device.type == "cpu" else f"this GPU ({a.device})"
    result = {"where": where, "nets": {n: run_net(n, a, device) for n in a.nets}}
    print(table(result))
    result["costs"] = measured_costs(result)
    result["paper"] = paper_memory(result["costs"], a.world, a.paper_batch)
    if result["paper"]:
        print(paper_table(result["paper"], a.world, a.paper_batch))
    return result


if __name__ == "__main__":
    from flowmap.guard import main_guard

    main_guard(main)
