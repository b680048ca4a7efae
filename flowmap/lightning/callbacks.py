"""Callbacks: checkpoints whose last.ckpt is always the newest state, export the trained model after the final
checkpoint (rank 0 only), progressive distillation's rounds, and sample images every N steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from flowmap.io import remove_stale_temps
from flowmap.plotting import image_grid, panels_figure


class ProgressiveRounds(L.Callback):
    """Drives progressive distillation's rounds (Salimans & Ho 2022): before each batch, ``objective.advance``
    snapshots the student (with ``snapshot_halflife``: the module's EMA target network) as the next round's teacher
    when the global step enters a new round, and the round index and the student's step count N_r are logged. The
    objective holds the snapshot (so a resume restores it exactly); a pure-torch loop without callbacks gets the same
    schedule from the objective's own ``advance`` call in ``forward``, which is a no-op once this callback has run for
    the step."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        objective = pl_module.objective
        step = int(trainer.global_step)
        objective.advance(pl_module.student, step, getattr(pl_module, "target", None))
        pl_module.log("train/pd_round", float(objective.rounds(step)), on_step=True, on_epoch=False)
        pl_module.log("train/pd_student_steps", float(objective.current_steps(step)), on_step=True, on_epoch=False)


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the newest state, whatever ``every_n_train_steps`` was:

    - it is written at the end of training also when the last step falls between two periodic saves;
    - it is overwritten in place, never versioned (``last-v1.ckpt``), also when a resume changes the period (the
      callback's state key changes with it, so Lightning would not recognise the old file as its own);
    - at the start of a run, rank 0 removes the temporary files of checkpoint writes killed midway
      (``flowmap.io.remove_stale_temps``) in the checkpoint folder and in the run's root folder (``hpc_ckpt``).

    ``save_final`` is idempotent: ``ExportModel`` calls it before exporting, so a failing export keeps the weights."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        self._last_step_saved: int | None = None  # global step held by last.ckpt (written by this process)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and stage == "fit":
            for folder in {self.dirpath, trainer.default_root_dir}:
                if folder:
                    remove_stale_temps(folder, "*.ckpt")

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_saved = int(trainer.global_step)

    def save_final(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` with the current state unless it already holds this step (all ranks call it)."""
        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
        ):
            return
        if self._last_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            # the last step, saved where periodic saves are: a resume (with more steps) goes on exactly; the loop
            # state at on_train_end says the epoch is over, and a resume from it would start the next one
            self.save_final(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_final(trainer)  # runs that stop elsewhere (max_epochs, a stop set after the callbacks ran)


class ExportError(ValueError):
    """The export at the end of training failed; the message names the checkpoint that holds the trained weights."""


class ExportModel(L.Callback):
    """At the end of training, rank 0 writes ``pl_module.export(path)`` (safetensors + config).

    The final checkpoint is saved first (``LastCheckpoint.save_final``, on every rank), so an export that fails
    (a path that became unwritable during training) loses nothing: the error names the checkpoint to use."""

    def __init__(self, path: str, extra: dict | None = None) -> None:
        self.path = path
        self.extra = dict(extra or {})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and stage == "fit":
            remove_stale_temps(Path(self.path).parent, Path(self.path).name)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, LastCheckpoint)]
        for cb in saved:
            cb.save_final(trainer)
        if callable(getattr(pl_module, "unshard_for_export", None)):
            pl_module.unshard_for_export()  # FSDP: the EMA gathered from its shards (every rank)
        if not trainer.is_global_zero:
            return
        try:
            out = pl_module.export(self.path, **self.extra)
        except OSError as err:
            kept = ", ".join(cb.last_model_path for cb in saved if cb.last_model_path)
            kept = f"the trained weights are saved in {kept}" if kept else "no checkpoint holds the trained weights"
            raise ExportError(f"--export {self.path}: cannot write ({err}); {kept}") from None
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


__all__ = ["ExportError", "ExportModel", "LastCheckpoint", "SampleLogger", "image_grid"]
