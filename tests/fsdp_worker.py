"""Two CPU processes (gloo) for tests/test_fsdp.py: the same MeanFlow distillation of a small DiT, first under
Lightning's ``ddp`` strategy, then under ``flowmap.lightning.sharding.FSDPStrategy`` (FSDP2), from the same seed
and data, in one launch (later Trainers reuse the process group).

    python tests/fsdp_worker.py --out DIR [--steps 10] [--cases ddp,fsdp,fsdp_ckpt,fsdp_func]

Each case writes ``DIR/<case>/rank{r}.pt``: the per-step local losses, the first step's gradients (whole tensors),
the final student and EMA (whole tensors, gathered from the shards under FSDP), the initial state; rank 0 exports
and writes ``last.ckpt`` (Lightning's checkpoint, whole tensors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from flowmap.lightning.callbacks import ExportModel

B = 4  # per-rank batch
NET = {"name": "dit", "data_shape": [1, 8, 8], "patch": 2, "dim": 32, "depth": 2, "heads": 2}


def build_module(backend: str = "forward_ad"):
    from flowmap.lightning.distill_module import DistillModule

    objective = {"name": "meanflow", "source": "data", "equal_share": 0.0, "p": 0.0, "jvp_backend": backend}
    return DistillModule(student={"net": dict(NET)}, objective=objective, lr=1e-3, ema_decay=0.9)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] | None = None
        self.init_state: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.init_state = {n: full(p) for n, p in pl_module.student.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {n: full(p.grad) for n, p in pl_module.student.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def run_case(case: str, steps: int, out: Path) -> None:
    from flowmap.lightning.sharding import FSDPStrategy

    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, workers=True)
    module = build_module("func" if case.endswith("_func") else "forward_ad")
    x = torch.randn(2 * B * steps, *NET["data_shape"], generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x, torch.full((len(x),), -1, dtype=torch.long)), batch_size=B, drop_last=True)
    strategy = "ddp" if case == "ddp" else FSDPStrategy(activation_checkpointing=case == "fsdp_ckpt")
    rec = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[rec, ExportModel(str(out / "export.safetensors"))],
    )
    trainer.fit(module, train_dataloaders=data)
    trainer.save_checkpoint(out / "last.ckpt")  # every rank calls it; one whole-state file (rank 0 writes)
    torch.save(
        {
            "losses": rec.losses,
            "grads": rec.grads,
            "init_state": rec.init_state,
            "params": {n: full(p) for n, p in module.student.named_parameters()},
            "ema": {n: full(p) for n, p in module.ema.named_parameters()},
            "sharded": [type(p).__name__ for p in module.student.parameters()],
        },
        out / f"rank{trainer.global_rank}.pt",
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cases", default="ddp,fsdp")
    a = p.parse_args()
    for case in a.cases.split(","):
        run_case(case, a.steps, Path(a.out) / case)


if __name__ == "__main__":
    main()
