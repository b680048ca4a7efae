"""What every flowmap LightningModule shares: AdamW with warm-up, EMA updates after each step, a guard
that skips non-finite steps and stops after K in a row, gradient-norm logging, and RNG state in the
checkpoint (so a resumed run draws the same noise as an uninterrupted one)."""

from __future__ import annotations

import random
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from flowmap.ema import EMASchedule, ema_update
from flowmap.nonfinite import NonFiniteCounter, NonFiniteLossError, all_finite, guarded_step
from flowmap.optim import adam
from flowmap.schedule import LearningRate

__all__ = ["NonFiniteLossError", "TrainingMixin"]


class TrainingMixin:
    """Mixed into LightningModules (``class M(TrainingMixin, L.LightningModule)``) that define ``ema_pairs()`` and
    ``trainable_parameters()``. It owns the training hyperparameters: a module takes its own arguments and hands
    the rest to ``super().__init__(**training)`` (LightningCLI lists them as the module's own options)."""

    _guard: NonFiniteCounter | None = None  # the non-finite guard's device counters (``flowmap.nonfinite``)
    hparams_ignore: tuple[str, ...] = ()  # constructor arguments kept out of ``hparams`` (e.g. a teacher module)

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_decay: str = "none",
        lr_final_ratio: float = 0.05,
        ema_halflife: float = 0.1,
        ema_decay: float | None = None,
        max_nonfinite: int = 20,
        compile: bool = False,
    ) -> None:
        """Save every constructor argument of the module (these and the subclass's) as ``hparams``.

        Args:
            lr, betas, weight_decay, warmup_steps: AdamW with linear warm-up.
            lr_decay: none | cosine (to lr_final_ratio * lr at the last step, ``flowmap.schedule``).
            lr_final_ratio: the cosine's final learning rate as a fraction of lr.
            ema_halflife: half-life of the evaluation EMA of the trained network (the exported weights): steps, or
                a fraction of trainer.max_steps when < 1 (``flowmap.ema.EMASchedule``).
            ema_decay: a constant EMA decay instead of ema_halflife.
            max_nonfinite: stop with a clear error after this many non-finite steps in a row.
            compile: ``torch.compile`` the networks run each step (``flowmap.compiled``; forward-mode JVPs stay
                eager).
        """
        super().__init__()
        self.save_hyperparameters(ignore=list(self.hparams_ignore))  # Lightning collects the subclasses' too
        self.ema_schedule()  # checks ema_halflife / ema_decay

    def _counter(self) -> NonFiniteCounter:
        if self._guard is None:
            limit = int(self.hparams.max_nonfinite)
            trainer = getattr(self, "_trainer", None)
            every = min(limit, int(getattr(trainer, "log_every_n_steps", limit) or limit))
            self._guard = NonFiniteCounter(limit, every)
        return self._guard

    @property
    def nonfinite_in_a_row(self) -> int:
        return self._counter().in_a_row

    @property
    def nonfinite_total(self) -> int:
        return self._counter().total

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module, float]]:
        return []

    # --- sharded training (flowmap.lightning.sharding.FSDPStrategy; no-ops under other strategies) ------------
    _sharded: bool = False

    def configure_model(self) -> None:
        """Shard the networks under FSDPStrategy; with hparam ``compile``, compile what runs each step
        (``compiled_networks``) with ``flowmap.compiled.compile_net`` (forward-mode JVP passes stay eager)."""
        from flowmap.lightning.sharding import shard_networks

        shard_networks(self)
        if self.hparams.get("compile", False):
            from flowmap.compiled import compile_net

            for net in self.compiled_networks():
                compile_net(net)

    def compiled_networks(self) -> list[nn.Module]:
        """The networks ``compile: true`` compiles: the trained ones (the sources of ``ema_pairs``), their targets."""
        from flowmap.lightning.sharding import inner_net

        nets = [inner_net(source) for _, source, _ in self.ema_pairs()]
        nets += [inner_net(target) for target, _, _ in self.ema_pairs()[1:]]  # the first pair's is the evaluation EMA
        teacher_net = getattr(getattr(self, "_teacher", None), "net", None)  # a frozen network teacher (NetVelocity)
        return nets + ([teacher_net] if isinstance(teacher_net, nn.Module) else [])

    def unshard_for_export(self) -> None:
        """Replace a sharded EMA by a whole copy (a collective: every rank calls it, at the end of training)."""
        if self._sharded:
            from flowmap.lightning.sharding import gather_full

            self.ema = gather_full(self, self.ema)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def check_batch(self, x0: Tensor, cond: Tensor | None) -> None:
        shape = tuple(getattr(self, "data_shape", ()))
        if shape and tuple(x0.shape[1:]) != shape:
            raise ValueError(f"the data has shape {tuple(x0.shape[1:])} per sample, the model expects {shape}")
        if (
            isinstance(cond, Tensor) and cond.dim() == 1 and int(getattr(self, "num_classes", 0)) == 0
        ):  # labels (text: a TextCondition)
            raise ValueError("the data has class labels but the model is unconditional (num_classes=0)")

    # --- pre-flight: checked before anything is written (FlowmapCLI.preflight) -------------------------
    def check_data(self, datamodule) -> None:
        """Raise one ValueError when the data module's sample shape is not the network's."""
        data, mine = tuple(getattr(datamodule, "data_shape", ()) or ()), tuple(getattr(self, "data_shape", ()))
        if data and mine and data != mine:
            raise ValueError(
                f"the data ({type(datamodule).__name__}) has samples of shape {data}, the network expects {mine}; "
                "change the data or the net's data_shape"
            )

    def check_resume(self, checkpoint: dict) -> str | None:
        """Raise one ValueError when ``checkpoint`` comes from another module kind or method; subclasses may
        return a note to print when the checkpoint is resumed (called by the pre-flight and on load)."""
        stored, mine = checkpoint.get("flowmap_run"), self.run_identity()
        if stored is not None and stored != mine:

            def say(d: dict) -> str:
                return d.get("method") or d.get("kind", "?")

            raise ValueError(
                f"--resume: the checkpoint comes from a {say(stored)!r} run, this run is configured for {say(mine)!r}; "
                "resume with the same method and module, or start a new --run_dir"
            )
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            raise ValueError(
                "--resume: the checkpoint has no Lightning 'state_dict'; give a checkpoint of a flowmap run"
            )
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        shapes = [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
        ]
        if missing or shapes:  # (extra tensors may be state a module rebuilds on load, e.g. a round's teacher)
            found = (("missing", missing), ("shape mismatch", shapes))
            parts = [f"{name} {items[:3]}{' ...' if len(items) > 3 else ''}" for name, items in found if items]
            raise ValueError(
                f"--resume: the checkpoint does not fit this run's networks ({'; '.join(parts)}); "
                "resume with the configuration the run was started with, or start a new --run_dir"
            )
        return None

    def configure_optimizers(self):
        hp = self.hparams
        params = self.trainable_parameters()  # ``adam`` keeps those that require grad
        # the fused kernel unscales inside step(): Lightning's GradScaler path (16-mixed) clips before that
        trainer = getattr(self, "_trainer", None)  # None outside a Trainer (``self.trainer`` would raise)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        opt = adam(
            params,
            lr=hp.lr,
            betas=tuple(hp.betas),
            weight_decay=hp.weight_decay,
            decoupled=True,
            fused=False if scaler is not None else None,
        )
        decay = getattr(hp, "lr_decay", "none")
        total = int(getattr(trainer, "max_steps", -1) or -1)
        if decay not in ("none", "cosine"):
            raise ValueError(f"lr_decay must be 'none' or 'cosine', got {decay!r}")
        if decay == "cosine" and total <= 0:
            raise ValueError("lr_decay='cosine' needs trainer.max_steps")
        # warm-up, then (cosine) a half-cosine to lr_final_ratio * lr at the last step: ``flowmap.schedule``
        final = hp.lr * float(hp.get("lr_final_ratio", 0.05)) if decay == "cosine" else None
        sched = LearningRate(opt, hp.lr, total if decay == "cosine" else None, max(int(hp.warmup_steps), 0), final)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Run forward/backward, then update only if every gradient and the loss are finite (DDP averages
        gradients before this point, so all ranks take the same decision): ``flowmap.nonfinite``, the guard
        ``flowmap.training.TrainLoop`` runs too. The host reads the counters every min(max_nonfinite,
        log_every_n_steps) steps and stops once ``max_nonfinite`` steps in a row were skipped."""
        loss = optimizer_closure() if optimizer_closure is not None else None
        finite = all_finite(loss, self.trainable_parameters(), self.device)
        on_device = guarded_step(optimizer, finite)
        if on_device or bool(finite):  # here, not in on_train_batch_end: a checkpoint saved there would miss it
            self.update_emas(finite if on_device else None)
        counts = self._counter().update(finite, self.global_step)
        self.log("train/skipped_steps", counts[1].float())

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().float().norm() for p in self.trainable_parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def ema_schedule(self) -> EMASchedule:
        """The evaluation EMA's decay per step from hparams ``ema_halflife`` (steps, or a fraction of
        trainer.max_steps) or an explicit ``ema_decay``."""
        hp = self.hparams
        trainer = getattr(self, "_trainer", None)
        total = int(getattr(trainer, "max_steps", -1) or -1)
        return EMASchedule(
            halflife=float(hp.get("ema_halflife", 0.1)),
            total_steps=total if total > 0 else None,
            decay=None if hp.get("ema_decay") is None else float(hp.get("ema_decay")),
        )

    def update_emas(self, active: Tensor | None = None) -> None:
        """EMA / target updates after each optimizer step (Lightning calls callbacks such as ModelCheckpoint
        before the module's own on_train_batch_end, so updating there would leave the step's update out of
        the checkpoint and break exact resume). ``active``: 0-d bool tensor, false for a skipped step."""
        for target, source, decay in self.ema_pairs():
            ema_update(target, source, decay(self.global_step) if callable(decay) else float(decay), active)

    # --- exact resume: RNG and guard counters travel with the checkpoint ----------------------------
    def on_fit_start(self) -> None:
        """Give each DDP rank its own noise stream (seed_everything seeds every rank alike, so ranks would
        otherwise draw the same times and noise for different data)."""
        world = int(getattr(self.trainer, "world_size", 1) or 1)
        if world > 1 and getattr(self, "_pending_rng", None) is None:
            torch.manual_seed(torch.initial_seed() + 1_000_003 * int(self.trainer.global_rank))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # every rank's torch RNG state (called on all ranks; rank 0 writes the gathered copy)
        own = torch.get_rng_state()
        world = int(getattr(getattr(self, "trainer", None), "world_size", 1) or 1)
        all_states = self.all_gather(own.to(self.device)).cpu() if world > 1 else own[None]
        checkpoint["flowmap_run"] = self.run_identity()
        checkpoint["flowmap_rng"] = {
            "torch": own,
            "torch_per_rank": all_states,
            "numpy": _numpy_state_to_torch(np.random.get_state()),
            "python": random.getstate(),
            "nonfinite": (self.nonfinite_in_a_row, self.nonfinite_total),
        }

    def run_identity(self) -> dict:
        """What a checkpoint of this run must match to be resumed by it (the module kind; the method)."""
        return {"kind": type(self).__name__}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning calls this before it loads the state dict: refuse another module kind or method with one line
        note = self.check_resume(checkpoint)
        trainer = getattr(self, "_trainer", None)
        if note and (trainer is None or trainer.is_global_zero):
            print(note, flush=True)
        state = checkpoint.get("flowmap_rng")
        if state is None:
            return
        self._pending_rng = state

    def on_train_start(self) -> None:
        state = getattr(self, "_pending_rng", None)
        if state is not None:
            per_rank = state.get("torch_per_rank")
            rank = int(getattr(self.trainer, "global_rank", 0))
            torch.set_rng_state(
                per_rank[rank].clone() if per_rank is not None and rank < len(per_rank) else state["torch"]
            )
            np.random.set_state(_numpy_state_from_torch(state["numpy"]))
            random.setstate(state["python"])
            self._counter().set(*state["nonfinite"])
            self._pending_rng = None


def _numpy_state_to_torch(state: tuple) -> dict:
    """numpy's RNG state without numpy arrays (checkpoints load with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_torch(state: dict) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"])
