#!/usr/bin/env python
"""The latent row of the benchmark: digits through a VAE trained here, a latent teacher, a distilled student.

    python scripts/benchmark_latent.py --threads 1                  # writes benchmarks/LATENT.md (+ latent.json)
    python scripts/benchmark.py --latent --threads 1                # the same, from the main benchmark

1. the digits (8x8) upsampled bilinearly to 16x16, one channel, in [-1, 1];
2. a small ``AutoencoderKL`` (16x16x1 <-> 4x8x8) trained on them by this script, its ``scaling_factor`` set to
   1 / std of the train latents (Rombach et al. 2022, App. G), saved with a diffusers pipeline folder;
3. the latents encoded once into shards (``flowmap.latent.encode_items``, the pass of ``scripts/make_shards.py
   --encode``): encode throughput in samples/s;
4. a class-conditional ``UNet2DModel`` latent teacher trained by flow matching on the shards' latents (label
   dropout 0.1 onto its null class), saved into the folder with a ``FlowMatchEulerDiscreteScheduler`` and loaded
   back as a teacher (``teachers.CheckpointTeacher``: "latent (4, 8, 8) via AutoencoderKL");
5. the student: the teacher's own network with the injected interval embedding (``flowmap.models.
   student_from_teacher``), distilled by consistency distillation from the teacher's weights;
6. FD on the project's digit features (``flowmap.features``) of decoded samples pooled back to 8x8, against the
   digits' train split: teacher (Euler, 16 steps) vs student (1 and 2 steps), and the codec's own floor (test
   images through encode + decode);
7. peak memory per part (``benchmark.Memory``: CPU resident-set growth on Linux, CUDA allocator peak on GPUs): the
   VAE encode and decode of a batch, the frozen teacher's guided velocity (float32 and bfloat16), a text encoder
   (a small random CLIP, the size of a CLIP-S: the digits row is class-conditional and has none), and one student
   training step with and without activation checkpointing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flowmap.data.digits import load_digits_tensors  # noqa: E402
from flowmap.data.shards import read_all, write_shards  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.latent import LatentCodec, decode_in_chunks, encode_items  # noqa: E402
from flowmap.runtime import set_cpu_threads  # noqa: E402

BUDGETS = {
    "full": {"vae_steps": 600, "teacher_steps": 1500, "student_steps": 300, "batch": 64, "n_eval": 1000},
    "quick": {"vae_steps": 20, "teacher_steps": 20, "student_steps": 3, "batch": 16, "n_eval": 64},
}
TEACHER_STEPS = 16  # Euler steps of the teacher's reference samples
STUDENT_NFE = (1, 2)


def log(msg: str) -> None:
    print(f"[latent {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="directory of LATENT.md and latent.json")
    p.add_argument("--work", default=None, help="working directory (pipeline folder, shards; default a temporary one)")
    p.add_argument("--budget", default="full", choices=sorted(BUDGETS))
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def tiny_vae():
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )


def latent_unet():
    import diffusers

    torch.manual_seed(1)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=11,  # digits 0..9 and the null class 10 (classifier-free guidance)
    )


def train_vae(vae, x: torch.Tensor, steps: int, batch: int, device: torch.device) -> list[float]:
    """Reconstruction (MSE) + 1e-4 KL of the diagonal Gaussian posterior (Kingma & Welling 2014, Eq. 10)."""
    vae.to(device).train()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (batch,), generator=g)].to(device)
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, xb) + 1e-4 * post.kl().mean() / xb[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_teacher(unet, z: torch.Tensor, y: torch.Tensor, steps: int, batch: int, device: torch.device) -> list[float]:
    """Flow matching on the linear path (diffusers' flow-matching convention: timestep = 1000 t, the net predicts
    eps - x0), logit-normal times (Esser et al. 2024, Sec. 3.1), labels dropped to the null class with p = 0.1."""
    unet.to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(z), (batch,), generator=g)
        x0, c = z[idx].to(device), y[idx].to(device)
        c = torch.where(torch.rand(batch, generator=g).to(device) < 0.1, torch.full_like(c, 10), c)
        t = torch.sigmoid(torch.randn(batch, generator=g)).to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        x_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(unet(x_t, t * 1000, class_labels=c).sample, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def save_folder(folder: Path, vae, unet) -> None:
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    vae.eval().save_pretrained(folder / "vae", safe_serialization=True)
    unet.eval().save_pretrained(folder / "unet", safe_serialization=True)
    diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "DiffusionPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))


def small_clip():
    """A random CLIP text encoder of CLIP-S-like size (512 wide, 6 layers, 77 tokens) for the memory line."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(4)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=8,
        max_position_embeddings=77,
    )
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def params_mib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def main(argv: list[str] | None = None) -> dict:
    from benchmark import Memory

    a = parse(argv)
    set_cpu_threads(a.threads)
    budget = BUDGETS[a.budget]
    device = torch.device(a.device)
    out = Path(a.out)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="flowmap_latent_"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "pipe"
    B = budget["batch"]
    t_start = time.time()
    result: dict = {"budget": a.budget, **budget, "threads": torch.get_num_threads(), "device": str(device)}

    x_train, y_train = load_digits_tensors("train", image_size=16)
    x_test, _ = load_digits_tensors("test", image_size=16)

    # 1-2. the VAE
    log(f"training the AutoencoderKL ({budget['vae_steps']} steps, batch {B})")
    t0 = time.time()
    vae = tiny_vae()
    vae_losses = train_vae(vae, x_train, budget["vae_steps"], B, device)
    vae.eval()
    with torch.no_grad():
        mean = torch.cat(
            [vae.encode(x_train[i : i + 256].to(device)).latent_dist.mean for i in range(0, len(x_train), 256)]
        )
    scaling = float(1.0 / mean.float().std())
    vae.register_to_config(scaling_factor=scaling)
    result["vae"] = {
        "seconds": time.time() - t0,
        "final_loss": sum(vae_losses[-20:]) / len(vae_losses[-20:]),
        "scaling_factor": scaling,
        "params": sum(p.numel() for p in vae.parameters()),
    }
    unet = latent_unet()
    save_folder(folder, vae, unet)  # the teacher's unet is replaced after training

    # 3. encode once
    codec = LatentCodec.from_folder(folder).to(device)
    items = ((x, int(c)) for x, c in zip(x_train, y_train))
    t0 = time.time()
    index = write_shards(
        encode_items(codec, items, batch_size=B, device=device),
        work / "latents",
        shape=(4, 8, 8),
        num_classes=10,
        max_count=512,
        overwrite=True,
        source={"encoded_by": str(folder / "vae")},
    )
    seconds = time.time() - t0
    result["encode"] = {"samples": index.count, "seconds": seconds, "samples_per_s": index.count / seconds}
    log(f"encoded {index.count} images in {seconds:.1f} s ({index.count / seconds:.0f}/s)")
    z, y = read_all(work / "latents")

    # 4. the teacher
    log(f"training the latent teacher ({budget['teacher_steps']} steps)")
    t0 = time.time()
    t_losses = train_teacher(unet, z, y, budget["teacher_steps"], B, device)
    result["teacher"] = {
        "seconds": time.time() - t0,
        "final_loss": sum(t_losses[-50:]) / len(t_losses[-50:]),
        "params": sum(p.numel() for p in unet.parameters()),
    }
    save_folder(folder, vae, unet)
    from teachers import CheckpointTeacher, describe_teacher

    teacher = CheckpointTeacher(str(folder), null_class=True).to(device)
    result["teacher"]["description"] = describe_teacher(teacher.description)
    log(result["teacher"]["description"])

    # 5. the student, from the teacher's weights
    from flowmap.models import student_from_teacher
    from flowmap.objectives import build_objective, sampler_defaults
    from flowmap.training import fit

    config = {"name": "cd", "steps": 18, "grid": "edm", "solver": "heun", "metric": "pseudo_huber", "target_ema": 0.95}
    objective = build_objective(dict(config))
    torch.manual_seed(5)
    student = student_from_teacher(teacher).to(device)
    g = torch.Generator().manual_seed(6)

    def batches(step: int):
        idx = torch.randint(0, len(z), (B,), generator=g)
        return z[idx].to(device), y[idx].to(device)

    log(f"distilling the student (cd, {budget['student_steps']} steps)")
    t0 = time.time()
    s_losses = fit(student, objective, batches, budget["student_steps"], teacher=teacher, lr=2e-4, lr_final=2e-5)
    result["student"] = {
        "method": config,
        "seconds": time.time() - t0,
        "final_loss": sum(s_losses[-20:]) / len(s_losses[-20:]),
        "finite": all(math.isfinite(v) for v in s_losses),
    }
    gamma = float(sampler_defaults(config["name"]).get("gamma", 0.0))

    # 6. FD on decoded samples
    from flowmap.features import build_feature_extractor, digit_classifier, fid_kid_from_features, load_feature_net
    from flowmap.sampling import sample
    from flowmap.solvers import solve

    cache = work / "digit_features_1000.safetensors"
    digit_classifier(cache, steps=1000)
    extractor = build_feature_extractor(None, load_feature_net(cache), source="1000 steps")
    x8_train, _ = load_digits_tensors("train")
    ref = extractor.extract(x8_train)
    n = budget["n_eval"]
    noise = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(7)).to(device)
    labels = (torch.arange(n) % 10).to(device)

    def fd(latents: torch.Tensor, classes: torch.Tensor | None = labels) -> dict:
        images = decode_in_chunks(codec, latents.to(device), 256).cpu()
        small = F.avg_pool2d(images, 2)  # back to the classifier's 8x8
        m = fid_kid_from_features(ref, extractor.extract(small), kid_subsets=20, kid_subset_size=min(500, n))
        acc = None if classes is None else float((extractor.classify(small) == classes.cpu()).double().mean())
        return {"fd": m["fd"], "class_acc": acc}

    with torch.no_grad():
        floor = fd(torch.cat([codec.encode(x_test[i : i + 256].to(device)) for i in range(0, len(x_test), 256)]), None)
        result["codec_floor"] = floor
        teacher_x = solve(teacher, noise, TEACHER_STEPS, "euler", cond=labels)
        result["teacher"]["fd"] = fd(teacher_x)
        result["student"]["fd"] = {}
        for nfe in STUDENT_NFE:
            gen = torch.Generator(device).manual_seed(8)
            result["student"]["fd"][nfe] = fd(
                sample(student.eval(), noise, nfe, cond=labels, gamma=gamma, generator=gen)
            )
    log(f"FD teacher {result['teacher']['fd']['fd']:.2f}, student 1 NFE {result['student']['fd'][1]['fd']:.2f}")

    # 7. memory per part
    memory = Memory(device)
    xb = x_train[:B].to(device)
    zb, yb = z[:B].to(device), y[:B].to(device)
    tb = torch.full((B,), 0.5, device=device)
    mem: dict = {"method": memory.method, "batch": B}
    with torch.no_grad():
        mem["vae_encode"] = memory.measure(lambda: codec.encode(xb))
        mem["vae_decode"] = memory.measure(lambda: codec.decode(zb))
        mem["teacher_cfg_fp32"] = memory.measure(lambda: teacher.velocity(zb, tb, yb, guidance=2.0))
        weights = {"vae": params_mib(vae), "teacher_fp32": params_mib(unet)}
        teacher.to(torch.bfloat16)
        weights["teacher_bf16"] = params_mib(teacher.teacher.net.model)
        mem["teacher_cfg_bf16"] = memory.measure(lambda: teacher.velocity(zb, tb, yb, guidance=2.0))
        teacher.to(torch.float32)
        clip = small_clip().to(device)
        ids = torch.randint(0, 49408, (B, 77), generator=torch.Generator().manual_seed(9)).to(device)
        mem["text_encoder_fp32"] = memory.measure(lambda: clip(ids))
        weights["text_encoder_fp32"] = params_mib(clip)
        clip.to(torch.bfloat16)
        mem["text_encoder_bf16"] = memory.measure(lambda: clip(ids))
        weights["text_encoder_bf16"] = params_mib(clip)
    mem["weights_mib"] = weights
    from flowmap.student import activation_checkpointing
    from flowmap.training import TrainLoop

    for ac in (False, True):
        work_student = student_from_teacher(teacher).to(device)
        if ac:  # the student option (the model's own switch, with the injected embedding seen by the recomputation)
            activation_checkpointing(work_student)
        loop = TrainLoop(work_student, build_objective(dict(config)), teacher, lr=1e-4, steps=4)
        mem["student_step" + ("_checkpointed" if ac else "")] = memory.measure(lambda: loop.step(zb, yb))
    result["memory_mib"] = mem
    result["seconds_total"] = time.time() - t_start
    result["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "loadavg": os.getloadavg()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "latent.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "LATENT.md").write_text(report(result))
    log(f"wrote {out / 'LATENT.md'} in {result['seconds_total']:.0f} s")
    return result


