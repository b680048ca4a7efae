"""Callbacks: export the trained model (rank 0 only), and log samples as images every N steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from flowmap.plotting import image_grid, panels_figure


class ProgressiveRounds(L.Callback):
    """Drives progressive distillation's rounds (Salimans & Ho 2022): before each batch, ``objective.advance``
    snapshots the student as the next round's teacher when the global step enters a new round, and the round
    index and the student's step count N_r are logged. The objective holds the snapshot (so a resume restores it
    exactly); a pure-torch loop without callbacks gets the same schedule from the objective's own ``advance``
    call in ``forward``, which is a no-op once this callback has run for the step."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        objective = pl_module.objective
        step = int(trainer.global_step)
        objective.advance(pl_module.student, step)
        pl_module.log("train/pd_round", float(objective.rounds(step)), on_step=True, on_epoch=False)
        pl_module.log("train/pd_student_steps", float(objective.current_steps(step)), on_step=True, on_epoch=False)


class ExportModel(L.Callback):
    """At the end of training, rank 0 writes ``pl_module.export(path)`` (safetensors + config)."""

    def __init__(self, path: str, extra: dict | None = None) -> None:
        self.path = path
        self.extra = dict(extra or {})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            out = pl_module.export(self.path, **self.extra)
            print(f"exported {out}")


class SampleLogger(L.Callback):
    """Every ``every_n_steps`` steps, draw ``n`` samples at each NFE in ``nfes`` and log them as one
    figure (2-D scatter or image grid) to the trainer's logger(s) and to ``<log_dir>/samples/``."""

    def __init__(self, every_n_steps: int = 1000, n: int = 1000, nfes: tuple[int, ...] = (1, 2), seed: int = 0) -> None:
        self.every_n_steps = every_n_steps
        self.n = n
        self.nfes = tuple(nfes)
        self.seed = seed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps != 0 or step == 0 or not trainer.is_global_zero:
            return
        self.log_samples(trainer, pl_module, step)

    @torch.no_grad()
    def log_samples(self, trainer, pl_module, step: int) -> None:
        panels = {}
        for nfe in self.nfes:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            cpu_state = torch.get_rng_state()
            try:
                x = pl_module.generate(self.n, nfe, generator=g)
            finally:
                torch.set_rng_state(cpu_state)
            panels[f"{nfe} NFE"] = x.float().cpu()
        fig = panels_figure(panels)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_dir / f"step{step:07d}.png", dpi=90)
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        import matplotlib.pyplot as plt

        plt.close(fig)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="samples", images=[image], step=step, caption=[", ".join(panels)])
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("samples", image, step, dataformats="HWC")


__all__ = ["ExportModel", "SampleLogger", "image_grid"]
