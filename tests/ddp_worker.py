"""A two-process DDP run on CPU (gloo) for tests/test_ddp.py; launched as a script because Lightning's
``ddp`` strategy starts the other ranks by running the same command again.

    python tests/ddp_worker.py --case meanflow --out DIR [--shards DIR]
    python tests/ddp_worker.py --case teacher,cd,pd --out DIR --shards DIR   # several fits, one launch

Each rank writes ``rank{r}.pt`` holding its gradients after the first backward, the indices (or the
samples) of the batches it saw, its batch count, and its final parameters; rank 0 exports once.
With several comma-separated cases the two processes run them one after the other (Lightning's launcher
starts the second rank once; later Trainers reuse the process group) and write into ``DIR/<case>/``:
one launch instead of one per case, which is most of the cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from flowmap.lightning.callbacks import ExportModel  # noqa: E402

B = 8  # per-rank batch
N = 64  # samples in the in-memory set


NET = {"name": "mlp", "data_shape": [2], "width": 32, "depth": 2, "emb_dim": 32}


def student_config() -> dict:
    return {"net": dict(NET)}


def objective_config(case: str) -> dict:
    return {
        "meanflow": {"name": "meanflow"},  # the default JVP backend, forward_ad
        "meanflow_func": {"name": "meanflow", "jvp_backend": "func"},
        "scd": {"name": "scd"},
        "cd": {"name": "cd"},
        "pd": {"name": "pd"},
        "shortcut": {"name": "shortcut"},
        "ayf_lmd": {"name": "ayf_lmd"},
        "ctm": {"name": "ctm"},
    }.get(case, {"name": case})  # any other registered method with its defaults


def make_teacher():
    from teachers import preset_mixture

    return preset_mixture("grid4")


def make_data(seed: int = 0) -> torch.Tensor:
    return make_teacher().sample(N, generator=torch.Generator().manual_seed(seed)).float()


def build_module(case: str) -> L.LightningModule:
    if case == "teacher":
        from flowmap.lightning.teacher_module import TeacherModule

        return TeacherModule(net=dict(NET), lr=1e-3, ema_decay=0.9)
    from flowmap.lightning.distill_module import DistillModule

    return DistillModule(
        student=student_config(), objective=objective_config(case), teacher=make_teacher(), lr=1e-3, ema_decay=0.9
    )


class Recorder(L.Callback):
    """Keeps the first step's gradients, the batches seen and their count."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None
        self.batches: list[torch.Tensor] = []
        self.rng: torch.Tensor | None = None
        self.init_params: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.init_params = {n: p.detach().cpu().clone() for n, p in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.batches.append(x.detach().cpu().clone())
        if self.rng is None:
            self.rng = torch.get_rng_state()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.grad is not None
            }


class IndexedData(L.LightningDataModule):
    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x

    def train_dataloader(self):
        y = torch.full((len(self.x),), -1, dtype=torch.long)
        return DataLoader(TensorDataset(self.x, y), batch_size=B, shuffle=False, drop_last=True)


def run_case(case: str, a: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, workers=True)
    module = build_module(case)
    if a.shards:
        from flowmap.lightning.streaming import ShardDataModule

        data = ShardDataModule(
            root=a.shards, batch_size=B, epoch_length=a.steps, shuffle_buffer=0, num_workers=0, seed=0, split="by_rank"
        )
    else:
        data = IndexedData(make_data())
    rec = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=a.devices,
        strategy="ddp" if a.devices > 1 else "auto",
        max_steps=a.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec, ExportModel(str(out / "export.safetensors"))],
        default_root_dir=str(out),
        use_distributed_sampler=not a.shards,
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    torch.save(
        {
            "grads": rec.grads,
            "batches": rec.batches,
            "num_batches": len(rec.batches),
            "rng": rec.rng,
            "init_state": rec.init_params,
            "params": {n: p.detach().cpu().clone() for n, p in module.named_parameters()},
            "ema": {n: p.detach().cpu().clone() for n, p in module.ema.named_parameters()},
            "target": (
                {n: p.detach().cpu().clone() for n, p in module.target.named_parameters()}
                if getattr(module, "target", None) is not None
                else None
            ),
        },
        out / f"rank{rank}.pt",
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--case", required=True, help="one case, or several separated by commas (outputs in OUT/<case>/)")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", default=None)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--register", action="append", default=[], help="NAME=module:Class, an objective to register")
    a = p.parse_args()
    for spec in a.register:
        from flowmap.objectives import register_objective

        register_objective(*spec.split("=", 1), overwrite=True)
    cases = a.case.split(",")
    for case in cases:
        run_case(case, a, Path(a.out) / case if len(cases) > 1 else Path(a.out))


if __name__ == "__main__":
    main()