def _mib(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def report(r: dict) -> str:
    mem, w = r["memory_mib"], r["memory_mib"]["weights_mib"]
    fd_t, fd_s = r["teacher"]["fd"], r["student"]["fd"]
    lines = [
        "# Latent row: digits through a VAE trained here",
        "",
        "Written by `python scripts/benchmark_latent.py` (or `scripts/benchmark.py --latent`); "
        f"budget `{r['budget']}`, device {r['device']}, {r['threads']} thread(s), {r['seconds_total']:.0f} s in all "
        f"(load average at the end {', '.join(f'{v:.1f}' for v in r['machine']['loadavg'])}: times are this "
        "machine's under that load).",
        "",
        "Digits 8x8 -> bilinear 16x16 (1 channel) -> an `AutoencoderKL` trained by the script "
        f"({r['vae']['params']:,} parameters, {r['vae_steps']} steps, latent (4, 8, 8), scaling_factor "
        f"{r['vae']['scaling_factor']:.4f} = 1 / std of the train latents) -> latents encoded once into shards -> a "
        f"class-conditional `UNet2DModel` flow-matching teacher ({r['teacher']['params']:,} parameters, "
        f"{r['teacher_steps']} steps) in a pipeline folder -> a student made from the teacher's own network and "
        f"distilled with consistency distillation ({r['student_steps']} steps). The teacher loads as: "
        f"`{r['teacher']['description']}`.",
        "",
        f"FD: the project's digit features (`flowmap/features.py`) of {r['n_eval']} decoded samples (labels "
        "0..9 in turn), average-pooled back to 8x8, against the digits' train split. The codec floor is the test "
        "split through encode + decode (it includes the 8 -> 16 -> 8 resampling, which blurs what the classifier "
        "sees).",
        "",
        "| model | NFE | FD | class accuracy |",
        "| --- | --- | --- | --- |",
        f"| codec floor (test images, encode + decode) | - | {r['codec_floor']['fd']:.2f} | - |",
        f"| teacher (Euler) | {TEACHER_STEPS} | {fd_t['fd']:.2f} | {fd_t['class_acc']:.3f} |",
    ]
    for nfe, m in fd_s.items():
        lines.append(f"| student (cd) | {nfe} | {m['fd']:.2f} | {m['class_acc']:.3f} |")
    e = r["encode"]
    lines += [
        "",
        f"Latent encode (one pass, batch {r['batch']}): {e['samples']} images in {e['seconds']:.2f} s = "
        f"**{e['samples_per_s']:.0f} samples/s**.",
        f"Training time: VAE {r['vae']['seconds']:.0f} s, teacher {r['teacher']['seconds']:.0f} s, student "
        f"{r['student']['seconds']:.0f} s.",
        "",
        f"## Peak memory per part (MiB, batch {mem['batch']})",
        "",
        f"Method: {mem['method']}. On the CPU these are resident-set figures (allocator and library overheads "
        "included), not GPU allocator figures; the weights column is parameters x bytes per element.",
        "",
        "| part | weights | peak of one call |",
        "| --- | --- | --- |",
        f"| VAE encode | {_mib(w['vae'])} | {_mib(mem['vae_encode'])} |",
        f"| VAE decode | {_mib(w['vae'])} | {_mib(mem['vae_decode'])} |",
        f"| teacher, guided velocity (2 passes), float32 | {_mib(w['teacher_fp32'])} | "
        f"{_mib(mem['teacher_cfg_fp32'])} |",
        f"| teacher, guided velocity, bfloat16 | {_mib(w['teacher_bf16'])} | {_mib(mem['teacher_cfg_bf16'])} |",
        f"| text encoder (random CLIP 512 x 6 layers, 77 tokens), float32 | {_mib(w['text_encoder_fp32'])} | "
        f"{_mib(mem['text_encoder_fp32'])} |",
        f"| text encoder, bfloat16 | {_mib(w['text_encoder_bf16'])} | {_mib(mem['text_encoder_bf16'])} |",
        f"| student training step (cd) | {_mib(w['teacher_fp32'])} | {_mib(mem['student_step'])} |",
        f"| student training step, activation checkpointing | {_mib(w['teacher_fp32'])} | "
        f"{_mib(mem['student_step_checkpointed'])} |",
        "",
        "The VAE and the text encoder run once, in the encode pass (`scripts/make_shards.py --encode ... "
        "[--prompts ...]`); distillation streams the shards and holds only the frozen teacher and the student "
        "(with its optimizer state and EMA copies).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main_guard(main)
